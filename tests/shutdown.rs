//! Graceful shutdown and exactly-once hooks at scale.
//!
//! Each scenario runs twice: under virtual time on the current-thread
//! runtime (in-memory pipes; exact timings asserted), and on a
//! multi-thread runtime with 2 workers in real time, where only outcomes
//! are asserted (one hook call per connection, reasons, gauges back at 0,
//! nothing left behind), never durations. Their metrics go to the global
//! recorder of `support::recorder`, one `supervisor` label per test.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use support::recorder::{self, assert_gauges_at_zero};
use support::*;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use ws_supervisor::{
    CloseCode, CloseEvent, CloseReason, Config, HandshakeFailure, Initiator, ShutdownSummary,
    Supervisor,
};

/// Whether this test runs on the multi-thread runtime (real time).
fn multi_thread_runtime() -> bool {
    Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread
}

/// Tasks alive on this runtime.
fn alive_tasks() -> usize {
    Handle::current().metrics().num_alive_tasks()
}

/// Asserts that no task is left on this runtime. On the multi-thread runtime
/// a finished task leaves the count just after its `JoinHandle` resolves,
/// so the check is retried (bounded: 1000 steps of 1 ms).
async fn assert_no_task_left(what: &str) {
    if multi_thread_runtime() {
        for _ in 0..1000 {
            if alive_tasks() == 0 {
                return;
            }
            tokio::time::sleep(MS).await;
        }
    }
    assert_eq!(alive_tasks(), 0, "{what}");
}

// ===== 1000 connections, 100 silent =====

/// 1000 connections over `net`, every tenth peer silent (reads everything,
/// never answers, never closes), the others tungstenite clients; then
/// `shutdown(grace)`. Checks what holds on any runtime and returns the
/// summary and how long the shutdown took, for the runtime's own checks.
async fn shutdown_1000_with_100_silent(
    net: &Net,
    grace: Duration,
    label: &str,
) -> (ShutdownSummary, Duration) {
    let (sup, events) = recorder::supervisor(heartbeat(60 * SEC, 10 * SEC).build().unwrap(), label);
    let mut cooperative = Vec::new();
    let mut silent = Vec::new();
    let mut conns = Vec::new();
    for i in 0..1000 {
        if i % 10 == 0 {
            // Reads everything, never answers, never closes.
            let (conn, peer) = net.accept_raw(&sup).await;
            silent.push(tokio::spawn(peer.drain()));
            conns.push(conn);
        } else {
            let (conn, mut peer) = net.accept_ws(&sup).await;
            cooperative.push(tokio::spawn(async move {
                let mut first_close = None;
                while let Some(Ok(message)) = peer.next().await {
                    if let Message::Close(frame) = message {
                        first_close.get_or_insert(frame.map(|f| f.code));
                    }
                }
                first_close
            }));
            conns.push(conn);
        }
    }
    assert_eq!(sup.len(), 1000);
    let tasks_before = alive_tasks();

    let started = Instant::now();
    let summary = sup.shutdown(grace).await;
    let took = Instant::now() - started;

    assert_eq!(summary.count(CloseReason::GoingAway), 1000, "{summary}");
    assert_eq!(summary.total(), 1000);
    assert!(
        summary.forced() >= 100,
        "the silent peers are forced: {summary}"
    );
    assert_eq!(sup.len(), 0);
    assert!(sup.is_empty());

    for peer in cooperative {
        assert_eq!(peer.await.unwrap(), Some(Some(CloseCode::Away)));
    }
    for peer in silent {
        let frames = peer.await.unwrap();
        assert_eq!(frames.last().and_then(Frame::close_code), Some(1001));
    }
    let all = events.all();
    assert_eq!(all.len(), 1000);
    let mut ids: Vec<_> = all.iter().map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "each hook ran once");
    assert!(
        all.iter()
            .all(|e| (e.reason, e.initiator) == (CloseReason::GoingAway, Initiator::Local))
    );
    for conn in &conns {
        assert_eq!(conn.closed().await.reason, CloseReason::GoingAway);
    }
    // Every driver task is gone (and every peer task was awaited above).
    assert_eq!(
        tasks_before, 2000,
        "1000 drivers and 1000 peers were running"
    );
    assert_no_task_left("driver tasks left behind").await;
    assert_gauges_at_zero(label);
    (summary, took)
}

