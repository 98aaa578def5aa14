//! Graceful shutdown and exactly-once hooks at scale, under virtual time.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use ws_supervisor::{
    CloseCode, CloseEvent, CloseReason, Config, HandshakeFailure, Initiator, Supervisor,
};

#[tokio::test(start_paused = true)]
async fn shutdown_1000_connections_100_silent() {
    let (sup, events) = supervisor(heartbeat(60 * SEC, 10 * SEC).build().unwrap());
    let mut cooperative = Vec::new();
    let mut silent = Vec::new();
    let mut conns = Vec::new();
    for i in 0..1000 {
        if i % 10 == 0 {
            // Reads everything, never answers, never closes.
            let (conn, peer) = accept_raw(&sup).await;
            silent.push(tokio::spawn(peer.drain()));
            conns.push(conn);
        } else {
            let (conn, mut peer) = accept_ws(&sup).await;
            cooperative.push(tokio::spawn(async move {
                let mut first_close = None;
                while let Some(Ok(message)) = peer.next().await {
                    if let Message::Close(frame) = message {
                        first_close.get_or_insert(frame.map(|f| f.code));
                    }
                }
                first_close
            }));
            conns.push(conn);
        }
    }
    assert_eq!(sup.len(), 1000);
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();

    let grace = 5 * SEC;
    let started = Instant::now();
    let summary = sup.shutdown(grace).await;
    let took = Instant::now() - started;

    assert!(
        took >= grace && took <= grace + 10 * MS,
        "shutdown took {took:?}"
    );
    assert_eq!(summary.count(CloseReason::GoingAway), 1000, "{summary}");
    assert_eq!(summary.total(), 1000);
    assert_eq!(summary.forced(), 100, "only the silent peers are forced");
    assert_eq!(sup.len(), 0);
    assert!(sup.is_empty());

    for peer in cooperative {
        assert_eq!(peer.await.unwrap(), Some(Some(CloseCode::Away)));
    }
    for peer in silent {
        let frames = peer.await.unwrap();
        assert_eq!(frames.last().and_then(Frame::close_code), Some(1001));
    }
    let all = events.all();
    assert_eq!(all.len(), 1000);
    let mut ids: Vec<_> = all.iter().map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "each hook ran once");
    assert!(
        all.iter()
            .all(|e| (e.reason, e.initiator) == (CloseReason::GoingAway, Initiator::Local))
    );
    for conn in &conns {
        assert_eq!(conn.closed().await.reason, CloseReason::GoingAway);
    }
    // Every driver task is gone (and every peer task was awaited above).
    assert_eq!(
        tasks_before, 2000,
        "1000 drivers and 1000 peers were running"
    );
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert_eq!(tasks_after, 0, "driver tasks left behind");
}

