//! `Connection::on_message`: messages handled on the connection's own task.
//! Order, replies, heartbeats between calls, a panicking handler, and the
//! backpressure rule (a full send queue pauses reading; the write timeout,
//! not the application-stall rule, judges a peer that reads nothing).
//! Real loopback TCP where the wire matters; timeouts are hang guards.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use ws_supervisor::{CloseReason, Config, Initiator};

const BOUND: Duration = Duration::from_secs(30);

/// 1000 messages of both kinds come back from an echo handler in order;
/// then the client closes, `recv` gives `None`, and the event is `Normal`.
async fn echo_in_order() {
    let (sup, events) = supervisor(Config::default());
    let (mut conn, mut peer) = accept_over_tcp(&sup).await;
    conn.on_message(|message, reply| {
        reply.send(message).unwrap();
    })
    .unwrap();
    let sent: Vec<Message> = (0..1000u32)
        .map(|i| match i % 2 {
            0 => Message::text(format!("text {i}")),
            _ => Message::binary(i.to_be_bytes().repeat(i as usize % 64)),
        })
        .collect();
    let client = async {
        for m in &sent {
            peer.feed(m.clone()).await.unwrap();
        }
        peer.flush().await.unwrap();
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let m = peer.next().await.unwrap().unwrap();
            if m.is_text() || m.is_binary() {
                got.push(m);
            }
        }
        peer.close(None).await.unwrap();
        while let Some(Ok(_)) = peer.next().await {}
        got
    };
    let got = timeout(BOUND, client).await.unwrap();
    assert_eq!(got, sent);
    assert_eq!(timeout(BOUND, conn.recv()).await.unwrap(), None);
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Normal, Initiator::Remote)
    );
    assert!(events.wait_within(1, BOUND).await);
}

#[tokio::test]
async fn an_inline_echo_answers_every_message_in_order() {
    echo_in_order().await;
}

#[test]
fn an_inline_echo_answers_every_message_in_order_multi_thread() {
    multi_thread().block_on(echo_in_order());
}

/// Whatever was queued before the handler was given (here, maybe some of
/// 2..=100 behind the first, taken with `recv`), the handler sees every
/// later message once, in order.
#[tokio::test]
async fn messages_queued_before_the_handler_reach_it_first_in_order() {
    let (sup, _events) = supervisor(Config::default());
    let (mut conn, mut peer) = accept_over_tcp(&sup).await;
    for i in 1..=100u32 {
        peer.feed(Message::text(i.to_string())).await.unwrap();
    }
    peer.flush().await.unwrap();
    assert_eq!(
        timeout(BOUND, conn.recv()).await.unwrap(),
        Some(Message::text("1"))
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    conn.on_message(move |message, _| tx.send(message).unwrap())
        .unwrap();
    for i in 2..=100u32 {
        let got = timeout(BOUND, rx.recv()).await.unwrap().unwrap();
        assert_eq!(got, Message::text(i.to_string()));
    }
    assert!(
        conn.on_message(|_, _| {}).unwrap_err().is_invalid_input(),
        "one handler per connection"
    );
    drop(conn);
    while let Some(Ok(_)) = timeout(BOUND, peer.next()).await.unwrap() {}
}

/// A peer that streams messages as fast as it can still gets its pings:
/// the driver checks its timers between handler calls.
#[tokio::test]
async fn pings_keep_their_schedule_while_the_handler_takes_a_stream() {
    let config = heartbeat(Duration::from_millis(20), Duration::from_secs(5))
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (mut conn, peer) = accept_over_tcp(&sup).await;
    let calls = Arc::new(AtomicUsize::new(0));
    conn.on_message({
        let calls = calls.clone();
        move |_, _| {
            calls.fetch_add(1, Relaxed);
        }
    })
    .unwrap();
    let (mut write, mut read) = peer.split();
    // The client's reader answers the pings (tungstenite queues the pongs;
    // the writer's sends flush them).
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = read.next().await {} });
    let streamed = timeout(BOUND, async {
        let mut sent = 0usize;
        while conn.stats().pings_sent < 10 && sent < 10_000_000 {
            write.send(Message::text("tick")).await.unwrap();
            sent += 1;
        }
        sent
    })
    .await
    .expect("10 pings while the peer streams");
    assert!(conn.stats().pongs_received >= 1, "{:?}", conn.stats());
    // The peer's Close comes after its messages: each one is handled first.
    write.send(Message::Close(None)).await.unwrap();
    timeout(BOUND, reader).await.unwrap().unwrap();
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(event.reason, CloseReason::Normal);
    assert_eq!(calls.load(Relaxed), streamed, "every message was handled");
}

/// A handler that panics ends its connection as `Internal`, local, with
/// 1011 on the wire, and is not called again.
#[tokio::test]
async fn a_panicking_handler_ends_the_connection_as_internal() {
    quiet_expected_panics();
    let (sup, events) = supervisor(Config::default());
    let (mut conn, mut peer) = accept_over_tcp(&sup).await;
    let calls = Arc::new(AtomicUsize::new(0));
    conn.on_message({
        let calls = calls.clone();
        move |_, _| {
            calls.fetch_add(1, Relaxed);
            panic!("expected in this test: a handler that panics");
        }
    })
    .unwrap();
    peer.send(Message::text("one")).await.unwrap();
    peer.send(Message::text("two")).await.unwrap();
    let mut close = None;
    while let Some(Ok(m)) = timeout(BOUND, peer.next()).await.unwrap() {
        if let Message::Close(frame) = m {
            close = frame;
        }
    }
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Error));
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(
        (event.reason, event.initiator, event.text.as_str()),
        (
            CloseReason::Internal,
            Initiator::Local,
            "application panicked"
        )
    );
    assert_eq!(calls.load(Relaxed), 1, "not called after its panic");
    assert_eq!(events.len(), 1);
}

