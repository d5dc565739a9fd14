#!/usr/bin/env node
// MQTT 5 features with MQTT.js against a running broker: shared subscriptions,
// subscription identifiers, topic aliases both ways, announced capabilities.
//
//   node mqtt5_features.js PORT HOST SCENARIO RUN_ID
//   (MQTTJS_MODULE = path of the mqtt package)
//
// SCENARIO is one of: connack, shared, ids, aliases, limits, prepare-restart, resume-restart.
// Prints one JSON object on stdout and exits 0, or {"error": ...} and exits 1.
// Every wait is bounded: each step by STEP_MS, the whole run by TOTAL_MS.
'use strict';

const path = require('path');

const mqtt = require(process.env.MQTTJS_MODULE || path.join(__dirname, 'node', 'node_modules', 'mqtt'));

const port = Number(process.argv[2]);
const host = process.argv[3] || '127.0.0.1';
const scenario = process.argv[4];
const run = process.argv[5] || Math.random().toString(16).slice(2, 10);
const STEP_MS = 5000;
const TOTAL_MS = 25000;
const url = `mqtt://${host}:${port}`;
const open = new Set();

function done(result, code) {
  process.stdout.write(JSON.stringify(result) + '\n');
  for (const c of open) c.end(true);
  process.exit(code);
}

const overall = setTimeout(() => done({ error: `${scenario} did not finish in ${TOTAL_MS} ms` }, 1), TOTAL_MS);

function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function connect(opts, onClient) {
  return within(STEP_MS, `connect ${opts.clientId}`, new Promise((resolve, reject) => {
    const client = mqtt.connect(url, {
      protocolVersion: 5, reconnectPeriod: 0, connectTimeout: STEP_MS, ...opts,
    });
    open.add(client);
    client.received = [];
    client.on('message', (topic, payload, packet) => client.received.push({
      topic,
      payload: payload.toString(),
      qos: packet.qos,
      retain: packet.retain,
      subscriptionIdentifier: packet.properties && packet.properties.subscriptionIdentifier,
      topicAlias: packet.properties && packet.properties.topicAlias,
    }));
    if (onClient) onClient(client);
    client.once('connect', (connack) => resolve([client, connack]));
    client.once('error', reject);
    client.once('close', () => reject(new Error(`connection closed before CONNACK (${opts.clientId})`)));
  }));
}

function end(client) {
  open.delete(client);
  return within(STEP_MS, 'end', client.endAsync());
}

// Wait until `clients` together received `count` messages (bounded).
function receivedCount(clients, count, what) {
  return within(STEP_MS, what, new Promise((resolve) => {
    const check = () => {
      const n = clients.reduce((sum, c) => sum + c.received.length, 0);
      if (n >= count) { resolve(n); return true; }
      return false;
    };
    if (check()) return;
    const timer = setInterval(() => { if (check()) clearInterval(timer); }, 10);
  }));
}

// A marker published after everything else: once each client has it, nothing else is coming.
async function settle(pub, clients, topic) {
  for (const c of clients) {
    await within(STEP_MS, 'subscribe marker', c.subscribeAsync(topic, { qos: 1 }));
  }
  await within(STEP_MS, 'publish marker', pub.publishAsync(topic, 'marker', { qos: 1 }));
  await within(STEP_MS, 'marker', Promise.all(clients.map((c) => new Promise((resolve) => {
    const check = () => c.received.some((m) => m.topic === topic);
    if (check()) return resolve();
    const timer = setInterval(() => { if (check()) { clearInterval(timer); resolve(); } }, 10);
  }))));
  return clients.map((c) => c.received.filter((m) => m.topic !== topic));
}

function props(connack) {
  return connack.properties || {};
}

async function connackScenario() {
  const [c, connack] = await connect({
    clientId: `js-connack-${run}`, properties: { requestResponseInformation: true },
  });
  await end(c);
  return { properties: props(connack) };
}

async function sharedScenario() {
  const share = `$share/js-${run}/jobs/#`;
  const members = [];
  for (const [i, protocolVersion] of [[0, 5], [1, 5], [2, 4]]) {
    const [m] = await connect({ clientId: `js-member-${i}-${run}`, protocolVersion });
    const granted = await within(STEP_MS, 'subscribe shared', m.subscribeAsync(share, { qos: 1 }));
    if (granted[0].qos !== 1) throw new Error(`shared subscribe granted ${JSON.stringify(granted)}`);
    members.push(m);
  }
  const [pub] = await connect({ clientId: `js-pub-${run}` });
  for (let i = 0; i < 6; i += 1) {
    await within(STEP_MS, 'publish', pub.publishAsync(`jobs/${i}`, `job ${i}`, { qos: 1 }));
  }
  const got = await settle(pub, members, `marker/${run}`);
  // No Local on a shared subscription is a protocol error: the broker disconnects
  const [bad] = await connect({ clientId: `js-bad-${run}` });
  const closed = within(STEP_MS, 'disconnect after No Local', new Promise((resolve) => {
    bad.once('disconnect', (packet) => resolve(packet.reasonCode));
  }));
  bad.subscribe(`$share/g/${run}`, { qos: 1, nl: true });
  const reasonCode = await closed;
  for (const m of members) await end(m);
  await end(pub);
  return { perMember: got.map((msgs) => msgs.map((m) => m.payload)), noLocalReasonCode: reasonCode };
}

