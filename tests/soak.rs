//! A bounded soak on real loopback TCP: many concurrent clients churn
//! through every ending for `SOAK_SECS` seconds (default 10). At the end
//! every hook ran exactly once, counts by reason match what the clients did,
//! the supervisor is empty, and file descriptors and RSS are back near their
//! start. Ignored by `cargo test`; .ci/run runs it:
//!
//! ```text
//! SOAK_SECS=20 cargo test --release --test soak -- --ignored
//! ```

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use ws_supervisor::{CloseCode, CloseEvent, CloseReason, Initiator, Supervisor};

#[derive(Debug, Clone, Copy)]
enum Ending {
    PeerClose,
    PeerAway,
    Vanish,
    Silent,
    InvalidUtf8,
    AppClose,
    AppPanic,
}

const ENDINGS: [Ending; 7] = [
    Ending::PeerClose,
    Ending::PeerAway,
    Ending::Vanish,
    Ending::Silent,
    Ending::InvalidUtf8,
    Ending::AppClose,
    Ending::AppPanic,
];

impl Ending {
    fn expected(self) -> (CloseReason, Initiator) {
        match self {
            Ending::PeerClose => (CloseReason::Normal, Initiator::Remote),
            Ending::PeerAway => (CloseReason::GoingAway, Initiator::Remote),
            Ending::Vanish => (CloseReason::Abnormal, Initiator::Remote),
            Ending::Silent => (CloseReason::Timeout, Initiator::Local),
            Ending::InvalidUtf8 => (CloseReason::ProtocolError, Initiator::Remote),
            Ending::AppClose => (CloseReason::Normal, Initiator::Local),
            Ending::AppPanic => (CloseReason::Internal, Initiator::Local),
        }
    }
}

/// Hook calls per connection id.
type Calls = Arc<Mutex<HashMap<u64, Vec<(CloseReason, Initiator)>>>>;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The server application: echoes; "close-me" closes normally, "panic" panics.
async fn serve(listener: TcpListener, sup: Supervisor) {
    while let Ok((tcp, _)) = listener.accept().await {
        let sup = sup.clone();
        tokio::spawn(async move {
            let Ok(mut conn) = sup.accept_tcp(tcp).await else {
                return;
            };
            while let Some(message) = conn.recv().await {
                match message.to_text().unwrap_or("") {
                    "close-me" => {
                        let _ = conn.close(CloseCode::Normal, "as asked").await;
                    }
                    "panic" => panic!("handler bug {EXPECTED_PANIC}"),
                    _ => {
                        let _ = conn.send(message).await;
                    }
                }
            }
        });
    }
}

/// One client: connects, ends its way, waits until the server hung up.
async fn client(addr: std::net::SocketAddr, ending: Ending) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut peer = RawPeer::handshake(tcp).await;
    match ending {
        Ending::PeerClose => peer.close(1000, "").await,
        Ending::PeerAway => peer.close(1001, "").await,
        Ending::Vanish => return,
        Ending::Silent => {}
        Ending::InvalidUtf8 => peer.send(OP_TEXT, &[0xc3, 0x28]).await,
        Ending::AppClose => {
            peer.send(OP_TEXT, b"close-me").await;
            // Answer the application's Close, like a well-behaved client.
            while let Some(frame) = peer.read_frame().await {
                if frame.opcode == OP_CLOSE {
                    peer.send(OP_CLOSE, &frame.payload).await;
                    break;
                }
            }
        }
        Ending::AppPanic => peer.send(OP_TEXT, b"panic").await,
    }
    peer.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of SOAK_SECS seconds (default 10): run explicitly, see the file header"]
async fn soak_every_ending_under_churn() {
    quiet_expected_panics();
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let workers = 200;
    let calls: Calls = Arc::default();
    let recorder = calls.clone();
    let config = heartbeat(Duration::from_millis(200), Duration::from_millis(200))
        .close_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let sup = Supervisor::builder(config)
        .on_close(move |e: &CloseEvent| {
            recorder
                .lock()
                .unwrap()
                .entry(e.id.as_u64())
                .or_default()
                .push((e.reason, e.initiator));
        })
        .build();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // Warm up once so the baseline includes the runtime's own allocations.
    let server = tokio::spawn(serve(listener, sup.clone()));
    client(addr, Ending::PeerClose).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds_start, rss_start) = (open_fds(), rss_kib());
    let already = sup.accepted_total();

    let deadline = Instant::now() + Duration::from_secs(secs);
    let done: Arc<Mutex<HashMap<(CloseReason, Initiator), u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(w as u64 + 1);
            let mut cycles = 0u64;
            // Bounded in time and in count.
            while Instant::now() < deadline && cycles < 100_000 {
                let ending = ENDINGS[rng.below(ENDINGS.len() as u64) as usize];
                timeout(Duration::from_secs(20), client(addr, ending))
                    .await
                    .expect("each cycle ends within its deadlines");
                *done.lock().unwrap().entry(ending.expected()).or_default() += 1;
                cycles += 1;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Every connection the clients saw end has ended on the server too, or
    // is about to (its hook may still be running): wait for the count.
    let expected_total: u64 = done.lock().unwrap().values().sum();
    timeout(Duration::from_secs(20), async {
        while CloseReason::ALL
            .iter()
            .map(|&r| sup.closed_total(r))
            .sum::<u64>()
            < already + expected_total
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every hook ran");

    let calls = calls.lock().unwrap().clone();
    let mut by_reason: HashMap<(CloseReason, Initiator), u64> = HashMap::new();
    for (id, got) in &calls {
        assert_eq!(got.len(), 1, "connection {id}: {} hook calls", got.len());
        *by_reason.entry(got[0]).or_default() += 1;
    }
    // The warm-up connection was a normal remote close.
    *by_reason
        .get_mut(&(CloseReason::Normal, Initiator::Remote))
        .unwrap() -= already;
    assert_eq!(by_reason.values().sum::<u64>(), expected_total);
    assert_eq!(
        by_reason,
        *done.lock().unwrap(),
        "counts by reason match what the clients did"
    );
    assert_eq!(sup.accepted_total(), already + expected_total);
    assert!(sup.is_empty());

    server.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds_end, rss_end) = (open_fds(), rss_kib());
    eprintln!(
        "soak: {expected_total} connections in {secs} s; fds {fds_start} -> {fds_end}; RSS {rss_start} -> {rss_end} KiB; {:?}",
        by_reason
    );
    assert!(
        fds_end <= fds_start + 2,
        "file descriptors leaked: {fds_start} -> {fds_end}"
    );
    assert!(
        rss_end <= rss_start + 64 * 1024,
        "RSS grew from {rss_start} to {rss_end} KiB"
    );
    assert!(
        expected_total > 1000,
        "the soak churned too little: {expected_total}"
    );
}
