//! What the application holds for one supervised connection. See [`Connection`].

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::Stream;
use futures::task::AtomicWaker;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::close::{CloseEvent, truncate_text};
use crate::error::Error;
use crate::heartbeat::HeartbeatStats;
use crate::stats::{ConnectionId, Stats};

/// Sentinel for "no RTT yet" in the atomics.
const NONE: u64 = u64::MAX;

/// State shared by the driver (writer) and the application's handles (readers).
#[derive(Debug)]
pub(crate) struct Shared {
    /// When the handshake completed.
    pub(crate) opened: Instant,
    pings_sent: AtomicU64,
    pongs_received: AtomicU64,
    pongs_unmatched: AtomicU64,
    /// Microseconds, or `NONE`.
    last_rtt_us: AtomicU64,
    /// Microseconds, or `NONE`.
    smoothed_rtt_us: AtomicU64,
    /// Microseconds after `opened`.
    last_inbound_us: AtomicU64,
    /// Set once by the driver when the connection has ended (boxed: most of
    /// a connection's life it is empty, and it is large).
    event: OnceLock<Box<CloseEvent>>,
    /// Wakes [`Connection::closed`] waiters once `event` is set.
    notify: Notify,
    /// The application's task panicked while holding the [`Connection`].
    pub(crate) app_panicked: AtomicBool,
    /// The [`Connection`] was dropped (set before its receiver goes).
    pub(crate) app_gone: AtomicBool,
    /// Bytes of data messages read but not yet taken by the application
    /// (its queue and the driver's backlog), against `inbound_limit`.
    unread: AtomicUsize,
    /// `inbound_buffer_limit`: at this many unread bytes the driver pauses.
    inbound_limit: usize,
    /// The driver stopped reading for the budget: wake it when the
    /// application takes a message.
    reader: AtomicWaker,
    /// Messages read after the application's queue filled, handed over when
    /// the driver ends (oldest first), so that none is lost.
    leftover: Mutex<VecDeque<Inbound>>,
}

impl Shared {
    pub(crate) fn new(opened: Instant, inbound_limit: usize) -> Self {
        Self {
            opened,
            pings_sent: AtomicU64::new(0),
            pongs_received: AtomicU64::new(0),
            pongs_unmatched: AtomicU64::new(0),
            last_rtt_us: AtomicU64::new(NONE),
            smoothed_rtt_us: AtomicU64::new(NONE),
            last_inbound_us: AtomicU64::new(0),
            event: OnceLock::new(),
            notify: Notify::new(),
            app_panicked: AtomicBool::new(false),
            app_gone: AtomicBool::new(false),
            unread: AtomicUsize::new(0),
            inbound_limit,
            reader: AtomicWaker::new(),
            leftover: Mutex::new(VecDeque::new()),
        }
    }

    /// The driver read `bytes` of data for the application.
    pub(crate) fn read(&self, bytes: usize) {
        self.unread.fetch_add(bytes, Relaxed);
    }

    /// Whether the unread bytes have reached the inbound budget (the driver
    /// then stops reading).
    pub(crate) fn over_budget(&self) -> bool {
        self.unread.load(Acquire) >= self.inbound_limit
    }

    /// The driver is about to stop reading for the budget: the next message
    /// the application takes wakes it. (Register, then check `unread`
    /// again, or a take in between is missed.)
    pub(crate) fn wake_reader_on_take(&self, waker: &std::task::Waker) {
        self.reader.register(waker);
    }

    /// The application took a message of `bytes`.
    fn took(&self, bytes: usize) {
        let before = self.unread.fetch_sub(bytes, Release);
        // Only a driver that saw the budget full can be waiting for this;
        // below it, a take wakes no one (no atomic traffic per message).
        if before >= self.inbound_limit {
            self.reader.wake();
        }
    }

    /// Hands the driver's backlog to the application, at the end.
    pub(crate) fn hand_over(&self, backlog: VecDeque<Inbound>) {
        if !backlog.is_empty() {
            *self.leftover.lock().unwrap_or_else(|e| e.into_inner()) = backlog;
        }
    }