async function idsScenario() {
  const [c] = await connect({ clientId: `js-ids-${run}` });
  await within(STEP_MS, 'subscribe 1', c.subscribeAsync(`ids/${run}/#`, { qos: 1, properties: { subscriptionIdentifier: 5 } }));
  await within(STEP_MS, 'subscribe 2', c.subscribeAsync(`ids/${run}/+`, { qos: 0, properties: { subscriptionIdentifier: 6 } }));
  await within(STEP_MS, 'publish', c.publishAsync(`ids/${run}/x`, 'both', { qos: 1 }));
  await within(STEP_MS, 'publish', c.publishAsync(`ids/${run}/x/y`, 'one', { qos: 1 }));
  await receivedCount([c], 2, 'two messages');
  await end(c);
  return { messages: c.received };
}

async function aliasesScenario() {
  // the subscriber lets the server use aliases; the publisher assigns its own
  const [sub] = await connect({ clientId: `js-alias-sub-${run}`, properties: { topicAliasMaximum: 2 } });
  await within(STEP_MS, 'subscribe', sub.subscribeAsync(`alias/${run}/#`, { qos: 1 }));
  const [pub, pubConnack] = await connect({ clientId: `js-alias-pub-${run}`, autoAssignTopicAlias: true });
  const topics = ['a', 'a', 'b', 'c', 'a', 'a'].map((t) => `alias/${run}/${t}`);
  for (const [i, topic] of topics.entries()) {
    await within(STEP_MS, 'publish', pub.publishAsync(topic, `m${i}`, { qos: 1 }));
  }
  await receivedCount([sub], topics.length, 'aliased messages');
  await end(sub);
  await end(pub);
  return { serverTopicAliasMaximum: props(pubConnack).topicAliasMaximum, messages: sub.received };
}

// A connection that the broker must refuse or close: resolves with the reason code seen
// (CONNACK refusal or DISCONNECT), never hangs (bounded by STEP_MS).
function refused(opts, action) {
  return within(STEP_MS, `refusal of ${opts.clientId}`, new Promise((resolve) => {
    const client = mqtt.connect(url, {
      protocolVersion: 5, reconnectPeriod: 0, connectTimeout: STEP_MS, ...opts,
    });
    open.add(client);
    client.once('disconnect', (packet) => resolve({ disconnect: packet.reasonCode }));
    client.once('error', (err) => resolve({ connack: err.code }));
    client.once('connect', () => { if (action) action(client); });
  }));
}

async function limitsScenario() {
  // broker started with --max-qos 1 --retain-available false
  const [c] = await connect({ clientId: `js-limits-${run}` });
  const granted = await within(STEP_MS, 'subscribe qos 2', c.subscribeAsync(`lim/${run}`, { qos: 2 }));
  await end(c);
  const retained = await refused({ clientId: `js-ret-${run}` },
    (client) => client.publish(`lim/${run}`, 'r', { qos: 0, retain: true }));
  const qos2 = await refused({ clientId: `js-qos2-${run}` },
    (client) => client.publish(`lim/${run}`, 'q', { qos: 2 }));
  const willQos = await refused({ clientId: `js-will-${run}`, will: { topic: `lim/${run}`, payload: 'w', qos: 2 } });
  const willRetain = await refused({ clientId: `js-willr-${run}`, will: { topic: `lim/${run}`, payload: 'w', qos: 0, retain: true } });
  return { granted: granted.map((g) => g.qos), retained, qos2, willQos, willRetain };
}

async function prepareRestart() {
  // a persistent member of a shared group with a subscription identifier, then away
  const [m] = await connect({ clientId: `js-durable-${run}`, clean: false, properties: { sessionExpiryInterval: 600 } });
  await within(STEP_MS, 'subscribe', m.subscribeAsync(`$share/dur/durable/${run}`, { qos: 1, properties: { subscriptionIdentifier: 42 } }));
  await within(STEP_MS, 'subscribe', m.subscribeAsync(`plain/${run}/#`, { qos: 1, properties: { subscriptionIdentifier: 43 } }));
  await end(m);
  return { ok: true };
}

async function resumeRestart() {
  const [m, connack] = await connect({ clientId: `js-durable-${run}`, clean: false, properties: { sessionExpiryInterval: 600 } });
  await receivedCount([m], 2, 'queued messages after restart');
  const [pub] = await connect({ clientId: `js-after-${run}` });
  await within(STEP_MS, 'publish', pub.publishAsync(`durable/${run}`, 'live', { qos: 1 }));
  await receivedCount([m], 3, 'live shared message after restart');
  await end(pub);
  await end(m);
  return { sessionPresent: !!connack.sessionPresent, messages: m.received };
}

const SCENARIOS = {
  connack: connackScenario,
  shared: sharedScenario,
  ids: idsScenario,
  aliases: aliasesScenario,
  limits: limitsScenario,
  'prepare-restart': prepareRestart,
  'resume-restart': resumeRestart,
};

async function main() {
  if (!Number.isInteger(port) || port <= 0 || !SCENARIOS[scenario]) {
    done({ error: `usage: node mqtt5_features.js PORT HOST (${Object.keys(SCENARIOS).join('|')}) [RUN]` }, 1);
  }
  const result = await SCENARIOS[scenario]();
  clearTimeout(overall);
  done(result, 0);
}

main().catch((err) => done({ error: String(err && err.stack || err) }, 1));
