//! The driver's state machine at its corners, over an in-memory pipe under
//! virtual time, after hyper's dispatch tests: what the driver does when two
//! things happen at once.

mod support;

use tokio::time::{Instant, sleep};
use ws_supervisor::tungstenite::Message;
use ws_supervisor::{CloseCode, CloseReason as R, Initiator::Local, Initiator::Remote};

use support::*;

/// A pipe this small fills with one large message the peer does not read.
const SMALL_PIPE: usize = 4096;

/// Blocks the driver's write side: a message far larger than the pipe,
/// which the peer does not read.
async fn block_writes(conn: &ws_supervisor::Connection) {
    conn.send(Message::binary(vec![7u8; 256 * 1024]))
        .await
        .unwrap();
    // Let the driver write what fits and find the socket full.
    sleep(MS).await;
}

#[tokio::test(start_paused = true)]
async fn a_ping_due_while_the_write_side_is_blocked_leaves_the_verdict_to_the_write_timeout() {
    let config = heartbeat(SEC, 5 * SEC)
        .write_timeout(3 * SEC)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (conn, _peer_never_reads) = accept_raw_with(&sup, SMALL_PIPE).await;
    let started = Instant::now();
    block_writes(&conn).await;
    let event = conn.closed().await;
    // The pings due at 1 s and 2 s were skipped (they would have waited
    // behind our message): the stalled write ended it at 3 s.
    assert_eq!((event.reason, event.initiator), (R::Timeout, Local));
    assert_eq!(event.text, "write timeout");
    assert_eq!(
        event.code_sent, None,
        "no Close can get out of a stuck write side"
    );
    assert_eq!(
        event.stats.pings_sent, 0,
        "no ping is queued behind our own data"
    );
    let took = Instant::now() - started;
    assert!(took >= 3 * SEC && took < 3 * SEC + 10 * MS, "{took:?}");
    assert_eq!(events.len(), 1);
}

