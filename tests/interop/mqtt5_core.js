#!/usr/bin/env node
// MQTT.js v5 scenarios for issue 7 faults 1, 2, 3, 6, 7, against a running broker.
//
//   node mqtt5_core.js SCENARIO PORT [HOST]      (MQTTJS_MODULE = path of the mqtt package)
//
// Prints one JSON object on stdout with what the scenario observed and exits 0, or
// {"error": ...} and exits 1.  Every wait is bounded: each step by STEP_MS, the whole
// run by TOTAL_MS.  The Python side (test_mqtt5_core_mqttjs.py) asserts on the result.
'use strict';

const path = require('path');

const mqtt = require(process.env.MQTTJS_MODULE || path.join(__dirname, 'node', 'node_modules', 'mqtt'));

const scenario = process.argv[2];
const port = Number(process.argv[3]);
const host = process.argv[4] || '127.0.0.1';   // argv[5]: a scenario's argument
const STEP_MS = 5000;
const TOTAL_MS = 25000;
const url = `mqtt://${host}:${port}`;
const run = Math.random().toString(16).slice(2, 10);
const open = new Set();

function done(result, code) {
  process.stdout.write(JSON.stringify(result) + '\n');
  for (const c of open) c.end(true);
  process.exit(code);
}

setTimeout(() => done({ error: `${scenario} did not finish in ${TOTAL_MS} ms` }, 1), TOTAL_MS);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Connect (MQTT 5, never reconnecting on its own); resolves [client, connack].
function connect(opts, onClient) {
  return within(STEP_MS, `connect ${opts.clientId}`, new Promise((resolve, reject) => {
    const client = mqtt.connect(url, { protocolVersion: 5, reconnectPeriod: 0,
      connectTimeout: STEP_MS, ...opts });
    open.add(client);
    if (onClient) onClient(client);
    client.once('connect', (connack) => resolve([client, connack]));
    client.once('error', reject);
  }));
}

// Collects every message a client receives.
function collect(client) {
  const got = [];
  client.on('message', (topic, payload, packet) => got.push({
    topic, payload: payload.toString(), qos: packet.qos, retain: packet.retain, dup: packet.dup,
    properties: packet.properties || {}, at: Date.now(),
  }));
  return got;
}

// Wait until pred() holds (polling every 20 ms), at most ms.
async function until(ms, what, pred) {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(20);
  }
}

// Messages received before a QoS 0 marker published on `topic` now (the marker excluded).
async function beforeMarker(pub, sub, got, topic) {
  const token = `marker-${Math.random()}`;
  await within(STEP_MS, 'marker publish', pub.publishAsync(topic, token));
  await until(STEP_MS, 'marker', () => got.some((m) => m.payload === token));
  const index = got.findIndex((m) => m.payload === token);
  return got.splice(0, index + 1).slice(0, index);
}

// The socket goes away without DISCONNECT (network loss as the broker sees it).
function drop(client) {
  open.delete(client);
  client.stream.destroy();
  client.end(true);
}

async function end(client) {
  open.delete(client);
  await within(STEP_MS, 'end', client.endAsync());
}

