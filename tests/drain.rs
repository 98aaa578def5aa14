//! The drained shutdown (`drain_window`, `drain_batches`, `drain_close_code`).
//!
//! Schedules are asserted under virtual time on in-memory pipes, where a
//! Close reaches the peer at exactly its planned instant (to the timer's
//! 1 ms). The wire (the code reaches a real client over 127.0.0.1) and the
//! multi-thread runtime assert outcomes only. The loopback measurement of
//! the spread with 1000 real clients is a report, ignored by `cargo test`:
//!
//! ```text
//! cargo test --release --test drain -- --ignored --nocapture
//! ```

mod support;

use std::time::Duration;

use futures::StreamExt;
use support::recorder::{self, assert_gauges_at_zero, gauge};
use support::*;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use ws_supervisor::metrics::names;
use ws_supervisor::{CloseCode, CloseReason, ConfigBuilder, Connection, Initiator, Supervisor};

/// What a peer saw of the shutdown: when the server's Close arrived and its
/// code, and how many pings and echoes it got before.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    at: Option<Instant>,
    code: Option<u16>,
    pings: u32,
    echoes: u32,
}

/// `n` connections through `net`, each with a [`ws_peer`].
async fn open(net: &Net, sup: &Supervisor, n: usize) -> (Vec<Connection>, Vec<JoinHandle<Seen>>) {
    let mut conns = Vec::with_capacity(n);
    let mut peers = Vec::with_capacity(n);
    for _ in 0..n {
        let (conn, peer) = net.accept_ws(sup).await;
        peers.push(ws_peer(peer));
        conns.push(conn);
    }
    (conns, peers)
}

/// A tungstenite client that reads until the end, noting the first Close
/// (tungstenite answers it).
fn ws_peer(mut peer: tokio_tungstenite::WebSocketStream<BoxIo>) -> JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        while let Some(Ok(message)) = peer.next().await {
            match message {
                Message::Close(frame) if seen.at.is_none() => {
                    seen.at = Some(Instant::now());
                    seen.code = frame.map(|f| u16::from(f.code));
                }
                Message::Ping(_) => seen.pings += 1,
                _ => {}
            }
        }
        seen
    })
}

/// A raw peer that answers pings, sends a text after each and counts the
/// echoes, and answers the server's Close.
fn chatty_peer(mut peer: RawPeer<BoxIo>) -> JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        while let Some(frame) = peer.read_frame().await {
            match frame.opcode {
                OP_PING => {
                    seen.pings += 1;
                    peer.send(OP_PONG, &frame.payload).await;
                    peer.send(OP_TEXT, b"still here").await;
                }
                OP_TEXT => seen.echoes += 1,
                OP_CLOSE => {
                    seen.at = Some(Instant::now());
                    seen.code = frame.close_code();
                    peer.send(OP_CLOSE, &frame.payload).await;
                }
                _ => {}
            }
        }
        seen
    })
}

/// Offsets of the peers' Close arrivals from `t0`.
async fn offsets(peers: Vec<JoinHandle<Seen>>, t0: Instant, code: u16) -> Vec<Duration> {
    let mut out = Vec::new();
    for peer in peers {
        let seen = peer.await.unwrap();
        assert_eq!(seen.code, Some(code), "{seen:?}");
        out.push(seen.at.expect("a Close") - t0);
    }
    out
}

/// Closes per whole second of the window (the timer rounds a planned
/// instant up to the next millisecond, so one may land exactly on the end).
fn per_second(offsets: &[Duration], window: Duration) -> Vec<usize> {
    let seconds = window.as_secs() as usize;
    let mut bins = vec![0; seconds];
    for offset in offsets {
        assert!(*offset <= window, "{offset:?} after the window");
        bins[(offset.as_secs() as usize).min(seconds - 1)] += 1;
    }
    bins
}

fn drained(window: Duration, code: u16) -> ConfigBuilder {
    heartbeat(60 * SEC, 10 * SEC)
        .drain_window(window)
        .drain_close_code(code)
}

// ===== the schedule, under virtual time =====

