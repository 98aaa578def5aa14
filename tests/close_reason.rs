//! One test per row of docs/close-reasons.md, named after the row, over
//! in-memory pipes under virtual time. Test names read `row__case`.
#![allow(non_snake_case)]

mod support;

use std::future::IntoFuture;

use futures::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, sleep};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use ws_supervisor::{CloseCode, CloseEvent, CloseReason, Config, HandshakeFailure, Initiator};

use CloseReason as R;
use Initiator::{Local, Remote};

fn assert_reason(event: &CloseEvent, reason: CloseReason, initiator: Initiator) {
    assert_eq!(
        (event.reason, event.initiator),
        (reason, initiator),
        "{event:#?}"
    );
}

/// The peer closes with `code`; returns the single event.
async fn peer_closes_with(code: u16, text: &str) -> CloseEvent {
    let (sup, events) = supervisor(Config::default());
    let (conn, mut peer) = accept_raw(&sup).await;
    peer.close(code, text).await;
    let reply = peer.read_until(OP_CLOSE).await.expect("close reply");
    let event = conn.closed().await;
    assert_eq!(events.len(), 1);
    // Valid codes are echoed in the reply (tungstenite answers 1002 to invalid ones).
    if reply.close_code() != Some(1002) {
        assert_eq!(reply.close_code(), Some(code));
    }
    event
}

#[tokio::test(start_paused = true)]
async fn normal__peer_close_1000() {
    let event = peer_closes_with(1000, "bye").await;
    assert_reason(&event, R::Normal, Remote);
    assert_eq!(event.code_received, Some(CloseCode::Normal));
    assert_eq!(event.text, "bye");
    assert!(event.error.is_none());
}

#[tokio::test(start_paused = true)]
async fn normal__peer_empty_close_1005() {
    let (sup, _events) = supervisor(Config::default());
    let (conn, mut peer) = accept_raw(&sup).await;
    peer.send(OP_CLOSE, &[]).await;
    peer.read_until(OP_CLOSE).await.unwrap();
    let event = conn.closed().await;
    assert_reason(&event, R::Normal, Remote);
    assert_eq!(event.code_received, None);
}

#[tokio::test(start_paused = true)]
async fn normal__peer_close_with_other_codes() {
    for code in [1008, 3000, 4000, 4999] {
        let event = peer_closes_with(code, "app-specific").await;
        assert_reason(&event, R::Normal, Remote);
        assert_eq!(event.code_received, Some(CloseCode::from(code)));
    }
}

