//! Application-level heartbeats: probes that are messages, under virtual
//! time over in-memory pipes (as `tests/heartbeat.rs` does for ping frames),
//! and the answering mode on real loopback sockets.

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use support::*;
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, sleep};
use ws_supervisor::metrics::names;
use ws_supervisor::tungstenite::Message;
use ws_supervisor::{AppPong, CloseCode, CloseReason, ConfigBuilder, Initiator, Liveness};

// ===== the protocol of these tests =====

/// `{"op":"ping","t":N}`.
fn probe(nonce: u64) -> Message {
    Message::text(format!(r#"{{"op":"ping","t":{nonce}}}"#))
}

/// The `op` and `t` of a JSON heartbeat message, if it is one.
fn parse(data: &[u8]) -> Option<(String, Option<u64>)> {
    let value: serde_json::Value = serde_json::from_slice(data).ok()?;
    let op = value.get("op")?.as_str()?.to_owned();
    Some((op, value.get("t").and_then(|t| t.as_u64())))
}

/// `{"op":"pong","t":N}` answers probe N; `{"op":"pong"}` the oldest.
fn answer(message: &Message) -> Option<AppPong> {
    let Message::Text(text) = message else {
        return None;
    };
    match parse(text.as_bytes())? {
        (op, Some(t)) if op == "pong" => Some(AppPong::Nonce(t)),
        (op, None) if op == "pong" => Some(AppPong::Oldest),
        _ => None,
    }
}

/// The reply to a peer's `{"op":"ping","t":N}`: `{"op":"pong","t":N}`.
fn reply(message: &Message) -> Option<Message> {
    let Message::Text(text) = message else {
        return None;
    };
    match parse(text.as_bytes())? {
        (op, Some(t)) if op == "ping" => Some(Message::text(format!(r#"{{"op":"pong","t":{t}}}"#))),
        _ => None,
    }
}

/// A builder with an exact schedule and JSON probes.
fn app(interval: Duration, timeout: Duration) -> ConfigBuilder {
    heartbeat(interval, timeout).app_heartbeat(probe, answer)
}

/// The nonce of a probe frame; fails on anything else.
fn nonce_of(frame: &Frame) -> u64 {
    assert_eq!(frame.opcode, OP_TEXT, "{frame:?}");
    match parse(&frame.payload) {
        Some((op, Some(t))) if op == "ping" => t,
        other => panic!("not a probe: {other:?}"),
    }
}

/// The JSON text of a pong with nonce `t` (or none).
fn pong(t: Option<u64>) -> Vec<u8> {
    match t {
        Some(t) => format!(r#"{{"op":"pong","t":{t}}}"#).into_bytes(),
        None => br#"{"op":"pong"}"#.to_vec(),
    }
}

// ===== detection =====

/// As `tests/heartbeat.rs` does for ping frames (`support::silent_peer_dies`):
/// a peer that reads everything and never answers dies of `Timeout` within
/// `interval + timeout`, never before; every probe was a JSON message with a
/// fresh nonce, and no ping frame went out. Returns when, after the open.
async fn silent_peer_dies_after(interval: Duration, timeout: Duration) -> Duration {
    let (died, event, frames) = silent_peer_dies(app(interval, timeout).build().unwrap()).await;
    assert_eq!(event.text, "ping timeout");
    assert!(event.stats.pings_sent >= 1);
    let (_close, probes) = frames.split_last().expect("frames");
    let nonces: Vec<u64> = probes.iter().map(nonce_of).collect();
    assert_eq!(nonces.len() as u64, event.stats.pings_sent);
    let mut unique = nonces.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), nonces.len(), "{nonces:?}");
    died
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_times_out_within_the_bound_short_timeout() {
    let died = silent_peer_dies_after(SEC, 300 * MS).await;
    assert!(died <= SEC + 300 * MS + 10 * MS, "died after {died:?}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_times_out_within_the_bound_equal_timeout() {
    let died = silent_peer_dies_after(SEC, SEC).await;
    assert!(died <= 2 * SEC + 10 * MS, "died after {died:?}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_times_out_within_the_bound_long_timeout() {
    // The timeout spans three probes: the deadline stays on the first.
    let died = silent_peer_dies_after(SEC, 3 * SEC).await;
    assert!(died <= 4 * SEC + 10 * MS, "died after {died:?}");
}

#[tokio::test(start_paused = true)]
async fn the_bound_counts_from_the_last_answer() {
    let (sup, _events) = supervisor(app(SEC, SEC).build().unwrap());
    let (conn, mut peer) = accept_raw(&sup).await;
    let mut last = Instant::now();
    for _ in 0..5 {
        let t = nonce_of(&peer.read_until(OP_TEXT).await.unwrap());
        peer.send(OP_TEXT, &pong(Some(t))).await;
        last = Instant::now();
    }
    let drained = tokio::spawn(peer.drain());
    let event = conn.closed().await;
    let after_last = Instant::now() - last;
    assert_eq!(event.reason, CloseReason::Timeout);
    assert_eq!(event.stats.pongs_received, 5);
    assert!(
        after_last > SEC && after_last <= 2 * SEC + 10 * MS,
        "{after_last:?}"
    );
    drained.await.unwrap();
}

// ===== matching and delivery =====

/// A peer that answers each probe after `delay` with `answer(nonce)`, then
/// (after `rounds` probes) sends `hello` and keeps answering; answers our
/// Close.
async fn answering_peer(
    mut peer: RawPeer<tokio::io::DuplexStream>,
    delay: Duration,
    rounds: usize,
    answer: impl Fn(u64) -> Vec<u8>,
) {
    let mut seen = 0;
    while let Some(frame) = peer.read_frame().await {
        match frame.opcode {
            OP_TEXT => {
                let t = nonce_of(&frame);
                sleep(delay).await;
                peer.send(OP_TEXT, &answer(t)).await;
                seen += 1;
                if seen == rounds {
                    peer.send(OP_TEXT, b"hello").await;
                }
            }
            OP_CLOSE => peer.send(OP_CLOSE, &frame.payload).await,
            OP_PING => panic!("a ping frame under an application heartbeat"),
            _ => {}
        }
    }
}

#[tokio::test(start_paused = true)]
async fn answers_are_matched_by_nonce_measured_and_not_delivered() {
    let (sup, events) = supervisor(app(SEC, SEC).build().unwrap());
    let (mut conn, peer) = accept_raw(&sup).await;
    let peer = tokio::spawn(answering_peer(peer, 120 * MS, 10, |t| pong(Some(t))));

    // The first message the application gets is the peer's own, sent
    // after ten answers: none of those reached it.
    let first = conn.recv().await.unwrap();
    assert_eq!(first, Message::text("hello"));
    let stats = conn.stats();
    assert_eq!(stats.pings_sent, 10, "{stats:?}");
    assert_eq!(stats.pongs_received, 10);
    assert_eq!(stats.pongs_unmatched, 0);
    assert_eq!(stats.last_rtt, Some(120 * MS));
    assert_eq!(stats.smoothed_rtt, Some(120 * MS));
    assert!(conn.close_event().is_none());
    drop(conn);
    peer.await.unwrap();
    assert_eq!(events.only().reason, CloseReason::Normal);
}

#[tokio::test(start_paused = true)]
async fn answers_with_a_foreign_nonce_are_unmatched_liveness() {
    let config = app(SEC, SEC).liveness(Liveness::Pong).build().unwrap();
    let (sup, events) = supervisor(config);
    let (conn, peer) = accept_raw(&sup).await;
    // Every answer names a probe we never sent: liveness, never RTT.
    let peer = tokio::spawn(answering_peer(peer, 10 * MS, 0, |t| {
        pong(Some(t.wrapping_add(1000)))
    }));
    sleep(10 * SEC + 500 * MS).await;
    let stats = conn.stats();
    assert!(conn.close_event().is_none(), "an answer is liveness");
    assert_eq!(stats.pings_sent, 10);
    assert_eq!(stats.pongs_received, 10);
    assert_eq!(stats.pongs_unmatched, 10);
    assert_eq!(stats.last_rtt, None);
    drop(conn);
    peer.await.unwrap();
    assert_eq!(events.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn answers_without_a_nonce_answer_the_oldest_probe() {
    // A timeout of three intervals: up to three probes outstanding.
    let (sup, _events) = supervisor(app(SEC, 3 * SEC).build().unwrap());
    let (conn, mut peer) = accept_raw(&sup).await;
    // Two probes go unanswered for a while, then both answers come at once.
    let first = peer.read_until(OP_TEXT).await.unwrap();
    let second = peer.read_until(OP_TEXT).await.unwrap();
    assert_ne!(nonce_of(&first), nonce_of(&second));
    sleep(500 * MS).await;
    peer.send(OP_TEXT, &pong(None)).await;
    peer.send(OP_TEXT, &pong(None)).await;
    sleep(10 * MS).await;
    let stats = conn.stats();
    assert_eq!((stats.pings_sent, stats.pongs_received), (2, 2));
    assert_eq!(stats.pongs_unmatched, 0);
    // In order: 1.5 s for the first probe, then 0.5 s for the second.
    assert_eq!(stats.last_rtt, Some(500 * MS));
    assert_eq!(stats.smoothed_rtt, Some((1500 * MS * 7 + 500 * MS) / 8));
    // A third answer has no probe left to answer.
    peer.send(OP_TEXT, &pong(None)).await;
    sleep(10 * MS).await;
    assert_eq!(conn.stats().pongs_unmatched, 1);
}

/// The counters of a debugging recorder, by name, in one snapshot (taking
/// one resets them).
fn counters(recorder: &DebuggingRecorder) -> impl Fn(&str) -> u64 {
    let snapshot = recorder.snapshotter().snapshot().into_vec();
    move |name| {
        snapshot
            .iter()
            .find(|(key, ..)| key.key().name() == name)
            .map_or(0, |(.., value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{name}: {other:?}"),
            })
    }
}

/// Delivered heartbeat messages count as messages received; our probes and
/// replies are never messages sent (`docs/keepalive.md`, "Delivery").
#[tokio::test(start_paused = true)]
async fn heartbeat_messages_are_delivered_when_asked() {
    let config = app(SEC, SEC)
        .answer_app_pings(reply)
        .deliver_heartbeats(true)
        .build()
        .unwrap();
    let recorder = DebuggingRecorder::new();
    let (sup, _events) = metrics::with_local_recorder(&recorder, || supervisor(config));
    let (mut conn, mut peer) = accept_raw(&sup).await;
    let t = nonce_of(&peer.read_until(OP_TEXT).await.unwrap());
    peer.send(OP_TEXT, &pong(Some(t))).await;
    peer.send(OP_TEXT, br#"{"op":"ping","t":7}"#).await;
    // The peer's ping was answered…
    let answer = peer.read_until(OP_TEXT).await.unwrap();
    assert_eq!(answer.payload, br#"{"op":"pong","t":7}"#);
    // …and both heartbeat messages reached the application, after being
    // handled: the answer matched its probe.
    assert_eq!(
        conn.recv().await.unwrap().into_data().as_ref(),
        pong(Some(t))
    );
    assert_eq!(
        conn.recv().await.unwrap(),
        Message::text(r#"{"op":"ping","t":7}"#)
    );
    let stats = conn.stats();
    assert_eq!((stats.pongs_received, stats.pongs_unmatched), (1, 0));
    assert!(stats.last_rtt.is_some());
    let count = counters(&recorder);
    assert_eq!(count(names::MESSAGES_RECEIVED), 2, "both were delivered");
    assert_eq!(
        count(names::MESSAGES_SENT),
        0,
        "a probe and a reply went out"
    );
}

#[tokio::test(start_paused = true)]
async fn the_peers_app_pings_are_answered_and_not_delivered_by_default() {
    // Ping frames for our own heartbeat; the peer pings with messages.
    let config = heartbeat(SEC, SEC).answer_app_pings(reply).build().unwrap();
    let (sup, _events) = supervisor(config);
    let (mut conn, mut peer) = accept_raw(&sup).await;
    for t in 0..3 {
        let ping = format!(r#"{{"op":"ping","t":{t}}}"#);
        peer.send(OP_TEXT, ping.as_bytes()).await;
        let answer = peer.read_until(OP_TEXT).await.unwrap();
        assert_eq!(answer.payload, pong(Some(t)));
    }
    peer.send(OP_TEXT, b"data").await;
    assert_eq!(conn.recv().await.unwrap(), Message::text("data"));
    // Our own heartbeat still uses ping frames.
    let ping = peer.read_until(OP_PING).await.unwrap();
    assert_eq!(ping.payload.len(), 8);
    peer.send(OP_PONG, &ping.payload).await;
    sleep(10 * MS).await;
    assert_eq!(conn.stats().pongs_received, 1);
}

/// The metrics count probes as pings and answers as pongs, not as messages.
#[tokio::test(start_paused = true)]
async fn probes_and_answers_move_the_ping_and_pong_series() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let config = app(SEC, SEC).build().unwrap();
    let (sup, events) = metrics::with_local_recorder(&recorder, || supervisor(config));
    let (mut conn, peer) = accept_raw(&sup).await;
    let peer = tokio::spawn(answering_peer(peer, 50 * MS, 3, |t| pong(Some(t))));
    assert_eq!(conn.recv().await.unwrap(), Message::text("hello"));
    drop(conn);
    peer.await.unwrap();
    events.wait_for(1).await;

    // One snapshot: taking one resets the debugging recorder's counters.
    let snapshot = snapshotter.snapshot().into_vec();
    let value = |name: &str| {
        snapshot
            .iter()
            .find(|(key, ..)| key.key().name() == name)
            .map(|(.., value)| value)
    };
    let count = |name| match value(name) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(count(names::PINGS_SENT), 3);
    assert_eq!(count(names::PONGS_RECEIVED), 3);
    assert_eq!(count(names::PONGS_UNMATCHED), 0);
    // Only the peer's `hello` was a message; the probes were no messages sent.
    assert_eq!(count(names::MESSAGES_RECEIVED), 1);
    assert_eq!(count(names::MESSAGES_SENT), 0);
    match value(names::RTT) {
        Some(DebugValue::Histogram(samples)) => {
            assert_eq!(samples.len(), 3);
            assert!(
                samples.iter().all(|s| (0.050..0.051).contains(&s.0)),
                "{samples:?}"
            );
        }
        other => panic!("rtt: {other:?}"),
    }
}

// ===== the write side =====

/// A probe due while a large message is being written waits for it: it is
/// skipped, as a ping frame is (`docs/keepalive.md`, "Writes"), and the
/// next one follows the message whole; the peer is not held to the skipped
/// one.
#[tokio::test(start_paused = true)]
async fn a_large_message_being_written_delays_the_probe_rather_than_interleaving() {
    const SIZE: usize = 256 * 1024;
    let config = app(SEC, SEC)
        .liveness(Liveness::Pong)
        .write_timeout(10 * SEC)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (conn, mut peer) = accept_raw_with(&sup, 4096).await;
    let opened = Instant::now();
    conn.send(Message::binary(vec![7u8; SIZE])).await.unwrap();

    // The peer reads 8 KiB every 50 ms: the message takes 1.6 s, across
    // the probe due at 1 s.
    let mut bytes = vec![0u8; 2 + 8 + SIZE];
    for chunk in bytes.chunks_mut(8192) {
        peer.reader.read_exact(chunk).await.unwrap();
        sleep(50 * MS).await;
    }
    let read = Instant::now() - opened;
    assert!(read > SEC + 500 * MS, "{read:?}");
    // One whole binary frame, no probe inside it.
    assert_eq!(bytes[0], 0x82, "FIN + binary");
    assert_eq!(bytes[1], 127);
    assert_eq!(
        u64::from_be_bytes(bytes[2..10].try_into().unwrap()),
        SIZE as u64
    );
    assert!(
        bytes[10..].iter().all(|&b| b == 7),
        "the message was interleaved"
    );
    assert_eq!(
        conn.stats().pings_sent,
        0,
        "the probe due at 1 s was skipped"
    );

    // The next probe comes at its slot, 2 s, after the message.
    let next = peer.read_frame().await.unwrap();
    assert_eq!(Instant::now() - opened, 2 * SEC);
    let t = nonce_of(&next);
    peer.send(OP_TEXT, &pong(Some(t))).await;
    sleep(10 * MS).await;
    let stats = conn.stats();
    assert_eq!(
        (
            stats.pings_sent,
            stats.pongs_received,
            stats.pongs_unmatched
        ),
        (1, 1, 0)
    );
    assert!(
        conn.close_event().is_none(),
        "the peer was held to a skipped probe"
    );
    assert_eq!(events.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_peer_ping_while_a_large_message_is_written_is_answered_after_it() {
    const SIZE: usize = 64 * 1024;
    let config = heartbeat(60 * SEC, 60 * SEC)
        .answer_app_pings(reply)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, mut peer) = accept_raw_with(&sup, 4096).await;
    conn.send(Message::binary(vec![7u8; SIZE])).await.unwrap();
    sleep(MS).await;
    // Three pings while our message is stuck: only the latest is answered.
    for t in 0..3 {
        let ping = format!(r#"{{"op":"ping","t":{t}}}"#);
        peer.send(OP_TEXT, ping.as_bytes()).await;
    }
    sleep(MS).await;
    let message = peer.read_frame().await.unwrap();
    assert_eq!((message.opcode, message.payload.len()), (OP_BINARY, SIZE));
    let answer = peer.read_frame().await.unwrap();
    assert_eq!(answer.payload, pong(Some(2)));
    // Nothing else is waiting: the next frame is a fresh answer.
    peer.send(OP_TEXT, br#"{"op":"ping","t":9}"#).await;
    assert_eq!(peer.read_frame().await.unwrap().payload, pong(Some(9)));
}

// ===== user code =====

#[tokio::test(start_paused = true)]
async fn a_panicking_recogniser_ends_the_connection_as_internal() {
    quiet_expected_panics();
    let config = heartbeat(SEC, SEC)
        .app_heartbeat(probe, |m| {
            if m.to_text().is_ok_and(|t| t == "boom") {
                panic!("{EXPECTED_PANIC} recogniser");
            }
            None
        })
        .build()
        .unwrap();
    boom_ends_as_app_panicked(config).await;
}

/// Under `config`, whose user function panics on the message `boom`: the
/// peer sends it, and the connection ends as `Internal`.
async fn boom_ends_as_app_panicked(config: ws_supervisor::Config) {
    let (sup, events) = supervisor(config);
    let (conn, mut peer) = accept_raw(&sup).await;
    peer.send(OP_TEXT, b"boom").await;
    let close = peer.read_until(OP_CLOSE).await.unwrap();
    ended_as_app_panicked(close, &conn, &mut peer, &events).await;
}

/// `close` is our Close 1011: the peer answers it, and the connection ends
/// as `Internal`, local, "application panicked", hooks run once.
async fn ended_as_app_panicked(
    close: Frame,
    conn: &ws_supervisor::Connection,
    peer: &mut RawPeer<tokio::io::DuplexStream>,
    events: &Events,
) -> ws_supervisor::CloseEvent {
    assert_eq!(close.close_code(), Some(1011));
    peer.send(OP_CLOSE, &close.payload).await;
    let event = conn.closed().await;
    assert_eq!(
        (event.reason, event.initiator, event.text.as_str()),
        (
            CloseReason::Internal,
            Initiator::Local,
            "application panicked"
        )
    );
    assert_eq!(events.len(), 1);
    event
}

#[tokio::test(start_paused = true)]
async fn a_panicking_reply_to_the_peers_ping_ends_the_connection_as_internal() {
    quiet_expected_panics();
    let config = heartbeat(SEC, SEC)
        .answer_app_pings(|m| {
            if m.to_text().is_ok_and(|t| t == "boom") {
                panic!("{EXPECTED_PANIC} reply");
            }
            None
        })
        .build()
        .unwrap();
    boom_ends_as_app_panicked(config).await;
}

/// A reply above the write-buffer limit is not sent; the connection goes on.
#[tokio::test(start_paused = true)]
async fn a_reply_that_cannot_be_sent_is_not_sent() {
    let config = heartbeat(SEC, SEC)
        .write_buffer_limit(1024)
        .answer_app_pings(|m| {
            (m.to_text().ok()? == "ping?").then(|| Message::binary(vec![0; 2048]))
        })
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (mut conn, mut peer) = accept_raw(&sup).await;
    peer.send(OP_TEXT, b"ping?").await;
    peer.send(OP_TEXT, b"data").await;
    assert_eq!(conn.recv().await.unwrap(), Message::text("data"));
    assert!(conn.close_event().is_none());
    drop(conn);
    events.wait_for(1).await;
    let frames = peer.drain().await;
    assert_eq!(
        frames.iter().map(|f| f.opcode).collect::<Vec<_>>(),
        [OP_CLOSE],
        "no reply went out, only our Close"
    );
}

/// Probes built by a function that misbehaves once the config is built:
/// `build()` checked its first probe, so a later one is caught at run time.
fn misbehaving_probe(
    mode: &'static std::sync::atomic::AtomicU8,
) -> impl Fn(u64) -> Message + Send + Sync + 'static {
    move |nonce| match mode.load(std::sync::atomic::Ordering::Relaxed) {
        0 => probe(nonce),
        1 => Message::binary(vec![0; 2048]),
        _ => panic!("{EXPECTED_PANIC} probe builder"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_cannot_be_sent_is_skipped_and_the_peer_not_held_to_it() {
    static MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let config = heartbeat(SEC, SEC)
        .liveness(Liveness::Pong)
        .write_buffer_limit(1024)
        .app_heartbeat(misbehaving_probe(&MODE), answer)
        .build()
        .unwrap();
    // From now on every probe is larger than the write-buffer limit.
    MODE.store(1, std::sync::atomic::Ordering::Relaxed);
    let (sup, events) = supervisor(config);
    let (conn, peer) = accept_raw(&sup).await;
    let drained = tokio::spawn(peer.drain());
    // A silent peer, five intervals: no probe went out, so no deadline ran.
    sleep(5 * SEC + 500 * MS).await;
    assert!(conn.close_event().is_none(), "{:?}", conn.close_event());
    assert_eq!(conn.stats().pings_sent, 0);
    drop(conn);
    events.wait_for(1).await;
    let frames = drained.await.unwrap();
    assert_eq!(
        frames.iter().map(|f| f.opcode).collect::<Vec<_>>(),
        [OP_CLOSE],
        "only our Close went out"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_probe_builder_ends_the_connection_as_internal() {
    static MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    quiet_expected_panics();
    let config = heartbeat(SEC, SEC)
        .app_heartbeat(misbehaving_probe(&MODE), answer)
        .build()
        .unwrap();
    MODE.store(2, std::sync::atomic::Ordering::Relaxed);
    let (sup, events) = supervisor(config);
    let (conn, mut peer) = accept_raw(&sup).await;
    let opened = Instant::now();
    let close = peer.read_frame().await.unwrap();
    // At the first probe's time, a Close 1011 instead of the probe.
    assert_eq!(Instant::now() - opened, SEC);
    let event = ended_as_app_panicked(close, &conn, &mut peer, &events).await;
    assert_eq!(event.stats.pings_sent, 0);
}

// ===== real sockets =====

/// A browser-like client (plain tungstenite) pings a supervised server with
/// messages and gets answers; a supervised client with an application
/// heartbeat gets its probes answered by the same server. Real loopback,
/// real time, on a multi-thread runtime; the time bounds only guard
/// against hangs.
#[test]
fn the_answering_mode_over_loopback_on_a_multi_thread_runtime() {
    const BOUND: Duration = Duration::from_secs(20);
    multi_thread().block_on(async {
        let config = heartbeat(SEC, 5 * SEC)
            .answer_app_pings(reply)
            .build()
            .unwrap();
        let (server, server_events) = supervisor(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // An echo server: anything the application gets goes back.
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        let accepting = server.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let mut conn = accepting.accept_tcp(tcp).await.unwrap();
                let log = log.clone();
                tokio::spawn(async move {
                    while let Some(message) = conn.recv().await {
                        log.lock().unwrap().push(message.clone());
                        if conn.send(message).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });

        // The browser-like client.
        let url = format!("ws://{addr}/");
        let (mut browser, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        for t in [1u64, 2, 3] {
            let ping = format!(r#"{{"op":"ping","t":{t}}}"#);
            browser.send(Message::text(ping)).await.unwrap();
            let answer = tokio::time::timeout(BOUND, browser.next())
                .await
                .expect("an answer")
                .unwrap()
                .unwrap();
            assert_eq!(answer.into_data().as_ref(), pong(Some(t)));
        }
        browser.send(Message::text("hello")).await.unwrap();
        let echo = tokio::time::timeout(BOUND, browser.next()).await.unwrap();
        assert_eq!(echo.unwrap().unwrap(), Message::text("hello"));

        // A supervised client whose heartbeat is the same JSON ping.
        let config = app(50 * MS, 5 * SEC)
            .liveness(Liveness::Pong)
            .build()
            .unwrap();
        let (client, client_events) = supervisor(config);
        let conn = client.connect(url.as_str()).await.unwrap();
        let mut answered = false;
        for _ in 0..400 {
            if conn.stats().pongs_received >= 5 {
                answered = true;
                break;
            }
            sleep(25 * MS).await;
        }
        assert!(answered, "{:?}", conn.stats());
        let stats = conn.stats();
        assert_eq!(stats.pongs_unmatched, 0, "{stats:?}");
        assert!(stats.last_rtt.is_some());
        assert!(conn.close_event().is_none());

        // The server's application saw only `hello`: every ping was answered
        // by the supervisor and kept from it.
        assert_eq!(*received.lock().unwrap(), vec![Message::text("hello")]);

        conn.close(CloseCode::Normal, "").await.unwrap();
        assert_eq!(conn.closed().await.reason, CloseReason::Normal);
        browser.close(None).await.unwrap();
        while let Ok(Some(Ok(_))) = tokio::time::timeout(BOUND, browser.next()).await {}
        assert!(server_events.wait_within(2, BOUND).await);
        assert!(client_events.wait_within(1, BOUND).await);
        for event in server_events.all() {
            assert_eq!(event.reason, CloseReason::Normal, "{event:?}");
        }
    });
}
