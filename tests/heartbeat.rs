//! Heartbeat timing, under virtual time over in-memory pipes.

mod support;

use std::time::Duration;

use support::*;
use tokio::time::{Instant, sleep};
use ws_supervisor::{CloseCode, CloseReason, Initiator, Liveness};

/// A peer that answers each ping after `delay`, counting the pings, and
/// answers our Close.
async fn delayed_ponger(mut peer: RawPeer<tokio::io::DuplexStream>, delay: Duration) -> usize {
    let mut pings = 0;
    while let Some(frame) = peer.read_frame().await {
        if frame.opcode == OP_PING {
            pings += 1;
            sleep(delay).await;
            peer.send(OP_PONG, &frame.payload).await;
        } else if frame.opcode == OP_CLOSE {
            peer.send(OP_CLOSE, &frame.payload).await;
        }
    }
    pings
}

#[tokio::test(start_paused = true)]
async fn cadence_100_intervals_with_rtt() {
    let (sup, events) = supervisor(heartbeat(SEC, SEC).build().unwrap());
    let (conn, peer) = accept_raw(&sup).await;
    let opened = Instant::now();
    let peer = tokio::spawn(delayed_ponger(peer, 120 * MS));

    sleep(100 * SEC + 500 * MS).await;
    let stats = conn.stats();
    assert!(
        conn.close_event().is_none(),
        "a live peer must never time out"
    );
    assert!((99..=101).contains(&stats.pings_sent), "{stats:?}");
    assert_eq!(stats.pongs_received, stats.pings_sent);
    assert_eq!(stats.pongs_unmatched, 0);
    let rtt = stats.last_rtt.expect("rtt measured");
    assert!(rtt >= 120 * MS && rtt < 125 * MS, "rtt {rtt:?}");
    let srtt = stats.smoothed_rtt.expect("smoothed rtt");
    assert!(srtt >= 120 * MS && srtt < 125 * MS, "srtt {srtt:?}");
    assert!(stats.since_last_inbound < SEC);

    drop(conn);
    let pings = peer.await.unwrap();
    assert!((99..=101).contains(&pings), "peer saw {pings} pings");
    let event = events.only();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Normal, Initiator::Local)
    );
    assert!(event.duration >= Instant::now() - opened - SEC);
}

/// How long after the open a peer that never answers died (see
/// `support::silent_peer_dies`).
async fn silent_peer_dies_after(interval: Duration, timeout: Duration) -> Duration {
    silent_peer_dies(heartbeat(interval, timeout).build().unwrap())
        .await
        .0
}

#[tokio::test(start_paused = true)]
async fn silent_peer_times_out_within_bound_short_timeout() {
    let died = silent_peer_dies_after(SEC, 300 * MS).await;
    assert!(died <= SEC + 300 * MS + 10 * MS, "died after {died:?}");
}

#[tokio::test(start_paused = true)]
async fn silent_peer_times_out_within_bound_equal_timeout() {
    let died = silent_peer_dies_after(SEC, SEC).await;
    assert!(died <= 2 * SEC + 10 * MS, "died after {died:?}");
}

#[tokio::test(start_paused = true)]
async fn silent_peer_times_out_within_bound_long_timeout() {
    // The timeout spans three pings: the deadline stays on the first one.
    let died = silent_peer_dies_after(SEC, 3 * SEC).await;
    assert!(died <= 4 * SEC + 10 * MS, "died after {died:?}");
}

