//! The `tracing` feature: one `ws_connection` span per connection, an event
//! at open and at close, levels by reason, nothing per frame above TRACE.
//!
//! A capturing [`Layer`] is installed per test with `set_default` (the
//! `#[tokio::test]` runtime is current-thread, so every driver task runs
//! under it), and records spans and events as plain strings. Over in-memory
//! pipes under virtual time, except the client test (`connect` dials TCP).
#![cfg(feature = "tracing")]

mod support;

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::time::sleep;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::DefaultGuard;
use tracing::{Event, Instrument, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use ws_supervisor::{CloseEvent, Config, Connection, Supervisor};

// ===== the capturing layer =====

type Fields = BTreeMap<String, String>;

/// One span, as created (and later recorded into).
#[derive(Debug, Clone)]
struct SpanRec {
    name: &'static str,
    target: String,
    level: Level,
    fields: Fields,
    /// Index of the parent span in `Log::spans`.
    parent: Option<usize>,
    /// Indexes of the spans it `follows_from`.
    follows: Vec<usize>,
    closed: bool,
}

/// One event, with the spans it happened in (root first).
#[derive(Debug, Clone)]
struct EventRec {
    level: Level,
    target: String,
    message: String,
    fields: Fields,
    scope: Vec<usize>,
}

#[derive(Debug, Default)]
struct Log {
    spans: Vec<SpanRec>,
    events: Vec<EventRec>,
}

/// Records every span and event it is shown; clones share the log.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Log>>);

/// A span's index in `Log::spans` (registry ids are reused, these are not).
struct Index(usize);

struct Visitor<'a> {
    fields: &'a mut Fields,
    message: Option<&'a mut String>,
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.fields.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match (&mut self.message, field.name()) {
            (Some(message), "message") => **message = format!("{value:?}"),
            _ => {
                self.fields
                    .insert(field.name().into(), format!("{value:?}"));
            }
        }
    }
}

fn index<S: Subscriber + for<'a> LookupSpan<'a>>(ctx: &Context<'_, S>, id: &Id) -> Option<usize> {
    ctx.span(id)?.extensions().get::<Index>().map(|i| i.0)
}

impl<S> Layer<S> for Capture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("new span");
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<Index>().map(|i| i.0));
        let mut fields = Fields::new();
        attrs.record(&mut Visitor {
            fields: &mut fields,
            message: None,
        });
        let mut log = self.0.lock().unwrap();
        span.extensions_mut().insert(Index(log.spans.len()));
        log.spans.push(SpanRec {
            name: attrs.metadata().name(),
            target: attrs.metadata().target().into(),
            level: *attrs.metadata().level(),
            fields,
            parent,
            follows: Vec::new(),
            closed: false,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(i) = index(&ctx, id) else { return };
        let mut log = self.0.lock().unwrap();
        values.record(&mut Visitor {
            fields: &mut log.spans[i].fields,
            message: None,
        });
    }

    fn on_follows_from(&self, id: &Id, follows: &Id, ctx: Context<'_, S>) {
        if let (Some(i), Some(f)) = (index(&ctx, id), index(&ctx, follows)) {
            self.0.lock().unwrap().spans[i].follows.push(f);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let scope = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .filter_map(|s| s.extensions().get::<Index>().map(|i| i.0))
                    .collect()
            })
            .unwrap_or_default();
        let (mut fields, mut message) = (Fields::new(), String::new());
        event.record(&mut Visitor {
            fields: &mut fields,
            message: Some(&mut message),
        });
        self.0.lock().unwrap().events.push(EventRec {
            level: *event.metadata().level(),
            target: event.metadata().target().into(),
            message,
            fields,
            scope,
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(i) = index(&ctx, &id) {
            self.0.lock().unwrap().spans[i].closed = true;
        }
    }
}

impl Capture {
    /// A capture of everything (TRACE and up), installed on this thread
    /// until the guard drops.
    fn install() -> (Self, DefaultGuard) {
        Self::install_at(LevelFilter::TRACE)
    }

    /// A capture behind the filter an operator would set (`info`, …).
    fn install_at(filter: LevelFilter) -> (Self, DefaultGuard) {
        let capture = Self::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone().with_filter(filter));
        (capture, tracing::subscriber::set_default(subscriber))
    }

    fn spans(&self) -> Vec<SpanRec> {
        self.0.lock().unwrap().spans.clone()
    }

    /// The crate's events (nothing else emits here, but be sure).
    fn events(&self) -> Vec<EventRec> {
        let log = self.0.lock().unwrap();
        log.events
            .iter()
            .filter(|e| e.target.starts_with("ws_supervisor"))
            .cloned()
            .collect()
    }

    /// Indexes of the `ws_connection` spans, in creation order.
    fn connection_spans(&self) -> Vec<usize> {
        let spans = self.spans();
        (0..spans.len())
            .filter(|&i| spans[i].name == "ws_connection")
            .collect()
    }

    /// The single `ws_connection` span.
    fn only_connection_span(&self) -> (usize, SpanRec) {
        let found = self.connection_spans();
        assert_eq!(found.len(), 1, "{:#?}", self.spans());
        (found[0], self.spans()[found[0]].clone())
    }

    /// The events whose message starts with `prefix`.
    fn events_named(&self, prefix: &str) -> Vec<EventRec> {
        let mut found = self.events();
        found.retain(|e| e.message.starts_with(prefix));
        found
    }

    /// The single close event.
    fn close(&self) -> EventRec {
        let found = self.events_named("connection closed");
        assert_eq!(found.len(), 1, "{:#?}", self.events());
        found.into_iter().next().unwrap()
    }
}

