// node bench/ws_throughput.js URL N : one MQTT.js publisher -> one subscriber, QoS 0, 64-byte payloads.
// Prints {"url", "messages", "seconds", "per_second"}; driven by bench/websocket.py (MQTTJS_MODULE = the mqtt package).
'use strict';
const mqtt = require(process.env.MQTTJS_MODULE);
const url = process.argv[2]; const N = Number(process.argv[3] || 20000);
const payload = Buffer.alloc(64, 120);
const sub = mqtt.connect(url, { reconnectPeriod: 0 });
let got = 0, t0;
const timer = setTimeout(() => { console.log(JSON.stringify({ url, error: 'timeout', got })); process.exit(1); }, 60000);
sub.on('connect', () => sub.subscribe('bench/t', { qos: 0 }, () => {
  const pub = mqtt.connect(url, { reconnectPeriod: 0 });
  pub.on('connect', () => {
    t0 = process.hrtime.bigint();
    let i = 0;
    (function burst() {
      for (let k = 0; k < 500 && i < N; k++, i++) pub.publish('bench/t', payload, { qos: 0 });
      if (i < N) setImmediate(burst);
    })();
  });
}));
sub.on('message', () => {
  if (++got === N) {
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    console.log(JSON.stringify({ url, messages: N, seconds: +s.toFixed(3), per_second: Math.round(N / s) }));
    clearTimeout(timer); process.exit(0);
  }
});
