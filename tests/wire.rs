//! Real sockets on 127.0.0.1:0, real time, short. Timeouts here are safety
//! bounds against hangs, never assertions about speed.

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use ws_supervisor::{CloseCode, CloseReason, Config, HandshakeFailure, Initiator, Supervisor};

const BOUND: Duration = Duration::from_secs(20);

/// A supervised echo server on 127.0.0.1:0; returns its address.
async fn echo_server(sup: Supervisor) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let sup = sup.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = sup.accept_tcp(tcp).await else {
                    return;
                };
                while let Some(message) = conn.recv().await {
                    if conn.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn echo_ping_and_normal_close_over_tcp() {
    let (sup, events) = supervisor(Config::default());
    let addr = echo_server(sup.clone()).await;
    let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .unwrap();
    let local = client.get_ref().get_ref().local_addr().unwrap();

    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        timeout(BOUND, client.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        Message::text("hello")
    );
    client.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(
        timeout(BOUND, client.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        Message::binary(vec![1, 2, 3])
    );
    client.send(Message::Ping("p".into())).await.unwrap();
    assert_eq!(
        timeout(BOUND, client.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        Message::Pong("p".into())
    );

    client.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = timeout(BOUND, client.next()).await {}
    events.wait_for(1).await;
    let event = events.only();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Normal, Initiator::Remote)
    );
    assert_eq!(event.peer_addr, Some(local));
    assert!(sup.is_empty());
}

#[tokio::test]
async fn supervised_client_and_server_measure_rtt_both_ways() {
    let fast = || {
        heartbeat(Duration::from_millis(50), Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let (server, server_events) = supervisor(fast());
    let addr = echo_server(server.clone()).await;
    let (client, _client_events) = supervisor(fast());
    let mut conn = client.connect(format!("ws://{addr}/")).await.unwrap();
    assert_eq!(conn.peer_addr(), Some(addr));
    conn.send("round trip").await.unwrap();
    assert_eq!(
        timeout(BOUND, conn.recv()).await.unwrap().unwrap(),
        Message::text("round trip")
    );
    // Wait (bounded) until a few heartbeats went each way.
    timeout(BOUND, async {
        while conn.stats().pongs_received < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert!(conn.stats().last_rtt.is_some());
    let summary = client.shutdown(Duration::from_secs(5)).await;
    assert_eq!(summary.count(CloseReason::GoingAway), 1);
    assert_eq!(summary.forced(), 0);
    server_events.wait_for(1).await;
    let event = server_events.only();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::GoingAway, Initiator::Remote)
    );
    assert!(
        event.stats.pongs_received >= 1,
        "the server's pings were answered: {event:?}"
    );
    assert!(event.stats.last_rtt.is_some());
}

#[tokio::test]
async fn supervised_client_detects_a_silent_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        // Upgraded, then it reads bytes but never answers a ping.
        let mut tcp = ws.into_inner();
        tokio::io::copy(&mut tcp, &mut tokio::io::sink()).await.ok();
    });
    let config = heartbeat(Duration::from_millis(200), Duration::from_millis(200))
        .build()
        .unwrap();
    let (client, events) = supervisor(config);
    let conn = client.connect(format!("ws://{addr}/")).await.unwrap();
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Timeout, Initiator::Local)
    );
    assert_eq!(event.code_sent, Some(CloseCode::Error));
    assert!(event.stats.pings_sent >= 1);
    assert_eq!(event.stats.pongs_received, 0);
    assert_eq!(events.len(), 1);
    timeout(BOUND, server).await.unwrap().unwrap();
}

#[tokio::test]
async fn handshake_timeout_on_a_silent_tcp_client() {
    let config = Config::builder()
        .handshake_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let err = timeout(BOUND, sup.accept_tcp(tcp))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.handshake_failure(), Some(HandshakeFailure::Timeout));
    assert_eq!(events.len(), 0);
}

#[tokio::test]
async fn connect_to_a_closed_port_is_a_connection_refused_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (sup, events) = supervisor(Config::default());
    let err = sup.connect(format!("ws://{addr}/")).await.unwrap_err();
    assert_eq!(
        err.handshake_failure(),
        Some(HandshakeFailure::ConnectionRefused)
    );
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(events.len(), 0);
    assert_eq!(
        sup.handshake_failures(HandshakeFailure::ConnectionRefused),
        1
    );
    assert_eq!(sup.handshake_failures(HandshakeFailure::Io), 0);
}

#[tokio::test]
async fn reset_by_peer_is_abnormal() {
    let (sup, events) = supervisor(Config::default());
    let addr = echo_server(sup.clone()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp)
        .await
        .unwrap();
    let tcp = client.into_inner();
    // SO_LINGER 0: closing sends RST instead of FIN.
    tcp.set_zero_linger().unwrap();
    drop(tcp);
    events.wait_for(1).await;
    let event = events.only();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Abnormal, Initiator::Remote)
    );
}

/// Pins a bug found in review: with the timers run before the flush, a
/// connection whose application kept sending had its write side dirty in
/// every turn a ping came due, so every ping was skipped and no pong
/// deadline ever ran. Over a real socket, an application that streams
/// messages as fast as the peer reads them still pings on schedule.
#[tokio::test]
async fn a_connection_that_streams_messages_still_pings_on_schedule() {
    let config = heartbeat(Duration::from_millis(20), Duration::from_secs(5))
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, mut peer) = accept_over_tcp(&sup).await;
    // The peer reads everything (and tungstenite answers the pings).
    let reader = tokio::spawn(async move {
        let mut texts = 0u64;
        while let Some(Ok(message)) = peer.next().await {
            texts += u64::from(message.is_text());
        }
        texts
    });
    // Stream until 10 pings went out, bounded in count and time.
    let streamed = timeout(BOUND, async {
        let mut sent = 0u64;
        while conn.stats().pings_sent < 10 && sent < 10_000_000 {
            conn.send("tick").await.unwrap();
            sent += 1;
        }
        sent
    })
    .await
    .expect("10 pings while streaming (every one skipped?)");
    assert!(conn.stats().pongs_received >= 1, "{:?}", conn.stats());
    drop(conn);
    let texts = timeout(BOUND, reader).await.unwrap().unwrap();
    assert_eq!(texts, streamed, "every message arrived");
}

/// Pins a bug found in review: a message that came whole from one read of
/// a TCP socket parks the read (no second read to find nothing), and the
/// parked shortcut was checked before the inbound budget, so a message that
/// filled the budget did not pause reading: with a peer gone silent the
/// end was blamed on the peer (`Timeout`) instead of the application that
/// did not read. Real TCP (only a plain socket parks), paused time.
#[tokio::test(start_paused = true)]
async fn a_parked_message_that_fills_the_budget_pauses_reading() {
    let config = heartbeat(Duration::from_secs(1), Duration::from_secs(1))
        .max_message_size(64)
        .max_frame_size(64)
        .inbound_buffer_limit(64)
        .close_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (conn, mut peer) = accept_over_tcp(&sup).await;
    // One message that fills the budget; then the peer is never polled
    // again (it answers no ping), and the application takes nothing.
    peer.send(Message::text("x".repeat(64))).await.unwrap();
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(
        (event.reason, event.initiator, event.text.as_str()),
        (
            CloseReason::Internal,
            Initiator::Local,
            "application not reading"
        )
    );
    assert_eq!(events.len(), 1);
    drop(peer);
}