/// Replies that the peer never reads: the send queue fills, reading pauses,
/// so the handler's replies stay bounded; and the write timeout ends the
/// connection, not the application-stall rule (whose limit, 500 ms here,
/// is the shorter one): the application is not the one that stopped.
#[tokio::test]
async fn a_peer_that_reads_no_replies_is_a_write_stall_with_bounded_replies() {
    let limit = 256 * 1024;
    let config = heartbeat(Duration::from_millis(250), Duration::from_millis(250))
        .write_timeout(Duration::from_secs(2))
        .write_buffer_limit(limit)
        .outbound_queue(8)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    // The peer upgrades, then writes 16 KiB frames and never reads.
    let (mut conn, mut tcp) = accept_over_tcp_from(&sup, non_reader).await;
    let message = vec![3u8; 16 * 1024];
    let calls = Arc::new(AtomicUsize::new(0));
    conn.on_message({
        let calls = calls.clone();
        move |message, reply| {
            calls.fetch_add(1, Relaxed);
            let _ = reply.send(message);
        }
    })
    .unwrap();
    let frame = encode(true, 0x2, &message, true);
    let writer = tokio::spawn(async move {
        // 20 000 frames (320 MiB) at most; it blocks long before.
        for _ in 0..20_000 {
            if tcp.write_all(&frame).await.is_err() {
                break;
            }
        }
        tcp
    });
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(
        (event.reason, event.initiator, event.text.as_str()),
        (CloseReason::Timeout, Initiator::Local, "write timeout")
    );
    // Replies held: the socket's few MiB (loopback buffers autotune), our
    // write buffer, and the queue. The peer offered up to 320 MiB.
    let replied = calls.load(Relaxed) * message.len();
    let held_bound = 16 * 1024 * 1024 + limit + 9 * message.len();
    assert!(
        replied <= held_bound,
        "replied {replied} bytes, bound {held_bound}"
    );
    assert_eq!(events.len(), 1);
    writer.abort();
}

/// Other tasks' `Sender`s keep the send queue full: a broadcast faster
/// than the peer reads (it reads, slowly, so the write side makes progress
/// and the write timeout rightly never fires). Only the handler's own
/// replies count against its pause, so reading goes on: the peer's
/// messages still reach the handler (which answers none of them here).
async fn senders_that_fill_the_queue() {
    let config = Config::builder().outbound_queue(8).build().unwrap();
    let (sup, _events) = supervisor(config);
    let (mut conn, peer) = accept_over_tcp(&sup).await;
    let (tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    conn.on_message(move |message, _| tx.send(message).unwrap())
        .unwrap();
    let sender = conn.sender();
    let broadcast = tokio::spawn(async move {
        // 100 MB at most; the peer drains far less in this test.
        for _ in 0..200_000 {
            if sender.send(vec![0u8; 512]).await.is_err() {
                break;
            }
        }
    });
    let (mut write, mut read) = peer.split();
    let slow_reader = tokio::spawn(async move {
        // At most 100 000 reads of a message, one per millisecond.
        for _ in 0..100_000 {
            if !matches!(read.next().await, Some(Ok(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    // Let the broadcast fill our buffers first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..10u32 {
        write.send(Message::text(i.to_string())).await.unwrap();
    }
    for i in 0..10u32 {
        let got = timeout(BOUND, handled.recv())
            .await
            .expect("the peer's messages are read while the queue is full");
        assert_eq!(got, Some(Message::text(i.to_string())));
    }
    broadcast.abort();
    slow_reader.abort();
}

#[tokio::test]
async fn a_queue_kept_full_by_other_senders_does_not_stop_reading() {
    senders_that_fill_the_queue().await;
}

#[test]
fn a_queue_kept_full_by_other_senders_does_not_stop_reading_multi_thread() {
    multi_thread().block_on(senders_that_fill_the_queue());
}

/// A handler given after the connection ended still gets what was read
/// (replies fail: nothing more is written), so no message is lost.
#[tokio::test]
async fn a_handler_given_after_the_end_still_gets_what_was_read() {
    let (sup, _events) = supervisor(Config::default());
    let (mut conn, mut peer) = accept_over_tcp(&sup).await;
    peer.send(Message::text("hello")).await.unwrap();
    peer.close(None).await.unwrap();
    while let Some(Ok(_)) = timeout(BOUND, peer.next()).await.unwrap() {}
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(event.reason, CloseReason::Normal);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    conn.on_message(move |message, reply| {
        let refused = reply.send("too late").unwrap_err().is_closed();
        tx.send((message, refused)).unwrap();
    })
    .unwrap();
    assert_eq!(rx.recv().await, Some((Message::text("hello"), true)));
    assert_eq!(rx.recv().await, None, "then dropped");
    assert_eq!(conn.recv().await, None);
}