/// The event is INFO, WARN or ERROR: what an `info` filter lets through.
/// (`Level` orders by verbosity: ERROR < WARN < INFO < DEBUG < TRACE.)
fn at_least_info(event: &EventRec) -> bool {
    event.level <= Level::INFO
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields.get(name).map(String::as_str)
}

/// Expected fields, from `(name, value)` pairs.
fn fields<const N: usize>(pairs: [(&str, String); N]) -> Fields {
    pairs.into_iter().map(|(k, v)| (k.into(), v)).collect()
}

// ===== helpers =====

type Pipe = tokio::io::DuplexStream;

/// An address for the peer (the pipe has none of its own).
fn peer_addr(n: u16) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 7], 40000 + n))
}

/// A supervised server connection to a [`RawPeer`], with a peer address.
async fn accept_from(sup: &Supervisor, addr: SocketAddr) -> (Connection, RawPeer<Pipe>) {
    let (server, client) = tokio::io::duplex(PIPE);
    let (conn, peer) = tokio::join!(
        sup.accept(server).peer_addr(addr).into_future(),
        RawPeer::handshake(client)
    );
    (conn.expect("accept"), peer)
}

/// The peer closes with `code`; returns the connection's close event.
async fn peer_closes_with(code: u16) -> CloseEvent {
    let (sup, _events) = supervisor(Config::default());
    let (conn, mut peer) = accept_from(&sup, peer_addr(1)).await;
    peer.close(code, "bye").await;
    peer.read_until(OP_CLOSE).await.expect("close reply");
    conn.closed().await
}

/// Checks the close event's level, reason and initiator.
fn assert_close(capture: &Capture, level: Level, reason: &str, initiator: &str) -> EventRec {
    let close = capture.close();
    assert_eq!(
        (
            close.level,
            field(&close.fields, "reason"),
            field(&close.fields, "initiator")
        ),
        (level, Some(reason), Some(initiator)),
        "{close:#?}"
    );
    close
}

// ===== the span =====