const scenarios = {
  // fault 1: will {Will Delay 0, User Property a=b}; a v5 subscriber; drop -> will arrives,
  // the expiry-0 session is gone, and a retained copy does not break later SUBSCRIBEs
  async willProperties() {
    const [sub] = await connect({ clientId: `sub-${run}` });
    const got = collect(sub);
    await sub.subscribeAsync(`w${run}/#`, { qos: 1 });
    const will = { topic: `w${run}/t`, payload: 'gone', qos: 1, retain: true,
      properties: { willDelayInterval: 0, userProperties: { a: 'b' } } };
    const [w1] = await connect({ clientId: `w1-${run}`, will });
    drop(w1);
    await until(STEP_MS, 'will', () => got.length > 0);
    const [again, connack] = await connect({ clientId: `w1-${run}`, clean: false });
    await end(again);
    const late = [];
    for (let i = 0; i < 2; i += 1) {
      const [l] = await connect({ clientId: `late${i}-${run}` });
      const lgot = collect(l);
      const granted = await within(STEP_MS, 'late subscribe', l.subscribeAsync(`w${run}/#`, { qos: 1 }));
      await until(STEP_MS, 'retained will', () => lgot.length > 0);
      late.push({ granted: granted.map((g) => g.qos), message: lgot[0] });
      await end(l);
    }
    return { will: got[0], sessionPresent: connack.sessionPresent, late };
  },

  // fault 2: Will Delay 1 s -> published about a second after the drop; a reconnect in
  // time cancels another client's will
  async willDelay() {
    const [sub] = await connect({ clientId: `sub-${run}` });
    const got = collect(sub);
    await sub.subscribeAsync(`wd${run}/#`, { qos: 1 });
    const delayed = { topic: `wd${run}/late`, payload: 'late', qos: 1, properties: { willDelayInterval: 1 } };
    const [w] = await connect({ clientId: `wd-${run}`, clean: false,
      properties: { sessionExpiryInterval: 60 }, will: delayed });
    const cancelled = { topic: `wd${run}/never`, payload: 'never', qos: 1, properties: { willDelayInterval: 1 } };
    const [c] = await connect({ clientId: `wc-${run}`, clean: false,
      properties: { sessionExpiryInterval: 60 }, will: cancelled });
    const dropped = Date.now();
    drop(w);
    drop(c);
    const early = await beforeMarker(sub, sub, got, `wd${run}/marker`);
    const [back, connack] = await connect({ clientId: `wc-${run}`, clean: false,
      properties: { sessionExpiryInterval: 60 } });
    await until(STEP_MS, 'delayed will', () => got.length > 0);
    const delayedWill = got.shift();
    await sleep(1200);   // past the cancelled will's delay
    const after = await beforeMarker(sub, sub, got, `wd${run}/marker2`);
    await end(back);
    return { early: early.map((m) => m.topic), resumed: connack.sessionPresent,
      delayed: delayedWill.payload, waitedMs: delayedWill.at - dropped,
      after: after.map((m) => m.topic) };
  },

  // fault 2 across a crash, phase 1: arm a 3 s will on a persistent session and drop
  async willArm() {
    const will = { topic: `wk${run}/t`, payload: 'durable', qos: 1, retain: true,
      properties: { willDelayInterval: 3 } };
    const [w] = await connect({ clientId: `wk-${run}`, clean: false,
      properties: { sessionExpiryInterval: 600 }, will });
    const dropped = Date.now();
    drop(w);
    await sleep(300);   // the broker sees the close and stores the pending will
    return { dropped, topic: will.topic };
  },

  // phase 2 (after the broker was killed and restarted): the will arrives on time
  async willCollect() {
    const topic = process.argv[5];
    let got;
    const [sub] = await connect({ clientId: `wsub-${run}` }, (c) => { got = collect(c); });
    await sub.subscribeAsync(topic, { qos: 1 });
    await until(STEP_MS + 3000, 'the delayed will', () => got.length > 0);
    return { payload: got[0].payload, at: got[0].at };
  },

  // fault 3: the s1 example (two 1 s and two 60 s messages, 3 s offline)
  async expiry() {
    const opts = { clientId: `s1-${run}`, clean: false, properties: { sessionExpiryInterval: 300 } };
    const [s1] = await connect(opts);
    await s1.subscribeAsync(`e${run}/#`, { qos: 1 });
    await end(s1);
    const [pub] = await connect({ clientId: `pub-${run}` });
    const intervals = [1, 1, 60, 60];
    for (let i = 0; i < intervals.length; i += 1) {
      await pub.publishAsync(`e${run}/${i}`, `m${i}`, { qos: 1,
        properties: { messageExpiryInterval: intervals[i] } });
    }
    await sleep(3000);
    let got;
    const [back, connack] = await connect(opts, (c) => { got = collect(c); });
    const before = await beforeMarker(pub, back, got, `e${run}/marker`);
    return { sessionPresent: connack.sessionPresent,
      messages: before.map((m) => ({ payload: m.payload, interval: m.properties.messageExpiryInterval })) };
  },

  // fault 6: 10 unacknowledged QoS 1 messages, resume with Receive Maximum 2: the resends
  // arrive with DUP, in order, all of them, while the client acknowledges slowly
  async receiveMaximum() {
    const id = `rm-${run}`;
    const first = [];
    const [s] = await connect({ clientId: id, clean: false, properties: { sessionExpiryInterval: 300 },
      // never acknowledged (MQTT.js emits 'message' only once acknowledged)
      customHandleAcks: (topic, message) => { first.push(message.toString()); } });
    await s.subscribeAsync(`rm${run}/#`, { qos: 1 });
    const [pub] = await connect({ clientId: `pub-${run}` });
    for (let i = 0; i < 10; i += 1) await pub.publishAsync(`rm${run}/x`, `${i}`, { qos: 1 });
    // MQTT.js handles one PUBLISH at a time until it is acknowledged: it saw one
    await until(STEP_MS, 'first publish', () => first.length >= 1);
    drop(s);
    let got;
    const [back, connack] = await connect({ clientId: id, clean: false,
      properties: { sessionExpiryInterval: 300, receiveMaximum: 2 },
      customHandleAcks: (topic, message, packet, ack) => setTimeout(() => ack(0), 30) },
    (c) => { got = collect(c); });
    await until(STEP_MS + 3000, 'all ten', () => got.length >= 10);
    return { sessionPresent: connack.sessionPresent,
      payloads: got.map((m) => m.payload), dups: got.map((m) => m.dup) };
  },

  // fault 7: the n1 example
  async noLocal() {
    let got;
    const [n1] = await connect({ clientId: `n1-${run}` }, (c) => { got = collect(c); });
    const granted = await n1.subscribeAsync({ [`t${run}/#`]: { qos: 0 }, [`t${run}/x`]: { qos: 1, nl: true } });
    await n1.publishAsync(`t${run}/x`, 'mine', { qos: 1 });
    const before = await beforeMarker(n1, n1, got, `t${run}/marker`);
    return { granted: granted.map((g) => g.qos), messages: before.map((m) => ({ payload: m.payload, qos: m.qos })) };
  },
};

(async () => {
  const f = scenarios[scenario];
  if (!f) return done({ error: `unknown scenario ${scenario}` }, 1);
  try {
    done({ scenario, result: await f() }, 0);
  } catch (e) {
    done({ error: String(e && e.stack ? e.stack : e) }, 1);
  }
})();
