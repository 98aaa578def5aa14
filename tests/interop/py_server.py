"""A Python `websockets` server for one connection, driven by tests/interop.rs.

    py_server.py MODE [--ping-interval S] [--ping-timeout S] [--hold S]
                      [--close CODE] [--reason TEXT] [--flood N]
                      [--close-timeout S]

Listens on 127.0.0.1 (a free port) with websockets' own keepalive on and
serves exactly one connection, then exits. MODE:

  echo   echoes messages for --hold seconds, reports what its keepalive saw,
         probes with one ping of its own, then closes with CODE / TEXT.
  flood  sends N text messages at once, then only waits for the connection
         to end (whatever its keepalive decides), printing the Close it
         starts sending, if it does.

Prints one line per step on stdout:

    listening <port>
    connected
    echoed <text>
    flooded <n>
    closing <code sent> <reason sent>
    keepalive-latency <seconds>      (0.0 until a keepalive pong came back)
    probe-pong <seconds>
    closed <code received or none> <reason received>
    sent <code sent or none> <reason sent>
    error <what>

Bounded: gives up after --max-seconds, and a SIGALRM a few seconds later
ends the process even if the event loop hangs.
"""

import argparse
import asyncio
import signal
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State


def say(line):
    print(line, flush=True)


def frame(close):
    if close is None:
        return "none", ""
    return str(close.code), close.reason


async def echo(ws, args):
    try:
        async with asyncio.timeout(args.hold):
            async for message in ws:
                await ws.send(message)
                say(f"echoed {message}")
    except TimeoutError:
        pass
    except ConnectionClosed:
        return  # reported by the caller
    if ws.protocol.close_rcvd or ws.protocol.close_sent:
        return
    say(f"keepalive-latency {ws.latency:.6f}")
    pong = await ws.ping(b"probe")
    say(f"probe-pong {await asyncio.wait_for(pong, 2):.6f}")
    await ws.close(args.close, args.reason)


async def flood(ws, args):
    for i in range(args.flood):
        await ws.send(f"flood-{i}")
    say(f"flooded {args.flood}")
    # Report the moment our keepalive (or anything else) starts the close.
    while ws.protocol.close_sent is None and ws.state is not State.CLOSED:
        await asyncio.sleep(0.02)
    if ws.protocol.close_sent is not None:
        say("closing %s %s" % frame(ws.protocol.close_sent))
    await ws.wait_closed()


async def run(args):
    done = asyncio.get_running_loop().create_future()

    async def handler(ws):
        say("connected")
        try:
            await (echo if args.mode == "echo" else flood)(ws, args)
            await ws.wait_closed()
        finally:
            say("closed %s %s" % frame(ws.protocol.close_rcvd))
            say("sent %s %s" % frame(ws.protocol.close_sent))
            if not done.done():
                done.set_result(None)

    async with serve(
        handler,
        "127.0.0.1",
        0,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        close_timeout=args.close_timeout,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        say(f"listening {port}")
        await done


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["echo", "flood"])
    parser.add_argument("--ping-interval", type=float, default=0.3)
    parser.add_argument("--ping-timeout", type=float, default=1.0)
    parser.add_argument("--hold", type=float, default=2.5)
    parser.add_argument("--close", type=int, default=1011)
    parser.add_argument("--reason", default="keepalive ping timeout")
    parser.add_argument("--flood", type=int, default=64)
    parser.add_argument("--close-timeout", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=15.0)
    args = parser.parse_args()
    signal.alarm(int(args.max_seconds) + 5)
    try:
        asyncio.run(asyncio.wait_for(run(args), args.max_seconds))
    except asyncio.TimeoutError:
        say("error timeout")
        sys.exit(2)
    except Exception as e:  # reported to the test, which prints it
        say(f"error {type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