#[tokio::test(start_paused = true)]
async fn one_root_span_per_connection_with_its_fields() {
    let (capture, _guard) = Capture::install();
    let (sup, events) = supervisor(Config::default());
    // Admitted from inside the application's own span, as an accept loop would.
    let (first, mut first_peer, second, mut second_peer) = async {
        let (a, pa) = accept_from(&sup, peer_addr(1)).await;
        let (b, pb) = accept_from(&sup, peer_addr(2)).await;
        (a, pa, b, pb)
    }
    .instrument(tracing::info_span!("accept_loop"))
    .await;

    let spans = capture.spans();
    let conns = capture.connection_spans();
    assert_eq!(conns.len(), 2, "{spans:#?}");
    let outer = spans.iter().position(|s| s.name == "accept_loop").unwrap();
    for (&i, (conn, addr)) in conns
        .iter()
        .zip([(&first, peer_addr(1)), (&second, peer_addr(2))])
    {
        let span = &spans[i];
        assert_eq!(span.target, "ws_supervisor");
        assert_eq!(span.level, Level::INFO);
        let expected = fields([
            ("conn_id", conn.id().as_u64().to_string()),
            ("peer", addr.to_string()),
            ("role", "server".to_string()),
            ("path", "/".to_string()),
        ]);
        // No protocol: none was offered.
        assert_eq!(span.fields, expected);
        // A root span: a connection outlives the request that admitted it.
        assert_eq!(span.parent, None);
        assert_eq!(span.follows, vec![outer]);
        assert!(!span.closed);
    }

    first_peer.close(1000, "").await;
    second_peer.close(1000, "").await;
    first_peer.read_until(OP_CLOSE).await.unwrap();
    second_peer.read_until(OP_CLOSE).await.unwrap();
    sup.shutdown(SEC).await;
    assert_eq!(events.len(), 2);

    // Each connection's close event is in its own span, and the span ends
    // with the task.
    for (&i, conn) in conns.iter().zip([&first, &second]) {
        let closes: Vec<_> = capture
            .events_named("connection closed")
            .into_iter()
            .filter(|e| e.scope == vec![i])
            .collect();
        assert_eq!(closes.len(), 1);
        let id = conn.id().as_u64().to_string();
        assert_eq!(field(&closes[0].fields, "conn_id"), Some(id.as_str()));
        assert!(capture.spans()[i].closed);
    }
}

// ===== open and close events =====

/// A peer that answers `pongs` pings 20 ms late, then sends an unsolicited
/// pong and 50 messages, then closes with 1000.
async fn pongs_then_close(mut peer: RawPeer<Pipe>, pongs: usize) {
    for _ in 0..pongs {
        let ping = peer.read_until(OP_PING).await.unwrap();
        sleep(20 * MS).await;
        peer.send(OP_PONG, &ping.payload).await;
    }
    peer.send(OP_PONG, b"unsolicited").await;
    for _ in 0..50 {
        peer.send(OP_TEXT, b"hello").await;
    }
    peer.close(1000, "done").await;
    peer.read_until(OP_CLOSE).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn open_and_close_events_carry_the_close_event() {
    let (capture, _guard) = Capture::install();
    let (sup, _events) = supervisor(heartbeat(SEC, SEC).build().unwrap());
    let (mut conn, peer) = accept_from(&sup, peer_addr(1)).await;
    let peer = tokio::spawn(pongs_then_close(peer, 3));
    while conn.recv().await.is_some() {}
    let event = conn.closed().await;
    peer.await.unwrap();

    let (span, _) = capture.only_connection_span();
    let opened = capture.events_named("connection opened");
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].level, Level::DEBUG);
    assert_eq!(opened[0].scope, vec![span]);

    let close = assert_close(&capture, Level::DEBUG, "normal", "remote");
    assert_eq!(close.scope, vec![span]);
    assert_eq!(close.target, "ws_supervisor");
    assert_eq!(close.message, "connection closed: closed normally");
    let debug = |d: Option<std::time::Duration>| format!("{:?}", d.unwrap());
    let expected = fields([
        ("conn_id", conn.id().as_u64().to_string()),
        ("reason", "normal".into()),
        ("initiator", "remote".into()),
        ("code_sent", "1000".into()),
        ("code_received", "1000".into()),
        ("text", "done".into()),
        ("duration", format!("{:?}", event.duration)),
        ("last_rtt", debug(event.stats.last_rtt)),
        ("smoothed_rtt", debug(event.stats.smoothed_rtt)),
        ("pings_sent", "3".into()),
        ("pongs_received", "4".into()),
        ("pongs_unmatched", "1".into()),
    ]);
    assert_eq!(close.fields, expected);
    assert_eq!(event.stats.last_rtt, Some(20 * MS));
}

