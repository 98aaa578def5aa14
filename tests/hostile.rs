//! Hostile and broken peers, byte by byte, over in-memory pipes under
//! virtual time: each ends with the documented reason, one hook call, no
//! panic, and bounded memory. docs/reliability.md lists them all.

mod support;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, sleep};
use ws_supervisor::{CloseEvent, CloseReason, Config, Initiator};

use CloseReason as R;
use Initiator::{Local, Remote};

/// The peer writes `bytes` after the handshake; returns the single event
/// and the close code the supervisor sent back, if any.
async fn after_handshake(config: Config, bytes: &[u8]) -> (CloseEvent, Option<u16>) {
    let (sup, events) = supervisor(config);
    let (conn, mut peer) = accept_raw(&sup).await;
    peer.writer.write_all(bytes).await.unwrap();
    let close = peer.read_until(OP_CLOSE).await;
    let event = conn.closed().await;
    assert_eq!(events.len(), 1, "exactly one hook call");
    assert!(sup.is_empty());
    (event, close.and_then(|f| f.close_code()))
}

fn reason(event: &CloseEvent) -> (CloseReason, Initiator) {
    (event.reason, event.initiator)
}

#[tokio::test(start_paused = true)]
async fn garbage_bytes_are_a_protocol_error() {
    // 0xff: FIN + all reserved bits + opcode 0xF.
    let (event, sent) = after_handshake(Config::default(), &[0xff; 32]).await;
    assert_eq!(reason(&event), (R::ProtocolError, Remote));
    assert_eq!(sent, Some(1002));
}

#[tokio::test(start_paused = true)]
async fn fragmented_control_frame_is_a_protocol_error() {
    let (event, sent) =
        after_handshake(Config::default(), &encode(false, OP_PING, b"half", true)).await;
    assert_eq!(reason(&event), (R::ProtocolError, Remote));
    assert_eq!(sent, Some(1002));
}

#[tokio::test(start_paused = true)]
async fn oversized_control_frame_is_a_protocol_error() {
    let (event, sent) =
        after_handshake(Config::default(), &encode(true, OP_PING, &[1; 126], true)).await;
    assert_eq!(reason(&event), (R::ProtocolError, Remote));
    assert_eq!(sent, Some(1002));
}

#[tokio::test(start_paused = true)]
async fn close_reason_over_123_bytes_is_a_protocol_error() {
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[b'x'; 124]); // 126 bytes: over the 125 limit
    let (event, sent) =
        after_handshake(Config::default(), &encode(true, OP_CLOSE, &payload, true)).await;
    assert_eq!(reason(&event), (R::ProtocolError, Remote));
    assert_eq!(sent, Some(1002));
}

#[tokio::test(start_paused = true)]
async fn one_byte_close_payload_is_a_protocol_error() {
    let (event, _) = after_handshake(Config::default(), &encode(true, OP_CLOSE, &[3], true)).await;
    assert_eq!(reason(&event), (R::ProtocolError, Remote));
}

#[tokio::test(start_paused = true)]
async fn invalid_utf8_across_fragments_is_a_protocol_error() {
    // "é" is C3 A9: split across two fragments it is valid; C3 then 28 is not.
    let mut bytes = encode(false, OP_TEXT, &[b'a', 0xc3], true);
    bytes.extend(encode(true, OP_CONT, &[0x28], true));
    let (event, sent) = after_handshake(Config::default(), &bytes).await;
    assert_eq!(reason(&event), (R::ProtocolError, Remote));
    assert_eq!(sent, Some(1007));
}

#[tokio::test(start_paused = true)]
async fn valid_utf8_across_fragments_is_delivered() {
    let (sup, _events) = supervisor(Config::default());
    let (mut conn, mut peer) = accept_raw(&sup).await;
    peer.send_frame(false, OP_TEXT, &[b'a', 0xc3], true).await;
    peer.send_frame(true, OP_CONT, &[0xa9], true).await;
    let message = conn.recv().await.unwrap();
    assert_eq!(message.to_text().unwrap(), "aé");
}

#[tokio::test(start_paused = true)]
async fn continuation_without_a_start_is_a_protocol_error() {
    let (event, sent) =
        after_handshake(Config::default(), &encode(true, OP_CONT, b"orphan", true)).await;
    assert_eq!(reason(&event), (R::ProtocolError, Remote));
    assert_eq!(sent, Some(1002));
}

#[tokio::test(start_paused = true)]
async fn a_message_over_the_limit_in_many_small_frames_is_a_protocol_error() {
    let config = Config::builder()
        .max_message_size(4096)
        .max_frame_size(1024)
        .build()
        .unwrap();
    let mut bytes = encode(false, OP_BINARY, &[0; 1000], true);
    for _ in 0..5 {
        bytes.extend(encode(false, OP_CONT, &[0; 1000], true));
    }
    let (event, sent) = after_handshake(config, &bytes).await;
    assert_eq!(reason(&event), (R::ProtocolError, Remote));
    assert_eq!(sent, Some(1009));
}

