// Minimal aedes server for bench/run: default options, in-memory persistence.
// usage: node aedes-server.js --port P [--host 127.0.0.1] [--ready-file PATH] [--modules DIR]
// DIR is the folder holding node_modules/ (bench/.peers/aedes); aedes 1.x is ESM, so we
// resolve it from there and import it by file URL (NODE_PATH does not apply to ESM).
'use strict'
const net = require('net')
const fs = require('fs')
const path = require('path')
const { createRequire } = require('module')
const { pathToFileURL } = require('url')

function arg (name, dflt) {
  const i = process.argv.indexOf('--' + name)
  return i > 0 ? process.argv[i + 1] : dflt
}

async function main () {
  const host = arg('host', '127.0.0.1')
  const port = parseInt(arg('port', '1883'), 10)
  const ready = arg('ready-file', null)
  const modules = path.resolve(arg('modules', path.join(__dirname, '..', '.peers', 'aedes')))
  const req = createRequire(path.join(modules, 'package.json'))
  const { Aedes } = await import(pathToFileURL(req.resolve('aedes')).href)
  const broker = await Aedes.createBroker()
  const server = net.createServer(broker.handle)
  server.listen(port, host, () => {
    if (ready) {
      const tmp = ready + '.tmp'
      fs.writeFileSync(tmp, JSON.stringify({ pid: process.pid, listeners: [{ host, port }] }))
      fs.renameSync(tmp, ready)
    }
  })
  const stop = () => { server.close(); broker.close(() => process.exit(0)); setTimeout(() => process.exit(0), 2000).unref() }
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
}

main().catch((err) => { console.error(err); process.exit(1) })
