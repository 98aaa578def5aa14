//! A peer that stops reading, on real loopback TCP: the write stall is found
//! within the write timeout, the memory held for it stays bounded, and the
//! peers around it are untouched. Real time, short; timeouts are hang guards.

mod support;

use std::time::Duration;

use futures::StreamExt;
use support::*;
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};
use ws_supervisor::{CloseReason, Config, Connection, Initiator, Supervisor};

const GUARD: Duration = Duration::from_secs(30);

async fn listen(
    sup: &Supervisor,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<Connection>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(2048);
    let sup = sup.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (sup, tx) = (sup.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(conn) = sup.accept_tcp(tcp).await {
                    let _ = tx.send(conn).await;
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_a_write_stall_with_bounded_memory() {
    let limit = 256 * 1024;
    let config = Config::builder()
        .write_timeout(Duration::from_secs(1))
        .write_buffer_limit(limit)
        .outbound_queue(8)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (addr, mut conns) = listen(&sup).await;
    let _peer = non_reader(addr).await;
    let conn = timeout(GUARD, conns.recv()).await.unwrap().unwrap();

    // The application pushes 64 KiB messages as fast as the supervisor takes
    // them: `send` waits while the queue is full, so what it accepts is
    // bounded by the socket buffers, the write buffer and the queue.
    let message = vec![7u8; 64 * 1024];
    let started = Instant::now();
    let mut accepted = 0usize;
    let pusher = async {
        for _ in 0..100_000 {
            if conn.send(message.clone()).await.is_err() {
                break;
            }
            accepted += message.len();
        }
    };
    timeout(GUARD, pusher)
        .await
        .expect("send returns once the connection is closed");
    let event = timeout(GUARD, conn.closed()).await.unwrap();
    let took = started.elapsed();

    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Timeout, Initiator::Local)
    );
    assert_eq!(event.text, "write timeout");
    // The socket takes a few MiB (loopback buffers autotune), plus our write
    // buffer and the queue; the application offered 6 GiB.
    let held_bound = 16 * 1024 * 1024 + limit + 8 * message.len();
    assert!(
        accepted <= held_bound,
        "accepted {accepted} bytes, bound {held_bound}"
    );
    // How long it took is printed, not asserted (a shared machine's clock
    // proves nothing); `GUARD` only keeps a hang from lasting.
    assert_eq!(events.len(), 1);
    eprintln!(
        "write stall: accepted {} KiB before the stall, closed after {took:?}",
        accepted / 1024
    );
}

#[tokio::test]
async fn one_stalled_peer_among_999_healthy_ones() {
    let interval = Duration::from_millis(250);
    let config = heartbeat(interval, Duration::from_millis(500))
        .write_timeout(Duration::from_secs(1))
        .write_buffer_limit(64 * 1024)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (addr, mut conns) = listen(&sup).await;

    let mut clients = Vec::new();
    for _ in 0..999 {
        let (client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .unwrap();
        clients.push(tokio::spawn(async move {
            let mut client = client;
            while let Some(Ok(_)) = client.next().await {}
        }));
    }
    let mut healthy = Vec::new();
    for _ in 0..999 {
        healthy.push(timeout(GUARD, conns.recv()).await.unwrap().unwrap());
    }
    let _stalled_peer = non_reader(addr).await;
    let stalled = timeout(GUARD, conns.recv()).await.unwrap().unwrap();
    let started = Instant::now();
    let pings_before: Vec<u64> = healthy.iter().map(|c| c.stats().pings_sent).collect();
    let stalled_sender = stalled.sender();
    let pusher = tokio::spawn(async move {
        let message = vec![1u8; 32 * 1024];
        for _ in 0..100_000 {
            if stalled_sender.send(message.clone()).await.is_err() {
                break;
            }
        }
    });
    let event = timeout(GUARD, stalled.closed()).await.unwrap();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Timeout, Initiator::Local)
    );
    timeout(GUARD, pusher).await.unwrap().unwrap();
    // Keep going for a few more intervals, then look at the healthy ones.
    tokio::time::sleep(interval * 4).await;
    let elapsed = started.elapsed();
    let expected = (elapsed.as_millis() / interval.as_millis()) as u64;
    for (conn, before) in healthy.iter().zip(pings_before) {
        assert!(
            conn.close_event().is_none(),
            "a healthy peer was closed: {:?}",
            conn.close_event()
        );
        let pings = conn.stats().pings_sent - before;
        // Cadence held: at most three intervals lost to scheduling.
        assert!(pings + 3 >= expected, "{pings} pings in {elapsed:?}");
    }
    assert_eq!(events.len(), 1, "only the stalled peer closed");
    for c in clients {
        c.abort();
    }
}