    /// The next message of the handed-over backlog.
    fn next_leftover(&self) -> Option<Inbound> {
        self.leftover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// Publishes the heartbeat counters (called on pings and pongs only).
    pub(crate) fn publish(&self, s: &HeartbeatStats) {
        let us = |d: Option<Duration>| d.map_or(NONE, |d| d.as_micros() as u64);
        self.pings_sent.store(s.pings_sent, Relaxed);
        self.pongs_received.store(s.pongs_received, Relaxed);
        self.pongs_unmatched.store(s.pongs_unmatched, Relaxed);
        self.last_rtt_us.store(us(s.last_rtt), Relaxed);
        self.smoothed_rtt_us.store(us(s.smoothed_rtt), Relaxed);
    }

    /// Records an inbound frame at `at`.
    pub(crate) fn touch(&self, at: Instant) {
        let us = at.saturating_duration_since(self.opened).as_micros() as u64;
        self.last_inbound_us.store(us, Relaxed);
    }

    pub(crate) fn stats(&self) -> Stats {
        let dur = |v: u64| (v != NONE).then(|| Duration::from_micros(v));
        let last = self.opened + Duration::from_micros(self.last_inbound_us.load(Relaxed));
        Stats {
            pings_sent: self.pings_sent.load(Relaxed),
            pongs_received: self.pongs_received.load(Relaxed),
            pongs_unmatched: self.pongs_unmatched.load(Relaxed),
            last_rtt: dur(self.last_rtt_us.load(Relaxed)),
            smoothed_rtt: dur(self.smoothed_rtt_us.load(Relaxed)),
            since_last_inbound: Instant::now().saturating_duration_since(last),
        }
    }

    /// Stores the final event and wakes every waiter. Called once.
    pub(crate) fn finish(&self, event: CloseEvent) {
        let _ = self.event.set(Box::new(event));
        self.notify.notify_waiters();
    }

    pub(crate) fn event(&self) -> Option<&CloseEvent> {
        self.event.get().map(|e| &**e)
    }
}

/// A request from the application to the driver.
#[derive(Debug)]
pub(crate) enum Command {
    Send(Message),
    Close(Option<CloseFrame>),
}

// The queues carry boxes: tokio's mpsc allocates its first block of 32 slots
// when the channel is created, so the slot size is paid by every idle
// connection (32 x ~60 B per queue unboxed, 32 x 8 B boxed). One small
// allocation per message is the cheaper side of that trade (docs/benchmarks.md).

/// What travels from the driver to the application.
pub(crate) type Inbound = Box<Message>;
/// What travels from the application to the driver.
pub(crate) type Outbound = Box<Command>;

// ===== impl Sender =====

/// A cloneable handle that sends on one connection; many tasks may hold one.
///
/// Messages go through a bounded queue (see
/// [`ConfigBuilder::outbound_queue`](crate::ConfigBuilder::outbound_queue))
/// to the connection's driver task, which writes them in order. No lock is
/// held across an await.
#[derive(Clone)]
pub struct Sender {
    tx: mpsc::Sender<Outbound>,
    id: ConnectionId,
    write_buffer_limit: usize,
}

impl Sender {
    pub(crate) fn new(tx: mpsc::Sender<Outbound>, id: ConnectionId, limit: usize) -> Self {
        Self {
            tx,
            id,
            write_buffer_limit: limit,
        }
    }

