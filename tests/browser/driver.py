"""Drives headless Chromium over raw CDP against a running ws-supervisor example.

Started by .ci/browser-interop, which owns every process (browser, HTTP
server, example) and cleans them up; this script only talks to them and, for
the last check, sends SIGINT to the example's PID that it is given.

Checks, in order, one fresh tab (and one server connection) at a time:
  1. text and binary echo from the page's WebSocket;
  2. the browser answers the supervisor's pings (pongs >= pings - 1, pings >= 2);
  3. ws.close(1000) from the page: the server says reason=normal initiator=remote;
  4. closing the tab: reason=going_away initiator=remote;
  5. SIGINT to the server: the page sees onclose 1001, wasClean; the server
     prints `shutdown: ...` and exits 0.

Prints one PASS/FAIL line per check and a final
`browser-interop: N passed, M failed`; exit status 0 only if all passed.
Needs the `websockets` package (>= 13, the asyncio client).
"""

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time

from websockets.asyncio.client import connect


def log(message):
    print(f"browser-interop: {message}", flush=True)


class CheckFailed(Exception):
    """A check's assertion failed; the text says what was expected and seen."""


# ===== CDP =====


class Cdp:
    """A minimal CDP client over one browser-level WebSocket (flat sessions)."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.pending = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                future = self.pending.pop(msg.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(msg)
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("CDP connection closed"))

    async def call(self, method, params=None, session=None, timeout=10.0):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send(json.dumps(msg))
        try:
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise CheckFailed(f"CDP {method} got no answer within {timeout} s") from None
        if "error" in reply:
            raise CheckFailed(f"CDP {method} failed: {reply['error']}")
        return reply.get("result", {})


class Tab:
    """One page target with an attached flat session."""

    def __init__(self, cdp, target, session):
        self.cdp, self.target, self.session = cdp, target, session

    @classmethod
    async def open(cls, cdp, url):
        target = (await cdp.call("Target.createTarget", {"url": url}))["targetId"]
        session = (await cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True}))[
            "sessionId"
        ]
        return cls(cdp, target, session)

    async def eval(self, expression, timeout=10.0):
        """Evaluates in the page (awaiting promises) and returns the JSON value."""
        result = await self.cdp.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=self.session,
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CheckFailed(f"page threw on `{expression}`: {text}")
        return result["result"].get("value")

    async def wait_for(self, expression, seconds, what):
        """Polls `expression` until truthy; fails after `seconds` with the page's events."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                value = await self.eval(expression, timeout=5.0)
            except CheckFailed:
                value = None  # the page may still be loading
            if value:
                return value
            if time.monotonic() >= deadline:
                events = await self.events()
                raise CheckFailed(f"{what}: not within {seconds} s; page events: {events}")
            await asyncio.sleep(0.05)

    async def events(self):
        try:
            return await self.eval("window.t ? JSON.stringify(t.events) : 'no page state'", 5.0)
        except CheckFailed as e:
            return f"(cannot read: {e})"

    async def close(self):
        await self.cdp.call("Target.closeTarget", {"targetId": self.target})


# ===== The server's output =====


class ServerLog:
    """Reads the example's stdout file; `closed` lines are counted as they come."""

    def __init__(self, path):
        self.path = path
        self.seen_closed = 0

    def lines(self):
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()

    def closed_lines(self):
        return [line for line in self.lines() if line.startswith("closed ")]

    async def next_closed(self, seconds, what):
        """Waits for the next unread `closed` line and returns its fields."""
        deadline = time.monotonic() + seconds
        while True:
            closed = self.closed_lines()
            if len(closed) > self.seen_closed:
                line = closed[self.seen_closed]
                self.seen_closed += 1
                fields = dict(re.findall(r"(\w+)=(\S+)", line))
                fields["_line"] = line
                return fields
            if time.monotonic() >= deadline:
                raise CheckFailed(
                    f"{what}: the server printed no new `closed` line within {seconds} s; "
                    f"its output so far:\n" + "\n".join(self.lines())
                )
            await asyncio.sleep(0.05)

    async def wait_line(self, pattern, seconds, what):
        deadline = time.monotonic() + seconds
        while True:
            for line in self.lines():
                if re.search(pattern, line):
                    return line
            if time.monotonic() >= deadline:
                raise CheckFailed(
                    f"{what}: no line matching /{pattern}/ within {seconds} s; "
                    f"server output:\n" + "\n".join(self.lines())
                )
            await asyncio.sleep(0.05)


