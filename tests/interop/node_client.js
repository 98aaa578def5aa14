// A Node `ws` client, driven by tests/interop.rs (NODE_PATH points at the
// node_modules that .ci/interop-setup installed).
//
//     node node_client.js URL [CLOSE_CODE] [MAX_SECONDS]
//
// Sends three text messages and one binary message and expects each back
// (the peer is an echo server), then waits for a line on stdin ("close", or
// EOF) or for the connection to end. On "close" it closes with CLOSE_CODE.
// `ws` answers pings by itself and has no keepalive of its own. Prints one
// line per step on stdout:
//
//     ready
//     received text <text> | received binary <hex>
//     waiting
//     pings <number of pings received>
//     closed <code received> <reason received>
//     error <what>
//
// Bounded: exits with status 2 after MAX_SECONDS (default 15) whatever happens.
'use strict';

const WebSocket = require('ws');

const url = process.argv[2];
const closeCode = Number(process.argv[3] || 1000);
const maxSeconds = Number(process.argv[4] || 15);

const say = (line) => process.stdout.write(line + '\n');

setTimeout(() => {
  say('error timeout');
  process.exit(2);
}, maxSeconds * 1000).unref();

const outgoing = [
  { text: 'hello-0' },
  { text: 'hello-1' },
  { text: 'hello-2' },
  { binary: Buffer.from([0, 1, 2, 255]) },
];
let next = 0;
let pings = 0;
let waiting = false;

const ws = new WebSocket(url);

function sendNext() {
  if (next < outgoing.length) {
    const m = outgoing[next++];
    ws.send(m.text !== undefined ? m.text : m.binary);
    return;
  }
  say('waiting');
  waiting = true;
}

ws.on('open', () => {
  say('ready');
  sendNext();
});

ws.on('message', (data, isBinary) => {
  if (isBinary) {
    say(`received binary ${Buffer.from(data).toString('hex')}`);
  } else {
    say(`received text ${data.toString()}`);
  }
  sendNext();
});

ws.on('ping', () => {
  pings += 1;
});

ws.on('error', (err) => say(`error ${err.message}`));

ws.on('close', (code, reason) => {
  say(`pings ${pings}`);
  say(`closed ${code} ${reason.toString()}`);
  process.exit(0);
});

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => {
  input += chunk;
  if (input.includes('\n')) closeNow();
});
process.stdin.on('end', closeNow);

function closeNow() {
  if (ws.readyState === WebSocket.OPEN) {
    if (!waiting) say('error close requested before the exchange finished');
    ws.close(closeCode, 'bye');
  }
}
