#!/usr/bin/env node
// The reference tutorial's three scenarios, with MQTT.js, against a running broker.
//
//   node tutorial.js PORT [HOST] [PROTOCOL_VERSION]
//   (or env MQTT_PORT, MQTT_HOST, MQTT_PROTOCOL_VERSION; MQTTJS_MODULE = path of the mqtt package)
//
// Prints one JSON object on stdout: {"mqttjs": version, "self": {...}, "talk": {...},
// "offline": {...}} and exits 0, or {"error": ...} and exits 1. Every wait is bounded:
// each step by STEP_MS, the whole run by TOTAL_MS.
'use strict';

const path = require('path');

const mqtt = require(process.env.MQTTJS_MODULE || path.join(__dirname, 'node', 'node_modules', 'mqtt'));
const mqttjsVersion = require(path.join(
  process.env.MQTTJS_MODULE || path.join(__dirname, 'node', 'node_modules', 'mqtt'), 'package.json')).version;

const port = Number(process.argv[2] || process.env.MQTT_PORT);
const host = process.argv[3] || process.env.MQTT_HOST || '127.0.0.1';
const protocolVersion = Number(process.argv[4] || process.env.MQTT_PROTOCOL_VERSION || 4);
const STEP_MS = 5000;
const TOTAL_MS = 20000;
const url = `mqtt://${host}:${port}`;
const run = Math.random().toString(16).slice(2, 10);
const open = new Set();

function done(result, code) {
  process.stdout.write(JSON.stringify(result) + '\n');
  for (const c of open) c.end(true);
  process.exit(code);
}

const overall = setTimeout(() => done({ error: `tutorial did not finish in ${TOTAL_MS} ms` }, 1), TOTAL_MS);

function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Connect and resolve with [client, connack]; never reconnect on its own.
// onClient(client) runs before the connection opens (to attach listeners early).
function connect(opts, onClient) {
  return within(STEP_MS, `connect ${opts.clientId || '(no id)'}`, new Promise((resolve, reject) => {
    const client = mqtt.connect(url, { protocolVersion, reconnectPeriod: 0, connectTimeout: STEP_MS, ...opts });
    open.add(client);
    if (onClient) onClient(client);
    client.once('connect', (connack) => resolve([client, connack]));
    client.once('error', reject);
    client.once('close', () => reject(new Error(`connection closed before CONNACK (${opts.clientId})`)));
  }));
}

function nextMessage(client, what) {
  return within(STEP_MS, what, new Promise((resolve) => {
    client.once('message', (topic, payload, packet) => resolve({
      topic, payload: payload.toString(), qos: packet.qos, retain: packet.retain,
    }));
  }));
}

function end(client) {
  open.delete(client);
  return within(STEP_MS, 'end', client.endAsync());
}

// (1) A client subscribes to a topic, publishes to it and receives its own message.
async function selfMessage() {
  const [client] = await connect({ clientId: `tut-self-${run}` });
  const topic = 'presence';
  await within(STEP_MS, 'subscribe', client.subscribeAsync(topic));
  const received = nextMessage(client, 'own message');
  await within(STEP_MS, 'publish', client.publishAsync(topic, 'Hello mqtt'));
  const msg = await received;
  await end(client);
  return msg;
}

// (2) Client A and client B talk through agreed topics.
async function talk() {
  const [a] = await connect({ clientId: `tut-A-${run}` });
  const [b] = await connect({ clientId: `tut-B-${run}` });
  await within(STEP_MS, 'A subscribe', a.subscribeAsync('clientB/says'));
  await within(STEP_MS, 'B subscribe', b.subscribeAsync('clientA/says'));
  const bGets = nextMessage(b, 'B waits for A');
  await within(STEP_MS, 'A publish', a.publishAsync('clientA/says', 'Hello from A'));
  const toB = await bGets;
  const aGets = nextMessage(a, 'A waits for B');
  await within(STEP_MS, 'B publish', b.publishAsync('clientB/says', 'Hello from B'));
  const toA = await aGets;
  await end(a);
  await end(b);
  return { toA, toB };
}

// (3) Offline: a persistent subscriber leaves; a QoS 1 retained message waits for it.
async function offline() {
  const clientId = `tut-offline-${run}`;
  const topic = `offline/${run}`;
  const durable = { clientId, clean: false };
  if (protocolVersion === 5) durable.properties = { sessionExpiryInterval: 300 };

  const [sub1, connack1] = await connect(durable);
  const granted = await within(STEP_MS, 'subscribe qos 1', sub1.subscribeAsync(topic, { qos: 1 }));
  await end(sub1);

  const [pub] = await connect({ clientId: `tut-pub-${run}` });
  await within(STEP_MS, 'publish qos 1 retained',
    pub.publishAsync(topic, 'Hello offline subscriber', { qos: 1, retain: true }));
  await end(pub);

  // The returning subscriber may get the message in the same read as CONNACK:
  // listen before the connection opens.
  let got;
  const [sub2, connack2] = await connect(durable, (c) => {
    got = nextMessage(c, 'queued message after reconnect');
  });
  const msg = await got;
  await end(sub2);
  return {
    firstSessionPresent: !!connack1.sessionPresent,
    granted: granted.map((g) => g.qos),
    sessionPresent: !!connack2.sessionPresent,
    message: msg,
  };
}

async function main() {
  if (!Number.isInteger(port) || port <= 0) {
    done({ error: 'usage: node tutorial.js PORT [HOST] [PROTOCOL_VERSION]' }, 1);
  }
  const result = { mqttjs: mqttjsVersion, protocolVersion };
  result.self = await selfMessage();
  result.talk = await talk();
  result.offline = await offline();
  clearTimeout(overall);
  done(result, 0);
}

main().catch((err) => done({ error: String(err && err.stack || err) }, 1));
