//! The shipped dashboard and alert rules against the crate itself: every
//! expression parses as PromQL, names only metrics the crate emits, every
//! emitted metric is on some panel, and the dashboard is structurally sound.
//! (CI also type-checks the JSON against Grafana's schema and runs every
//! query on a real Prometheus: see .ci/run.)

use std::collections::{BTreeMap, BTreeSet};

use promql_parser::parser::{self, Expr};
use serde_json::Value;
use ws_supervisor::metrics::names;

const DASHBOARD: &str = include_str!("../dashboards/ws-supervisor.json");
const ALERTS: &str = include_str!("../dashboards/alerts.yml");

/// Replaces Grafana's variables with what a query at import time would see.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("$job", ".*")
        .replace("$instance", ".*")
}

/// Every metric name an expression selects.
fn metric_names(expr: &Expr, out: &mut BTreeSet<String>) {
    match expr {
        Expr::Aggregate(e) => {
            metric_names(&e.expr, out);
            if let Some(p) = &e.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(e) => metric_names(&e.expr, out),
        Expr::Binary(e) => {
            metric_names(&e.lhs, out);
            metric_names(&e.rhs, out);
        }
        Expr::Paren(e) => metric_names(&e.expr, out),
        Expr::Subquery(e) => metric_names(&e.expr, out),
        Expr::VectorSelector(vs) => selector_name(vs, out),
        Expr::MatrixSelector(ms) => selector_name(&ms.vs, out),
        Expr::Call(call) => {
            for arg in &call.args.args {
                metric_names(arg, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

fn selector_name(vs: &promql_parser::parser::VectorSelector, out: &mut BTreeSet<String>) {
    let name = vs.name.clone().or_else(|| {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__")
            .map(|m| m.value.clone())
    });
    out.insert(name.expect("every selector names its metric"));
}

/// The catalog name behind a series name (histograms add suffixes).
fn base_name(series: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if names::ALL.contains(&base) {
                return base;
            }
        }
    }
    series
}

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("dashboard is valid JSON")
}

fn panels(dash: &Value) -> Vec<&Value> {
    dash["panels"].as_array().expect("panels").iter().collect()
}

/// (panel title, expression) for every query target.
fn panel_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dash) {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                title.clone(),
                target["expr"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

/// (alert name, expression): every `expr:` stays on one line in alerts.yml.
fn alert_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = String::new();
    for line in ALERTS.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        } else if let Some(expr) = line.strip_prefix("expr:") {
            out.push((alert.clone(), expr.trim().to_owned()));
        }
    }
    out
}

#[test]
fn every_expression_parses_and_names_only_catalog_metrics() {
    let dash = dashboard();
    let mut queries = panel_queries(&dash);
    let alerts = alert_queries();
    assert_eq!(alerts.len(), 6, "one expression per alert rule");
    queries.extend(alerts);
    let mut used = BTreeSet::new();
    for (owner, expr) in &queries {
        let parsed = parser::parse(&substitute(expr))
            .unwrap_or_else(|e| panic!("{owner}: {expr}\ndoes not parse: {e}"));
        let mut found = BTreeSet::new();
        metric_names(&parsed, &mut found);
        assert!(!found.is_empty(), "{owner}: no metric in {expr}");
        for series in found {
            let base = base_name(&series);
            assert!(
                names::ALL.contains(&base),
                "{owner}: {series} is not emitted by the crate"
            );
            used.insert(base.to_owned());
        }
    }
    // Template variable queries name metrics too.
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(query) = var["query"]["query"].as_str() {
            assert!(query.contains(names::CONNECTIONS), "{query}");
        }
    }
    let catalog: BTreeSet<String> = names::ALL.iter().map(|s| s.to_string()).collect();
    let dashboard_only: BTreeSet<String> = {
        let mut d = BTreeSet::new();
        for (_, expr) in panel_queries(&dash) {
            let mut found = BTreeSet::new();
            metric_names(&parser::parse(&substitute(&expr)).unwrap(), &mut found);
            d.extend(found.iter().map(|s| base_name(s).to_owned()));
        }
        d
    };
    let missing: Vec<_> = catalog.difference(&dashboard_only).collect();
    assert!(
        missing.is_empty(),
        "catalog metrics on no panel: {missing:?}"
    );
    assert_eq!(used, catalog);
}

#[test]
fn dashboard_is_structurally_sound() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "ws-supervisor");
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["pluginId"] == "prometheus" && i["type"] == "datasource")
    );

    let vars: BTreeMap<&str, &Value> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    for name in ["job", "instance"] {
        assert_eq!(vars[name]["type"], "query", "{name}");
        assert_eq!(vars[name]["datasource"]["uid"], "${datasource}");
    }

    let mut ids = BTreeSet::new();
    let mut occupied: BTreeSet<(u64, u64)> = BTreeSet::new();
    for panel in panels(&dash) {
        let id = panel["id"].as_u64().expect("numeric id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        let grid = &panel["gridPos"];
        let (x, y, w, h) = (
            grid["x"].as_u64().unwrap(),
            grid["y"].as_u64().unwrap(),
            grid["w"].as_u64().unwrap(),
            grid["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "panel {id} grid {grid}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    occupied.insert((cx, cy)),
                    "panel {id} overlaps at ({cx}, {cy})"
                );
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {id}");
        assert!(
            panel["fieldConfig"]["defaults"]["unit"].is_string(),
            "panel {id} has no unit"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            let r = t["refId"].as_str().expect("refId");
            assert!(refs.insert(r), "panel {id}: duplicate refId {r}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains("$job") && expr.contains("$instance"),
                "panel {id}: {expr}"
            );
            assert_eq!(t["datasource"]["uid"], "${datasource}");
        }
    }
}

#[test]
fn histogram_quantiles_aggregate_buckets_by_le() {
    for (title, expr) in panel_queries(&dashboard())
        .into_iter()
        .chain(alert_queries())
    {
        if expr.contains("histogram_quantile") {
            assert!(expr.contains("_bucket"), "{title}: {expr}");
            assert!(
                expr.contains("by (le") || expr.contains(", le)"),
                "{title}: {expr}"
            );
        }
    }
}
