"""Turns benches/run's results.jsonl into the markdown tables of
docs/benchmarks.md, with ratios to the baselines of the same run.

(a) = raw tokio-tungstenite, no heartbeat; (b) = hand-written interval
heartbeat, default config; (b') = the same with a 4 KiB read buffer
(`tuned`); floor = the cheapest per-connection heartbeat (plain tokio after
the handshake); ws-supervisor with its defaults and a recorder.

The default matrix tags its runs `idle R`, `echo R`, `mt-idle R`,
`mt-echo R` (R = the repeat) and `detection`: every column is the median
of the repeats with their spread (min-max), and every ratio leads with
(b'): median over (b')'s median, and in brackets the range of the
same-repeat ratios. Untagged rows (older runs) get the older tables.

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


LABEL = {"raw": "(a) raw", "handwritten": "(b) hand-written", "tuned": "(b′) tuned",
         "floor": "floor", "supervisor": "ws-supervisor",
         "inline": "ws-supervisor, `on_message`"}
MATRIX_TAGS = ("idle ", "echo ", "mt-idle ", "mt-echo ", "detection")


def threads(r):
    args = r.get("server_args", "").split()
    return int(args[args.index("--threads") + 1]) if "--threads" in args else 1


def spread(values, fmt):
    """`median (min-max)` of the values, or `-`."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.median(values)
    if len(values) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def med(runs, key):
    values = [r.get(key) for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def vs(runs, base, key):
    """Median over the base's median, and the range of same-repeat ratios."""
    m, b = med(runs, key), med(base, key)
    if m is None or not b:
        return "-"
    per = []
    for r in runs:
        same = [x for x in base if x["tag"] == r["tag"] and x.get(key)]
        if r.get(key) is not None and same:
            per.append(r[key] / same[0][key])
    text = f"{m / b:.2f}x"
    if len(per) > 1:
        text += f" [{min(per):.2f}–{max(per):.2f}]"
    return text


def matrix(runs):
    def pick(prefix, kind, **kw):
        return [r for r in runs if r["tag"].startswith(prefix) and r["kind"] == kind
                and all(r.get(k) == v for k, v in kw.items())]

    reps = len({r["tag"] for r in runs if r["tag"].startswith("idle ")})
    idle = [r for r in runs if r["tag"].startswith("idle ")]
    n = idle[0]["conns"] if idle else None
    echo_sizes = sorted({r["message_bytes"] for r in runs if r["scenario"] == "echo"})

    # The lead: the supervisor (and the floor) against (b') tuned.
    print(f"### Against (b′) tuned, same run (medians of {reps} interleaved repeats; "
          "[range of the same-repeat ratios])\n")
    print("| metric | (b′) tuned | ws-supervisor | supervisor / (b′) | floor / (b′) |")
    print("|---|---|---|---|---|")

    def lead(name, prefix, key, fmt, floor=True, kind="supervisor", **kw):
        t, s_, f = pick(prefix, "tuned", **kw), pick(prefix, kind, **kw), pick(prefix, "floor", **kw)
        if not t or not s_:
            return
        fl = vs(f, t, key) if floor and f else "-"
        print(f"| {name} | {spread([r.get(key) for r in t], fmt)} | {spread([r.get(key) for r in s_], fmt)} "
              f"| {vs(s_, t, key)} | {fl} |")

    lead(f"idle {n}: CPU/heartbeat (µs), 1 core", "idle ", "cpu_us_per_heartbeat", "{:.2f}")
    lead(f"idle {n}: RSS/conn (KiB), 1 core", "idle ", "rss_per_conn_kib", "{:.2f}")
    for b in echo_sizes:
        lead(f"echo 64 × {b} B: server CPU/round trip (µs), 1 core", "echo ", "cpu_us_per_round_trip",
             "{:.2f}", message_bytes=b)
        lead(f"echo 64 × {b} B: round trips/s, 1 core", "echo ", "round_trips_per_s", "{:.0f}",
             message_bytes=b)
        lead(f"echo 64 × {b} B, `on_message`: server CPU/round trip (µs), 1 core", "echo ",
             "cpu_us_per_round_trip", "{:.2f}", kind="inline", message_bytes=b)
        lead(f"echo 64 × {b} B, `on_message`: round trips/s, 1 core", "echo ", "round_trips_per_s",
             "{:.0f}", kind="inline", message_bytes=b)
    lead(f"idle {n}: CPU/heartbeat (µs), 2 workers, unpinned", "mt-idle ", "cpu_us_per_heartbeat", "{:.2f}")
    lead(f"idle {n}: RSS/conn (KiB), 2 workers, unpinned", "mt-idle ", "rss_per_conn_kib", "{:.2f}")
    for b in echo_sizes:
        lead(f"echo 64 × {b} B: server CPU/round trip (µs), 2 workers", "mt-echo ",
             "cpu_us_per_round_trip", "{:.2f}", message_bytes=b)
        lead(f"echo 64 × {b} B: round trips/s, 2 workers", "mt-echo ", "round_trips_per_s", "{:.0f}",
             message_bytes=b)
        lead(f"echo 64 × {b} B, `on_message`: server CPU/round trip (µs), 2 workers", "mt-echo ",
             "cpu_us_per_round_trip", "{:.2f}", kind="inline", message_bytes=b)
    det = {k: pick("detection", k) for k in ("tuned", "supervisor")}
    if det["tuned"] and det["supervisor"]:
        t, s_ = det["tuned"][0], det["supervisor"][0]
        print(f"| detection p99 (ms), false kills | {t['p99_ms']}, {t['false_kills']} "
              f"| {s_['p99_ms']}, {s_['false_kills']} | {ratio(s_['p99_ms'], t['p99_ms'])} | - |")

    kinds = ["raw", "handwritten", "tuned", "floor", "supervisor", "inline"]
    for prefix, title in (("idle ", "one core: server on CPU 0, load generator on CPU 1"),
                          ("mt-idle ", "server on a 2-worker multi_thread runtime, unpinned; "
                                       "the load generator shares the 2 cores")):
        sel = [r for r in runs if r["tag"].startswith(prefix)]
        if not sel:
            continue
        print(f"\n### Idle, {sel[0]['conns']} connections, I = T = 1 s ({title})\n")
        print("| server | RSS/conn (KiB) | vs (b′) | vs (b) | vs (a) | CPU/heartbeat (µs) | vs (b′) "
              "| vs (b) | server CPU (% of a core) | generator CPU (% of a core) | wrongly closed |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        base = {k: pick(prefix, k) for k in kinds}
        for k in kinds:
            rs = base[k]
            if not rs:
                continue
            print(f"| {LABEL[k]} | {spread([r['rss_per_conn_kib'] for r in rs], '{:.2f}')} "
                  f"| {vs(rs, base['tuned'], 'rss_per_conn_kib')} | {vs(rs, base['handwritten'], 'rss_per_conn_kib')} "
                  f"| {vs(rs, base['raw'], 'rss_per_conn_kib')} "
                  f"| {spread([r['cpu_us_per_heartbeat'] for r in rs], '{:.2f}')} "
                  f"| {vs(rs, base['tuned'], 'cpu_us_per_heartbeat')} "
                  f"| {vs(rs, base['handwritten'], 'cpu_us_per_heartbeat')} "
                  f"| {spread([r['cpu_ms'] / r['window_s'] / 10 for r in rs], '{:.0f}')} "
                  f"| {spread([r.get('gen_cpu_ms', 0) / r['window_s'] / 10 for r in rs], '{:.0f}')} "
                  f"| {max(r['wrongly_closed'] for r in rs)} |")

    for prefix, title in (("echo ", "one core: server on CPU 0, load generator on CPU 1"),
                          ("mt-echo ", "server on a 2-worker multi_thread runtime, unpinned; "
                                       "the load generator shares the 2 cores")):
        sel = [r for r in runs if r["tag"].startswith(prefix)]
        if not sel:
            continue
        print(f"\n### Echo, 64 connections, closed loop ({title})\n")
        print("| message | server | round trips/s | vs (b′) | vs (b) | server CPU/round trip (µs) "
              "| vs (b′) | vs (b) | server CPU (% of a core) | generator CPU (% of a core) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for b in echo_sizes:
            base = {k: pick(prefix, k, message_bytes=b) for k in kinds}
            for k in kinds:
                rs = base[k]
                if not rs:
                    continue
                print(f"| {b} B | {LABEL[k]} | {spread([r['round_trips_per_s'] for r in rs], '{:.0f}')} "
                      f"| {vs(rs, base['tuned'], 'round_trips_per_s')} "
                      f"| {vs(rs, base['handwritten'], 'round_trips_per_s')} "
                      f"| {spread([r['cpu_us_per_round_trip'] for r in rs], '{:.2f}')} "
                      f"| {vs(rs, base['tuned'], 'cpu_us_per_round_trip')} "
                      f"| {vs(rs, base['handwritten'], 'cpu_us_per_round_trip')} "
                      f"| {spread([r['cpu_ms'] / r['window_s'] / 10 for r in rs], '{:.0f}')} "
                      f"| {spread([r.get('gen_cpu_ms', 0) / r['window_s'] / 10 for r in rs], '{:.0f}')} |")

    det = [r for r in runs if r["tag"] == "detection"]
    if det:
        d = det[0]
        print(f"\n### Detection ({d['conns']} connections, {d['silent']} go silent; "
              f"I = {d['interval_ms']} ms, T = {d['timeout_ms']} ms; one run each)\n")
        print("| server | detected | p50 (ms) | p99 (ms) | max (ms) | false kills |")
        print("|---|---|---|---|---|---|")
        for k in kinds:
            for r in (x for x in det if x["kind"] == k):
                print(f"| {LABEL[k]} | {r['detected']}/{r['silent']} | {r['p50_ms']} | {r['p99_ms']} "
                      f"| {r['max_ms']} | {r['false_kills']} |")


tagged = [r for r in all_rows if r.get("tag")]
matrix_rows = [r for r in tagged if r["tag"].startswith(MATRIX_TAGS)]
paths_rows = [r for r in tagged if not r["tag"].startswith(MATRIX_TAGS)]
if paths_rows:
    ways_in(paths_rows)
if matrix_rows:
    matrix(matrix_rows)
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
