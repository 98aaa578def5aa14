//! A ping flood from a peer that never reads, on every way in the crate
//! builds (`accept`, hyper, axum), with the memory it costs measured by a
//! counting allocator: bounded by the write-buffer limit, where a stream
//! with tungstenite's default config queues one pong per ping.
//!
//! One test in this binary, so nothing else allocates while it measures.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use tokio_tungstenite::WebSocketStream;
use ws_supervisor::tungstenite::protocol::Role;
use ws_supervisor::{CloseReason as R, Connection, Initiator::Local};

use support::ways::{WAYS, open};
use support::*;

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only counters move.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(live, Relaxed);
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The write-buffer limit of these supervisors.
const LIMIT: usize = 64 * 1024;
/// What the measurement itself holds besides the connection: the in-memory
/// pipe's two directions fill up to `PIPE` each (the peer never reads, and
/// the flood outruns us), plus room for the tasks and frames in flight.
const HARNESS: usize = 2 * PIPE + 64 * 1024;

/// Floods `peer` with pings for up to 10 virtual seconds without reading,
/// until `conn` ends; returns the peak heap growth and the pings sent.
async fn flood(
    conn: Connection,
    writer: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
) -> (usize, u64) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let flood = tokio::spawn(flood_pings(writer));
    let event = conn.closed().await;
    assert_eq!(
        (event.reason, event.initiator),
        (R::Timeout, Local),
        "a write stall"
    );
    let sent = flood.await.unwrap();
    (PEAK.load(Relaxed).saturating_sub(base), sent)
}

#[tokio::test(start_paused = true)]
async fn a_ping_flood_from_a_peer_that_never_reads_costs_bounded_memory_on_every_way_in() {
    let config = || {
        heartbeat(60 * SEC, 60 * SEC)
            .write_timeout(3 * SEC)
            .write_buffer_limit(LIMIT)
            .build()
            .unwrap()
    };
    for &way in WAYS {
        let (sup, events) = supervisor(config());
        let (conn, peer) = open(way, &sup).await;
        let (_unread, writer) = (peer.reader, peer.writer);
        let (growth, sent) = flood(conn, writer).await;
        println!("{way:?}: {sent} pings, peak heap growth {growth} B");
        assert!(sent > 100_000, "{way:?}: the flood was read: {sent} pings");
        assert!(
            growth < LIMIT + HARNESS,
            "{way:?}: {growth} B for a write-buffer limit of {LIMIT} B"
        );
        events.wait_for(1).await;
        sup.shutdown(SEC).await;
    }

    // The control: the same flood on a stream built with tungstenite's
    // defaults and handed to `supervise`, which keeps the stream's config.
    let (sup, _events) = supervisor(config());
    let (server, client) = tokio::io::duplex(PIPE);
    let (ws, peer) = tokio::join!(
        tokio_tungstenite::accept_async(server),
        RawPeer::handshake(client)
    );
    let conn = sup.supervise(ws.unwrap(), None).await.unwrap();
    let (_unread, writer) = (peer.reader, peer.writer);
    let (growth, sent) = flood(conn, writer).await;
    println!("supervise (tungstenite defaults): {sent} pings, peak heap growth {growth} B");
    assert!(
        growth > 4 * (LIMIT + HARNESS),
        "the default config queues a pong per ping: {growth} B"
    );

    // And `supervise` on a stream built with the supervisor's own blocks is
    // bounded again.
    let (sup, _events) = supervisor(config());
    let (server, client) = tokio::io::duplex(PIPE);
    let server = ws_supervisor::ReadLayer::new(server, sup.config());
    let (ws, peer) = tokio::join!(
        WebSocketStream::from_raw_socket(
            server,
            Role::Server,
            Some(sup.config().websocket_config())
        ),
        async {
            // The handshake was someone else's: the peer only speaks frames.
            let (reader, writer) = tokio::io::split(client);
            RawPeer { reader, writer }
        }
    );
    let conn = sup.supervise(ws, None).await.unwrap();
    let (_unread, writer) = (peer.reader, peer.writer);
    let (growth, sent) = flood(conn, writer).await;
    println!("supervise (ReadLayer + websocket_config): {sent} pings, peak heap growth {growth} B");
    assert!(growth < LIMIT + HARNESS, "{growth} B");
}