/// 1000 connections drained over 10 s at a steady rate with 1012. The
/// stated bound: no second holds more than 11 % of the closes, nor fewer
/// than 9 % (the mean is 10 %; the plan's golden-ratio sequence is off its
/// fair share by a few closes per interval, see `DrainPlan`; independent
/// random draws would peak at 11.6 % on average and over 13 % one time in
/// a hundred). Meanwhile the shutdown-remaining gauge counts down with the
/// closes, and the whole shutdown ends with the last close.
#[tokio::test(start_paused = true)]
async fn a_drain_spreads_1000_closes_over_the_window() {
    let label = "drain-1000";
    let window = 10 * SEC;
    let (sup, events) = recorder::supervisor(drained(window, 1012).build().unwrap(), label);
    let (_conns, peers) = open(&Net::Memory, &sup, 1000).await;

    let t0 = Instant::now();
    let shutdown = tokio::spawn({
        let sup = sup.clone();
        async move { sup.shutdown(5 * SEC).await }
    });
    // The gauge, sampled in the middle of every second: what is left.
    let mut samples = Vec::new();
    for k in 0..11u32 {
        tokio::time::sleep_until(t0 + k * SEC + 500 * MS).await;
        let left = gauge(names::SHUTDOWN_REMAINING, label);
        assert_eq!(left, (1000 - events.len()) as f64, "second {k}");
        assert_eq!(left as usize, sup.len());
        samples.push(left);
    }
    let summary = shutdown.await.unwrap();
    assert!(
        samples.windows(2).all(|w| w[1] <= w[0]),
        "counts down: {samples:?}"
    );
    assert!(samples[0] < 1000.0 && samples[4] > 0.0, "{samples:?}");
    assert_eq!(samples[10], 0.0, "{samples:?}");

    let offsets = offsets(peers, t0, 1012).await;
    let bins = per_second(&offsets, window);
    println!("closes per second: {bins:?}");
    assert!(
        bins.iter().all(|&n| (90..=110).contains(&n)),
        "peak second over 11 %: {bins:?}"
    );
    let last = *offsets.iter().max().unwrap();
    assert!(last >= window - 100 * MS, "the window is used: {last:?}");
    assert!(summary.elapsed() <= last + MS, "{summary}");

    assert_eq!(summary.count(CloseReason::GoingAway), 1000, "{summary}");
    assert_eq!(summary.forced(), 0);
    let all = events.all();
    assert_eq!(all.len(), 1000);
    assert!(all.iter().all(|e| {
        (e.reason, e.initiator, e.code_sent, e.text.as_str())
            == (
                CloseReason::GoingAway,
                Initiator::Local,
                Some(CloseCode::Restart),
                "service restart",
            )
    }));
    assert_gauges_at_zero(label);
}

/// In batches: every Close goes out at one of `batches` instants,
/// `window / batches` apart from the start, each batch about a fifth.
#[tokio::test(start_paused = true)]
async fn a_drain_in_batches_closes_at_equal_steps() {
    let window = 10 * SEC;
    let config = drained(window, 1001).drain_batches(5).build().unwrap();
    let (sup, _events) = recorder::supervisor(config, "drain-batches");
    let (_conns, peers) = open(&Net::Memory, &sup, 1000).await;
    let t0 = Instant::now();
    let summary = sup.shutdown(5 * SEC).await;
    assert_eq!(summary.count(CloseReason::GoingAway), 1000, "{summary}");
    let mut batches = [0; 5];
    for offset in offsets(peers, t0, 1001).await {
        assert_eq!(offset.subsec_millis(), 0, "{offset:?}");
        assert_eq!(offset.as_secs() % 2, 0, "{offset:?}");
        batches[offset.as_secs() as usize / 2] += 1;
    }
    assert!(
        batches.iter().all(|n| (190..=210).contains(n)),
        "{batches:?}"
    );
    assert_gauges_at_zero("drain-batches");
}

/// The default is unchanged: 1001 to every connection at the same
/// instant, and the shutdown ends as soon as they have answered.
#[tokio::test(start_paused = true)]
async fn without_a_drain_every_connection_is_closed_at_once() {
    let (sup, _events) = recorder::supervisor(
        heartbeat(60 * SEC, 10 * SEC).build().unwrap(),
        "drain-default",
    );
    let (_conns, peers) = open(&Net::Memory, &sup, 200).await;
    let t0 = Instant::now();
    let summary = sup.shutdown(5 * SEC).await;
    assert!(summary.elapsed() < MS, "{summary}");
    assert!(
        offsets(peers, t0, 1001)
            .await
            .iter()
            .all(|offset| offset.is_zero())
    );
    assert_eq!(summary.count(CloseReason::GoingAway), 200);
    assert_gauges_at_zero("drain-default");
}

