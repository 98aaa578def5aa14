"""Turns benches/run's results.jsonl into the markdown tables of
docs/benchmarks.md, with ratios to the baselines of the same run.

(a) = raw tokio-tungstenite, no heartbeat; (b) = hand-written interval
heartbeat, default config; (c) = ws-supervisor with its defaults.
"""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]


def find(scenario, kind, **kw):
    """The run matching; for repeated runs, the one with the median CPU."""
    found = [r for r in rows
             if r["scenario"] == scenario and r["kind"] == kind and all(r.get(k) == v for k, v in kw.items())]
    if not found:
        return None
    key = "cpu_us_per_heartbeat" if scenario == "idle" else None
    if key and all(r.get(key) is not None for r in found):
        found.sort(key=lambda r: r[key])
    return found[len(found) // 2]


def ratio(x, y):
    return f"{x / y:.2f}x" if x is not None and y not in (None, 0) else "n/a"


print("### Idle connections (1 s ping interval, 1 s pong timeout; server on one core; median of repeats)\n")
print("| N | server | RSS/conn (KiB) | vs (a) | vs (b) | CPU/heartbeat (us) | vs (b) | wrongly closed |")
print("|---|---|---|---|---|---|---|---|")
for n in sorted({r["conns"] for r in rows if r["scenario"] == "idle"}):
    a, b, c = (find("idle", k, conns=n) for k in ("raw", "handwritten", "supervisor"))
    for label, r in (("(a) raw", a), ("(b) hand-written", b), ("(c) ws-supervisor", c)):
        if r is None:
            continue
        cpu = r["cpu_us_per_heartbeat"]
        print(
            f"| {n} | {label} | {r['rss_per_conn_kib']:.2f} | {ratio(r['rss_per_conn_kib'], a and a['rss_per_conn_kib'])} "
            f"| {ratio(r['rss_per_conn_kib'], b and b['rss_per_conn_kib'])} | {cpu if cpu is not None else '-'} "
            f"| {ratio(cpu, b and b['cpu_us_per_heartbeat']) if cpu is not None else '-'} | {r['wrongly_closed']} |"
        )

print("\n### Detection (1000 connections, 100 go silent; 1 s interval, 1 s timeout)\n")
print("| server | detected | p50 (ms) | p99 (ms) | max (ms) | false kills |")
print("|---|---|---|---|---|---|")
for label, kind in (("(b) hand-written", "handwritten"), ("(c) ws-supervisor", "supervisor")):
    r = find("detection", kind)
    if r:
        print(f"| {label} | {r['detected']}/{r['silent']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['false_kills']} |")

print("\n### Echo (64 connections x 128-byte messages, closed loop; heartbeats on for (c))\n")
print("| server | round trips/s | vs (a) | server CPU/round trip (us) |")
print("|---|---|---|---|")
a = find("echo", "raw")
for label, kind in (("(a) raw", "raw"), ("(c) ws-supervisor", "supervisor")):
    r = find("echo", kind)
    if r:
        print(f"| {label} | {r['round_trips_per_s']:.0f} | {ratio(r['round_trips_per_s'], a and a['round_trips_per_s'])} | {r['cpu_us_per_round_trip']:.2f} |")

f = find("pingfloor", "raw")
if f:
    print(f"\nFloor reference: a raw tokio-tungstenite server that only answers client pings costs "
          f"{f['cpu_us_per_exchange']:.1f} us of server CPU per ping/pong exchange ({f['conns']} connections).")
