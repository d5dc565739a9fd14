// Connect with MQTT.js using a user name and password; print what the broker answered.
// usage: node mqttjs_auth.js PORT HOST PROTOCOL_VERSION [USERNAME PASSWORD]
// prints one JSON line: {"connected": true, "code": 0} or {"connected": false, "code": N}
const mqtt = require(process.env.MQTTJS_MODULE);
const [port, host, version, username, password] = process.argv.slice(2);
const options = { host, port: Number(port), protocolVersion: Number(version), reconnectPeriod: 0,
                  connectTimeout: 5000, clientId: `js-auth-${process.pid}` };
if (username !== undefined) { options.username = username; options.password = password; }
const client = mqtt.connect(options);
let finished = false;
function done(result) {
  if (finished) return;
  finished = true;
  console.log(JSON.stringify(result));
  client.end(true, () => process.exit(0));
  setTimeout(() => process.exit(0), 1000);
}
client.on('connect', (ack) => done({ connected: true, code: ack.reasonCode || ack.returnCode || 0 }));
client.on('error', (err) => done({ connected: false, code: err.code }));
setTimeout(() => done({ connected: false, timeout: true }), 8000);
