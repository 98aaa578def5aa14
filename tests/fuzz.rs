//! Property-based fuzzing of a supervised server connection: arbitrary bytes
//! and arbitrary sequences of peer and application behaviour, each case on a
//! fresh supervisor and a fresh runtime; every case ends with the
//! supervisor's `shutdown`.
//!
//! Whatever happens: no panic, exactly one close event with a reason from
//! the table, the supervisor empty, its connections and shutdown-remaining
//! gauges back at 0, the application's `Connection` (if it still holds one)
//! sees `closed()` resolve, and no task is left on the runtime.
//!
//! The same cases run twice:
//! - on the current-thread runtime under virtual time, over an in-memory
//!   pipe: `PROPTEST_CASES` cases (default 256, a few seconds in a debug
//!   build; CI runs 20 000);
//! - on a multi-thread runtime with 2 workers in real time, over loopback
//!   TCP, with every duration divided by 50 (`Run::scale`):
//!   `PROPTEST_CASES_MULTI_THREAD` cases (default 256, about 10 s in a debug
//!   build). Its own knob: `PROPTEST_CASES` does not reach it, so CI's
//!   20 000 for the first does not make this one run for a quarter of an
//!   hour.
//!
//! The application never reads, reads, or reads slowly; it may drop its
//! `Connection` while another of its tasks is sending, and it sends
//! messages up to past the write-buffer limit. The peer also sends bursts
//! of messages and messages past the size limits. Every case but those the
//! shutdown is meant to end must end by itself within the bound, an
//! application that never reads included (the inbound byte budget keeps
//! its dead peers detectable, and a stuck application is closed after
//! `ping_interval + pong_timeout`). (No case asserts which reason, only that
//! it is in the table.)
//!
//! Failing cases are shrunk and saved to `tests/fuzz.proptest-regressions`,
//! which is replayed first on every run.

mod support;

use std::future::IntoFuture;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use support::recorder;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use ws_supervisor::metrics::names;
use ws_supervisor::{CloseCode, CloseEvent, CloseReason, Config, Connection, Supervisor};

/// One step of the peer or the application.
#[derive(Debug, Clone)]
enum Step {
    /// Arbitrary bytes on the wire.
    Bytes(Vec<u8>),
    /// A frame with any header bits, masked or not.
    Frame {
        fin: bool,
        opcode: u8,
        masked: bool,
        payload: Vec<u8>,
    },
    /// A Close frame with any code and a short text.
    Close { code: u16, text: String },
    /// The peer sends this many small binary messages at once (more than the
    /// inbound queue holds, often).
    Burst(usize),
    /// The peer sends one binary message of `len` bytes in `frames`
    /// fragments (past the frame and message limits, often).
    Big { len: usize, frames: usize },
    /// Time passes (milliseconds, before scaling).
    Wait(u64),
    /// The application sends a message of this many bytes.
    AppSend(usize),
    /// The application closes with a valid code.
    AppClose(u16),
    /// The application drops its connection.
    AppDrop,
    /// The application drops its connection while another of its tasks is
    /// sending `n` messages of `len` bytes through a `Sender`.
    AppDropMidSend { n: usize, len: usize },
}

/// How the application takes its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum App {
    /// Never calls `recv`: the inbound queue fills.
    NeverReads,
    /// Takes every message at once.
    Reads,
    /// Waits this long (milliseconds, before scaling) after each message.
    ReadsSlowly(u64),
}