/// A connection whose turn has not come keeps working: its heartbeat runs
/// and its messages flow until its Close.
#[tokio::test(start_paused = true)]
async fn a_connection_works_normally_until_its_turn() {
    let config = heartbeat(2 * SEC, SEC)
        .drain_window(10 * SEC)
        .drain_close_code(1012)
        .build()
        .unwrap();
    let (sup, _events) = recorder::supervisor(config, "drain-works");
    let mut peers = Vec::new();
    let mut apps = Vec::new();
    for _ in 0..20 {
        let (mut conn, peer) = Net::Memory.accept_raw(&sup).await;
        peers.push(chatty_peer(peer));
        // The application echoes until its connection ends.
        apps.push(tokio::spawn(async move {
            while let Some(message) = conn.recv().await {
                let _ = conn.send(message).await;
            }
            conn.closed().await
        }));
    }
    let t0 = Instant::now();
    let summary = sup.shutdown(5 * SEC).await;
    assert_eq!(summary.count(CloseReason::GoingAway), 20, "{summary}");
    let mut seen = Vec::new();
    for peer in peers {
        seen.push(peer.await.unwrap());
    }
    for app in apps {
        let event = app.await.unwrap();
        assert_eq!(event.reason, CloseReason::GoingAway);
        assert_eq!(event.code_sent, Some(CloseCode::Restart));
    }
    // The last to be closed (about 9.5 s in) was pinged at 2, 4, 6 and 8 s
    // and had every "still here" echoed.
    let last = seen.iter().max_by_key(|s| s.at).unwrap();
    assert!(last.at.unwrap() - t0 >= 8 * SEC, "{last:?}");
    assert!(last.pings >= 4, "{last:?}");
    assert_eq!(last.echoes, last.pings, "{last:?}");
    // And each was pinged as long as it stayed open (a Close due in the
    // same millisecond as a ping goes first: hence the 1 ms).
    for s in &seen {
        let open = s.at.unwrap() - t0 - MS;
        assert!(s.pings as u64 >= open.as_secs() / 2, "{s:?}");
    }
    assert_gauges_at_zero("drain-works");
}

/// A dead peer is still caught while it waits for its turn: 20 silent
/// peers in a drain of an hour all end as `Timeout` within the detection
/// bound, not at their planned close. (The plan spaces consecutive ids by
/// the golden ratio, so at most one of 20 can fall in the first 2 s of the
/// hour: that one may be closed by the drain first.)
#[tokio::test(start_paused = true)]
async fn a_dead_peer_waiting_for_its_turn_is_still_caught() {
    let config = heartbeat(SEC, SEC)
        .drain_window(3600 * SEC)
        .drain_close_code(1012)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let mut conns = Vec::new();
    for _ in 0..20 {
        let (conn, peer) = accept_raw(&sup).await;
        // Reads everything, answers nothing.
        tokio::spawn(peer.drain());
        conns.push(conn);
    }
    let t0 = Instant::now();
    let shutdown = tokio::spawn({
        let sup = sup.clone();
        async move { sup.shutdown(SEC).await }
    });
    let mut caught = 0;
    for conn in &conns {
        let event = tokio::time::timeout(60 * SEC, conn.closed())
            .await
            .expect("ended long before its turn in an hour");
        if event.reason == CloseReason::Timeout {
            caught += 1;
            assert!(Instant::now() - t0 <= 2 * SEC + 10 * MS);
            assert_eq!(event.code_sent, Some(CloseCode::Error));
        }
    }
    assert!(caught >= 19, "{caught} of 20 caught as dead");
    let summary = tokio::time::timeout(60 * SEC, shutdown)
        .await
        .expect("the shutdown ends with its last connection")
        .unwrap();
    assert_eq!(summary.total(), 20);
}

/// Peers that never answer the Close: each batch has its own
/// `close_timeout`, and `grace` counts after the window. Both cut them
/// short and count them as forced.
#[tokio::test(start_paused = true)]
async fn the_grace_after_the_window_forces_the_rest() {
    // close_timeout beyond the end: the grace after the window decides.
    for (close_timeout, label) in [(60 * SEC, "drain-grace"), (500 * MS, "drain-close-timeout")] {
        let config = drained(2 * SEC, 1012)
            .close_timeout(close_timeout)
            .build()
            .unwrap();
        let (sup, events) = recorder::supervisor(config, label);
        let mut silent = Vec::new();
        let mut polite = Vec::new();
        let mut conns = Vec::new();
        for i in 0..40 {
            if i % 2 == 0 {
                let (conn, peer) = Net::Memory.accept_raw(&sup).await;
                silent.push(tokio::spawn(peer.drain()));
                conns.push(conn);
            } else {
                let (conn, peer) = Net::Memory.accept_ws(&sup).await;
                polite.push(ws_peer(peer));
                conns.push(conn);
            }
        }
        let summary = sup.shutdown(SEC).await;
        assert_eq!(
            summary.count(CloseReason::GoingAway),
            40,
            "{label}: {summary}"
        );
        assert_eq!(summary.forced(), 20, "{label}: the silent ones: {summary}");
        if close_timeout > 3 * SEC {
            assert_eq!(summary.elapsed(), 3 * SEC, "{label}: window + grace");
        } else {
            // The last Close goes out before 2 s (the timer rounds up to
            // the millisecond), and its peer is given up 500 ms later.
            assert!(
                summary.elapsed() <= 2 * SEC + close_timeout + 2 * MS,
                "{label}: {summary}"
            );
            assert!(summary.elapsed() > 2 * SEC, "{label}: {summary}");
        }
        for peer in silent {
            let frames = peer.await.unwrap();
            assert_eq!(frames.last().and_then(Frame::close_code), Some(1012));
        }
        for peer in polite {
            assert_eq!(peer.await.unwrap().code, Some(1012));
        }
        assert_eq!(events.len(), 40);
        assert_gauges_at_zero(label);
    }
}

