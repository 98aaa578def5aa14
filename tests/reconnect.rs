//! The reconnecting client against real servers on 127.0.0.1: a server that
//! stops and comes back, a flapping server, refused upgrades with
//! `Retry-After`, each client-side handshake cause, and (ignored by default)
//! the loopback storm of 1000 clients. Real time, short backoffs; only
//! outcomes and counts are asserted, never durations. The backoff schedule,
//! server hints and shutdown under paused time are unit tests in
//! `src/client/`.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use ws_supervisor::{
    Backoff, CloseCode, CloseReason, Config, Decision, HandshakeFailure, Initiator, Jitter, Stop,
    Supervisor,
};

use support::{SEC, supervisor, wait_until};

/// Generous bound on anything that should happen at once.
const BOUND: Duration = Duration::from_secs(10);

/// A short, exact backoff for real-time tests: 10 ms, 20 ms, 40 ms, … 80 ms.
fn quick() -> Backoff {
    Backoff::builder()
        .min(Duration::from_millis(10))
        .max(Duration::from_millis(80))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

/// An echo server on `listener` that counts the "subscribe" messages it
/// receives, until aborted (which drops its listener and every connection).
fn echo_server(listener: TcpListener, subscribes: Arc<AtomicUsize>) -> JoinHandle<()> {
    let server = Supervisor::new(Config::default());
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = match server.accept(tcp).await {
                Ok(conn) => conn,
                Err(_) => continue,
            };
            let subscribes = subscribes.clone();
            conns.spawn(async move {
                while let Some(message) = conn.recv().await {
                    if message.to_text().is_ok_and(|t| t == "subscribe") {
                        subscribes.fetch_add(1, SeqCst);
                    }
                    let _ = conn.send(message).await;
                }
            });
        }
    })
}

async fn a_restarted_server_gets_its_client_back_resubscribed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let subscribes = Arc::new(AtomicUsize::new(0));
    let server = echo_server(listener, subscribes.clone());

    let (sup, events) = supervisor(Config::default());
    let mut client = sup
        .reconnecting(format!("ws://{addr}/feed"))
        .backoff(quick())
        .on_connect(|sender| async move { sender.send("subscribe").await })
        .build()
        .unwrap();

    let mut conn = timeout(BOUND, client.next()).await.unwrap().unwrap();
    assert_eq!(client.attempts(), 1);
    // The subscription was sent before the application got the connection:
    // its echo is the first message.
    assert_eq!(conn.recv().await.unwrap(), "subscribe".into());

    // Stop the server: its listener goes, and its connections close (the
    // dropped server-side `Connection` sends 1000).
    server.abort();
    let _ = server.await;
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(
        (event.initiator, event.code_received),
        (Initiator::Remote, Some(CloseCode::Normal)),
        "{event:?}"
    );
    // Let the client fail at least once against the closed port.
    let next = tokio::spawn(async move {
        let conn = timeout(BOUND, client.next()).await.unwrap().unwrap();
        (client, conn)
    });
    let refused = || sup.handshake_failures(HandshakeFailure::ConnectionRefused);
    wait_until("a refused attempt", || refused() >= 1).await;

    // Restart it on the same port.
    let listener = TcpListener::bind(addr).await.unwrap();
    let server = echo_server(listener, subscribes.clone());
    let (client, mut conn) = next.await.unwrap();
    assert_eq!(conn.recv().await.unwrap(), "subscribe".into());
    assert_eq!(subscribes.load(SeqCst), 2);
    // The first connection lived less than `reset_after` (60 s), so the
    // count goes on from it: 1, then every failed attempt, then this one.
    let failures: u64 = HandshakeFailure::ALL
        .iter()
        .map(|c| sup.handshake_failures(*c))
        .sum();
    let causes: Vec<_> = HandshakeFailure::ALL
        .iter()
        .map(|c| (c.as_str(), sup.handshake_failures(*c)))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(u64::from(client.attempts()), 1 + failures + 1, "{causes:?}");
    assert_eq!(
        client.last_error().and_then(|e| e.handshake_failure()),
        Some(HandshakeFailure::ConnectionRefused)
    );
    assert!(client.stopped().is_none());
    // One close hook call per connection so far: the first one.
    assert_eq!(events.len(), 1);
    drop(conn);
    assert!(events.wait_within(2, BOUND).await);
    server.abort();
}