/// A server's ping frame is written by the read layer, past tungstenite.
/// Cut by a full pipe, it still reaches the peer whole and before the
/// message sent while it was on its way, and the pong to it matches.
#[tokio::test(start_paused = true)]
async fn a_ping_cut_by_a_full_pipe_goes_out_whole_before_the_next_message() {
    let config = heartbeat(SEC, 30 * SEC).build().unwrap();
    let (sup, events) = supervisor(config);
    // 4 bytes: the 10-byte ping takes three writes, the peer reads nothing
    // yet.
    let (conn, mut peer) = accept_raw_with(&sup, 4).await;
    wait_until("the first ping is on its way", || {
        conn.stats().pings_sent > 0
    })
    .await;
    assert_eq!(conn.stats().pings_sent, 1);
    conn.send(Message::text("after")).await.unwrap();
    sleep(MS).await;
    let ping = peer.read_frame().await.unwrap();
    assert_eq!(
        (ping.fin, ping.opcode, ping.payload.len()),
        (true, OP_PING, 8)
    );
    let next = peer.read_frame().await.unwrap();
    assert_eq!((next.opcode, &next.payload[..]), (OP_TEXT, &b"after"[..]));
    peer.send(OP_PONG, &ping.payload).await;
    wait_until("the pong is counted", || conn.stats().pongs_received > 0).await;
    let stats = conn.stats();
    assert_eq!((stats.pongs_received, stats.pongs_unmatched), (1, 0));
    assert!(stats.last_rtt.is_some(), "the pong answered our ping");
    assert_eq!(events.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_peers_close_arriving_while_ours_is_queued_makes_our_close_final() {
    let config = heartbeat(60 * SEC, 60 * SEC)
        .close_timeout(2 * SEC)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (conn, mut peer) = accept_raw_with(&sup, SMALL_PIPE).await;
    block_writes(&conn).await;
    // Dropping the connection queues our Close 1000 behind the message,
    // in the protocol layer's buffer; the peer closes too, unaware.
    drop(conn);
    sleep(MS).await;
    assert_eq!(events.len(), 0, "our Close is still queued");
    peer.close(1000, "me too").await;
    events.wait_for(1).await;
    let event = events.only();
    // Its Close ended the handshake: ours came first and is final, though
    // it never reached the peer.
    assert_eq!((event.reason, event.initiator), (R::Normal, Local));
    assert_eq!(event.code_sent, Some(CloseCode::Normal));
    assert_eq!(event.code_received, Some(CloseCode::Normal));
    assert_eq!(event.text, "", "the peer's text is not ours");
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_the_failure_path_caps_it_at_the_grace_period() {
    let config = heartbeat(60 * SEC, 60 * SEC)
        .write_timeout(30 * SEC)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (conn, mut peer) = accept_raw_with(&sup, SMALL_PIPE).await;
    block_writes(&conn).await;
    // Invalid UTF-8: the failure path, a Close 1007 that cannot get out.
    peer.send(OP_TEXT, &[0xff, 0xfe]).await;
    sleep(MS).await;
    assert!(conn.close_event().is_none(), "still flushing its Close");
    let started = Instant::now();
    let summary = sup.shutdown(SEC).await;
    let took = Instant::now() - started;
    // The grace period (1 s), not the write timeout (30 s), ended the wait;
    // the reason stays the first one.
    assert!(took >= SEC && took < SEC + 10 * MS, "{took:?}");
    assert_eq!(summary.forced(), 1);
    assert_eq!(summary.count(R::ProtocolError), 1);
    let event = events.only();
    assert_eq!((event.reason, event.initiator), (R::ProtocolError, Remote));
    assert_eq!(event.code_sent, Some(CloseCode::Invalid));
}

/// Pins a bug (issue "No dead peer outlives its bound", item 6): while
/// writes were blocked, a ping was queued every interval until they filled
/// the write buffer's headroom; then the next data message (and a Close)
/// no longer fit, and the connection ended at once on a `WriteBufferFull`
/// error instead of its own close handshake.
#[tokio::test(start_paused = true)]
async fn pings_do_not_pile_up_behind_blocked_writes_and_our_close_always_fits() {
    let config = heartbeat(100 * MS, 600 * SEC)
        .write_timeout(600 * SEC)
        .close_timeout(2 * SEC)
        .write_buffer_limit(1024)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    // One message, larger than the pipe: the rest of it waits in our buffer.
    let (conn, _peer_never_reads) = accept_raw_with(&sup, 512).await;
    conn.send(Message::binary(vec![7u8; 1024])).await.unwrap();
    // 20 s of pings come due while the data waits for the peer.
    sleep(20 * SEC).await;
    assert!(conn.close_event().is_none(), "{:?}", conn.close_event());
    assert_eq!(
        conn.stats().pings_sent,
        0,
        "a ping behind our own data never reaches the peer"
    );
    let dropped = Instant::now();
    drop(conn);
    events.wait_for(1).await;
    let event = events.only();
    // Our Close was queued, and the peer never answered it.
    assert_eq!((event.reason, event.initiator), (R::Timeout, Local));
    assert_eq!(event.code_sent, Some(CloseCode::Normal));
    assert!(event.error.is_none(), "{:?}", event.error);
    let took = Instant::now() - dropped;
    assert!(took >= 2 * SEC && took <= 2 * SEC + 10 * MS, "{took:?}");
}

/// A peer reading our data at a steady pace: `bytes_per_tick` every 100 ms,
/// for `ticks` ticks (then it stops reading), answering every ping as soon
/// as it reads it. Returns the data bytes it read.
async fn paced_reader(
    peer: RawPeer<tokio::io::DuplexStream>,
    bytes_per_tick: usize,
    ticks: usize,
) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let RawPeer { mut reader, writer } = peer;
    // What it has read so far, parsed as frames on the other side of a pipe.
    let (mut paced_tx, paced_rx) = tokio::io::duplex(16 << 20);
    let copier = tokio::spawn(async move {
        let mut buf = vec![0u8; bytes_per_tick];
        for _ in 0..ticks {
            let Ok(n) = reader.read(&mut buf).await else {
                return;
            };
            if n == 0 || paced_tx.write_all(&buf[..n]).await.is_err() {
                // The server hung up: so does the parser's side.
                return;
            }
            sleep(100 * MS).await;
        }
        // Stops reading, keeps the socket open (until the test ends).
        std::future::pending::<()>().await;
        drop((reader, paced_tx));
    });
    let mut peer = RawPeer {
        reader: tokio::io::split(paced_rx).0,
        writer,
    };
    let mut data = 0;
    while let Some(frame) = peer.read_frame().await {
        match frame.opcode {
            OP_PING => peer.send(OP_PONG, &frame.payload).await,
            OP_BINARY => data += frame.payload.len(),
            _ => {}
        }
    }
    copier.abort();
    data
}

/// Pins a bug (issue "No dead peer outlives its bound", item 2): a peer
/// reading a 3 MiB message steadily (about 640 KB/s) was killed: first as
/// "ping timeout" (its pong deadline ran while the ping waited behind the
/// message), then, with that fixed, by the write timeout, which counted
/// from the last empty buffer rather than the last byte the socket took.
#[tokio::test(start_paused = true)]
async fn a_peer_reading_steadily_survives_a_large_message_and_one_that_stops_is_caught() {
    let config = || {
        heartbeat(300 * MS, 300 * MS)
            .write_timeout(2 * SEC)
            .close_timeout(SEC)
            .build()
            .unwrap()
    };
    let message = Message::binary(vec![7u8; 3 << 20]);

    // Keeps reading: alive through the whole message, and after it.
    let (sup, _events) = supervisor(config());
    let (conn, peer) = accept_raw_with(&sup, 64 * 1024).await;
    let reader = tokio::spawn(paced_reader(peer, 64 * 1024, 1000));
    conn.send(message.clone()).await.unwrap();
    sleep(8 * SEC).await;
    assert!(conn.close_event().is_none(), "{:#?}", conn.close_event());
    assert!(conn.stats().pongs_received > 0, "{:?}", conn.stats());
    drop(conn);
    assert_eq!(reader.await.unwrap(), 3 << 20, "the whole message arrived");

    // Stops reading after 1 MiB: caught by the write timeout, counted from
    // the last bytes the socket took.
    let (sup, _events) = supervisor(config());
    let (conn, peer) = accept_raw_with(&sup, 64 * 1024).await;
    let reader = tokio::spawn(paced_reader(peer, 64 * 1024, 16));
    let started = Instant::now();
    conn.send(message).await.unwrap();
    let event = conn.closed().await;
    assert_eq!((event.reason, event.initiator), (R::Timeout, Local));
    assert_eq!(event.text, "write timeout");
    let took = Instant::now() - started;
    // The last read at 1.5 s (16 ticks of 100 ms), plus 2 s, plus the one
    // pipe's worth the socket still took after it.
    assert!(took >= 3500 * MS && took <= 3800 * MS, "{took:?}");
    reader.abort();
}