#[tokio::test(start_paused = true)]
async fn shutdown_1000_connections_100_silent() {
    let grace = 5 * SEC;
    let (summary, took) = shutdown_1000_with_100_silent(&Net::Memory, grace, "shutdown-1000").await;
    assert!(
        took >= grace && took <= grace + 10 * MS,
        "shutdown took {took:?}"
    );
    assert_eq!(summary.forced(), 100, "only the silent peers are forced");
}

/// The same on 2 worker threads in real time: outcomes only. (In-memory
/// pipes: 1000 loopback connections would need 2000 file descriptors, more
/// than a default soft limit of 1024.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_1000_connections_100_silent_multi_thread() {
    // The silent peers hold the shutdown for the whole grace: keep it short.
    // A cooperative peer slower than that is forced too, so `forced` is
    // only bounded below.
    shutdown_1000_with_100_silent(&Net::Memory, SEC, "shutdown-1000-mt").await;
}

// ===== admission after the shutdown =====

/// After a shutdown, a handshake over `net` is refused with 503 and no hook runs.
async fn refuses_after_shutdown(net: &Net, label: &str) {
    let (sup, events) = recorder::supervisor(Config::default(), label);
    let summary = sup.shutdown(SEC).await;
    assert_eq!(summary.total(), 0);
    assert!(sup.is_shutting_down());
    let (server, client) = net.pipe().await;
    let (conn, client) = tokio::join!(
        std::future::IntoFuture::into_future(sup.accept(server)),
        tokio_tungstenite::client_async("ws://localhost/", client)
    );
    assert_eq!(
        conn.unwrap_err().handshake_failure(),
        Some(HandshakeFailure::ShuttingDown)
    );
    match client.unwrap_err() {
        ws_supervisor::tungstenite::Error::Http(res) => assert_eq!(res.status(), 503),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(events.len(), 0);
    assert_gauges_at_zero(label);
}

#[tokio::test(start_paused = true)]
async fn shutdown_refuses_new_connections() {
    refuses_after_shutdown(&Net::Memory, "refuses").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_connections_multi_thread() {
    refuses_after_shutdown(&Net::loopback().await, "refuses-mt").await;
}

// ===== exactly once, over random endings =====

/// What a peer (or the application) does to end its connection.
#[derive(Debug, Clone, Copy)]
enum Ending {
    PeerClose1000,
    PeerClose1001,
    Silent,
    InvalidUtf8,
    Dropped,
    AppClose,
    AppPanic,
}

impl Ending {
    const ALL: [Self; 7] = [
        Self::PeerClose1000,
        Self::PeerClose1001,
        Self::Silent,
        Self::InvalidUtf8,
        Self::Dropped,
        Self::AppClose,
        Self::AppPanic,
    ];

    fn expected(self) -> (CloseReason, Initiator) {
        use CloseReason as R;
        use Initiator::{Local, Remote};
        match self {
            Self::PeerClose1000 => (R::Normal, Remote),
            Self::PeerClose1001 => (R::GoingAway, Remote),
            Self::Silent => (R::Timeout, Local),
            Self::InvalidUtf8 => (R::ProtocolError, Remote),
            Self::Dropped => (R::Abnormal, Remote),
            Self::AppClose => (R::Normal, Local),
            Self::AppPanic => (R::Internal, Local),
        }
    }
}

/// The heartbeat, the close timeout and the spread of the endings, per
/// runtime.
#[derive(Debug, Clone, Copy)]
struct Pace {
    ping_interval: Duration,
    pong_timeout: Duration,
    /// How long we wait for the peer's answer to our Close (the peers of
    /// the protocol-error and application-panic endings never answer).
    close_timeout: Duration,
    /// Each connection ends after a random delay below this.
    spread: Duration,
}

impl Pace {
    /// Virtual time: a second each, the default close timeout, endings
    /// over 3 s.
    const VIRTUAL: Self = Self {
        ping_interval: SEC,
        pong_timeout: SEC,
        close_timeout: Duration::from_secs(5),
        spread: Duration::from_secs(3),
    };

    /// Real time, about 2.5 s in all: every peer that answers pings has
    /// 1.5 s to do so and every Close is answered within 1 s, far more
    /// than a busy 2-CPU machine needs, so the reasons stay exact.
    const REAL: Self = Self {
        ping_interval: Duration::from_millis(500),
        pong_timeout: Duration::from_millis(1500),
        close_timeout: SEC,
        spread: Duration::from_millis(500),
    };
}

/// `n` connections over `net`, each ending one random way at a random
/// moment, with a second hook that panics on every seventh: every
/// connection gets exactly one hook call with the reason its ending calls
/// for, and the counts, hook panics and gauges add up.
async fn exactly_once_over_random_endings(net: &Net, n: usize, pace: Pace, label: &str) {
    quiet_expected_panics();
    recorder::install();
    let calls = Arc::new(Mutex::new(
        HashMap::<u64, Vec<(CloseReason, Initiator)>>::new(),
    ));
    let panics = Arc::new(AtomicU64::new(0));
    let recorder = calls.clone();
    let panicky = panics.clone();
    let config = heartbeat(pace.ping_interval, pace.pong_timeout)
        .close_timeout(pace.close_timeout)
        .build()
        .unwrap();
    let sup = Supervisor::builder(config)
        .metric_label("supervisor", label)
        .on_close(move |e: &CloseEvent| {
            recorder
                .lock()
                .unwrap()
                .entry(e.id.as_u64())
                .or_default()
                .push((e.reason, e.initiator));
        })
        .on_close(move |e: &CloseEvent| {
            // A second hook that panics on every seventh connection.
            if e.id.as_u64() % 7 == 0 {
                panicky.fetch_add(1, Relaxed);
                panic!("hook bug on {} {EXPECTED_PANIC}", e.id);
            }
        })
        .build();

    let mut rng = Rng::new(0x5eed);
    let mut expected = HashMap::new();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let ending = Ending::ALL[rng.below(Ending::ALL.len() as u64) as usize];
        let delay = MS * rng.below(pace.spread.as_millis() as u64) as u32;
        let (conn, mut peer) = net.accept_raw(&sup).await;
        expected.insert(conn.id().as_u64(), ending.expected());
        tasks.push(tokio::spawn(async move {
            // Everyone answers pings until its moment comes, so only the
            // silent ones time out.
            let mut conn = Some(conn);
            let until = Instant::now() + delay;
            loop {
                tokio::select! {
                    frame = peer.read_frame() => match frame {
                        Some(f) if f.opcode == OP_PING => peer.send(OP_PONG, &f.payload).await,
                        Some(_) => {}
                        None => return,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            match ending {
                Ending::PeerClose1000 => peer.close(1000, "").await,
                Ending::PeerClose1001 => peer.close(1001, "").await,
                Ending::Silent => {}
                Ending::InvalidUtf8 => peer.send(OP_TEXT, &[0xc3, 0x28]).await,
                Ending::Dropped => {
                    // The application keeps its end until the supervisor saw it.
                    drop(peer);
                    conn.take().unwrap().closed().await;
                    return;
                }
                Ending::AppClose => {
                    let conn = conn.take().unwrap();
                    conn.close(CloseCode::Normal, "").await.unwrap();
                    let app = tokio::spawn(async move { conn.closed().await });
                    // Answer the Close, like a well-behaved client.
                    while let Some(f) = peer.read_frame().await {
                        if f.opcode == OP_CLOSE {
                            peer.close(1000, "").await;
                        }
                    }
                    app.await.unwrap();
                    return;
                }
                Ending::AppPanic => {
                    let conn = conn.take().unwrap();
                    let _ = tokio::spawn(async move {
                        let _held = conn;
                        panic!("application bug {EXPECTED_PANIC}");
                    })
                    .await;
                }
            }
            // Read (never answering pings) until the supervisor hangs up.
            peer.drain().await;
            drop(conn);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // On another thread, a peer may see its end before the driver has run
    // the hooks; the shutdown below must find nothing left. (On the
    // current-thread runtime the driver finishes in the poll that ends the
    // peer's wait, so nothing is waited for there.)
    if multi_thread_runtime() {
        wait_empty(&sup).await;
    }
    let summary = sup.shutdown(SEC).await;
    assert_eq!(
        summary.total(),
        0,
        "everything had ended before the shutdown: {summary}"
    );

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), n, "a hook call per accepted connection");
    assert_eq!(sup.accepted_total(), n as u64);
    let mut by_reason: HashMap<CloseReason, usize> = HashMap::new();
    let mut want_by_reason: HashMap<CloseReason, usize> = HashMap::new();
    for (id, want) in &expected {
        let got = &calls[id];
        assert_eq!(got.len(), 1, "connection {id} got {} hook calls", got.len());
        assert_eq!(&got[0], want, "connection {id}");
        *by_reason.entry(got[0].0).or_default() += 1;
        *want_by_reason.entry(want.0).or_default() += 1;
    }
    assert_eq!(by_reason, want_by_reason);
    for reason in CloseReason::ALL {
        assert_eq!(
            sup.closed_total(reason),
            by_reason.get(&reason).copied().unwrap_or(0) as u64
        );
    }
    let panicked = panics.load(Relaxed);
    assert!(panicked > 100);
    assert_eq!(sup.hook_panics(), panicked);
    assert!(sup.is_empty());
    assert_gauges_at_zero(label);
}

#[tokio::test(start_paused = true)]
async fn exactly_once_for_1200_concurrent_random_endings() {
    exactly_once_over_random_endings(&Net::Memory, 1200, Pace::VIRTUAL, "endings").await;
}

/// The same on 2 worker threads in real time (in-memory pipes, for the
/// file-descriptor limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_for_1200_concurrent_random_endings_multi_thread() {
    exactly_once_over_random_endings(&Net::Memory, 1200, Pace::REAL, "endings-mt").await;
}

/// Pins a bug found in review: a full inbound queue kept us from reading
/// the 1001 reply, so a cooperative client was forced at the end of grace.
#[tokio::test(start_paused = true)]
async fn shutdown_with_a_full_inbound_queue_is_not_forced() {
    let config = Config::builder()
        .max_message_size(64)
        .max_frame_size(64)
        .inbound_buffer_limit(64)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (_conn, mut peer) = accept_ws(&sup).await;
    futures::SinkExt::send(&mut peer, Message::text("a".repeat(64)))
        .await
        .unwrap();
    futures::SinkExt::send(&mut peer, Message::text("b".repeat(64)))
        .await
        .unwrap();
    tokio::time::sleep(10 * MS).await;
    let client = tokio::spawn(async move { while let Some(Ok(_)) = peer.next().await {} });
    let started = Instant::now();
    let summary = sup.shutdown(5 * SEC).await;
    client.await.unwrap();
    assert_eq!(summary.forced(), 0, "{summary}");
    assert_eq!(
        Instant::now(),
        started,
        "no wait for a peer that answered at once"
    );
}

/// Pins a bug found in review: a connection flushing its timeout Close
/// ignored the shutdown's grace and waited for the whole write timeout.
#[tokio::test(start_paused = true)]
async fn shutdown_grace_caps_a_connection_still_flushing_its_close() {
    let config = heartbeat(SEC, SEC).write_timeout(30 * SEC).build().unwrap();
    let (sup, events) = supervisor(config);
    // A 12-byte pipe and a peer that never reads: the ping fits, the 1011 Close does not.
    let (_conn, _peer) = accept_raw_with(&sup, 12).await;
    tokio::time::sleep(2 * SEC + 100 * MS).await;
    assert_eq!(events.len(), 0, "still flushing its Close");
    let started = Instant::now();
    let summary = sup.shutdown(SEC).await;
    assert_eq!(Instant::now() - started, SEC, "{summary}");
    assert_eq!(summary.forced(), 1);
    assert_eq!(
        summary.count(CloseReason::Timeout),
        1,
        "the first cause stays"
    );
}