/// How the peer leaves at the end.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Drops the transport.
    Vanish,
    /// Keeps reading, never answers (the heartbeat must catch it).
    Silent,
    /// Sends a Close 1000 and keeps reading.
    PeerClose,
    /// Keeps reading; the supervisor's shutdown ends the connection.
    Shutdown,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48).prop_map(Step::Bytes),
        (
            any::<bool>(),
            0u8..16,
            prop::bool::weighted(0.9),
            prop::collection::vec(any::<u8>(), 0..160)
        )
            .prop_map(|(fin, opcode, masked, payload)| Step::Frame {
                fin,
                opcode,
                masked,
                payload
            }),
        (
            prop_oneof![
                Just(1000u16),
                Just(1001),
                Just(1002),
                Just(1005),
                Just(1011),
                0u16..5000
            ],
            "[a-z]{0,20}"
        )
            .prop_map(|(code, text)| Step::Close { code, text }),
        (1usize..40).prop_map(Step::Burst),
        // At most 12 steps of at most ~4 KiB: what the peer writes always
        // fits the 64 KiB in-memory pipe, even when the supervisor stops
        // reading (a full inbound queue), so a peer's write never hangs.
        (256usize..4096, 1usize..4).prop_map(|(len, frames)| Step::Big { len, frames }),
        (0u64..4000).prop_map(Step::Wait),
        prop_oneof![0usize..300, 1000usize..4097, 4097usize..70_000].prop_map(Step::AppSend),
        prop_oneof![Just(1000u16), Just(1001), Just(1008), Just(4000)].prop_map(Step::AppClose),
        Just(Step::AppDrop),
        (1usize..80, prop_oneof![0usize..300, 1000usize..4097])
            .prop_map(|(n, len)| Step::AppDropMidSend { n, len }),
    ]
}

fn app() -> impl Strategy<Value = App> {
    prop_oneof![
        Just(App::NeverReads),
        Just(App::Reads),
        // At most 12 × 40 messages × 100 ms: well within `Run::bound`.
        (1u64..100).prop_map(App::ReadsSlowly),
    ]
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        Just(Ending::Vanish),
        Just(Ending::Silent),
        Just(Ending::PeerClose),
        Just(Ending::Shutdown),
    ]
}

// ===== one case =====

/// How a case runs: its transport and its clock.
struct Run {
    net: Net,
    /// Every duration of the case (the config, the waits, the slow reads,
    /// the shutdown's grace) is divided by this.
    scale: u32,
    /// How long a connection that can end on its own may take to, before
    /// the case fails.
    bound: Duration,
}

impl Run {
    /// Virtual time (current-thread runtime), over an in-memory pipe.
    fn virtual_time() -> Self {
        Self {
            net: Net::Memory,
            scale: 1,
            bound: 120 * SEC,
        }
    }

    /// Real time (multi-thread runtime), over loopback TCP, 50 times faster.
    async fn real_time() -> Self {
        Self {
            net: Net::loopback().await,
            scale: 50,
            bound: 10 * SEC,
        }
    }

    /// `ms` milliseconds, scaled.
    fn ms(&self, ms: u64) -> Duration {
        Duration::from_millis(ms) / self.scale
    }

    /// The config of every case, scaled.
    fn config(&self) -> Config {
        let s = self.scale;
        heartbeat(SEC / s, SEC / s)
            .max_message_size(1024)
            .max_frame_size(512)
            .write_buffer_limit(4096)
            .close_timeout(2 * SEC / s)
            .write_timeout(3 * SEC / s)
            .build()
            .unwrap()
    }
}

/// What the application task is told.
enum Order {
    /// Drop the `Connection`.
    Drop,
    /// Return the `Connection`, if still held.
    HandBack,
}

/// The application: takes its messages as `app` says, until told to drop
/// its `Connection` or to hand it back.
async fn application(
    mut conn: Connection,
    app: App,
    slow: Duration,
    mut orders: mpsc::UnboundedReceiver<Order>,
) -> Option<Connection> {
    let mut ended = false;
    loop {
        tokio::select! {
            order = orders.recv() => match order {
                Some(Order::HandBack) => return Some(conn),
                Some(Order::Drop) | None => return None,
            },
            message = conn.recv(), if !ended && app != App::NeverReads => match message {
                Some(_) if app != App::Reads => sleep(slow).await,
                Some(_) => {}
                None => ended = true,
            },
        }
    }
}

/// Awaits `task`, bounded by `bound`; a task cancelled by `abort` is fine.
async fn finished<T>(task: JoinHandle<T>, bound: Duration, what: &str) -> Option<T> {
    match timeout(bound, task).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) if e.is_cancelled() => None,
        Ok(Err(e)) => panic!("{what} failed: {e}"),
        Err(_) => panic!("{what} did not finish within {bound:?}"),
    }
}