#[tokio::test(start_paused = true)]
async fn a_frame_header_announcing_an_exabyte_is_refused_before_any_allocation() {
    // 127 + u64 length: 2^60 bytes announced, 8 sent.
    let mut bytes = vec![0x82, 0x80 | 127];
    bytes.extend_from_slice(&(1u64 << 60).to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    let (event, sent) = after_handshake(Config::default(), &bytes).await;
    assert_eq!(reason(&event), (R::ProtocolError, Remote));
    assert_eq!(sent, Some(1009));
}

#[tokio::test(start_paused = true)]
async fn half_close_without_a_close_frame_is_abnormal() {
    let (sup, events) = supervisor(Config::default());
    let (conn, mut peer) = accept_raw(&sup).await;
    peer.writer.shutdown().await.unwrap(); // FIN, still reading
    let event = conn.closed().await;
    assert_eq!(reason(&event), (R::Abnormal, Remote));
    assert_eq!(events.len(), 1);
}

/// Policy (docs/reliability.md): a peer flooding pings while never reading
/// is not rate-limited as such. tungstenite keeps only the latest pong, so
/// memory stays bounded; our writes stall, and the connection ends as a
/// write stall (Timeout, local) after `write_timeout`.
#[tokio::test(start_paused = true)]
async fn ping_flood_from_a_peer_that_never_reads_ends_as_a_write_stall() {
    let config = heartbeat(60 * SEC, 60 * SEC)
        .write_timeout(3 * SEC)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (conn, peer) = accept_raw_with(&sup, 16 * 1024).await;
    let (_reader_kept_unread, writer) = (peer.reader, peer.writer);
    let started = Instant::now();
    let flood = tokio::spawn(flood_pings(writer));
    let event = conn.closed().await;
    let took = Instant::now() - started;
    assert_eq!(reason(&event), (R::Timeout, Local));
    assert!(took >= 3 * SEC && took <= 3 * SEC + 50 * MS, "{took:?}");
    let sent = flood.await.unwrap();
    assert!(
        sent > 100_000,
        "the flood was read while we could not write: {sent} pings"
    );
    assert_eq!(events.len(), 1);
}

/// A peer flooding pings that does read gets every pong it can take and
/// stays connected: a busy peer is not a broken one.
#[tokio::test(start_paused = true)]
async fn ping_flood_from_a_reading_peer_is_answered_and_survives() {
    let (sup, events) = supervisor(heartbeat(SEC, SEC).build().unwrap());
    let (conn, peer) = accept_raw(&sup).await;
    let (reader, mut writer) = (peer.reader, peer.writer);
    let pongs = tokio::spawn(async move {
        let mut reader = reader;
        let mut pongs = 0u64;
        while let Some(frame) = read_frame(&mut reader).await {
            if frame.opcode == OP_PONG {
                pongs += 1;
            }
        }
        pongs
    });
    for _ in 0..300 {
        for _ in 0..100 {
            writer
                .write_all(&encode(true, OP_PING, b"busy", true))
                .await
                .unwrap();
        }
        sleep(10 * MS).await;
    }
    assert!(conn.close_event().is_none(), "{:#?}", conn.close_event());
    drop(conn);
    drop(writer);
    assert!(pongs.await.unwrap() > 0);
    assert_eq!(events.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_sends_nothing_after_the_upgrade_times_out() {
    let (sup, events) = supervisor(heartbeat(SEC, SEC).build().unwrap());
    let (conn, peer) = accept_raw(&sup).await;
    let drained = tokio::spawn(peer.drain());
    assert_eq!(reason(&conn.closed().await), (R::Timeout, Local));
    drained.await.unwrap();
    assert_eq!(events.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn handshake_with_garbage_is_refused_without_a_hook() {
    let (sup, events) = supervisor(Config::default());
    let (server, mut client) = tokio::io::duplex(PIPE);
    client.write_all(b"HELLO THERE\r\n\r\n").await.unwrap();
    let err = sup.accept(server).await.unwrap_err();
    assert_eq!(
        err.handshake_failure(),
        Some(ws_supervisor::HandshakeFailure::Protocol)
    );
    assert_eq!(events.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_huge_handshake_request_is_refused_without_a_hook() {
    let (sup, events) = supervisor(Config::default());
    let (server, mut client) = tokio::io::duplex(PIPE);
    let writer = tokio::spawn(async move {
        let _ = client.write_all(b"GET / HTTP/1.1\r\n").await;
        let header = format!("X-Junk: {}\r\n", "a".repeat(1000));
        for _ in 0..1000 {
            if client.write_all(header.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let err = sup.accept(server).await.unwrap_err();
    assert!(err.handshake_failure().is_some());
    assert_eq!(events.len(), 0);
    writer.abort();
}
