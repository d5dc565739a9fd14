#!/usr/bin/env node
// The reference tutorial's three scenarios, with MQTT.js, against a running broker.
//
//   node tutorial.js PORT [HOST] [PROTOCOL_VERSION]
//   (or env MQTT_PORT, MQTT_HOST, MQTT_PROTOCOL_VERSION; MQTTJS_MODULE = path of the mqtt package;
//    MQTT_URL = a full URL instead, e.g. ws://127.0.0.1:PORT/mqtt or wss://...;
//    MQTT_CAFILE = PEM file of the CA that signed a wss:/mqtts: server certificate)
//
// Prints one JSON object on stdout: {"mqttjs": version, "self": {...}, "talk": {...},
// "offline": {...}} and exits 0, or {"error": ...} and exits 1. Every wait is bounded:
// each step by STEP_MS (tutorial-scenarios.js), the whole run by TOTAL_MS.
'use strict';

const fs = require('fs');
const path = require('path');

const moduleDir = process.env.MQTTJS_MODULE || path.join(__dirname, 'node', 'node_modules', 'mqtt');
const mqtt = require(moduleDir);
const mqttjsVersion = require(path.join(moduleDir, 'package.json')).version;
const { runTutorial } = require('./tutorial-scenarios.js');

const port = Number(process.argv[2] || process.env.MQTT_PORT);
const host = process.argv[3] || process.env.MQTT_HOST || '127.0.0.1';
const protocolVersion = Number(process.argv[4] || process.env.MQTT_PROTOCOL_VERSION || 4);
const TOTAL_MS = 20000;
const url = process.env.MQTT_URL || `mqtt://${host}:${port}`;
const connectOptions = {};
if (process.env.MQTT_CAFILE) connectOptions.ca = fs.readFileSync(process.env.MQTT_CAFILE);

function done(result, code) {
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(code);
}

setTimeout(() => done({ error: `tutorial did not finish in ${TOTAL_MS} ms` }, 1), TOTAL_MS);

if (!process.env.MQTT_URL && (!Number.isInteger(port) || port <= 0)) {
  done({ error: 'usage: node tutorial.js PORT [HOST] [PROTOCOL_VERSION]' }, 1);
}

runTutorial(mqtt, { url, protocolVersion, connectOptions })
  .then((result) => done({ mqttjs: mqttjsVersion, url, ...result }, 0))
  .catch((err) => done({ error: String(err && err.stack || err) }, 1));