#[tokio::test(start_paused = true)]
async fn detection_bound_counts_from_the_last_inbound_frame() {
    let (sup, _events) = supervisor(heartbeat(SEC, SEC).build().unwrap());
    let (conn, mut peer) = accept_raw(&sup).await;
    // Answer pings for a while, then fall silent right after a pong.
    let mut last = Instant::now();
    for _ in 0..5 {
        let ping = peer.read_until(OP_PING).await.unwrap();
        peer.send(OP_PONG, &ping.payload).await;
        last = Instant::now();
    }
    let drained = tokio::spawn(peer.drain());
    let event = conn.closed().await;
    let after_last = Instant::now() - last;
    assert_eq!(event.reason, CloseReason::Timeout);
    assert!(
        after_last > SEC && after_last <= 2 * SEC + 10 * MS,
        "{after_last:?}"
    );
    drained.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn pings_flow_and_peer_pings_are_answered_while_the_app_is_idle() {
    let (sup, _events) = supervisor(heartbeat(SEC, SEC).build().unwrap());
    // The application holds the connection but never reads nor writes.
    let (conn, mut peer) = accept_raw(&sup).await;
    peer.send(OP_PING, b"are you there").await;
    let pong = peer.read_until(OP_PONG).await.unwrap();
    assert_eq!(pong.payload, b"are you there");
    for _ in 0..3 {
        let ping = peer.read_until(OP_PING).await.unwrap();
        peer.send(OP_PONG, &ping.payload).await;
    }
    sleep(100 * MS).await;
    assert_eq!(conn.stats().pings_sent, 3);
    assert_eq!(conn.stats().pongs_received, 3);
    assert!(conn.close_event().is_none());
}

#[tokio::test(start_paused = true)]
async fn auto_pong_goes_out_at_once() {
    let (sup, _events) = supervisor(heartbeat(10 * SEC, SEC).build().unwrap());
    let (_conn, mut peer) = accept_raw(&sup).await;
    let sent = Instant::now();
    peer.send(OP_PING, b"now").await;
    let pong = peer.read_until(OP_PONG).await.unwrap();
    assert_eq!(pong.payload, b"now");
    // Under paused time, any timer-driven delay would show up here.
    assert_eq!(Instant::now(), sent);
}

#[tokio::test(start_paused = true)]
async fn unsolicited_pongs_are_liveness_never_rtt() {
    let config = heartbeat(SEC, SEC)
        .liveness(Liveness::Pong)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, peer) = accept_raw(&sup).await;
    let (mut reader, mut writer) = (peer.reader, peer.writer);
    let discard =
        tokio::spawn(async move { tokio::io::copy(&mut reader, &mut tokio::io::sink()).await });
    // Never answers a ping, but sends a pong of its own twice a second.
    for _ in 0..40 {
        use tokio::io::AsyncWriteExt;
        writer
            .write_all(&encode(true, OP_PONG, b"heartbeat", true))
            .await
            .unwrap();
        sleep(500 * MS).await;
    }
    let stats = conn.stats();
    assert!(
        conn.close_event().is_none(),
        "unsolicited pongs keep it alive"
    );
    assert_eq!(stats.last_rtt, None);
    assert_eq!(stats.pongs_unmatched, 40);
    assert!(stats.pings_sent >= 19);
    drop(conn);
    drop(writer);
    discard.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn liveness_policy_any_frame_versus_pong_only() {
    for (liveness, survives) in [(Liveness::AnyFrame, true), (Liveness::Pong, false)] {
        let config = heartbeat(SEC, SEC).liveness(liveness).build().unwrap();
        let (sup, events) = supervisor(config);
        let (mut conn, peer) = accept_raw(&sup).await;
        let (mut reader, mut writer) = (peer.reader, peer.writer);
        let discard =
            tokio::spawn(async move { tokio::io::copy(&mut reader, &mut tokio::io::sink()).await });
        // Data every 300 ms, never a pong.
        let talker = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for _ in 0..20 {
                if writer
                    .write_all(&encode(true, OP_TEXT, b"tick", true))
                    .await
                    .is_err()
                {
                    break;
                }
                sleep(300 * MS).await;
            }
        });
        let reader_task = tokio::spawn(async move {
            while conn.recv().await.is_some() {}
            conn.closed().await
        });
        talker.await.unwrap();
        // 6 s of talk have passed: a pong-only supervisor killed it at 2 s.
        if survives {
            assert_eq!(events.len(), 0, "{liveness:?}: killed a talking peer");
        } else {
            let event = events.only();
            assert_eq!(event.reason, CloseReason::Timeout, "{liveness:?}");
            assert!(event.duration <= 2 * SEC + 10 * MS);
        }
        // Now silent: under either policy the peer times out.
        let event = reader_task.await.unwrap();
        assert_eq!(event.reason, CloseReason::Timeout);
        assert_eq!(events.len(), 1);
        let _ = discard.await;
    }
}