#[tokio::test]
async fn a_restarted_server_gets_its_client_back_resubscribed_current_thread() {
    a_restarted_server_gets_its_client_back_resubscribed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_gets_its_client_back_resubscribed_multi_thread() {
    a_restarted_server_gets_its_client_back_resubscribed().await;
}

/// A server that accepts and at once closes with `code`, `flaps` times,
/// then keeps the next connection open.
fn flapping_server(listener: TcpListener, flaps: usize, code: CloseCode) -> JoinHandle<()> {
    let server = Supervisor::new(Config::default());
    tokio::spawn(async move {
        let mut kept = Vec::new();
        for n in 0.. {
            let (tcp, _) = listener.accept().await.unwrap();
            let conn = server.accept(tcp).await.unwrap();
            if n < flaps {
                conn.close(code, "flap").await.unwrap();
                conn.closed().await;
            } else {
                kept.push(conn);
            }
        }
    })
}

#[tokio::test]
async fn a_flapping_server_does_not_reset_the_backoff_and_the_attempts_count_up() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = flapping_server(listener, 4, CloseCode::Restart);
    let (sup, events) = supervisor(Config::default());
    let mut client = sup
        .reconnecting(format!("ws://{addr}/"))
        .backoff(quick())
        .build()
        .unwrap();
    let mut attempts = Vec::new();
    for _ in 0..5 {
        let conn = timeout(BOUND, client.next()).await.unwrap().unwrap();
        attempts.push(client.attempts());
        if attempts.len() < 5 {
            let event = timeout(BOUND, conn.closed()).await.unwrap();
            assert_eq!(event.code_received, Some(CloseCode::Restart));
            assert_eq!(event.reason, CloseReason::GoingAway);
        }
    }
    // Each connection lived far less than `reset_after` (60 s): the outage
    // goes on, so the count grows instead of restarting at 1.
    assert_eq!(attempts, [1, 2, 3, 4, 5]);
    assert_eq!(events.len(), 4);
    assert_eq!(sup.accepted_total(), 5);
    server.abort();
}

#[tokio::test]
async fn a_policy_code_can_make_the_client_give_up() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = flapping_server(listener, 1, CloseCode::from(4003));
    let (sup, _events) = supervisor(Config::default());
    let mut client = sup
        .reconnecting(format!("ws://{addr}/"))
        .backoff(quick())
        .on_policy_close(|code, text| {
            if u16::from(code) == 4003 && text == "flap" {
                Decision::GiveUp
            } else {
                Decision::Retry
            }
        })
        .build()
        .unwrap();
    let conn = timeout(BOUND, client.next()).await.unwrap().unwrap();
    assert!(timeout(BOUND, client.next()).await.unwrap().is_none());
    assert_eq!(
        client.stopped(),
        Some(&Stop::ServerClosed(CloseCode::from(4003)))
    );
    assert_eq!(
        conn.closed().await.code_received,
        Some(CloseCode::from(4003))
    );
    assert_eq!(sup.accepted_total(), 1);
    server.abort();
}

/// A server that answers every request with `response` and closes.
async fn http_server(response: String) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let _ = support::read_http_head(&mut tcp).await;
            let _ = tcp.write_all(response.as_bytes()).await;
            let _ = tcp.shutdown().await;
        }
    });
    (addr, task)
}

/// `at` as an IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn imf_fixdate(at: SystemTime) -> String {
    let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let days = (secs / 86_400) as i64;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {day:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
        months[month as usize - 1]
    )
}

