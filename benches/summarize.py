"""Turns benches/run's results.jsonl into the markdown tables of
docs/benchmarks.md, with ratios to the baselines of the same run.

(a) = raw tokio-tungstenite, no heartbeat; (b) = hand-written interval
heartbeat, default config; (c) = ws-supervisor with its defaults.

With `PATHS=1 benches/run`'s paths.jsonl, the "Ways in" tables instead:
each way in against `accept` (kind `supervisor`) of the same run, medians
of the interleaved repeats; the rustls settings against rustls's defaults;
the request path of the axum router.
"""
import json
import statistics
import sys

all_rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
# The main matrix passes no tag; the ways in tag every run.
rows = [r for r in all_rows if not r.get("tag")]


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


def ways_in(tagged):
    """The ways-in tables, from the runs tagged `paths R`, `tls R` and `path`."""
    ways = [r for r in tagged if r["tag"].startswith("paths ")]
    order = ["supervisor", "axum", "hyper", "tls", "supervise-default"]
    label = {"supervisor": "accept (TCP)", "axum": "axum extractor", "hyper": "hyper upgrade",
             "tls": "TLS (tokio-rustls) + accept", "supervise-default": "supervise, tungstenite defaults"}
    by_kind = {k: [r for r in ways if r["kind"] == k] for k in order}
    reps = sorted({r["tag"] for r in ways})
    n = ways[0]["conns"] if ways else 0
    recorder = "with the Prometheus recorder" if any("--recorder" in r["server_args"] for r in ways) else "no recorder"

    def med(runs, key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    acc = by_kind["supervisor"]
    rss0, cpu0 = med(acc, "rss_per_conn_kib"), med(acc, "cpu_us_per_heartbeat")
    print(f"### Ways in ({n} idle connections, 1 s ping interval, 1 s pong timeout; {recorder}; "
          f"server on one core; medians of {len(reps)} interleaved repeats)\n")
    print("| way in | RSS/conn (KiB) | vs accept | CPU/heartbeat (us) | vs accept | "
          "CPU vs accept, each repeat | wrongly closed |")
    print("|---|---|---|---|---|---|---|")
    for kind in order:
        runs = by_kind[kind]
        if not runs:
            continue
        rss, cpu = med(runs, "rss_per_conn_kib"), med(runs, "cpu_us_per_heartbeat")
        per_rep = []
        for tag in reps:
            mine = [r for r in runs if r["tag"] == tag]
            base = [r for r in acc if r["tag"] == tag]
            if mine and base:
                per_rep.append(mine[0]["cpu_us_per_heartbeat"] / base[0]["cpu_us_per_heartbeat"])
        spread = f"{min(per_rep):.2f}-{max(per_rep):.2f}x" if per_rep else "n/a"
        closed = max(r["wrongly_closed"] for r in runs)
        print(f"| {label[kind]} | {rss:.2f} | {ratio(rss, rss0)} | {cpu:.1f} | {ratio(cpu, cpu0)} "
              f"| {spread} | {closed} |")
    print("\nEach repeat, CPU/heartbeat (us), in run order:\n")
    for kind in order:
        if by_kind[kind]:
            values = ", ".join(f"{r['cpu_us_per_heartbeat']:.1f}" for r in by_kind[kind])
            print(f"- {label[kind]}: {values}")

    tls = [r for r in tagged if r["tag"].startswith("tls ")]
    if tls:
        def setting(r):
            s = " ".join(a for a in r["server_args"].split() if a != "--recorder")
            return s or "rustls defaults"
        settings = list(dict.fromkeys(setting(r) for r in tls))
        settings.sort(key=lambda s: s != "rustls defaults")
        base = [r for r in tls if setting(r) == "rustls defaults"]
        brss, bcpu = med(base, "rss_per_conn_kib"), med(base, "cpu_us_per_heartbeat")
        tls_reps = len({r["tag"] for r in tls})
        print(f"\n### TLS: what each rustls setting buys ({n} idle connections; medians of "
              f"{tls_reps} interleaved repeats)\n")
        print("| server setting | RSS/conn (KiB) | vs defaults | vs accept | CPU/heartbeat (us) "
              "| vs defaults | wrongly closed |")
        print("|---|---|---|---|---|---|---|")
        for s in settings:
            runs = [r for r in tls if setting(r) == s]
            rss, cpu = med(runs, "rss_per_conn_kib"), med(runs, "cpu_us_per_heartbeat")
            drss = f"{rss - brss:+.2f} KiB" if s != "rustls defaults" else "-"
            print(f"| `{s}` | {rss:.2f} | {drss} | {ratio(rss, rss0)} | {cpu:.1f} | {ratio(cpu, bcpu)} "
                  f"| {max(r['wrongly_closed'] for r in runs)} |")

    paths = [r for r in tagged if r["tag"] == "path"]
    if paths:
        print("\n### The request path (axum router with `/` and `/ws`)\n")
        print("| kind | path | connections | RSS/conn (KiB) | CPU/heartbeat (us) | wrongly closed |")
        print("|---|---|---|---|---|---|")
        for r in paths:
            print(f"| {r['kind']} | `{r['path']}` | {r['conns']} | {r['rss_per_conn_kib']:.2f} "
                  f"| {r['cpu_us_per_heartbeat']:.1f} | {r['wrongly_closed']} |")


tagged = [r for r in all_rows if r.get("tag")]
if tagged:
    ways_in(tagged)
if not rows:
    sys.exit(0)


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