/// A connection already closing when the drain begins is left alone: no
/// second Close, and its own handshake deadline still applies.
#[tokio::test(start_paused = true)]
async fn a_connection_already_closing_is_left_alone() {
    let config = drained(10 * SEC, 1012)
        .close_timeout(3 * SEC)
        .build()
        .unwrap();
    let (sup, events) = recorder::supervisor(config, "drain-closing");
    let (conn, peer) = Net::Memory.accept_raw(&sup).await;
    let silent = tokio::spawn(peer.drain());
    conn.close(CloseCode::Normal, "bye").await.unwrap();
    tokio::time::sleep(SEC).await;
    let summary = sup.shutdown(SEC).await;
    // It ends at its own close timeout (2 s later), not at its drain time.
    assert_eq!(summary.elapsed(), 2 * SEC, "{summary}");
    let closes: Vec<_> = silent
        .await
        .unwrap()
        .iter()
        .filter_map(Frame::close_code)
        .collect();
    assert_eq!(closes, [1000], "one Close, the application's");
    assert_eq!(events.only().reason, CloseReason::Timeout);
    assert_eq!(summary.forced(), 0, "its own timeout, not the shutdown's");
}

/// The runtime dropped in the middle of a drain (the process exits before
/// `shutdown` returns): a connection still waiting for its turn is told,
/// best effort, with the drain's code, not 1001.
#[test]
fn a_runtime_dropped_mid_drain_still_sends_the_drain_code() {
    let rt = current_thread();
    let config = drained(3600 * SEC, 1012).build().unwrap();
    let (sup, events) = recorder::supervisor(config, "drain-dropped");
    let (conn, mut peer) = rt.block_on(accept_raw(&sup));
    rt.block_on(async {
        let s = sup.clone();
        tokio::spawn(async move { s.shutdown(SEC).await });
        // Let the shutdown begin and the driver see it (bounded).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(sup.is_shutting_down());
    });
    drop(rt);
    let event = events.only();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::GoingAway, Initiator::Local)
    );
    assert_eq!(event.code_sent, Some(CloseCode::Restart));
    let frame = current_thread()
        .block_on(peer.read_frame())
        .expect("a Close frame");
    assert_eq!((frame.opcode, frame.close_code()), (OP_CLOSE, Some(1012)));
    assert_gauges_at_zero("drain-dropped");
    drop(conn);
}

/// The drain of 1000 connections on 2 worker threads in real time, over a
/// 1 s window: outcomes only. Every connection is told 1012 once, no hook
/// runs twice, and the shutdown gauge only ever falls (sampled every 50 ms,
/// bounded), to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_of_1000_on_the_multi_thread_runtime() {
    let label = "drain-1000-mt";
    let (sup, events) = recorder::supervisor(drained(SEC, 1012).build().unwrap(), label);
    let (_conns, peers) = open(&Net::Memory, &sup, 1000).await;
    let shutdown = tokio::spawn({
        let sup = sup.clone();
        async move { sup.shutdown(10 * SEC).await }
    });
    let mut samples = Vec::new();
    for _ in 0..400 {
        if shutdown.is_finished() {
            break;
        }
        if sup.is_shutting_down() {
            samples.push(gauge(names::SHUTDOWN_REMAINING, label));
        }
        tokio::time::sleep(50 * MS).await;
    }
    let summary = shutdown.await.unwrap();
    // The window alone lasts about a second: many samples, at least two.
    assert!(samples.len() >= 2, "{samples:?}");
    assert!(
        samples.windows(2).all(|w| w[1] <= w[0]),
        "the gauge only falls: {samples:?}"
    );
    assert_eq!(summary.count(CloseReason::GoingAway), 1000, "{summary}");
    for peer in peers {
        assert_eq!(peer.await.unwrap().code, Some(1012));
    }
    let mut ids: Vec<_> = events.all().iter().map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "each hook ran once");
    assert_gauges_at_zero(label);
}

