//! Metrics as a recorder sees them: names, units, labels, pre-registered
//! zeros, counts after real traffic, and a gauge that always returns to 0.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::IntoFuture;

use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::*;
use ws_supervisor::metrics::names;
use ws_supervisor::{
    CloseCode, CloseEvent, CloseReason, Config, HandshakeFailure, Initiator, Supervisor,
};

/// One series: metric name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// A snapshot, keyed by series.
struct Snap {
    kinds: BTreeMap<Series, MetricKind>,
    values: BTreeMap<Series, DebugValue>,
    units: BTreeMap<String, Option<metrics::Unit>>,
    descriptions: BTreeMap<String, String>,
}

impl Snap {
    fn take(snapshotter: &Snapshotter) -> Self {
        let mut snap = Snap {
            kinds: BTreeMap::new(),
            values: BTreeMap::new(),
            units: BTreeMap::new(),
            descriptions: BTreeMap::new(),
        };
        for (ck, unit, description, value) in snapshotter.snapshot().into_vec() {
            let (kind, key) = ck.into_parts();
            let mut labels: Vec<_> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let name = key.name().to_owned();
            snap.units.insert(name.clone(), unit);
            if let Some(d) = description {
                snap.descriptions.insert(name.clone(), d.to_string());
            }
            let series = (name, labels);
            snap.kinds.insert(series.clone(), kind);
            snap.values.insert(series, value);
        }
        snap
    }

    fn get(&self, name: &str, extra: &[(&str, &str)]) -> &DebugValue {
        let mut labels: Vec<(String, String)> = vec![("supervisor".into(), "test".into())];
        labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        labels.sort();
        self.values
            .get(&(name.to_owned(), labels.clone()))
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"))
    }

    fn counter(&self, name: &str, extra: &[(&str, &str)]) -> u64 {
        match self.get(name, extra) {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        }
    }