#[tokio::test(start_paused = true)]
async fn normal__application_close() {
    let (sup, events) = supervisor(Config::default());
    let (conn, mut peer) = accept_ws(&sup).await;
    conn.close(CloseCode::Normal, "done").await.unwrap();
    // A real client answers the Close and sees our code.
    let received = peer.next().await.unwrap().unwrap();
    assert_eq!(
        received,
        Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into()
        }))
    );
    while peer.next().await.is_some() {}
    let event = conn.closed().await;
    assert_reason(&event, R::Normal, Local);
    assert_eq!(event.code_sent, Some(CloseCode::Normal));
    assert_eq!(event.code_received, Some(CloseCode::Normal));
    assert_eq!(event.text, "done");
    assert_eq!(events.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn normal__application_drops_connection() {
    let (sup, events) = supervisor(Config::default());
    let (conn, mut peer) = accept_ws(&sup).await;
    drop(conn);
    let received = peer.next().await.unwrap().unwrap();
    assert!(matches!(received, Message::Close(Some(f)) if f.code == CloseCode::Normal));
    while peer.next().await.is_some() {}
    events.wait_for(1).await;
    assert_reason(&events.only(), R::Normal, Local);
}

#[tokio::test(start_paused = true)]
async fn going_away__peer_close_1001() {
    let event = peer_closes_with(1001, "tab closed").await;
    assert_reason(&event, R::GoingAway, Remote);
}

#[tokio::test(start_paused = true)]
async fn going_away__peer_close_1012_1013() {
    for code in [1012, 1013] {
        assert_reason(&peer_closes_with(code, "").await, R::GoingAway, Remote);
    }
}

/// Pins a bug (issue "No dead peer outlives its bound", item 4): a runtime
/// dropped without `shutdown()` (an ordinary process exit) was reported as
/// `Internal`/local, the reason of a panic, and the peer got a bare EOF.
#[test]
fn going_away__runtime_dropped_without_shutdown() {
    let rt = current_thread();
    let (sup, events) = supervisor(Config::default());
    let (conn, mut peer) = rt.block_on(accept_raw(&sup));
    // The process exits: its runtime drops every task, with no shutdown.
    drop(rt);
    let event = events.only();
    assert_reason(&event, R::GoingAway, Local);
    assert_eq!(event.text, "runtime stopped");
    assert_eq!(event.code_sent, Some(CloseCode::Away));
    // The peer was told, best effort, instead of a bare EOF.
    let frame = current_thread()
        .block_on(peer.read_frame())
        .expect("a Close frame");
    assert_eq!((frame.opcode, frame.close_code()), (OP_CLOSE, Some(1001)));
    drop(conn);
}

#[tokio::test(start_paused = true)]
async fn going_away__supervisor_shutdown() {
    let (sup, events) = supervisor(Config::default());
    let (conn, mut peer) = accept_ws(&sup).await;
    let client = tokio::spawn(async move {
        let first = peer.next().await.unwrap().unwrap();
        while peer.next().await.is_some() {}
        first
    });
    let summary = sup.shutdown(5 * SEC).await;
    let first = client.await.unwrap();
    assert!(matches!(first, Message::Close(Some(f)) if f.code == CloseCode::Away));
    assert_eq!(summary.count(R::GoingAway), 1);
    assert_eq!(summary.forced(), 0);
    assert_reason(&conn.closed().await, R::GoingAway, Local);
    assert_eq!(events.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout__pong_deadline() {
    let (sup, _events) = supervisor(heartbeat(SEC, SEC).build().unwrap());
    let (conn, peer) = accept_raw(&sup).await;
    let drained = tokio::spawn(peer.drain());
    let event = conn.closed().await;
    assert_reason(&event, R::Timeout, Local);
    assert_eq!(event.code_sent, Some(CloseCode::Error));
    assert_eq!(event.text, "ping timeout");
    drained.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn timeout__write_stalled() {
    let config = heartbeat(60 * SEC, 60 * SEC)
        .write_timeout(5 * SEC)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    // A 4 KiB pipe and a peer that never reads after the handshake.
    let (conn, _peer) = accept_raw_with(&sup, 4096).await;
    let started = Instant::now();
    let big = vec![0u8; 64 * 1024];
    conn.send(big).await.unwrap();
    let event = conn.closed().await;
    assert_reason(&event, R::Timeout, Local);
    assert_eq!(event.text, "write timeout");
    let took = Instant::now() - started;
    assert!(took >= 5 * SEC && took <= 5 * SEC + 10 * MS, "{took:?}");
    assert_eq!(events.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout__close_handshake_not_answered() {
    let config = Config::builder().close_timeout(2 * SEC).build().unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, peer) = accept_raw(&sup).await;
    let drained = tokio::spawn(peer.drain());
    let asked = Instant::now();
    conn.close(CloseCode::Normal, "bye").await.unwrap();
    let event = conn.closed().await;
    assert_reason(&event, R::Timeout, Local);
    assert_eq!(event.code_sent, Some(CloseCode::Normal));
    assert_eq!(event.code_received, None);
    assert_eq!(Instant::now() - asked, 2 * SEC);
    drained.await.unwrap();
}

/// Pins a bug (issue "No dead peer outlives its bound", item 3): dropping
/// the `Connection` on a peer that never answers our Close was reported as
/// `Normal`/local, while an explicit `close(1000)` was `Timeout`.
#[tokio::test(start_paused = true)]
async fn timeout__dropped_connection_close_not_answered() {
    let config = Config::builder().close_timeout(2 * SEC).build().unwrap();
    let (sup, events) = supervisor(config);
    let (conn, peer) = accept_raw(&sup).await;
    let drained = tokio::spawn(peer.drain());
    let dropped = Instant::now();
    drop(conn);
    events.wait_for(1).await;
    let event = events.only();
    assert_reason(&event, R::Timeout, Local);
    assert_eq!(event.code_sent, Some(CloseCode::Normal));
    assert_eq!(event.code_received, None);
    let took = Instant::now() - dropped;
    assert!(took >= 2 * SEC && took <= 2 * SEC + 10 * MS, "{took:?}");
    drained.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn protocol_error__peer_close_codes() {
    for code in [1002, 1003, 1007, 1009, 1010] {
        let event = peer_closes_with(code, "").await;
        assert_reason(&event, R::ProtocolError, Remote);
    }
}

#[tokio::test(start_paused = true)]
async fn protocol_error__peer_close_code_forbidden_on_the_wire() {
    // 1006 must never be sent; tungstenite answers with 1002.
    let event = peer_closes_with(1006, "").await;
    assert_reason(&event, R::ProtocolError, Remote);
}

/// The peer sends `frame` bytes; returns the event and the code we sent back.
async fn peer_sends_raw(config: Config, bytes: Vec<u8>) -> (CloseEvent, Option<u16>) {
    let (sup, events) = supervisor(config);
    let (conn, mut peer) = accept_raw(&sup).await;
    peer.writer.write_all(&bytes).await.unwrap();
    let close = peer.read_until(OP_CLOSE).await;
    let event = conn.closed().await;
    assert_eq!(events.len(), 1);
    (event, close.and_then(|f| f.close_code()))
}

#[tokio::test(start_paused = true)]
async fn protocol_error__invalid_utf8_text() {
    let bytes = encode(true, OP_TEXT, &[0x66, 0x6f, 0xff, 0xfe], true);
    let (event, sent) = peer_sends_raw(Config::default(), bytes).await;
    assert_reason(&event, R::ProtocolError, Remote);
    assert_eq!(sent, Some(1007));
    assert_eq!(event.code_sent, Some(CloseCode::Invalid));
    assert!(event.error.is_some());
}

#[tokio::test(start_paused = true)]
async fn protocol_error__message_too_big() {
    let config = Config::builder()
        .max_message_size(1024)
        .max_frame_size(1024)
        .build()
        .unwrap();
    let bytes = encode(true, OP_BINARY, &[7; 2048], true);
    let (event, sent) = peer_sends_raw(config, bytes).await;
    assert_reason(&event, R::ProtocolError, Remote);
    assert_eq!(sent, Some(1009));
}

#[tokio::test(start_paused = true)]
async fn protocol_error__unmasked_client_frame() {
    let bytes = encode(true, OP_TEXT, b"hello", false);
    let (event, sent) = peer_sends_raw(Config::default(), bytes).await;
    assert_reason(&event, R::ProtocolError, Remote);
    assert_eq!(sent, Some(1002));
}

#[tokio::test(start_paused = true)]
async fn protocol_error__reserved_opcode() {
    let bytes = encode(true, 0x3, b"?", true);
    let (event, sent) = peer_sends_raw(Config::default(), bytes).await;
    assert_reason(&event, R::ProtocolError, Remote);
    assert_eq!(sent, Some(1002));
}

#[tokio::test(start_paused = true)]
async fn abnormal__transport_dropped_without_close() {
    let (sup, events) = supervisor(Config::default());
    let (conn, peer) = accept_raw(&sup).await;
    drop(peer);
    let event = conn.closed().await;
    assert_reason(&event, R::Abnormal, Remote);
    assert_eq!(event.code_sent, None);
    assert_eq!(event.code_received, None);
    assert_eq!(events.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn abnormal__transport_dropped_mid_message() {
    let (sup, _events) = supervisor(Config::default());
    let (conn, mut peer) = accept_raw(&sup).await;
    let frame = encode(true, OP_TEXT, b"half a message", true);
    peer.writer.write_all(&frame[..8]).await.unwrap();
    drop(peer);
    assert_reason(&conn.closed().await, R::Abnormal, Remote);
}

#[tokio::test(start_paused = true)]
async fn internal__application_panicked_holding_the_connection() {
    quiet_expected_panics();
    let (sup, events) = supervisor(Config::default());
    let (conn, mut peer) = accept_ws(&sup).await;
    let app = tokio::spawn(async move {
        let _conn = conn;
        panic!("application bug {EXPECTED_PANIC}");
    });
    assert!(app.await.unwrap_err().is_panic());
    let received = peer.next().await.unwrap().unwrap();
    assert!(matches!(received, Message::Close(Some(f)) if f.code == CloseCode::Error));
    while peer.next().await.is_some() {}
    events.wait_for(1).await;
    let event = events.only();
    assert_reason(&event, R::Internal, Local);
    assert_eq!(event.code_sent, Some(CloseCode::Error));
}

#[tokio::test(start_paused = true)]
async fn internal__peer_close_1011() {
    let event = peer_closes_with(1011, "keepalive ping timeout").await;
    assert_reason(&event, R::Internal, Remote);
    assert_eq!(event.text, "keepalive ping timeout");
}

#[tokio::test(start_paused = true)]
async fn first_cause_wins__timeout_then_reset_stays_timeout() {
    let config = heartbeat(SEC, SEC).write_timeout(60 * SEC).build().unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, peer) = accept_raw_with(&sup, 4096).await;
    // The ping at 1 s goes out; then fill the pipe so the Close 1011 of the
    // timeout at 2 s cannot get out, then reset at 3 s. (A ping is never
    // queued behind our own data, so the data comes after it.)
    sleep(1500 * MS).await;
    conn.send(vec![0u8; 8192]).await.unwrap();
    sleep(1500 * MS).await;
    drop(peer);
    let event = conn.closed().await;
    assert_reason(&event, R::Timeout, Local);
}

#[tokio::test(start_paused = true)]
async fn first_cause_wins__peer_close_then_reset_stays_normal() {
    let (sup, _events) = supervisor(Config::default());
    let (conn, mut peer) = accept_raw(&sup).await;
    peer.close(1000, "").await;
    drop(peer);
    assert_reason(&conn.closed().await, R::Normal, Remote);
}

#[tokio::test(start_paused = true)]
async fn refused__handshake_never_completed() {
    let config = Config::builder()
        .handshake_timeout(3 * SEC)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (server, _silent_client) = tokio::io::duplex(PIPE);
    let started = Instant::now();
    let err = sup.accept(server).await.unwrap_err();
    assert!(err.is_timeout());
    assert_eq!(err.handshake_failure(), Some(HandshakeFailure::Timeout));
    assert_eq!(Instant::now() - started, 3 * SEC);
    assert_eq!(sup.handshake_failures(HandshakeFailure::Timeout), 1);
    assert_eq!(
        events.len(),
        0,
        "no hook for a connection that never existed"
    );
    assert_eq!(sup.accepted_total(), 0);
    assert!(sup.is_empty());
}

#[tokio::test(start_paused = true)]
async fn refused__handshake_dribbled_past_the_deadline() {
    let config = Config::builder()
        .handshake_timeout(3 * SEC)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (server, mut client) = tokio::io::duplex(PIPE);
    let slowloris = tokio::spawn(async move {
        for byte in b"GET / HTTP/1.1\r\nHost: localhost\r\n"
            .iter()
            .cycle()
            .take(100)
        {
            if client.write_all(&[*byte]).await.is_err() {
                break;
            }
            sleep(100 * MS).await;
        }
    });
    let err = sup.accept(server).await.unwrap_err();
    assert!(err.is_timeout());
    assert_eq!(events.len(), 0);
    slowloris.abort();
}

#[tokio::test(start_paused = true)]
async fn refused__by_the_request_callback() {
    use ws_supervisor::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    let (sup, events) = supervisor(Config::default());
    let (server, client) = tokio::io::duplex(PIPE);
    // The signature is tungstenite's `Callback`.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, res: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == "/chat" && req.headers().contains_key("authorization") {
            Ok(res)
        } else {
            let mut refusal = ErrorResponse::new(Some("unauthorized".into()));
            *refusal.status_mut() = ws_supervisor::tungstenite::http::StatusCode::UNAUTHORIZED;
            Err(refusal)
        }
    };
    let (conn, client) = tokio::join!(
        sup.accept(server).on_request(check).into_future(),
        tokio_tungstenite::client_async("ws://localhost/chat", client)
    );
    let err = conn.unwrap_err();
    assert_eq!(err.handshake_failure(), Some(HandshakeFailure::Refused));
    match client.unwrap_err() {
        ws_supervisor::tungstenite::Error::Http(res) => assert_eq!(res.status(), 401),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(events.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn refused__at_capacity_with_503() {
    let config = Config::builder().max_connections(2).build().unwrap();
    let (sup, events) = supervisor(config);
    let (a, _pa) = accept_raw(&sup).await;
    let (_b, _pb) = accept_raw(&sup).await;
    let (server, client) = tokio::io::duplex(PIPE);
    let (third, client) = tokio::join!(
        sup.accept(server).into_future(),
        tokio_tungstenite::client_async("ws://localhost/", client)
    );
    assert_eq!(
        third.unwrap_err().handshake_failure(),
        Some(HandshakeFailure::AtCapacity)
    );
    match client.unwrap_err() {
        ws_supervisor::tungstenite::Error::Http(res) => assert_eq!(res.status(), 503),
        other => panic!("unexpected {other:?}"),
    }
    // A slot frees once a connection has ended and its hook has run.
    drop(a);
    events.wait_for(1).await;
    let (_c, _pc) = accept_raw(&sup).await;
    assert_eq!(sup.len(), 2);
    assert_eq!(sup.handshake_failures(HandshakeFailure::AtCapacity), 1);
}

#[tokio::test(start_paused = true)]
async fn supervise_an_upgraded_stream() {
    let (sup, events) = supervisor(Config::default());
    let (server, client) = tokio::io::duplex(PIPE);
    let (ws, client) = tokio::join!(
        tokio_tungstenite::accept_async(server),
        tokio_tungstenite::client_async("ws://localhost/", client)
    );
    let mut conn = sup.supervise(ws.unwrap(), None).await.unwrap();
    let mut client = client.unwrap().0;
    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(conn.next().await.unwrap(), Message::text("hello"));
    client.close(None).await.unwrap();
    while client.next().await.is_some() {}
    assert_reason(&conn.closed().await, R::Normal, Remote);
    assert_eq!(events.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn close_text_is_truncated_and_forbidden_codes_refused() {
    let (sup, _events) = supervisor(Config::default());
    let (conn, mut peer) = accept_raw(&sup).await;
    for code in [
        CloseCode::Abnormal,
        CloseCode::Tls,
        CloseCode::from(999),
        CloseCode::from(2000),
    ] {
        let err = conn.close(code, "").await.unwrap_err();
        assert!(err.is_invalid_input(), "{code:?}");
    }
    let long = "ü".repeat(100); // 200 bytes
    conn.close(CloseCode::Normal, &long).await.unwrap();
    let frame = peer.read_until(OP_CLOSE).await.unwrap();
    assert_eq!(frame.close_code(), Some(1000));
    let text = std::str::from_utf8(&frame.payload[2..]).expect("cut on a char boundary");
    assert_eq!(text.len(), 122);
    peer.close(1000, "").await;
    let event = conn.closed().await;
    assert_reason(&event, R::Normal, Local);
    assert_eq!(event.text.len(), 122);
}

#[tokio::test(start_paused = true)]
async fn send_refuses_control_frames_and_oversized_messages() {
    let config = Config::builder().write_buffer_limit(4096).build().unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, _peer) = accept_raw(&sup).await;
    assert!(
        conn.send(Message::Ping("x".into()))
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(
        conn.send(vec![0u8; 8192])
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    conn.send("fine").await.unwrap();
}

// ===== regressions found in review (each pins a bug that existed) =====

/// Our full inbound queue (its byte budget) must not stop us reading the
/// peer's Close reply.
#[tokio::test(start_paused = true)]
async fn normal__application_close_while_inbound_queue_full() {
    let config = Config::builder()
        .close_timeout(2 * SEC)
        .max_message_size(64)
        .max_frame_size(64)
        .inbound_buffer_limit(64)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, mut peer) = accept_ws(&sup).await;
    // One message fills the budget, the next is held back: reading pauses.
    peer.send(Message::text("a".repeat(64))).await.unwrap();
    peer.send(Message::text("b".repeat(64))).await.unwrap();
    sleep(10 * MS).await;
    conn.close(CloseCode::Normal, "bye").await.unwrap();
    let client = tokio::spawn(async move { while let Some(Ok(_)) = peer.next().await {} });
    let event = conn.closed().await;
    client.await.unwrap();
    assert_reason(&event, R::Normal, Local);
    assert_eq!(event.code_received, Some(CloseCode::Normal));
}

/// Close codes a peer must never send are answered with 1002.
#[tokio::test(start_paused = true)]
/// Pins a bug (issue "No dead peer outlives its bound", item 7): for a
/// code not allowed on the wire, tungstenite substitutes its own 1002
/// "Protocol violation", and the event reported that as what the peer
/// sent, as if the peer accused us.
async fn protocol_error__peer_close_codes_reserved_or_invalid() {
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 2000, 2999, 5000] {
        let (sup, _events) = supervisor(Config::default());
        let (conn, mut peer) = accept_raw(&sup).await;
        peer.close(code, "nonsense").await;
        let reply = peer.read_until(OP_CLOSE).await.unwrap();
        assert_eq!(reply.close_code(), Some(1002), "code {code}");
        let event = conn.closed().await;
        assert_reason(&event, R::ProtocolError, Remote);
        assert_eq!(
            event.code_received.map(u16::from),
            Some(code),
            "what the peer sent"
        );
        assert_eq!(event.text, "nonsense");
        assert_eq!(event.code_sent, Some(CloseCode::Protocol));
    }
}

/// The 1014 row (bad gateway, registered by IANA; unknown to tungstenite
/// 0.30, which answers it with 1002): `Internal`/remote, with the code and
/// text the peer sent.
#[tokio::test(start_paused = true)]
async fn internal__peer_close_1014() {
    let (sup, events) = supervisor(Config::default());
    let (conn, mut peer) = accept_raw(&sup).await;
    peer.close(1014, "upstream down").await;
    let reply = peer.read_until(OP_CLOSE).await.unwrap();
    assert_eq!(reply.close_code(), Some(1002), "tungstenite's answer");
    let event = conn.closed().await;
    assert_reason(&event, R::Internal, Remote);
    assert_eq!(event.code_received.map(u16::from), Some(1014));
    assert_eq!(event.text, "upstream down");
    assert_eq!(event.code_sent, Some(CloseCode::Protocol));
    assert_eq!(events.len(), 1);
}

/// 1014 can be sent, too.
#[tokio::test(start_paused = true)]
async fn internal__application_close_1014() {
    let (sup, _events) = supervisor(Config::default());
    let (conn, mut peer) = accept_raw(&sup).await;
    conn.close(CloseCode::from(1014), "upstream down")
        .await
        .unwrap();
    let frame = peer.read_until(OP_CLOSE).await.unwrap();
    assert_eq!(frame.close_code(), Some(1014));
    peer.send(OP_CLOSE, &frame.payload).await;
    let event = conn.closed().await;
    assert_reason(&event, R::Internal, Local);
    assert_eq!(event.code_sent.map(u16::from), Some(1014));
}

/// A client's Close answered by the server is final even if the server
/// keeps TCP open past the close timeout.
#[tokio::test(start_paused = true)]
async fn normal__client_close_answered_while_server_lingers() {
    let config = Config::builder().close_timeout(2 * SEC).build().unwrap();
    let (sup, _events) = supervisor(config);
    let (a, b) = tokio::io::duplex(PIPE);
    let (client, server) = tokio::join!(
        tokio_tungstenite::client_async("ws://localhost/", a),
        tokio_tungstenite::accept_async(b)
    );
    let (client, mut server) = (client.unwrap().0, server.unwrap());
    let conn = sup.supervise(client, None).await.unwrap();
    let lingering_server = tokio::spawn(async move {
        while let Some(Ok(_)) = server.next().await {}
        sleep(3 * SEC).await;
    });
    conn.close(CloseCode::Normal, "bye").await.unwrap();
    let event = conn.closed().await;
    assert_eq!(event.code_received, Some(CloseCode::Normal));
    assert_reason(&event, R::Normal, Local);
    lingering_server.await.unwrap();
}

/// `close(code)` then dropping the `Connection`: the application's own code goes out.
#[tokio::test(start_paused = true)]
async fn going_away__application_close_then_drop_keeps_its_code() {
    let (sup, _events) = supervisor(Config::default());
    let (conn, mut peer) = accept_ws(&sup).await;
    conn.close(CloseCode::Away, "maintenance").await.unwrap();
    drop(conn);
    let mut first = None;
    while let Some(Ok(m)) = peer.next().await {
        if let Message::Close(f) = m {
            first.get_or_insert(f.map(|f| (f.code, f.reason.to_string())));
        }
    }
    assert_eq!(
        first,
        Some(Some((CloseCode::Away, "maintenance".to_owned())))
    );
}

/// `send` then dropping the `Connection`: the message is delivered first.
#[tokio::test(start_paused = true)]
async fn normal__queued_message_goes_out_before_the_drop_close() {
    let (sup, events) = supervisor(Config::default());
    let (conn, mut peer) = accept_ws(&sup).await;
    conn.send("last words").await.unwrap();
    drop(conn);
    let mut texts = Vec::new();
    while let Some(Ok(m)) = peer.next().await {
        if m.is_text() {
            texts.push(m.into_text().unwrap().to_string());
        }
    }
    assert_eq!(texts, ["last words"]);
    events.wait_for(1).await;
    assert_reason(&events.only(), R::Normal, Local);
}

/// A message of exactly the write-buffer limit is delivered, not fatal.
#[tokio::test(start_paused = true)]
async fn send_at_the_write_buffer_limit_is_delivered() {
    let config = Config::builder().write_buffer_limit(4096).build().unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, mut peer) = accept_ws(&sup).await;
    conn.send(vec![7u8; 4096]).await.unwrap();
    let got = peer.next().await.unwrap().unwrap();
    assert_eq!(got.len(), 4096);
    assert!(conn.close_event().is_none());
}

/// Once closing, `send` says so instead of dropping the message silently.
#[tokio::test(start_paused = true)]
async fn send_after_close_is_refused_as_closed() {
    let (sup, _events) = supervisor(Config::default());
    let (conn, peer) = accept_raw(&sup).await;
    let sender = conn.sender();
    conn.close(CloseCode::Normal, "").await.unwrap();
    let drained = tokio::spawn(peer.drain());
    for _ in 0..10_000 {
        if sender.is_closed() {
            break;
        }
        sleep(MS).await;
    }
    assert!(sender.send("too late").await.unwrap_err().is_closed());
    conn.closed().await;
    drained.await.unwrap();
}

/// Pong replies that cannot be written (the peer pings but never reads)
/// are a write stall: detected within the write timeout, not at our next ping.
#[tokio::test(start_paused = true)]
async fn timeout__write_stalled_by_pong_replies() {
    let config = heartbeat(60 * SEC, 10 * SEC)
        .write_timeout(5 * SEC)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, peer) = accept_raw_with(&sup, 256).await;
    let (_reader, mut writer) = (peer.reader, peer.writer);
    let started = Instant::now();
    let pinger = tokio::spawn(async move {
        for _ in 0..1000 {
            if writer
                .write_all(&encode(true, OP_PING, &[0u8; 100], true))
                .await
                .is_err()
            {
                break;
            }
            sleep(100 * MS).await;
        }
    });
    let event = conn.closed().await;
    let took = Instant::now() - started;
    pinger.abort();
    assert_reason(&event, R::Timeout, Local);
    assert!(
        took <= 5 * SEC + 200 * MS,
        "write stall detected after {took:?}"
    );
}

/// Pins a lost wake-up: a Pending from tokio's cooperative budget was taken
/// for "the command queue holds our waker", so a later message waited for
/// the next ping to be written.
#[tokio::test(start_paused = true)]
async fn a_message_after_a_burst_goes_out_at_once() {
    // No ping in the 300 s of this test: only the message can wake the driver.
    let config = heartbeat(3600 * SEC, 60 * SEC)
        .outbound_queue(1024)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, mut peer) = accept_raw_with(&sup, 1 << 20).await;
    // Bursts of every size, so that one of them ends exactly as the
    // budget runs out.
    for round in 1..=300u32 {
        for i in 0..round {
            conn.send(format!("{round}-{i}")).await.unwrap();
        }
        for _ in 0..round {
            peer.read_until(OP_TEXT).await.unwrap();
        }
        sleep(SEC).await;
        let sent = Instant::now();
        conn.send("after the burst").await.unwrap();
        let frame = peer.read_until(OP_TEXT).await.unwrap();
        assert_eq!(frame.payload, b"after the burst");
        assert_eq!(
            Instant::now(),
            sent,
            "round {round}: written only at a later wake-up"
        );
    }
}

/// A dropped `Connection` closes even while another task keeps sending
/// through a `Sender` clone. (Raised in review as a possible starvation on a
/// multi-threaded runtime; since the fix, the drop stops the queue taking
/// new messages. This single-threaded test passes either way.)
#[tokio::test(start_paused = true)]
async fn timeout__dropped_connection_closes_although_another_sender_keeps_sending() {
    let (sup, events) = supervisor(Config::default());
    let (conn, peer) = accept_raw(&sup).await;
    let drained = tokio::spawn(peer.drain());
    let sender = conn.sender();
    let chatty = tokio::spawn(async move {
        let mut sent = 0u32;
        for _ in 0..100_000 {
            if sender.send("more").await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    // Let it get going (it only yields when the queue is full).
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    drop(conn);
    let sent = chatty.await.unwrap();
    assert!(sent < 100_000, "sends kept being accepted after the drop");
    events.wait_for(1).await;
    // The peer reads but never answers our Close: like `close()`, the drop
    // then ends as a timeout (it was `Normal` before that rule).
    assert_reason(&events.only(), R::Timeout, Local);
    drained.abort();
}