#[tokio::test(start_paused = true)]
async fn nothing_per_frame_above_trace() {
    let (capture, _guard) = Capture::install();
    let (sup, _events) = supervisor(heartbeat(SEC, SEC).build().unwrap());
    let (mut conn, peer) = accept_from(&sup, peer_addr(1)).await;
    let peer = tokio::spawn(pongs_then_close(peer, 3));
    let mut received = 0;
    while conn.recv().await.is_some() {
        received += 1;
    }
    peer.await.unwrap();
    assert_eq!(received, 50);

    let events = capture.events();
    // Open and close; everything else (pings, pongs: the 50 messages log
    // nothing at all) is TRACE.
    let (per_frame, ends): (Vec<_>, Vec<_>) = events
        .iter()
        .partition(|e| !e.message.starts_with("connection "));
    assert_eq!(ends.len(), 2, "{events:#?}");
    assert!(
        per_frame.iter().all(|e| e.level == Level::TRACE),
        "{events:#?}"
    );
    let count = |m: &str| per_frame.iter().filter(|e| e.message == m).count();
    assert_eq!(count("ping sent"), 3);
    assert_eq!(count("pong matched"), 3);
    assert_eq!(count("pong unmatched"), 1);
    assert_eq!(per_frame.len(), 7, "{per_frame:#?}");
    let rtt = per_frame
        .iter()
        .find(|e| e.message == "pong matched")
        .unwrap();
    assert_eq!(field(&rtt.fields, "rtt"), Some("20ms"));
}

// ===== levels =====

#[tokio::test(start_paused = true)]
async fn normal_close_is_silent_at_info() {
    let (capture, _guard) = Capture::install_at(LevelFilter::INFO);
    let event = peer_closes_with(1000).await;
    assert_eq!(event.reason, ws_supervisor::CloseReason::Normal);
    assert!(capture.events().is_empty(), "{:#?}", capture.events());
    // The span itself is INFO: created, but silent.
    capture.only_connection_span();
}