    /// The connection this sender writes to.
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// Queues a text or binary message, waiting while the queue is full.
    ///
    /// # Errors
    /// [`Error::is_closed`] once the connection is closing or closed;
    /// [`Error::is_invalid_input`] for a ping, pong, close or raw frame (the
    /// supervisor owns those) or a message larger than the write-buffer limit.
    /// In every error case nothing was queued.
    ///
    /// # Cancel safety
    /// Cancel safe: if the future is dropped before it completes, the message
    /// was not queued.
    pub async fn send(&self, message: impl Into<Message>) -> Result<(), Error> {
        let message = message.into();
        match &message {
            Message::Text(_) | Message::Binary(_) => {}
            _ => return Err(Error::invalid("only text and binary messages can be sent")),
        }
        if message.len() > self.write_buffer_limit {
            return Err(Error::invalid("message larger than the write-buffer limit"));
        }
        self.tx
            .send(Box::new(Command::Send(message)))
            .await
            .map_err(|_| Error::closed())
    }

    /// Starts the closing handshake with `code` and `reason` (cut to 123
    /// bytes on a character boundary), after the messages already queued.
    ///
    /// [`CloseCode::Status`] (1005) sends an empty Close frame. The reason
    /// reported in the [`CloseEvent`] follows the code's row of the reason
    /// table (1000 is [`Normal`](crate::CloseReason::Normal)).
    ///
    /// # Errors
    /// [`Error::is_invalid_input`] for codes that must not appear on the wire
    /// (1006, 1015, reserved ranges) or text with 1005;
    /// [`Error::is_closed`] if the connection is already closing.
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped before completion, no Close was queued.
    pub async fn close(&self, code: CloseCode, reason: &str) -> Result<(), Error> {
        let frame = match code {
            CloseCode::Status if reason.is_empty() => None,
            code if crate::verdict::valid_on_the_wire(u16::from(code)) => Some(CloseFrame {
                code,
                reason: truncate_text(reason).into(),
            }),
            _ => return Err(Error::invalid("close code not allowed on the wire")),
        };
        self.tx
            .send(Box::new(Command::Close(frame)))
            .await
            .map_err(|_| Error::closed())
    }

    /// Whether the connection has stopped taking messages.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("id", &self.id)
            .field("closed", &self.tx.is_closed())
            .finish()
    }
}

// ===== impl Connection =====

/// One supervised WebSocket connection, as the application holds it.
///
/// The supervisor's task drives the socket: it pings, reads pongs, answers
/// the peer's pings and enforces every deadline whether or not the
/// application reads or writes. The application gets:
///
/// * a [`Stream`] of inbound text and binary messages (or
///   [`recv`](Self::recv)), which ends when the connection ends;
/// * a cloneable [`Sender`] ([`sender`](Self::sender), or
///   [`send`](Self::send) directly);
/// * [`close`](Self::close), [`closed`](Self::closed) (its [`CloseEvent`]),
///   [`stats`](Self::stats), [`id`](Self::id) and
///   [`peer_addr`](Self::peer_addr).
///
/// Dropping the `Connection` closes it with 1000, as [`close`](Self::close)
/// does: reason [`Normal`](crate::CloseReason::Normal), local, once the
/// peer answers, or [`Timeout`](crate::CloseReason::Timeout), local, if it
/// does not answer within the close timeout. Dropping it while the holding
/// task panics closes it with 1011 (reason
/// [`Internal`](crate::CloseReason::Internal), local).
///
/// If the application stops taking messages, its queue fills and the
/// supervisor keeps reading into a backlog, within
/// [`inbound_buffer_limit`](crate::ConfigBuilder::inbound_buffer_limit)
/// bytes, so a silent peer is still found. Beyond that budget it stops
/// reading (TCP pushes back on the peer) and suspends the pong deadline —
/// our own backpressure is never reported as the peer's timeout — for at
/// most `ping_interval + pong_timeout`, after which the connection ends as
/// [`Internal`](crate::CloseReason::Internal), local, "application not
/// reading". Messages read before the end are never lost: `recv` yields
/// them all before `None`. See `docs/keepalive.md`.
pub struct Connection {
    rx: mpsc::Receiver<Inbound>,
    sender: Sender,
    shared: std::sync::Arc<Shared>,
    peer_addr: Option<SocketAddr>,
    /// The subprotocol agreed in the handshake.
    protocol: Option<Box<str>>,
}

