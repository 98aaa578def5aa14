"""Helpers for .ci/prometheus-e2e, standard library only.

  prometheus_check.py exposition HOST:PORT
      prints the demo's /metrics text (for `promtool check metrics`).
  prometheus_check.py queries HOST:PORT DASHBOARD.json
      waits (bounded) until `up` is 1, every panel query of the dashboard
      returns at least one finite sample (so quantiles and ratios have real
      traffic behind them, not NaN), and every loaded rule is healthy.
"""
import json
import math
import sys
import time
import urllib.parse
import urllib.request

DEADLINE_S = 120


def get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def exposition(addr):
    for _ in range(100):
        try:
            sys.stdout.write(get(f"http://{addr}/metrics"))
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"prometheus_check: no exposition at {addr}")


def substitute(expr):
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "1h"),
                       ("$job", ".*"), ("$instance", ".*")):
        expr = expr.replace(var, value)
    return expr


def query(addr, expr):
    url = f"http://{addr}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(get(url))
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def queries(addr, dashboard_path):
    dashboard = json.load(open(dashboard_path))
    targets = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            targets.append((f"variable {var['name']}", var["query"]["query"].replace("label_values(", "count by (job, instance) (").replace(", job)", ")").replace(", instance)", ")")))
    started = time.monotonic()
    pending = dict.fromkeys(targets)
    while True:
        try:
            up = query(addr, 'up{job="demo"}')
        except (OSError, RuntimeError):
            up = []
        if up and up[0]["value"][1] == "1":
            for title, expr in list(pending):
                try:
                    result = query(addr, substitute(expr))
                    if any(math.isfinite(float(r["value"][1])) for r in result):
                        del pending[(title, expr)]
                except RuntimeError as e:
                    sys.exit(f"prometheus_check: query error in '{title}': {e}")
        if not pending:
            break
        if time.monotonic() - started > DEADLINE_S:
            for title, expr in pending:
                print(f"NO DATA  {title}: {substitute(expr)}", file=sys.stderr)
            sys.exit(f"prometheus_check: {len(pending)} of {len(targets)} queries returned no data in {DEADLINE_S}s")
        time.sleep(1)
    print(f"prometheus_check: all {len(targets)} panel and variable queries returned data "
          f"after {time.monotonic() - started:.0f}s")

    rules = json.loads(get(f"http://{addr}/api/v1/rules"))["data"]["groups"]
    loaded = [r for g in rules for r in g["rules"]]
    bad = [r["name"] for r in loaded if r.get("health") != "ok"]
    # Rules are evaluated every second; give them a moment to report health.
    for _ in range(20):
        if loaded and not bad:
            break
        time.sleep(0.5)
        rules = json.loads(get(f"http://{addr}/api/v1/rules"))["data"]["groups"]
        loaded = [r for g in rules for r in g["rules"]]
        bad = [f"{r['name']}: {r.get('health')} {r.get('lastError', '')}" for r in loaded if r.get("health") != "ok"]
    if not loaded or bad:
        sys.exit(f"prometheus_check: rules not healthy: {bad or 'none loaded'}")
    print(f"prometheus_check: {len(loaded)} alert rules loaded and healthy")


if __name__ == "__main__":
    if sys.argv[1] == "exposition":
        exposition(sys.argv[2])
    elif sys.argv[1] == "queries":
        queries(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