/// Runs one case on `sup`, then shuts the supervisor down; checks
/// everything but the gauges (the caller's recorder holds those).
async fn run_case(
    run: &Run,
    sup: &Supervisor,
    events: &Events,
    steps: Vec<Step>,
    app: App,
    end: Ending,
) -> Result<(), TestCaseError> {
    let (server, client) = run.net.pipe().await;
    let (conn, peer) = tokio::join!(sup.accept(server).into_future(), RawPeer::handshake(client));
    let conn = conn.expect("handshake");
    let RawPeer { reader, mut writer } = peer;
    // The peer always reads what we send (frames parsed and discarded), so
    // that only the steps decide the outcome.
    let mut reader = reader;
    let drain = tokio::spawn(async move { while read_frame(&mut reader).await.is_some() {} });
    let sender = conn.sender();
    let slow = match app {
        App::ReadsSlowly(ms) => run.ms(ms),
        _ => Duration::ZERO,
    };
    let (orders, rx) = mpsc::unbounded_channel();
    let application = tokio::spawn(application(conn, app, slow, rx));
    let mut senders = Vec::new();
    let mut closed_by_app = false;
    for step in steps {
        match step {
            Step::Bytes(bytes) => {
                let _ = writer.write_all(&bytes).await;
            }
            Step::Frame {
                fin,
                opcode,
                masked,
                payload,
            } => {
                let _ = writer
                    .write_all(&encode(fin, opcode, &payload, masked))
                    .await;
            }
            Step::Close { code, text } => {
                let mut payload = code.to_be_bytes().to_vec();
                payload.extend_from_slice(text.as_bytes());
                let _ = writer
                    .write_all(&encode(true, OP_CLOSE, &payload, true))
                    .await;
            }
            Step::Burst(n) => {
                let bytes: Vec<u8> = (0..n)
                    .flat_map(|i| encode(true, OP_BINARY, &i.to_be_bytes(), true))
                    .collect();
                let _ = writer.write_all(&bytes).await;
            }
            Step::Big { len, frames } => {
                let payload = vec![b'b'; len];
                let chunk = len.div_ceil(frames);
                for (i, part) in payload.chunks(chunk).enumerate() {
                    let opcode = if i == 0 { OP_BINARY } else { OP_CONT };
                    let fin = (i + 1) * chunk >= len;
                    let _ = writer.write_all(&encode(fin, opcode, part, true)).await;
                }
            }
            Step::Wait(ms) => sleep(run.ms(ms)).await,
            Step::AppSend(len) => {
                // Errors (closed, or at the limit) are fine: nothing may panic.
                let _ = timeout(run.ms(1000), sender.send(vec![b'x'; len])).await;
            }
            Step::AppClose(code) => {
                if !closed_by_app {
                    closed_by_app = true;
                    let _ = sender.close(CloseCode::from(code), "bye").await;
                }
            }
            Step::AppDrop => {
                let _ = orders.send(Order::Drop);
            }
            Step::AppDropMidSend { n, len } => {
                let sender = sender.clone();
                let patience = run.ms(1000);
                senders.push(tokio::spawn(async move {
                    for _ in 0..n {
                        match timeout(patience, sender.send(vec![b'y'; len])).await {
                            Ok(Ok(())) => {}
                            _ => break,
                        }
                    }
                }));
                tokio::task::yield_now().await;
                let _ = orders.send(Order::Drop);
            }
        }
    }
    match end {
        Ending::Vanish => {
            drop(writer);
            drain.abort();
        }
        Ending::PeerClose => {
            let mut payload = 1000u16.to_be_bytes().to_vec();
            payload.extend_from_slice(b"bye");
            let _ = writer
                .write_all(&encode(true, OP_CLOSE, &payload, true))
                .await;
        }
        Ending::Silent | Ending::Shutdown => {}
    }
    // Wait for the connection to end on its own, unless the shutdown is
    // meant to end it.
    match end {
        Ending::Shutdown => {}
        _ => {
            let ended = events.wait_within(1, run.bound).await;
            prop_assert!(ended, "the connection ended within every deadline");
        }
    }
    let grace = 2 * SEC / run.scale;
    let summary = sup.shutdown(grace).await;
    prop_assert!(summary.total() <= 1, "{}", summary);

    let event = events.all().into_iter().next();
    prop_assert!(event.is_some_and(|e| CloseReason::ALL.contains(&e.reason)));
    prop_assert_eq!(
        events.len(),
        1,
        "exactly one hook call: {:#?}",
        events.all()
    );
    prop_assert_eq!(sup.len(), 0);

    // Nothing left behind: the application, its senders and the peer finish,
    // and a `Connection` still held sees its close.
    let _ = orders.send(Order::HandBack);
    let bound = run.bound;
    if let Some(conn) = finished(application, bound, "the application")
        .await
        .flatten()
    {
        let closed = timeout(bound, conn.closed()).await;
        prop_assert!(closed.is_ok(), "closed() resolves");
    }
    for task in senders {
        finished(task, bound, "a sender task").await;
    }
    finished(drain, bound, "the peer's reader").await;
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    for _ in 0..1000 {
        if alive() == 0 {
            break;
        }
        sleep(MS).await;
    }
    prop_assert_eq!(alive(), 0, "tasks left on the runtime");
    Ok(())
}