/// What the way in knows about a connection when it is registered.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnInfo {
    /// Which side of the handshake we were.
    pub(crate) role: Role,
    /// The request path (`/ws`), where the way in knows it.
    pub(crate) path: Option<Box<str>>,
    /// The subprotocol agreed in the handshake.
    pub(crate) protocol: Option<Box<str>>,
}

/// Which side of the opening handshake the supervisor was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Role {
    /// We accepted the connection (`accept`, an upgrade, or `supervise`).
    #[default]
    Server,
    /// We opened it (`connect`).
    Client,
}

impl Role {
    /// `"server"` or `"client"`.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Client => "client",
        }
    }
}

impl Connection {
    pub(crate) fn new(
        rx: mpsc::Receiver<Inbound>,
        sender: Sender,
        shared: std::sync::Arc<Shared>,
        peer_addr: Option<SocketAddr>,
        protocol: Option<Box<str>>,
    ) -> Self {
        Self {
            rx,
            sender,
            shared,
            peer_addr,
            protocol,
        }
    }

    /// This connection's id.
    pub fn id(&self) -> ConnectionId {
        self.sender.id
    }

    /// The peer's address, when the transport has one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// The subprotocol agreed in the opening handshake
    /// (`Sec-WebSocket-Protocol`), if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// A cloneable sender for this connection.
    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// Receives the next text or binary message; `None` once the connection
    /// has ended and every received message was taken.
    ///
    /// # Cancel safety
    /// Cancel safe: no message is lost if the future is dropped.
    pub async fn recv(&mut self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_take(cx)).await
    }

    /// The next message: from the queue, then, once the driver has ended,
    /// from the backlog it handed over.
    fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let message = match ready!(self.rx.poll_recv(cx)) {
            Some(message) => Some(message),
            None => self.shared.next_leftover(),
        };
        Poll::Ready(message.map(|m| {
            self.shared.took(m.len());
            *m
        }))
    }

    /// Queues a message; see [`Sender::send`].
    ///
    /// # Errors
    /// As [`Sender::send`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Sender::send`].
    pub async fn send(&self, message: impl Into<Message>) -> Result<(), Error> {
        self.sender.send(message).await
    }

    /// Starts the closing handshake; see [`Sender::close`]. Await
    /// [`closed`](Self::closed) for the outcome.
    ///
    /// # Errors
    /// As [`Sender::close`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Sender::close`].
    pub async fn close(&self, code: CloseCode, reason: &str) -> Result<(), Error> {
        self.sender.close(code, reason).await
    }

    /// A live snapshot of the heartbeat.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The state the driver publishes to, for a watcher of the end that
    /// does not hold the connection (the reconnecting client).
    pub(crate) fn shared(&self) -> std::sync::Arc<Shared> {
        self.shared.clone()
    }

    /// The close event, if the connection has already ended.
    pub fn close_event(&self) -> Option<CloseEvent> {
        self.shared.event().cloned()
    }

    /// Waits until the connection has ended (and every close hook has run)
    /// and returns its [`CloseEvent`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn closed(&self) -> CloseEvent {
        closed(&self.shared).await
    }
}

/// Waits for the event of `shared`.
pub(crate) async fn closed(shared: &Shared) -> CloseEvent {
    loop {
        let notified = shared.notify.notified();
        tokio::pin!(notified);
        // Register before checking, so a `finish` in between is not missed.
        notified.as_mut().enable();
        if let Some(event) = shared.event() {
            return event.clone();
        }
        notified.await;
    }
}

impl Stream for Connection {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.poll_take(cx)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.app_panicked.store(true, Relaxed);
        }
        self.shared.app_gone.store(true, Release);
        // Dropping `rx` next is what tells the driver to close.
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.sender.id)
            .field("peer_addr", &self.peer_addr)
            .field("protocol", &self.protocol)
            .field("closed", &self.shared.event().is_some())
            .finish()
    }
}