#[tokio::test(start_paused = true)]
async fn timeout_is_visible_at_info_with_its_span() {
    let (capture, _guard) = Capture::install_at(LevelFilter::INFO);
    let (sup, _events) = supervisor(heartbeat(SEC, 300 * MS).build().unwrap());
    let (conn, peer) = accept_from(&sup, peer_addr(1)).await;
    let drained = tokio::spawn(peer.drain());
    let event = conn.closed().await;
    drained.await.unwrap();

    let events = capture.events();
    assert_eq!(events.len(), 1, "only the close event at info: {events:#?}");
    let close = assert_close(&capture, Level::INFO, "timeout", "local");
    let (span, record) = capture.only_connection_span();
    assert_eq!(close.scope, vec![span]);
    assert_eq!(field(&record.fields, "peer"), Some("203.0.113.7:40001"));
    let f = &close.fields;
    assert_eq!(field(f, "code_sent"), Some("1011"));
    assert_eq!(field(f, "text"), Some("ping timeout"));
    assert_eq!(field(f, "pings_sent"), Some("1"));
    assert_eq!(field(f, "pongs_received"), Some("0"));
    // Unknown values are left out, not logged as `None`.
    for absent in ["code_received", "last_rtt", "smoothed_rtt", "error"] {
        assert_eq!(field(f, absent), None, "{absent}");
    }
    assert_eq!(
        field(f, "duration"),
        Some(format!("{:?}", event.duration).as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn going_away_is_debug() {
    let (capture, _guard) = Capture::install();
    peer_closes_with(1001).await;
    assert_close(&capture, Level::DEBUG, "going_away", "remote");
    assert!(!capture.events().iter().any(at_least_info));
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_debug() {
    let (capture, _guard) = Capture::install();
    let (sup, _events) = supervisor(Config::default());
    let (_conn, peer) = accept_from(&sup, peer_addr(1)).await;
    let peer = tokio::spawn(peer.answer_pings());
    sup.shutdown(5 * SEC).await;
    assert_eq!(peer.await.unwrap(), Some(1001));
    assert_close(&capture, Level::DEBUG, "going_away", "local");
    assert!(!capture.events().iter().any(at_least_info));
}

#[tokio::test(start_paused = true)]
async fn application_drop_is_debug() {
    let (capture, _guard) = Capture::install();
    let (sup, events) = supervisor(Config::default());
    let (conn, peer) = accept_from(&sup, peer_addr(1)).await;
    let peer = tokio::spawn(peer.answer_pings());
    drop(conn);
    assert_eq!(peer.await.unwrap(), Some(1000));
    events.wait_for(1).await;
    assert_close(&capture, Level::DEBUG, "normal", "local");
    assert!(!capture.events().iter().any(at_least_info));
}

#[tokio::test(start_paused = true)]
async fn protocol_error_is_info() {
    let (capture, _guard) = Capture::install();
    peer_closes_with(1002).await;
    assert_close(&capture, Level::INFO, "protocol_error", "remote");
}

#[tokio::test(start_paused = true)]
async fn abnormal_is_info() {
    let (capture, _guard) = Capture::install();
    let (sup, _events) = supervisor(Config::default());
    let (conn, mut peer) = accept_from(&sup, peer_addr(1)).await;
    // Half a frame, then the transport is gone.
    let frame = encode(true, OP_TEXT, b"half a message", true);
    peer.writer.write_all(&frame[..8]).await.unwrap();
    drop(peer);
    conn.closed().await;
    assert_close(&capture, Level::INFO, "abnormal", "remote");
}

#[tokio::test(start_paused = true)]
async fn peer_internal_error_is_info() {
    // 1011 from the peer is its own failure, not ours.
    let (capture, _guard) = Capture::install();
    peer_closes_with(1011).await;
    assert_close(&capture, Level::INFO, "internal", "remote");
}

#[tokio::test(start_paused = true)]
async fn our_internal_error_is_warn() {
    quiet_expected_panics();
    let (capture, _guard) = Capture::install();
    let (sup, events) = supervisor(Config::default());
    let (conn, peer) = accept_from(&sup, peer_addr(1)).await;
    let peer = tokio::spawn(peer.answer_pings());
    let app = tokio::spawn(async move {
        let _conn = conn;
        panic!("application bug {EXPECTED_PANIC}");
    });
    assert!(app.await.unwrap_err().is_panic());
    assert_eq!(peer.await.unwrap(), Some(1011));
    events.wait_for(1).await;
    let close = assert_close(&capture, Level::WARN, "internal", "local");
    assert_eq!(field(&close.fields, "code_sent"), Some("1011"));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_hook_is_a_warn_event_in_the_span() {
    quiet_expected_panics();
    let (capture, _guard) = Capture::install();
    let sup = Supervisor::builder(Config::default())
        .on_close(|e: &CloseEvent| panic!("hook bug on {} {EXPECTED_PANIC}", e.id))
        .on_close(|_: &CloseEvent| {})
        .build();
    let (conn, mut peer) = accept_from(&sup, peer_addr(1)).await;
    peer.close(1000, "").await;
    conn.closed().await;
    assert_eq!(sup.hook_panics(), 1);

    let (span, _) = capture.only_connection_span();
    let events = capture.events();
    let messages: Vec<_> = events.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "connection opened",
            "connection closed: closed normally",
            "close hook panicked"
        ]
    );
    let panicked = &events[2];
    assert_eq!(panicked.level, Level::WARN);
    assert_eq!(panicked.scope, vec![span]);
    let id = conn.id().as_u64().to_string();
    assert_eq!(field(&panicked.fields, "conn_id"), Some(id.as_str()));
    assert_eq!(field(&panicked.fields, "panics"), Some("1"));
}

// ===== the client side =====

// `connect` dials TCP, so this one runs on loopback in real time (short: a
// handshake and a close, no waiting on timers).
#[tokio::test]
async fn client_span_has_role_path_and_protocol() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use ws_supervisor::CloseCode;

    let (capture, _guard) = Capture::install();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // The callback's signature is tungstenite's, large error and all.
        #[allow(clippy::result_large_err)]
        let agree = |_: &Request, mut response: Response| {
            let chat = "chat".parse().unwrap();
            response
                .headers_mut()
                .insert("sec-websocket-protocol", chat);
            Ok(response)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, agree)
            .await
            .unwrap();
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        ws.send(Message::Close(Some(frame))).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    });

    let (sup, _events) = supervisor(Config::default());
    let mut request = format!("ws://{addr}/chat?room=1")
        .into_client_request()
        .unwrap();
    let chat = "chat".parse().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", chat);
    let conn = sup.connect(request).await.unwrap();
    assert_eq!(conn.protocol(), Some("chat"));
    conn.closed().await;
    server.await.unwrap();

    let (_, span) = capture.only_connection_span();
    let expected = fields([
        ("conn_id", conn.id().as_u64().to_string()),
        ("peer", addr.to_string()),
        ("role", "client".to_string()),
        ("path", "/chat".to_string()),
        ("protocol", "chat".to_string()),
    ]);
    assert_eq!(span.fields, expected);
    assert_close(&capture, Level::DEBUG, "normal", "remote");
}