def expect_close(fields, reason, initiator, what):
    got = (fields.get("reason"), fields.get("initiator"))
    if got != (reason, initiator):
        raise CheckFailed(
            f"{what}: server says reason={got[0]} initiator={got[1]}, "
            f"want reason={reason} initiator={initiator}: {fields['_line']}"
        )


def expect_pongs(fields, what):
    try:
        pings, pongs = int(fields["pings"]), int(fields["pongs"])
    except (KeyError, ValueError):
        raise CheckFailed(f"{what}: no pings=/pongs= in the closed line: {fields['_line']}") from None
    if pings < 2:
        raise CheckFailed(
            f"{what}: only {pings} ping(s) were sent while the tab was open "
            f"(want >= 2; is the ping interval short enough?): {fields['_line']}"
        )
    if pongs < pings - 1:
        raise CheckFailed(
            f"{what}: the browser answered {pongs} of {pings} pings "
            f"(want >= pings - 1): {fields['_line']}"
        )
    return f"{pings} pings, {pongs} pongs"


# ===== The checks =====


NAMES = {
    1: "text and binary echo",
    2: "the browser answers pings",
    3: "ws.close(1000) -> reason=normal initiator=remote (page: 1000, clean)",
    4: "closing the tab -> reason=going_away initiator=remote",
    5: "server shutdown -> onclose 1001 wasClean, reason=going_away initiator=local, exit 0",
}