#[tokio::test]
async fn a_refused_upgrade_exposes_its_status_and_retry_after() {
    let (sup, events) = supervisor(Config::default());
    let refusal = |status: &str, retry_after: &str| {
        format!("HTTP/1.1 {status}\r\nRetry-After: {retry_after}\r\nContent-Length: 0\r\n\r\n")
    };

    // Delay-seconds.
    let (addr, server) = http_server(refusal("503 Service Unavailable", "7")).await;
    let err = sup.connect(format!("ws://{addr}/")).await.unwrap_err();
    assert_eq!(err.handshake_failure(), Some(HandshakeFailure::HttpStatus));
    assert_eq!(err.http_status(), Some(503));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    assert!(err.to_string().contains("503"), "{err}");
    server.abort();

    // An HTTP date an hour ahead (second resolution: 3599 or 3600 s).
    let date = imf_fixdate(SystemTime::now() + Duration::from_secs(3600));
    let (addr, server) = http_server(refusal("429 Too Many Requests", &date)).await;
    let err = sup.connect(format!("ws://{addr}/")).await.unwrap_err();
    assert_eq!(err.http_status(), Some(429));
    let wait = err.retry_after().expect("a valid date");
    assert!((3598..=3600).contains(&wait.as_secs()), "{date}: {wait:?}");
    server.abort();

    // No header, or an invalid one: a status without a hint.
    let (addr, server) = http_server(refusal("401 Unauthorized", "later")).await;
    let err = sup.connect(format!("ws://{addr}/")).await.unwrap_err();
    assert_eq!((err.http_status(), err.retry_after()), (Some(401), None));
    server.abort();

    assert_eq!(sup.handshake_failures(HandshakeFailure::HttpStatus), 3);
    assert_eq!(events.len(), 0);
}

#[tokio::test]
async fn a_reconnecting_client_retries_a_503_and_counts_it_by_cause() {
    let (addr, server) = http_server(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n".into(),
    )
    .await;
    let (sup, _events) = supervisor(Config::default());
    let backoff = Backoff::builder()
        .min(Duration::from_millis(5))
        .max(Duration::from_millis(20))
        .max_attempts(3)
        .build()
        .unwrap();
    let mut client = sup
        .reconnecting(format!("ws://{addr}/"))
        .backoff(backoff)
        .build()
        .unwrap();
    assert!(timeout(BOUND, client.next()).await.unwrap().is_none());
    assert_eq!(client.stopped(), Some(&Stop::MaxAttempts));
    assert_eq!(client.last_error().and_then(|e| e.http_status()), Some(503));
    assert_eq!(sup.handshake_failures(HandshakeFailure::HttpStatus), 3);
    server.abort();
}

#[tokio::test]
async fn an_unresolvable_host_is_a_dns_failure() {
    // `.invalid` never resolves (RFC 2606).
    let (sup, _events) = supervisor(Config::default());
    let err = timeout(BOUND, sup.connect("ws://no-such-host.invalid/"))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.handshake_failure(),
        Some(HandshakeFailure::Dns),
        "{err:?}"
    );
    assert_eq!(sup.handshake_failures(HandshakeFailure::Dns), 1);
}

#[tokio::test]
async fn a_silent_server_is_a_handshake_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config::builder()
        .handshake_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    // The kernel completes the TCP handshake; nobody answers the upgrade.
    let err = timeout(BOUND, sup.connect(format!("ws://{addr}/")))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.handshake_failure(), Some(HandshakeFailure::Timeout));
    drop(listener);
}

#[tokio::test]
async fn a_reset_during_the_upgrade_is_an_io_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let _ = support::read_http_head(&mut tcp).await;
        // Linger 0: close sends RST, not FIN.
        #[allow(deprecated)] // `set_zero_linger` is not in every tokio 1.x
        tcp.set_linger(Some(Duration::ZERO)).unwrap();
        drop(tcp);
    });
    let (sup, _events) = supervisor(Config::default());
    let err = timeout(BOUND, sup.connect(format!("ws://{addr}/")))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.handshake_failure(),
        Some(HandshakeFailure::Io),
        "{err:?}"
    );
    server.await.unwrap();
}

#[test]
fn an_invalid_url_is_refused_at_build() {
    let sup = Supervisor::new(Config::default());
    for url in ["http://example.com/", "ws:///nohost", "not a url"] {
        let err = sup.reconnecting(url).build().unwrap_err();
        assert!(
            matches!(err, ws_supervisor::BuildError::InvalidUrl(_)),
            "{url}: {err:?}"
        );
    }
}

// ===== the loopback storm =====