// ===== the two runtimes =====

/// The number of cases from the environment variable `var`, default 256.
fn cases(var: &str) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases("PROPTEST_CASES"),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_peer_ends_in_exactly_one_classified_close(
        steps in prop::collection::vec(step(), 0..12),
        app in app(),
        end in ending(),
    ) {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let events = Events::default();
        let sink = events.clone();
        let run = Run::virtual_time();
        let config = run.config();
        let sup = metrics::with_local_recorder(&recorder, || {
            Supervisor::builder(config).on_close(move |e: &CloseEvent| sink.push(e.clone())).build()
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run_case(&run, &sup, &events, steps, app, end))?;
        // One snapshot: taking one resets every gauge and counter to 0.
        let gauges: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, .., value)| match value {
                DebugValue::Gauge(v) => Some((key.key().name().to_owned(), v.0)),
                _ => None,
            })
            .collect();
        for name in [names::CONNECTIONS, names::SHUTDOWN_REMAINING] {
            let value = gauges.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
            prop_assert_eq!(value, Some(0.0), "gauge {}", name);
        }
    }
}

/// The same cases on a multi-thread runtime with 2 workers, in real time.
///
/// Through proptest's runner rather than `proptest!`: the macro lets
/// `PROPTEST_CASES` override any `cases` it is given, and CI sets that to
/// 20 000 for the virtual-time variant (about 15 minutes here). Failures
/// are saved to, and replayed from, the same regressions file.
#[test]
fn any_peer_ends_in_exactly_one_classified_close_multi_thread() {
    let config = ProptestConfig {
        cases: cases("PROPTEST_CASES_MULTI_THREAD"),
        max_shrink_iters: 200,
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = (prop::collection::vec(step(), 0..12), app(), ending());
    let case = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&strategy, |(steps, app, end)| {
        // One label per case: a failed case leaves its own series behind.
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let label = format!("fuzz-mt-{n}");
        let events = Events::default();
        let sink = events.clone();
        let runtime = multi_thread();
        runtime.block_on(async {
            let run = Run::real_time().await;
            recorder::install();
            let sup = Supervisor::builder(run.config())
                .metric_label("supervisor", &label)
                .on_close(move |e: &CloseEvent| sink.push(e.clone()))
                .build();
            run_case(&run, &sup, &events, steps, app, end).await
        })?;
        for name in [names::CONNECTIONS, names::SHUTDOWN_REMAINING] {
            prop_assert_eq!(recorder::gauge(name, &label), 0.0, "gauge {}", name);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{runner}");
    }
}