/// A peer that writes `messages` binary messages of `size` bytes, then
/// falls silent; it reads (and discards) everything we send.
async fn talk_then_fall_silent(
    peer: RawPeer<tokio::io::DuplexStream>,
    messages: usize,
    size: usize,
) -> tokio::task::JoinHandle<std::io::Result<u64>> {
    use tokio::io::AsyncWriteExt;
    let (mut reader, mut writer) = (peer.reader, peer.writer);
    let discard =
        tokio::spawn(async move { tokio::io::copy(&mut reader, &mut tokio::io::sink()).await });
    for i in 0..messages {
        let payload = vec![i as u8; size];
        writer
            .write_all(&encode(true, OP_BINARY, &payload, true))
            .await
            .unwrap();
    }
    // Keeps the socket open, says nothing more.
    std::mem::forget(writer);
    discard
}

/// Pins a bug (issue "No dead peer outlives its bound", item 1): an
/// application that keeps its `Connection` but never reads, with more
/// messages arriving than its queue holds, switched detection off: the full
/// queue suspended the pong deadline with no limit. (This test asserted
/// that rule for 30 s before; the rule is replaced on purpose.)
#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_found_while_the_application_does_not_read() {
    for messages in [10, 100] {
        let config = heartbeat(300 * MS, 300 * MS).build().unwrap();
        let (sup, events) = supervisor(config);
        let (mut conn, peer) = accept_raw(&sup).await;
        let discard = talk_then_fall_silent(peer, messages, 1).await;
        let last_frame = Instant::now();
        // The application does not read. The peer's data fits the inbound
        // budget, so reading goes on, and its missing pongs are seen.
        let event = tokio::time::timeout(5 * SEC, conn.closed())
            .await
            .expect("a silent peer still open 5 s later");
        assert_eq!(
            (event.reason, event.initiator),
            (CloseReason::Timeout, Initiator::Local)
        );
        let took = Instant::now() - last_frame;
        // I + J + 2T at most (J = 0 here).
        assert!(took <= 900 * MS + 10 * MS, "{messages}: {took:?}");
        // Nothing read was lost: the application gets every message.
        for i in 0..messages {
            let message = conn.recv().await.expect("a message read before the end");
            assert_eq!(message.into_data().as_ref(), &[i as u8]);
        }
        assert_eq!(conn.recv().await, None);
        assert_eq!(events.len(), 1);
        discard.abort();
    }
}

/// An application that takes nothing while the peer fills the inbound
/// budget: reading pauses, the pong deadline is suspended (the peer's pong
/// may sit behind its data), and after one whole heartbeat the application
/// is blamed, not the peer.
#[tokio::test(start_paused = true)]
async fn an_application_that_does_not_read_is_blamed_once_the_budget_is_full() {
    let config = heartbeat(300 * MS, 300 * MS)
        .max_message_size(16 * 1024)
        .max_frame_size(16 * 1024)
        .inbound_buffer_limit(64 * 1024)
        .close_timeout(SEC)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (conn, peer) = accept_raw(&sup).await;
    // 40 x 4 KiB: past the 64 KiB budget.
    let discard = talk_then_fall_silent(peer, 40, 4096).await;
    let started = Instant::now();
    let event = conn.closed().await;
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Internal, Initiator::Local)
    );
    assert_eq!(event.text, "application not reading");
    assert_eq!(event.code_sent, Some(CloseCode::Error));
    let took = Instant::now() - started;
    // Paused at once; I + T later, blamed (then the close handshake, which
    // the peer never answers, within close_timeout).
    assert!(took >= 600 * MS && took <= 1600 * MS + 10 * MS, "{took:?}");
    assert_eq!(events.len(), 1);
    discard.abort();
}