async def run(args, results):
    """Runs the checks, filling `results` (check number -> None or the failure)."""
    pong_notes = []
    page = f"{args.page_url}?ws={args.ws_url}"
    server = ServerLog(args.server_log)
    # Long enough for several pings; the assertion on pings= then proves they happened.
    hold = max(1.0, 5 * args.ping_interval_ms / 1000)
    opened = 10.0  # seconds for a new tab to load and open its WebSocket

    def record(n, failure=None, note=""):
        results[n] = failure
        if failure is None:
            log(f"PASS {n}. {NAMES[n]}{f' ({note})' if note else ''}")
        else:
            log(f"FAIL {n}. {NAMES[n]}: {failure}")

    async with connect(args.cdp_url, max_size=None, open_timeout=10) as ws:
        cdp = Cdp(ws)
        version = await cdp.call("Browser.getVersion")
        log(f"browser: {version.get('product')}")

        # --- Tab A: echo, pings, then ws.close(1000) -----------------------
        tab = await Tab.open(cdp, page)
        try:
            await tab.wait_for("window.t && t.open", opened, "tab A: the WebSocket did not open")
            got = await tab.eval("echoText('héllo from the browser ✓', 5000)")
            if got != {"type": "text", "text": "héllo from the browser ✓"}:
                raise CheckFailed(f"text echo: sent 'héllo from the browser ✓', got {got}")
            got = await tab.eval("echoBinary(1000, 5000)")
            if not got.get("same"):
                raise CheckFailed(f"binary echo: sent 1000 bytes, got back {got}")
            record(1)
        except CheckFailed as e:
            record(1, str(e))
        try:
            await asyncio.sleep(hold)  # pings happen meanwhile; checked below
            await tab.eval("ws.close(1000, 'done'), true")
            closes = await tab.wait_for(
                "t.closes.length > 0 && t.closes", 10, "tab A: onclose after ws.close(1000)"
            )
            if closes[0].get("code") != 1000 or closes[0].get("wasClean") is not True:
                raise CheckFailed(f"ws.close(1000): the page's onclose is {closes[0]}, want 1000, clean")
            fields = await server.next_closed(10, "ws.close(1000)")
            pong_notes.append(("tab A", fields))
            expect_close(fields, "normal", "remote", "ws.close(1000)")
            record(3)
        except CheckFailed as e:
            record(3, str(e))
        finally:
            await tab.close()

        # --- Tab B: held open, then the tab is closed ----------------------
        try:
            tab = await Tab.open(cdp, page)
            await tab.wait_for("window.t && t.open", opened, "tab B: the WebSocket did not open")
            await asyncio.sleep(hold)
            await tab.close()
            fields = await server.next_closed(10, "closing the tab")
            pong_notes.append(("tab B", fields))
            expect_close(fields, "going_away", "remote", "closing the tab")
            record(4)
        except CheckFailed as e:
            record(4, str(e))

        # --- Check 2, from both closed lines -------------------------------
        try:
            if not pong_notes:
                raise CheckFailed("no closed line to read pings from (see checks 3 and 4)")
            notes = [f"{name}: {expect_pongs(fields, name)}" for name, fields in pong_notes]
            record(2, note="; ".join(notes))
        except CheckFailed as e:
            record(2, str(e))

        # --- Tab C: the server shuts down under it -------------------------
        try:
            tab = await Tab.open(cdp, page)
            await tab.wait_for("window.t && t.open", opened, "tab C: the WebSocket did not open")
            log(f"sending SIGINT to the server (pid {args.server_pid})")
            os.kill(args.server_pid, signal.SIGINT)
            closes = await tab.wait_for(
                "t.closes.length > 0 && t.closes", 15, "shutdown: the page's onclose"
            )
            close = closes[0]
            if close.get("code") != 1001 or close.get("wasClean") is not True:
                raise CheckFailed(
                    f"shutdown: the page's onclose has code={close.get('code')} "
                    f"wasClean={close.get('wasClean')}, want code=1001 wasClean=true: {close}"
                )
            await server.wait_line(r"^shutdown: ", 15, "shutdown: the server's summary")
            fields = await server.next_closed(10, "shutdown")
            expect_close(fields, "going_away", "local", "shutdown")
            status = await wait_status(args.server_status, 15)
            if status != 0:
                raise CheckFailed(f"shutdown: the server exited with status {status}, want 0")
            record(5, note=f"onclose {close}")
        except CheckFailed as e:
            record(5, str(e))


async def wait_status(path, seconds):
    """The example's exit status, which the launching shell writes to `path`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
            if text:
                return int(text)
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            raise CheckFailed(f"shutdown: the server did not exit within {seconds} s of SIGINT")
        await asyncio.sleep(0.05)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cdp-url", required=True, help="ws://127.0.0.1:PORT/devtools/browser/ID")
    p.add_argument("--page-url", required=True, help="http://127.0.0.1:PORT/index.html")
    p.add_argument("--ws-url", required=True, help="ws://127.0.0.1:PORT/ws")
    p.add_argument("--server-log", required=True, help="the example's stdout, as a file")
    p.add_argument("--server-pid", required=True, type=int, help="gets SIGINT for check 5")
    p.add_argument("--server-status", required=True, help="file the exit status is written to")
    p.add_argument("--ping-interval-ms", required=True, type=int)
    args = p.parse_args()
    results = {}
    began = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(run(args, results), 90))
    except (CheckFailed, OSError, asyncio.TimeoutError, ConnectionError) as e:
        # A failure outside any one check (CDP unreachable, overall deadline):
        # the checks that did not finish count as failed.
        log(f"aborted: {type(e).__name__}: {e}")
    for n in sorted(set(NAMES) - set(results)):
        log(f"FAIL {n}. {NAMES[n]}: not run (aborted)")
    passed = sum(1 for n in NAMES if n in results and results[n] is None)
    failed = len(NAMES) - passed
    log(f"{passed} passed, {failed} failed ({time.monotonic() - began:.1f} s in the browser)")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