/// Raises this process's open-file limit to `need` if it is lower, with
/// `prlimit` (util-linux), or fails saying how to run the test.
fn ensure_fd_limit(need: u64) {
    let soft = || -> u64 {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    if soft() >= need {
        return;
    }
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={need}:{need}")])
        .status();
    assert!(
        soft() >= need,
        "this test opens {need} sockets but the open-file limit is {}; run it with `ulimit -n {need}`",
        soft()
    );
}

/// 1000 clients of a real server on loopback that restarts: every client
/// comes back; prints the measured spread of the reconnects. Scaled 10x
/// down from the defaults (min 100 ms, max 3 s, down 500 ms), so one
/// "second" of the default schedule is 100 ms here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "opens 2000 sockets for a few seconds; run with --ignored --nocapture"]
async fn loopback_storm_of_1000_clients_after_a_restart() {
    const CLIENTS: usize = 1000;
    const DOWN: Duration = Duration::from_millis(500);
    const SLOT: f64 = 0.1;
    ensure_fd_limit(4 * CLIENTS as u64 + 256);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Supervisor::new(Config::default());
    let serve = |listener: TcpListener, server: Supervisor| {
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let server = server.clone();
                held.push(tokio::spawn(async move {
                    if let Ok(mut conn) = server.accept(tcp).await {
                        while conn.recv().await.is_some() {}
                    }
                }));
            }
        })
    };
    let accepting = serve(listener, server.clone());

    let (sup, _events) = supervisor(Config::default());
    let backoff = Backoff::builder()
        .min(Duration::from_millis(100))
        .max(Duration::from_secs(3))
        .reset_after(Duration::from_millis(100))
        .build()
        .unwrap();
    let (up_tx, mut up_rx) = tokio::sync::mpsc::channel(CLIENTS);
    let (back_tx, mut back_rx) = tokio::sync::mpsc::channel(CLIENTS);
    for seed in 0..CLIENTS as u64 {
        let mut client = sup
            .reconnecting(format!("ws://{addr}/"))
            .backoff(backoff)
            .seed(seed)
            .build()
            .unwrap();
        let (up_tx, back_tx) = (up_tx.clone(), back_tx.clone());
        tokio::spawn(async move {
            let first = client.next().await.expect("connected");
            up_tx.send(()).await.unwrap();
            first.closed().await;
            let dropped = Instant::now();
            let second = client.next().await.expect("back");
            back_tx
                .send((dropped, Instant::now(), client.attempts()))
                .await
                .unwrap();
            second.closed().await;
        });
    }
    for _ in 0..CLIENTS {
        timeout(BOUND * 3, up_rx.recv()).await.unwrap().unwrap();
    }
    // Every connection has been up longer than `reset_after`.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The restart: stop listening, close every connection (1001), and
    // listen again after DOWN with a new supervisor.
    accepting.abort();
    let restart = Instant::now();
    server.shutdown(SEC).await;
    let _ = accepting.await;
    tokio::time::sleep_until(restart + DOWN).await;
    let listener = TcpListener::bind(addr).await.unwrap();
    let back_at = Instant::now();
    let server = Supervisor::new(Config::default());
    let accepting = serve(listener, server.clone());

    let mut times = Vec::with_capacity(CLIENTS);
    let mut drops = Vec::with_capacity(CLIENTS);
    let mut attempts = 0u64;
    for _ in 0..CLIENTS {
        let (dropped, at, n) = timeout(BOUND * 3, back_rx.recv()).await.unwrap().unwrap();
        times.push(at.saturating_duration_since(back_at).as_secs_f64());
        drops.push(dropped.saturating_duration_since(restart).as_secs_f64());
        attempts += u64::from(n);
    }
    drops.sort_by(f64::total_cmp);
    let mut per_slot = std::collections::BTreeMap::new();
    for t in &times {
        *per_slot.entry((t / SLOT).floor() as u64).or_insert(0usize) += 1;
    }
    let peak = *per_slot.values().max().unwrap();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    println!(
        "loopback storm: {CLIENTS} clients back, server down {DOWN:?}; after it listened again: \
         p10 {:.3} s, p50 {:.3} s, p90 {:.3} s, last {:.3} s; peak {SLOT} s slot {peak} clients \
         ({:.1}%); {:.2} attempts per client; refused attempts {}; \
         the clients saw their connection end p50 {:.3} s, p90 {:.3} s after the shutdown began",
        pct(0.1),
        pct(0.5),
        pct(0.9),
        times[times.len() - 1],
        100.0 * peak as f64 / CLIENTS as f64,
        attempts as f64 / CLIENTS as f64,
        sup.handshake_failures(HandshakeFailure::ConnectionRefused),
        drops[CLIENTS / 2],
        drops[CLIENTS * 9 / 10],
    );
    server.shutdown(SEC).await;
    accepting.abort();
}