/// Pins the blame rule for a short stall: while reading is paused for the
/// budget the pong deadline is suspended, and once the application reads
/// again the peer gets one full timeout.
#[tokio::test(start_paused = true)]
async fn a_paused_read_suspends_the_pong_deadline_until_the_application_reads() {
    let config = heartbeat(SEC, SEC)
        .liveness(Liveness::Pong)
        .max_message_size(16 * 1024)
        .max_frame_size(16 * 1024)
        .inbound_buffer_limit(16 * 1024)
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let (mut conn, peer) = accept_raw(&sup).await;
    let discard = talk_then_fall_silent(peer, 10, 4096).await;
    // 1.5 s without reading (under the 2 s stall limit): pings go
    // unanswered, yet nothing is blamed on the peer while we do not read.
    sleep(1500 * MS).await;
    assert!(
        conn.close_event().is_none(),
        "closed while our own budget was full"
    );
    // Once the application reads again, the peer gets one full timeout.
    let resumed = Instant::now();
    for i in 0..10u8 {
        let message = conn.recv().await.unwrap();
        assert_eq!(message.into_data()[0], i);
    }
    let event = conn.closed().await;
    assert_eq!(event.reason, CloseReason::Timeout);
    let waited = Instant::now() - resumed;
    assert!(waited >= SEC && waited <= 2 * SEC + 10 * MS, "{waited:?}");
    assert_eq!(events.len(), 1);
    discard.abort();
}

#[tokio::test(start_paused = true)]
async fn jitter_spreads_first_pings_within_bound() {
    let config = heartbeat(SEC, SEC).ping_jitter(500 * MS).build().unwrap();
    let (sup, _events) = supervisor(config);
    let mut firsts = Vec::new();
    for _ in 0..20 {
        let (conn, mut peer) = accept_raw(&sup).await;
        let opened = Instant::now();
        let ping = peer.read_until(OP_PING).await.unwrap();
        let first = Instant::now() - opened;
        peer.send(OP_PONG, &ping.payload).await;
        // Timers fire on whole milliseconds, so the top of the range is inclusive.
        assert!(
            first >= SEC && first <= SEC + 500 * MS,
            "first ping after {first:?}"
        );
        firsts.push(first);
        // The schedule keeps its phase: the second ping one interval later.
        let ping = peer.read_until(OP_PING).await.unwrap();
        assert_eq!(Instant::now() - opened, first + SEC);
        peer.send(OP_PONG, &ping.payload).await;
        drop(conn);
    }
    firsts.sort();
    firsts.dedup();
    assert!(firsts.len() > 10, "phases are not spread: {firsts:?}");
}

/// 50 data frames and then the pong to `ping`, in one write: a pong queued
/// behind data.
async fn data_then_pong(peer: &mut RawPeer<tokio::io::DuplexStream>, ping: &Frame) {
    use tokio::io::AsyncWriteExt;
    let mut burst = Vec::new();
    for i in 0..50u8 {
        burst.extend(encode(true, OP_BINARY, &[i; 100], true));
    }
    burst.extend(encode(true, OP_PONG, &ping.payload, true));
    peer.writer.write_all(&burst).await.unwrap();
}

