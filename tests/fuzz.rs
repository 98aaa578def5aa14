//! Property-based fuzzing of a supervised server connection: arbitrary bytes
//! and arbitrary sequences of peer and application behaviour, each case on a
//! fresh supervisor over an in-memory pipe under virtual time.
//!
//! Whatever happens: no panic, exactly one close event with a reason from
//! the table, the supervisor empty and its live gauge back at 0.
//!
//! `PROPTEST_CASES` sets the number of cases (default 256, a few seconds);
//! CI runs more. Failing cases are shrunk and saved to
//! `tests/fuzz.proptest-regressions`, which is replayed first on every run.

mod support;

use std::future::IntoFuture;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use proptest::prelude::*;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::time::{sleep, timeout};
use ws_supervisor::metrics::names;
use ws_supervisor::{CloseCode, CloseEvent, CloseReason, Supervisor};

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
    /// Virtual time passes.
    Wait(u64),
    /// The application sends a message.
    AppSend(usize),
    /// The application closes with a valid code.
    AppClose(u16),
    /// The application drops its connection.
    AppDrop,
}

/// How the peer leaves at the end.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Drops the transport.
    Vanish,
    /// Keeps reading, never answers (the heartbeat must catch it).
    Silent,
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
        (0u64..4000).prop_map(Step::Wait),
        (0usize..300).prop_map(Step::AppSend),
        prop_oneof![Just(1000u16), Just(1001), Just(1008), Just(4000)].prop_map(Step::AppClose),
        Just(Step::AppDrop),
    ]
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![Just(Ending::Vanish), Just(Ending::Silent)]
}

/// Runs one case; returns the close event.
async fn run_case(sup: &Supervisor, events: &Events, steps: Vec<Step>, end: Ending) -> CloseEvent {
    let (server, client) = tokio::io::duplex(16 * 1024);
    let (conn, peer) = tokio::join!(sup.accept(server).into_future(), RawPeer::handshake(client));
    let conn = conn.expect("handshake");
    let RawPeer { reader, mut writer } = peer;
    // The peer always reads what we send (frames parsed and discarded), so
    // that only the steps decide the outcome.
    let mut reader = reader;
    let drain = tokio::spawn(async move { while read_frame(&mut reader).await.is_some() {} });
    let sender = conn.sender();
    let mut conn = Some(conn);
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
            Step::Wait(ms) => sleep(MS * ms as u32).await,
            Step::AppSend(len) => {
                // Errors (closed, or at the limit) are fine: nothing may panic.
                let _ = timeout(SEC, sender.send(vec![b'x'; len])).await;
            }
            Step::AppClose(code) => {
                if !closed_by_app {
                    closed_by_app = true;
                    let _ = sender.close(CloseCode::from(code), "bye").await;
                }
            }
            Step::AppDrop => {
                conn.take();
            }
        }
    }
    if let Ending::Vanish = end {
        drop(writer);
        drain.abort();
    }
    // Bounded by every deadline: interval + jitter + timeout, close and write timeouts.
    let waited = timeout(120 * SEC, async {
        loop {
            if let Some(event) = events.all().into_iter().next() {
                return event;
            }
            sleep(10 * MS).await;
        }
    })
    .await;
    drop(conn);
    waited.expect("the connection ended within every deadline")
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_peer_ends_in_exactly_one_classified_close(
        steps in prop::collection::vec(step(), 0..12),
        end in ending(),
    ) {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let events = Events::default();
        let sink = events.clone();
        let config = heartbeat(SEC, SEC)
            .max_message_size(1024)
            .max_frame_size(512)
            .write_buffer_limit(4096)
            .close_timeout(2 * SEC)
            .write_timeout(3 * SEC)
            .build()
            .unwrap();
        let sup = metrics::with_local_recorder(&recorder, || {
            Supervisor::builder(config).on_close(move |e: &CloseEvent| sink.push(e.clone())).build()
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let event = runtime.block_on(async {
            let event = run_case(&sup, &events, steps, end).await;
            // Let the driver task finish its bookkeeping.
            sleep(MS).await;
            event
        });
        prop_assert!(CloseReason::ALL.contains(&event.reason));
        prop_assert_eq!(events.len(), 1, "exactly one hook call: {:#?}", events.all());
        prop_assert_eq!(sup.len(), 0);
        let live = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(key, ..)| key.key().name() == names::CONNECTIONS)
            .map(|(.., value)| value);
        prop_assert!(matches!(live, Some(DebugValue::Gauge(v)) if v.0 == 0.0), "live gauge: {:?}", live);
    }
}