#[tokio::test(start_paused = true)]
async fn shutdown_refuses_new_connections() {
    let (sup, events) = supervisor(Config::default());
    let summary = sup.shutdown(SEC).await;
    assert_eq!(summary.total(), 0);
    assert!(sup.is_shutting_down());
    let (server, client) = tokio::io::duplex(PIPE);
    let (conn, client) = tokio::join!(
        std::future::IntoFuture::into_future(sup.accept(server)),
        tokio_tungstenite::client_async("ws://localhost/", client)
    );
    assert_eq!(
        conn.unwrap_err().handshake_failure(),
        Some(HandshakeFailure::ShuttingDown)
    );
    match client.unwrap_err() {
        ws_supervisor::tungstenite::Error::Http(res) => assert_eq!(res.status(), 503),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(events.len(), 0);
}

/// What a peer (or the application) does to end its connection.
#[derive(Debug, Clone, Copy)]
enum Ending {
    PeerClose1000,
    PeerClose1001,
    Silent,
    InvalidUtf8,
    Dropped,
    AppClose,
    AppPanic,
}

impl Ending {
    const ALL: [Self; 7] = [
        Self::PeerClose1000,
        Self::PeerClose1001,
        Self::Silent,
        Self::InvalidUtf8,
        Self::Dropped,
        Self::AppClose,
        Self::AppPanic,
    ];

    fn expected(self) -> (CloseReason, Initiator) {
        use CloseReason as R;
        use Initiator::{Local, Remote};
        match self {
            Self::PeerClose1000 => (R::Normal, Remote),
            Self::PeerClose1001 => (R::GoingAway, Remote),
            Self::Silent => (R::Timeout, Local),
            Self::InvalidUtf8 => (R::ProtocolError, Remote),
            Self::Dropped => (R::Abnormal, Remote),
            Self::AppClose => (R::Normal, Local),
            Self::AppPanic => (R::Internal, Local),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn exactly_once_for_1200_concurrent_random_endings() {
    quiet_expected_panics();
    const N: usize = 1200;
    let calls = Arc::new(Mutex::new(
        HashMap::<u64, Vec<(CloseReason, Initiator)>>::new(),
    ));
    let panics = Arc::new(AtomicU64::new(0));
    let recorder = calls.clone();
    let panicky = panics.clone();
    let sup = Supervisor::builder(heartbeat(SEC, SEC).build().unwrap())
        .on_close(move |e: &CloseEvent| {
            recorder
                .lock()
                .unwrap()
                .entry(e.id.as_u64())
                .or_default()
                .push((e.reason, e.initiator));
        })
        .on_close(move |e: &CloseEvent| {
            // A second hook that panics on every seventh connection.
            if e.id.as_u64() % 7 == 0 {
                panicky.fetch_add(1, Relaxed);
                panic!("hook bug on {} {EXPECTED_PANIC}", e.id);
            }
        })
        .build();

    let mut rng = Rng::new(0x5eed);
    let mut expected = HashMap::new();
    let mut tasks = Vec::new();
    for _ in 0..N {
        let ending = Ending::ALL[rng.below(Ending::ALL.len() as u64) as usize];
        let delay = MS * rng.below(3000) as u32;
        let (conn, mut peer) = accept_raw(&sup).await;
        expected.insert(conn.id().as_u64(), ending.expected());
        tasks.push(tokio::spawn(async move {
            // Everyone answers pings until its moment comes, so only the
            // silent ones time out.
            let mut conn = Some(conn);
            let until = Instant::now() + delay;
            loop {
                tokio::select! {
                    frame = peer.read_frame() => match frame {
                        Some(f) if f.opcode == OP_PING => peer.send(OP_PONG, &f.payload).await,
                        Some(_) => {}
                        None => return,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            match ending {
                Ending::PeerClose1000 => peer.close(1000, "").await,
                Ending::PeerClose1001 => peer.close(1001, "").await,
                Ending::Silent => {}
                Ending::InvalidUtf8 => peer.send(OP_TEXT, &[0xc3, 0x28]).await,
                Ending::Dropped => {
                    // The application keeps its end until the supervisor saw it.
                    drop(peer);
                    conn.take().unwrap().closed().await;
                    return;
                }
                Ending::AppClose => {
                    let conn = conn.take().unwrap();
                    conn.close(CloseCode::Normal, "").await.unwrap();
                    let app = tokio::spawn(async move { conn.closed().await });
                    // Answer the Close, like a well-behaved client.
                    while let Some(f) = peer.read_frame().await {
                        if f.opcode == OP_CLOSE {
                            peer.close(1000, "").await;
                        }
                    }
                    app.await.unwrap();
                    return;
                }
                Ending::AppPanic => {
                    let conn = conn.take().unwrap();
                    let _ = tokio::spawn(async move {
                        let _held = conn;
                        panic!("application bug {EXPECTED_PANIC}");
                    })
                    .await;
                }
            }
            // Read (never answering pings) until the supervisor hangs up.
            peer.drain().await;
            drop(conn);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let summary = sup.shutdown(SEC).await;
    assert_eq!(
        summary.total(),
        0,
        "everything had ended before the shutdown: {summary}"
    );

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), N, "a hook call per accepted connection");
    assert_eq!(sup.accepted_total(), N as u64);
    let mut by_reason: HashMap<CloseReason, usize> = HashMap::new();
    let mut want_by_reason: HashMap<CloseReason, usize> = HashMap::new();
    for (id, want) in &expected {
        let got = &calls[id];
        assert_eq!(got.len(), 1, "connection {id} got {} hook calls", got.len());
        assert_eq!(&got[0], want, "connection {id}");
        *by_reason.entry(got[0].0).or_default() += 1;
        *want_by_reason.entry(want.0).or_default() += 1;
    }
    assert_eq!(by_reason, want_by_reason);
    for reason in CloseReason::ALL {
        assert_eq!(
            sup.closed_total(reason),
            by_reason.get(&reason).copied().unwrap_or(0) as u64
        );
    }
    let panicked = panics.load(Relaxed);
    assert!(panicked > 100);
    assert_eq!(sup.hook_panics(), panicked);
    assert!(sup.is_empty());
}

/// Pins a bug found in review: a full inbound queue kept us from reading
/// the 1001 reply, so a cooperative client was forced at the end of grace.
#[tokio::test(start_paused = true)]
async fn shutdown_with_a_full_inbound_queue_is_not_forced() {
    let config = Config::builder().inbound_queue(1).build().unwrap();
    let (sup, _events) = supervisor(config);
    let (_conn, mut peer) = accept_ws(&sup).await;
    futures::SinkExt::send(&mut peer, Message::text("a"))
        .await
        .unwrap();
    futures::SinkExt::send(&mut peer, Message::text("b"))
        .await
        .unwrap();
    tokio::time::sleep(10 * MS).await;
    let client = tokio::spawn(async move { while let Some(Ok(_)) = peer.next().await {} });
    let started = Instant::now();
    let summary = sup.shutdown(5 * SEC).await;
    client.await.unwrap();
    assert_eq!(summary.forced(), 0, "{summary}");
    assert_eq!(
        Instant::now(),
        started,
        "no wait for a peer that answered at once"
    );
}

/// Pins a bug found in review: a connection flushing its timeout Close
/// ignored the shutdown's grace and waited for the whole write timeout.
#[tokio::test(start_paused = true)]
async fn shutdown_grace_caps_a_connection_still_flushing_its_close() {
    let config = heartbeat(SEC, SEC).write_timeout(30 * SEC).build().unwrap();
    let (sup, events) = supervisor(config);
    // A 12-byte pipe and a peer that never reads: the ping fits, the 1011 Close does not.
    let (_conn, _peer) = accept_raw_with(&sup, 12).await;
    tokio::time::sleep(2 * SEC + 100 * MS).await;
    assert_eq!(events.len(), 0, "still flushing its Close");
    let started = Instant::now();
    let summary = sup.shutdown(SEC).await;
    assert_eq!(Instant::now() - started, SEC, "{summary}");
    assert_eq!(summary.forced(), 1);
    assert_eq!(
        summary.count(CloseReason::Timeout),
        1,
        "the first cause stays"
    );
}