/// Pins a bug found in review: when the deadline timer and a burst of data
/// with the pong at its end arrived together, the timeout was declared after
/// reading the first message, before the pong was read.
#[tokio::test(start_paused = true)]
async fn a_pong_queued_behind_data_at_the_deadline_is_read_first() {
    let config = heartbeat(SEC, SEC)
        .liveness(Liveness::Pong)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, mut peer) = accept_raw(&sup).await;
    let ping = peer.read_until(OP_PING).await.unwrap();
    let sent = Instant::now();
    // Exactly at the deadline.
    sleep(SEC).await;
    data_then_pong(&mut peer, &ping).await;
    assert_eq!(Instant::now() - sent, SEC);
    sleep(10 * MS).await;
    assert!(conn.close_event().is_none(), "{:#?}", conn.close_event());
    assert_eq!(conn.stats().pongs_received, 1);
}

/// Pins a bug found in review: a Pending from tokio's cooperative budget on
/// the read side was taken for "nothing left to read", so a busy sender got
/// its peer killed with the pong waiting right behind the data.
#[tokio::test(start_paused = true)]
async fn a_pong_behind_data_is_read_even_when_the_app_sends_a_lot() {
    let config = heartbeat(SEC, SEC)
        .liveness(Liveness::Pong)
        .outbound_queue(1024)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    let (conn, mut peer) = accept_raw_with(&sup, 1 << 20).await;
    let ping = peer.read_until(OP_PING).await.unwrap();
    let sent = Instant::now();
    sleep(SEC).await;
    data_then_pong(&mut peer, &ping).await;
    tokio::task::unconstrained(async {
        for i in 0..500 {
            conn.send(format!("out {i}")).await.unwrap();
        }
    })
    .await;
    assert_eq!(Instant::now() - sent, SEC);
    sleep(10 * MS).await;
    assert!(conn.close_event().is_none(), "{:#?}", conn.close_event());
}

/// Pins a bug found in review: aligning first pings to shared slots pushed
/// them past `interval + jitter` for connections opened off a slot boundary.
#[tokio::test(start_paused = true)]
async fn the_detection_bound_holds_for_connections_opened_off_the_slot_grid() {
    let jitter = 100 * MS;
    let config = heartbeat(SEC, 300 * MS)
        .ping_jitter(jitter)
        .build()
        .unwrap();
    let (sup, _events) = supervisor(config);
    for offset in [3, 7, 11] {
        sleep(MS * offset).await;
        let (conn, peer) = accept_raw(&sup).await;
        let opened = Instant::now();
        let drained = tokio::spawn(peer.drain());
        conn.closed().await;
        let died = Instant::now() - opened;
        // interval + jitter + timeout, plus the 1 ms timer granularity.
        assert!(
            died <= SEC + jitter + 300 * MS + MS,
            "opened at +{offset} ms: died after {died:?}"
        );
        drained.await.unwrap();
    }
}

/// Pins a bug found in review: the read layer took a peer's 8-byte pong out
/// of the stream on every stream, but a stream given to `supervise` has no
/// driver asking for it, so the pong was lost and an idle, healthy peer
/// timed out. A `supervise`d `ReadLayer` stream keeps its pongs.
#[tokio::test(start_paused = true)]
async fn a_supervised_read_layer_stream_keeps_its_pongs() {
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let config = heartbeat(SEC, SEC).build().unwrap();
    let (sup, events) = supervisor(config);
    let (server, client) = tokio::io::duplex(64 * 1024);
    let server = ws_supervisor::ReadLayer::new(server, sup.config());
    let ws = WebSocketStream::from_raw_socket(
        server,
        Role::Server,
        Some(sup.config().websocket_config()),
    )
    .await;
    // The peer: a tungstenite client past its handshake; it answers pings.
    let mut peer = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let conn = sup.supervise(ws, None).await.unwrap();
    let answering = tokio::spawn(async move {
        while let Some(Ok(_)) = futures::StreamExt::next(&mut peer).await {}
    });
    tokio::time::sleep(5 * SEC).await;
    let stats = conn.stats();
    assert!(stats.pongs_received >= 4, "{stats:?}");
    assert!(conn.close_event().is_none(), "still open after 5 intervals");
    assert_eq!(events.len(), 0);
    answering.abort();
}