    fn gauge(&self, name: &str) -> f64 {
        match self.get(name, &[]) {
            DebugValue::Gauge(v) => v.0,
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    fn histogram(&self, name: &str) -> Vec<f64> {
        match self.get(name, &[]) {
            DebugValue::Histogram(v) => v.iter().map(|x| x.0).collect(),
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }

    fn closed(&self, reason: CloseReason, initiator: Initiator) -> u64 {
        self.counter(
            names::CLOSED,
            &[
                ("reason", reason.as_str()),
                ("initiator", initiator.as_str()),
            ],
        )
    }
}

/// A supervisor whose metrics go to a fresh debugging recorder.
fn recorded(config: Config) -> (Supervisor, Snapshotter, Events) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let events = Events::default();
    let sink = events.clone();
    let sup = metrics::with_local_recorder(&recorder, || {
        Supervisor::builder(config)
            .metric_label("supervisor", "test")
            .on_close(move |e: &CloseEvent| sink.push(e.clone()))
            .on_close(|e: &CloseEvent| {
                // Some hook calls panic: they must not disturb any count.
                if e.id.as_u64() % 97 == 0 {
                    panic!("hook bug {EXPECTED_PANIC}");
                }
            })
            .build()
    });
    (sup, snapshotter, events)
}

#[test]
fn every_metric_is_described_with_a_unit_and_every_series_starts_at_zero() {
    let (_sup, snapshotter, _) = recorded(Config::default());
    let snap = Snap::take(&snapshotter);

    for name in names::ALL {
        assert!(snap.units.contains_key(name), "{name} not registered");
        assert!(snap.units[name].is_some(), "{name} has no unit");
        assert!(
            snap.descriptions.contains_key(name),
            "{name} has no description"
        );
        assert!(name.starts_with("ws_supervisor_"), "{name}");
    }
    let emitted: BTreeSet<&str> = snap.units.keys().map(String::as_str).collect();
    let catalog: BTreeSet<&str> = names::ALL.into_iter().collect();
    assert_eq!(emitted, catalog, "emitted names equal the catalog");

    // Every reason × initiator and every handshake cause exists, at zero.
    for reason in CloseReason::ALL {
        for initiator in Initiator::ALL {
            assert_eq!(snap.closed(reason, initiator), 0);
        }
    }
    for cause in HandshakeFailure::ALL {
        assert_eq!(
            snap.counter(names::HANDSHAKE_FAILURES, &[("cause", cause.as_str())]),
            0
        );
    }
    assert_eq!(snap.gauge(names::CONNECTIONS), 0.0);

    // Counters end in _total, histograms in _seconds; kinds match names.
    for ((name, labels), kind) in &snap.kinds {
        match kind {
            MetricKind::Counter => assert!(name.ends_with("_total"), "{name}"),
            MetricKind::Histogram => assert!(name.ends_with("_seconds"), "{name}"),
            MetricKind::Gauge => assert!(!name.ends_with("_total"), "{name}"),
        }
        // Only closed-enum labels and the constant one: no per-connection detail.
        for (key, _) in labels {
            assert!(
                ["supervisor", "reason", "initiator", "cause"].contains(&key.as_str()),
                "{name} has label {key}"
            );
        }
    }
    // 6 × 2 closes + 14 causes + 15 unlabelled series, and the
    // reconnecting clients' 14 + 1 failure causes and 4 unlabelled series.
    assert_eq!(snap.kinds.len(), 12 + 14 + 15 + 15 + 4);
}

#[tokio::test(start_paused = true)]
async fn traffic_moves_the_right_series() {
    let (sup, snapshotter, _) = recorded(heartbeat(SEC, SEC).build().unwrap());

    // A peer that echoes two messages, answers 3 pings after 50 ms, then closes 1000.
    let (mut conn, mut peer) = accept_raw(&sup).await;
    peer.send(OP_TEXT, b"hello").await;
    peer.send(OP_BINARY, &[1, 2, 3]).await;
    for _ in 0..2 {
        let message = conn.recv().await.unwrap();
        conn.send(message).await.unwrap();
    }
    for _ in 0..3 {
        let ping = peer.read_until(OP_PING).await.unwrap();
        tokio::time::sleep(50 * MS).await;
        peer.send(OP_PONG, &ping.payload).await;
    }
    peer.send(OP_PONG, b"unsolicited").await;
    peer.close(1000, "").await;
    peer.read_until(OP_CLOSE).await.unwrap();
    conn.closed().await;

    // A silent peer: times out.
    let (conn, peer) = accept_raw(&sup).await;
    let drained = tokio::spawn(peer.drain());
    conn.closed().await;
    drained.await.unwrap();

    // A refused handshake.
    let (server, _client) = tokio::io::duplex(PIPE);
    let config_timeout = sup.config().handshake_timeout();
    let started = tokio::time::Instant::now();
    assert!(sup.accept(server).await.is_err());
    assert_eq!(tokio::time::Instant::now() - started, config_timeout);

    let snap = Snap::take(&snapshotter);
    assert_eq!(snap.counter(names::ACCEPTED, &[]), 2);
    assert_eq!(snap.closed(CloseReason::Normal, Initiator::Remote), 1);
    assert_eq!(snap.closed(CloseReason::Timeout, Initiator::Local), 1);
    assert_eq!(
        snap.counter(names::HANDSHAKE_FAILURES, &[("cause", "timeout")]),
        1
    );
    assert_eq!(snap.counter(names::MESSAGES_RECEIVED, &[]), 2);
    assert_eq!(snap.counter(names::MESSAGES_SENT, &[]), 2);
    assert_eq!(snap.counter(names::BYTES_RECEIVED, &[]), 8);
    assert_eq!(snap.counter(names::BYTES_SENT, &[]), 8);
    // 3 answered pings on the first connection; 1 on the second, whose
    // deadline (2 s) comes before its second ping.
    assert_eq!(snap.counter(names::PINGS_SENT, &[]), 4);
    assert_eq!(snap.counter(names::PONGS_RECEIVED, &[]), 4);
    assert_eq!(snap.counter(names::PONGS_UNMATCHED, &[]), 1);
    let rtt = snap.histogram(names::RTT);
    assert_eq!(rtt.len(), 3);
    assert!(rtt.iter().all(|&s| (0.050..0.051).contains(&s)), "{rtt:?}");
    let detection = snap.histogram(names::DETECTION);
    assert_eq!(detection.len(), 1);
    // interval + timeout, plus at most one ping slot (interval / 64): this
    // connection opened off a slot boundary.
    assert!(
        (2.0..=2.0 + 1.0 / 64.0 + 0.001).contains(&detection[0]),
        "{detection:?}"
    );
    assert_eq!(snap.histogram(names::LIFETIME).len(), 2);
    assert_eq!(snap.histogram(names::HOOK_DURATION).len(), 2);
    assert_eq!(snap.gauge(names::CONNECTIONS), 0.0);
}

#[tokio::test(start_paused = true)]
async fn live_gauge_returns_to_zero_after_10k_random_cycles() {
    quiet_expected_panics();
    let config = heartbeat(SEC, SEC)
        .max_connections(64)
        .handshake_timeout(2 * SEC)
        .close_timeout(SEC)
        .build()
        .unwrap();
    let (sup, snapshotter, events) = recorded(config);
    let series_at_start = Snap::take(&snapshotter).kinds.len();

    let mut rng = Rng::new(42);
    let mut accepted = 0u64;
    let mut refused = 0u64;
    let mut kept = Vec::new();
    const CYCLES: usize = 10_000;
    const BATCH: usize = 50;
    for _ in 0..CYCLES / BATCH {
        let mut tasks = Vec::new();
        for _ in 0..BATCH {
            let sup = sup.clone();
            let what = rng.below(8);
            tasks.push(tokio::spawn(async move {
                if what == 7 {
                    // A handshake that never completes: refused, no hook.
                    let (server, _silent) = tokio::io::duplex(PIPE);
                    return (sup.accept(server).await.is_ok(), None);
                }
                let (server, client) = tokio::io::duplex(PIPE);
                let (conn, peer) = tokio::join!(
                    sup.accept(server).into_future(),
                    RawPeer::handshake_or_refused(client)
                );
                let (Ok(conn), Some(mut peer)) = (conn, peer) else {
                    return (false, None);
                };
                match what {
                    0 => {
                        peer.close(1000, "").await;
                        peer.drain().await;
                    }
                    1 => drop(peer),
                    2 => drop(conn.close(CloseCode::Away, "").await),
                    3 => {
                        let _ = tokio::spawn(async move {
                            let _held = conn;
                            panic!("application bug {EXPECTED_PANIC}");
                        })
                        .await;
                        peer.drain().await;
                        return (true, None);
                    }
                    4 => peer.send(OP_TEXT, &[0xff]).await,
                    5 => {
                        // Silent until the supervisor gives up.
                        peer.drain().await;
                    }
                    _ => {
                        // Stays open until the shutdown at the end.
                        return (true, Some((conn, tokio::spawn(peer.answer_pings()))));
                    }
                }
                conn.closed().await;
                (true, None)
            }));
        }
        for task in tasks {
            let (ok, keep) = task.await.unwrap();
            if ok {
                accepted += 1;
            } else {
                refused += 1;
            }
            kept.extend(keep);
        }
        // Keep the long-lived ones below the limit, so most cycles get in.
        while kept.len() > 20 {
            let (conn, peer) = kept.remove(0);
            drop(conn);
            assert_eq!(peer.await.unwrap(), Some(1000));
        }
    }
    assert_eq!(accepted + refused, CYCLES as u64);
    assert!(refused > 0, "some cycles must be refused");
    assert!(accepted > CYCLES as u64 / 2);
    let summary = sup.shutdown(SEC).await;
    assert_eq!(summary.count(CloseReason::GoingAway) as usize, kept.len());
    for (_, peer) in kept {
        assert_eq!(peer.await.unwrap(), Some(1001));
    }

    let snap = Snap::take(&snapshotter);
    assert_eq!(
        snap.gauge(names::CONNECTIONS),
        0.0,
        "live gauge back to zero"
    );
    assert_eq!(snap.gauge(names::SHUTDOWN_REMAINING), 0.0);
    assert_eq!(sup.len(), 0);
    assert_eq!(snap.counter(names::ACCEPTED, &[]), accepted);
    assert_eq!(
        events.len() as u64,
        accepted,
        "one hook call per accepted connection"
    );
    let closed: u64 = CloseReason::ALL
        .iter()
        .flat_map(|&r| Initiator::ALL.map(|i| snap.closed(r, i)))
        .sum();
    assert_eq!(closed, accepted);
    let failures: u64 = HandshakeFailure::ALL
        .iter()
        .map(|c| snap.counter(names::HANDSHAKE_FAILURES, &[("cause", c.as_str())]))
        .sum();
    assert_eq!(failures, refused);
    let at_capacity = snap.counter(names::HANDSHAKE_FAILURES, &[("cause", "at_capacity")]);
    let timed_out = snap.counter(names::HANDSHAKE_FAILURES, &[("cause", "timeout")]);
    assert!(
        at_capacity > 0 && timed_out > 0,
        "{at_capacity} at capacity, {timed_out} timed out"
    );
    let hook_panics = snap.counter(names::HOOK_PANICS, &[]);
    assert!(hook_panics > 0);
    assert_eq!(hook_panics, sup.hook_panics());
    assert_eq!(
        snap.kinds.len(),
        series_at_start,
        "the number of series never grows"
    );
}