// ===== real sockets, real time =====

/// The configured code reaches real tungstenite clients over 127.0.0.1, on
/// the multi-thread runtime: outcomes only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_code_reaches_clients_over_loopback_multi_thread() {
    for (code, label) in [(1012, "drain-wire-1012"), (4000, "drain-wire-4000")] {
        let config = drained(300 * MS, code).build().unwrap();
        let (sup, events) = recorder::supervisor(config, label);
        let net = Net::loopback().await;
        let (_conns, peers) = open(&net, &sup, 50).await;
        let summary = sup.shutdown(10 * SEC).await;
        assert_eq!(summary.count(CloseReason::GoingAway), 50, "{summary}");
        assert_eq!(summary.forced(), 0, "{summary}");
        for peer in peers {
            assert_eq!(peer.await.unwrap().code, Some(code));
        }
        assert!(
            events
                .all()
                .iter()
                .all(|e| e.code_sent == Some(CloseCode::from(code)))
        );
        assert_gauges_at_zero(label);
    }
}

// ===== the loopback report =====

/// Makes sure this process may open `needed` file descriptors: raises the
/// soft limit toward the hard one with `prlimit` if needed, or fails with a
/// clear message.
fn ensure_fd_limit(needed: u64) {
    fn soft_limit() -> Option<u64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    }
    if soft_limit().is_some_and(|n| n >= needed) {
        return;
    }
    let _ = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={needed}:"))
        .status();
    let now = soft_limit();
    assert!(
        now.is_some_and(|n| n >= needed),
        "this test needs {needed} file descriptors; the soft limit is {now:?}: \
         run `ulimit -n {needed}` first"
    );
}

/// 1000 real clients over 127.0.0.1, drained over 5 s with 1012 (in
/// `DRAIN_BATCHES` batches if set, else steadily; `DRAIN_WINDOW_MS=0` for
/// the default, everyone at once): prints the measured
/// spread (per second, per 500 ms, the busiest 100 ms), asserts outcomes
/// only. The figures are in `docs/operations.md`.
#[test]
#[ignore = "a measurement (5 s, 2000 sockets): run with --ignored --nocapture"]
fn drain_spread_of_1000_loopback_clients() {
    ensure_fd_limit(2200);
    multi_thread().block_on(async {
        let window = std::env::var("DRAIN_WINDOW_MS")
            .ok()
            .filter(|w| !w.is_empty())
            .map_or(5 * SEC, |w| {
                MS * w.parse().expect("DRAIN_WINDOW_MS is a count")
            });
        let batches: Option<usize> = std::env::var("DRAIN_BATCHES")
            .ok()
            .filter(|b| !b.is_empty())
            .map(|b| b.parse().expect("DRAIN_BATCHES is a count"));
        let mut config = drained(window, 1012);
        if let Some(batches) = batches {
            config = config.drain_batches(batches);
        }
        let (sup, events) = recorder::supervisor(config.build().unwrap(), "drain-report");
        let net = Net::loopback().await;
        let (_conns, peers) = open(&net, &sup, 1000).await;
        let t0 = Instant::now();
        let summary = sup.shutdown(10 * SEC).await;
        let offsets = offsets(peers, t0, 1012).await;
        assert_eq!(summary.count(CloseReason::GoingAway), 1000, "{summary}");
        assert_eq!(events.len(), 1000);
        let mut halves = vec![0usize; 12];
        let mut tenths = vec![0usize; 60];
        for offset in &offsets {
            halves[((offset.as_millis() / 500) as usize).min(11)] += 1;
            tenths[((offset.as_millis() / 100) as usize).min(59)] += 1;
        }
        let seconds: Vec<usize> = halves.chunks(2).map(|c| c.iter().sum()).collect();
        let mut sorted = offsets.clone();
        sorted.sort();
        println!(
            "drain report: 1000 loopback clients, window {window:?}, batches {batches:?}, code 1012"
        );
        println!("  closes per second:  {seconds:?}");
        println!("  closes per 500 ms:  {halves:?}");
        println!(
            "  busiest 100 ms: {} closes (steady ideal: 20)",
            tenths.iter().max().unwrap()
        );
        println!(
            "  first {:?}, median {:?}, last {:?}; shutdown took {:?}; peak second {:.1} %",
            sorted[0],
            sorted[500],
            sorted[999],
            summary.elapsed(),
            *seconds.iter().max().unwrap() as f64 / 10.0
        );
        assert_gauges_at_zero("drain-report");
    });
}
