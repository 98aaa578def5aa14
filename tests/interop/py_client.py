"""A Python `websockets` client, driven by tests/interop.rs.

    py_client.py URL [--ping-interval S] [--ping-timeout S] [--close CODE]

Connects with websockets' own keepalive on, sends three text messages and one
binary message and expects each back (the peer is an echo server), then
waits for a line on stdin ("close", or EOF) or for the connection to end.
On "close" it closes with CODE. Prints one line per step on stdout:

    ready
    received text <text> | received binary <hex>
    waiting
    closed <code received or none> <reason received>
    sent <code sent or none> <reason sent>
    error <what>

Bounded: gives up after --max-seconds (printing `error timeout`), and a
SIGALRM a few seconds later ends the process even if the event loop hangs.
"""

import argparse
import asyncio
import signal
import sys
import threading

from websockets.asyncio.client import connect


def say(line):
    print(line, flush=True)


def frame(close):
    if close is None:
        return "none", ""
    return str(close.code), close.reason


def stdin_lines(loop, queue):
    """Forwards stdin lines to `queue`; a daemon thread never blocks exit."""

    def pump():
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        loop.call_soon_threadsafe(queue.put_nowait, "eof")

    threading.Thread(target=pump, daemon=True).start()


async def run(args):
    commands = asyncio.Queue()
    stdin_lines(asyncio.get_running_loop(), commands)
    async with connect(
        args.url,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        close_timeout=2,
    ) as ws:
        say("ready")
        for i in range(3):
            await ws.send(f"hello-{i}")
            say(f"received text {await ws.recv()}")
        await ws.send(bytes([0, 1, 2, 255]))
        say(f"received binary {(await ws.recv()).hex()}")

        say("waiting")
        command = asyncio.ensure_future(commands.get())
        ended = asyncio.ensure_future(ws.wait_closed())
        await asyncio.wait({command, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not ended.done():
            command.result()  # "close" or "eof": either way, close now.
            await ws.close(args.close, "bye")
        command.cancel()
        await ws.wait_closed()
        say("closed %s %s" % frame(ws.protocol.close_rcvd))
        say("sent %s %s" % frame(ws.protocol.close_sent))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--ping-interval", type=float, default=0.2)
    parser.add_argument("--ping-timeout", type=float, default=1.0)
    parser.add_argument("--close", type=int, default=1000)
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
