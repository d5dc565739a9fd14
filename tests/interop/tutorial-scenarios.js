// The reference tutorial's three scenarios, for MQTT.js in Node (tutorial.js) and in a
// browser (browser/tutorial.html): one copy of the logic, loaded by require() or <script>.
//
//   runTutorial(mqtt, {url, protocolVersion, connectOptions}) -> Promise<{self, talk, offline}>
//
// Every wait is bounded by STEP_MS; the caller bounds the whole run.
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.mqttdTutorial = factory();
}(typeof self !== 'undefined' ? self : this, function () {
  'use strict';

  const STEP_MS = 5000;

  function runTutorial(mqtt, { url, protocolVersion = 4, connectOptions = {} }) {
    const run = Math.random().toString(16).slice(2, 10);
    const open = new Set();

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
        const client = mqtt.connect(url, {
          protocolVersion, reconnectPeriod: 0, connectTimeout: STEP_MS, ...connectOptions, ...opts,
        });
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

    async function all() {
      try {
        const result = { protocolVersion };
        result.self = await selfMessage();
        result.talk = await talk();
        result.offline = await offline();
        return result;
      } finally {
        for (const c of open) c.end(true);
      }
    }

    return all();
  }

  return { runTutorial, STEP_MS };
}));
