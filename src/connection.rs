//! What the application holds for one supervised connection. See [`Connection`].

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::Stream;
use futures::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::app_heartbeat::unsendable;
use crate::close::{CloseEvent, truncate_text};
use crate::error::Error;
use crate::heartbeat::HeartbeatStats;
use crate::inline::{Handler, Reply, run_leftovers};
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
    /// Wakes [`Connection::closed`] waiters once `event` is set, and
    /// senders waiting for room in the outbox when it frees or closes.
    notify: Notify,
    /// The application's task panicked while holding the [`Connection`].
    pub(crate) app_panicked: AtomicBool,
    /// The [`Connection`] was dropped.
    pub(crate) app_gone: AtomicBool,
    /// Bytes of data messages in the inbox, against `inbound_limit`.
    unread: AtomicUsize,
    /// `inbound_buffer_limit`: at this many unread bytes the driver pauses.
    inbound_limit: usize,
    /// The driver's task: woken by the socket through [`read_waker`], by a
    /// send, by a take while the budget is full, and by the application
    /// dropping its `Connection`.
    ///
    /// [`read_waker`]: Shared::read_waker
    reader: AtomicWaker,
    /// The socket woke the driver for reading since it last looked (see
    /// [`read_waker`](Shared::read_waker)).
    read_woken: AtomicBool,
    /// Messages the driver read for the application, oldest first.
    inbox: Mutex<Inbox>,
    /// The application's task, waiting in [`Connection::recv`].
    app: AtomicWaker,
    /// A message handler waits in the inbox for the driver to take it.
    handler_offered: AtomicBool,
    /// What the application's senders queued for the driver, oldest first.
    outbox: Mutex<Outbox>,
    /// The outbox holds a command: written under its lock, read without it
    /// by the driver, which looks every turn. A `Sender` wakes the driver
    /// after setting it; a handler's reply, made on the driver's own task,
    /// is seen later in the same turn.
    queued: AtomicBool,
    /// `outbound_queue`: senders wait while the outbox holds this many.
    outbound_limit: usize,
}

/// The queue from the driver to the application. No channel: the driver
/// pushes under a short lock and wakes the application's task; `recv` pops.
/// Bounded by the byte budget alone (`unread`), which is what pauses the
/// driver's reading.
#[derive(Default)]
struct Inbox {
    messages: VecDeque<Message>,
    /// The driver has ended: once `messages` is empty, `recv` gives `None`.
    ended: bool,
    /// The application's message handler ([`Connection::on_message`]),
    /// until the driver takes it (see `handler_offered`); the messages
    /// still queued here then go through it first, in order.
    handler: Option<Handler>,
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("messages", &self.messages.len())
            .field("ended", &self.ended)
            .field("handler", &self.handler.is_some())
            .finish()
    }
}

/// The queue from the application's senders to the driver.
#[derive(Debug, Default)]
struct Outbox {
    commands: VecDeque<Command>,
    /// The driver takes nothing new (it left `Open`, or the application
    /// dropped its `Connection`): senders get `Error::is_closed`.
    closed: bool,
}

/// A queue keeps at most this many slots' capacity once drained: a few
/// messages in flight cost no allocation each, and an idle connection
/// holds little.
const KEEP_SLOTS: usize = 4;

fn drained<T>(queue: &mut VecDeque<T>) {
    if queue.is_empty() && queue.capacity() > KEEP_SLOTS {
        *queue = VecDeque::new();
    }
}

/// What a message counts against the inbound budget: its payload and its
/// slot in the queue, so that a flood of empty messages fills the budget
/// too.
fn cost(message: &Message) -> usize {
    message.len() + std::mem::size_of::<Message>()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still
    // consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The read waker: see [`Shared::read_waker`].
impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.read_woken.store(true, Release);
        self.reader.wake();
    }
}

impl Shared {
    pub(crate) fn new(opened: Instant, inbound_limit: usize, outbound_limit: usize) -> Self {
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
            read_woken: AtomicBool::new(true),
            inbox: Mutex::new(Inbox::default()),
            app: AtomicWaker::new(),
            handler_offered: AtomicBool::new(false),
            outbox: Mutex::new(Outbox::default()),
            queued: AtomicBool::new(false),
            outbound_limit,
        }
    }

    // ----- the inbox: driver -> application -----

    /// The driver read `message` for the application.
    pub(crate) fn deliver(&self, message: Message) {
        self.unread.fetch_add(cost(&message), Relaxed);
        lock(&self.inbox).messages.push_back(message);
        self.app.wake();
    }

    /// Leaves `handler` for the driver, which takes it on its next turn
    /// ([`take_handler`](Self::take_handler)) and runs the messages still
    /// queued through it, in order, one per turn, before any it reads
    /// later. After the driver's end, the queued messages go through it
    /// here.
    fn offer_handler(&self, handler: Handler, id: ConnectionId, write_buffer_limit: usize) {
        let mut inbox = lock(&self.inbox);
        if inbox.ended {
            // Too late for the driver: what it read goes through the
            // handler here (its replies fail), then it is dropped.
            drop(inbox);
            run_leftovers(self, handler, id, write_buffer_limit);
            return;
        }
        inbox.handler = Some(handler);
        self.handler_offered.store(true, Release);
        drop(inbox);
        self.reader.wake();
    }

    /// The message handler the application offered, if any (once).
    pub(crate) fn take_handler(&self) -> Option<Handler> {
        if !self.handler_offered.load(Acquire) {
            return None;
        }
        let mut inbox = lock(&self.inbox);
        self.handler_offered.store(false, Relaxed);
        inbox.handler.take()
    }

    /// The oldest queued message, if any (for the driver's handler).
    pub(crate) fn take_queued(&self) -> Option<Message> {
        self.try_take().flatten()
    }

    /// `Ready(None)` once the driver has ended, whatever is queued (a
    /// handler takes the messages), else `Pending` with the application's
    /// task registered.
    fn poll_end(&self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if lock(&self.inbox).ended {
            return Poll::Ready(None);
        }
        // Register, then look again: an end in between wakes us.
        self.app.register(cx.waker());
        if lock(&self.inbox).ended {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// The driver has ended: `recv` gives `None` after the last message.
    /// Returns a message handler the driver never took, for it to run the
    /// queued messages through (and drop: it may hold this connection's
    /// own `Sender`, a cycle through this state).
    #[must_use]
    pub(crate) fn end_inbox(&self) -> Option<Handler> {
        let mut inbox = lock(&self.inbox);
        inbox.ended = true;
        let handler = inbox.handler.take();
        drop(inbox);
        self.app.wake();
        handler
    }

    /// The next message, `None` at the end, or `Pending` with the
    /// application's task registered.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if let Some(taken) = self.try_take() {
            return Poll::Ready(taken);
        }
        // Register, then look again: a delivery in between wakes us.
        self.app.register(cx.waker());
        self.try_take().map_or(Poll::Pending, Poll::Ready)
    }

    /// `Some(Some(message))`, `Some(None)` at the end, `None` for now.
    fn try_take(&self) -> Option<Option<Message>> {
        let mut inbox = lock(&self.inbox);
        match inbox.messages.pop_front() {
            Some(message) => {
                drained(&mut inbox.messages);
                drop(inbox);
                self.took(cost(&message));
                Some(Some(message))
            }
            None => inbox.ended.then_some(None),
        }
    }

    // ----- the outbox: senders -> driver -----

    /// Queues `command` for the driver, waiting while the outbox is full.
    async fn queue(&self, command: Command) -> Result<(), Error> {
        match self.try_queue(command) {
            Ok(()) => Ok(()),
            // The rare path is boxed: the wait's state would otherwise sit
            // in every future that sends, idle connections' included.
            Err(Some(command)) => Box::pin(self.queue_when_room(command)).await,
            Err(None) => Err(Error::closed()),
        }
    }

    /// Queues `command` if there is room; gives it back if the outbox is
    /// full, `Err(None)` if it is closed.
    fn try_queue(&self, command: Command) -> Result<(), Option<Command>> {
        let mut outbox = lock(&self.outbox);
        if outbox.closed {
            return Err(None);
        }
        if outbox.commands.len() >= self.outbound_limit {
            return Err(Some(command));
        }
        outbox.commands.push_back(command);
        self.queued.store(true, Release);
        drop(outbox);
        self.reader.wake();
        Ok(())
    }

    async fn queue_when_room(&self, command: Command) -> Result<(), Error> {
        let mut command = Some(command);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register, then look again: a pop in between wakes us.
            notified.as_mut().enable();
            match self.try_queue(command.take().expect("kept until queued")) {
                Ok(()) => return Ok(()),
                Err(None) => return Err(Error::closed()),
                Err(back) => command = back,
            }
            notified.await;
        }
    }

    /// Queues a handler's `command`, whatever the outbox holds (the driver
    /// bounds a handler's replies itself), without a wake-up: the driver
    /// calls handlers, and takes the outbox later in the same turn.
    pub(crate) fn push_command(&self, command: Command) -> Result<(), Error> {
        let mut outbox = lock(&self.outbox);
        if outbox.closed {
            return Err(Error::closed());
        }
        outbox.commands.push_back(command);
        self.queued.store(true, Release);
        Ok(())
    }

    /// Whether the outbox holds nothing (without its lock).
    pub(crate) fn outbox_is_empty(&self) -> bool {
        !self.queued.load(Acquire)
    }

    /// The oldest queued command, if any; frees room for a waiting sender.
    pub(crate) fn next_command(&self) -> Option<Command> {
        let mut outbox = lock(&self.outbox);
        // Only the pop that takes the queue below the limit makes room (a
        // handler's replies may take it above).
        let was_full = outbox.commands.len() == self.outbound_limit;
        let command = outbox.commands.pop_front();
        self.queued.store(!outbox.commands.is_empty(), Release);
        drained(&mut outbox.commands);
        drop(outbox);
        if was_full && command.is_some() {
            self.notify.notify_waiters();
        }
        command
    }

    /// Takes nothing new: waiting and later senders get `is_closed` (what
    /// is queued stays, for the driver to write).
    pub(crate) fn close_outbox(&self) {
        let newly = !std::mem::replace(&mut lock(&self.outbox).closed, true);
        if newly {
            self.notify.notify_waiters();
        }
    }

    fn outbox_closed(&self) -> bool {
        lock(&self.outbox).closed
    }

    /// The application dropped its `Connection` (`panicking`: while its
    /// task panicked): the driver closes once the outbox is written.
    fn app_dropped(&self, panicking: bool) {
        if panicking {
            self.app_panicked.store(true, Relaxed);
        }
        self.app_gone.store(true, Release);
        // Nobody will read what is queued: free it now, not when the driver
        // ends (up to `close_timeout` later).
        let unread = std::mem::take(&mut lock(&self.inbox).messages);
        self.unread
            .fetch_sub(unread.iter().map(cost).sum(), Release);
        drop(unread);
        self.reader.wake();
    }

    // ----- the byte budget -----

    /// Whether the unread bytes have reached the inbound budget (the driver
    /// then stops reading).
    pub(crate) fn over_budget(&self) -> bool {
        self.unread.load(Acquire) >= self.inbound_limit
    }

    /// The waker the driver reads the socket with: it marks the wake as a
    /// read wake, then wakes the driver's task (registered with
    /// [`register_driver`](Self::register_driver)). So a driver woken by a
    /// timer or by the application knows that its socket has nothing new,
    /// and does not walk the protocol stack down to the socket to find out.
    pub(crate) fn read_waker(self: &Arc<Self>) -> Waker {
        Waker::from(self.clone())
    }

    /// The driver's task, polled now with `waker`.
    pub(crate) fn register_driver(&self, waker: &Waker) {
        self.reader.register(waker);
    }

    /// Whether the socket woke the driver since the last call (clears it).
    pub(crate) fn take_read_wake(&self) -> bool {
        // A load first: most turns find nothing, and need no write.
        self.read_woken.load(Relaxed) && self.read_woken.swap(false, Acquire)
    }

    /// The driver has ended: it holds no task to wake any more (and the
    /// task's memory is not kept by a `Connection` the application holds).
    pub(crate) fn unregister_driver(&self) {
        drop(self.reader.take());
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
    /// A message handler's [`Reply::send`]: counted by the driver until
    /// it writes it.
    Reply(Message),
    Close(Option<CloseFrame>),
}

/// `message` if an application may send it: text or binary, within the
/// write-buffer limit (the rule probes and replies follow too).
pub(crate) fn checked_message(
    message: Message,
    write_buffer_limit: usize,
) -> Result<Message, Error> {
    match unsendable(&message, write_buffer_limit) {
        None => Ok(message),
        Some(why) => Err(Error::invalid(why)),
    }
}

/// The application's Close with `code` and `reason` (cut to 123 bytes), if
/// the code may be sent.
pub(crate) fn close_command(code: CloseCode, reason: &str) -> Result<Command, Error> {
    let frame = match code {
        CloseCode::Status if reason.is_empty() => None,
        code if crate::verdict::valid_on_the_wire(u16::from(code)) => Some(CloseFrame {
            code,
            reason: truncate_text(reason).into(),
        }),
        _ => return Err(Error::invalid("close code not allowed on the wire")),
    };
    Ok(Command::Close(frame))
}

// ===== impl Sender =====

/// A cloneable handle that sends on one connection; many tasks may hold one.
///
/// Messages go through a bounded queue (see
/// [`ConfigBuilder::outbound_queue`](crate::ConfigBuilder::outbound_queue))
/// to the connection's driver task, which writes them in order. No lock is
/// held across an await.
#[derive(Clone)]
pub struct Sender {
    shared: std::sync::Arc<Shared>,
    id: ConnectionId,
    write_buffer_limit: usize,
}

impl Sender {
    pub(crate) fn new(shared: std::sync::Arc<Shared>, id: ConnectionId, limit: usize) -> Self {
        Self {
            shared,
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
        let message = checked_message(message.into(), self.write_buffer_limit)?;
        self.shared.queue(Command::Send(message)).await
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
        self.shared.queue(close_command(code, reason)?).await
    }

    /// Whether the connection has stopped taking messages.
    pub fn is_closed(&self) -> bool {
        self.shared.outbox_closed()
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("id", &self.id)
            .field("closed", &self.is_closed())
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
/// If the application stops taking messages, the supervisor keeps reading
/// into its queue, within
/// [`inbound_buffer_limit`](crate::ConfigBuilder::inbound_buffer_limit)
/// bytes, so a silent peer is still found. Beyond that budget it stops
/// reading (TCP pushes back on the peer) and suspends the pong deadline —
/// our own backpressure is never reported as the peer's timeout — for at
/// most `ping_interval + pong_timeout`, after which the connection ends as
/// [`Internal`](crate::CloseReason::Internal), local, "application not
/// reading". Messages read before the end are never lost: `recv` yields
/// them all before `None`. See `docs/keepalive.md`.
pub struct Connection {
    sender: Sender,
    shared: std::sync::Arc<Shared>,
    peer_addr: Option<SocketAddr>,
    /// The subprotocol agreed in the handshake.
    protocol: Option<Box<str>>,
    /// A message handler was given ([`on_message`](Self::on_message)).
    handled: bool,
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
        sender: Sender,
        shared: std::sync::Arc<Shared>,
        peer_addr: Option<SocketAddr>,
        protocol: Option<Box<str>>,
    ) -> Self {
        Self {
            sender,
            shared,
            peer_addr,
            protocol,
            handled: false,
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

    fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if self.handled {
            // The handler takes every message, the queued ones too.
            return self.shared.poll_end(cx);
        }
        self.shared.poll_take(cx)
    }

    /// Handles every text and binary message on the connection's own task,
    /// instead of queueing it for [`recv`](Self::recv): `handler` gets each
    /// message and a [`Reply`] for the same connection.
    ///
    /// This saves a task wake-up and a queue hop per message each way
    /// (an echo's server CPU per round trip, `docs/benchmarks.md`), for work
    /// that is quick and never waits: parse, update shared state, answer,
    /// or hand off to other connections' [`Sender`]s. Work that awaits
    /// belongs in a task of its own, fed by [`recv`](Self::recv).
    ///
    /// * **Order.** The driver takes `handler` on its next turn and runs
    ///   the messages already queued through it, one per turn and in
    ///   order, before any it reads later (it reads on meanwhile, so pongs
    ///   still count). [`recv`](Self::recv) yields no message from here on,
    ///   and `None` once the connection has ended. No message is lost:
    ///   what was read before the end goes through `handler` even if it is
    ///   given after the end (its replies then fail).
    /// * **Heartbeats.** The driver calls `handler` with one message, then
    ///   checks its timers, in the same turn, so pings and deadlines wait
    ///   for at most one call. `handler` must not block: a call that takes
    ///   long delays that connection's pings by as much, as any code on
    ///   its task would.
    /// * **Backpressure.** While the connection is open, `handler` is
    ///   called only while fewer than
    ///   [`outbound_queue`](crate::ConfigBuilder::outbound_queue) of its
    ///   replies wait to be written; until then reading pauses (the pong
    ///   deadline with it, as for the inbound budget), and the
    ///   [`write_timeout`](crate::ConfigBuilder::write_timeout), not the
    ///   "application not reading" rule, judges a peer that does not read
    ///   our replies.
    /// * **Panics.** A panic in `handler` (on the connection's task) ends
    ///   the connection as [`Internal`](crate::CloseReason::Internal),
    ///   local, "application panicked" (1011); it is not called again.
    /// * **Life.** The `Connection` still owns the connection: dropping it
    ///   closes it as before. Keep it, and await [`closed`](Self::closed).
    ///
    /// ```
    /// # #[allow(dead_code)]
    /// # async fn serve(mut conn: ws_supervisor::Connection) -> Result<(), ws_supervisor::Error> {
    /// // An echo server, with no task of its own per message.
    /// conn.on_message(|message, reply| {
    ///     let _ = reply.send(message);
    /// })?;
    /// let event = conn.closed().await;
    /// println!("{} ended: {}", event.id, event.reason);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::is_invalid_input`] if a handler was already given (the
    /// first one stays).
    pub fn on_message<H>(&mut self, handler: H) -> Result<(), Error>
    where
        H: FnMut(Message, &mut Reply<'_>) + Send + 'static,
    {
        if std::mem::replace(&mut self.handled, true) {
            return Err(Error::invalid("a message handler was already given"));
        }
        let sender = &self.sender;
        self.shared
            .offer_handler(Box::new(handler), sender.id, sender.write_buffer_limit);
        Ok(())
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
        self.shared.app_dropped(std::thread::panicking());
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn shared(outbound: usize) -> Arc<Shared> {
        Arc::new(Shared::new(Instant::now(), 1024, outbound))
    }

    fn text(s: &str) -> Command {
        Command::Send(Message::text(s))
    }

    #[tokio::test]
    async fn a_full_outbox_makes_senders_wait_until_the_driver_takes_one() {
        let s = shared(2);
        s.queue(text("a")).await.unwrap();
        s.queue(text("b")).await.unwrap();
        let mut third = Box::pin(s.queue(text("c")));
        assert!(
            (&mut third).now_or_never().is_none(),
            "full: the sender waits"
        );
        assert!(matches!(s.next_command(), Some(Command::Send(m)) if m == Message::text("a")));
        // The pop freed a slot and woke the waiter.
        assert!(third.await.is_ok());
        let order: Vec<_> = std::iter::from_fn(|| s.next_command()).collect();
        assert!(matches!(&order[..], [Command::Send(b), Command::Send(c)]
            if *b == Message::text("b") && *c == Message::text("c")));
    }

    #[test]
    fn above_its_limit_the_outbox_wakes_a_waiting_sender_only_once_there_is_room() {
        // A handler's replies may take the queue above `outbound_queue`.
        struct Count(std::sync::atomic::AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Relaxed);
            }
        }
        let s = shared(2);
        assert!(s.try_queue(text("a")).is_ok());
        assert!(s.try_queue(text("b")).is_ok());
        s.push_command(Command::Reply(Message::text("r1"))).unwrap();
        s.push_command(Command::Reply(Message::text("r2"))).unwrap();
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut third = Box::pin(s.queue(text("c")));
        assert!(third.as_mut().poll(&mut cx).is_pending(), "full: it waits");
        let wakes = || count.0.load(Relaxed);
        // 4 -> 3 -> 2 queued: still no room, no wake-up.
        assert!(s.next_command().is_some());
        assert!(s.next_command().is_some());
        assert_eq!(wakes(), 0);
        // 2 -> 1: room, one wake-up, and the sender gets in.
        assert!(s.next_command().is_some());
        assert_eq!(wakes(), 1);
        assert!(matches!(third.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    }

    #[tokio::test]
    async fn closing_the_outbox_fails_waiting_and_later_senders_but_keeps_the_queue() {
        let s = shared(1);
        s.queue(text("a")).await.unwrap();
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.queue(text("b")).await }
        });
        tokio::task::yield_now().await;
        s.close_outbox();
        assert!(waiting.await.unwrap().unwrap_err().is_closed());
        assert!(s.queue(text("c")).await.unwrap_err().is_closed());
        assert!(s.next_command().is_some(), "what was queued stays");
        assert!(s.next_command().is_none());
    }

    #[tokio::test]
    async fn the_inbox_yields_every_message_then_none_once_ended() {
        let s = shared(1);
        s.deliver(Message::text("x"));
        s.deliver(Message::binary(vec![1u8; 10]));
        assert_eq!(s.unread.load(Relaxed), 11 + 2 * size_of::<Message>());
        assert!(s.end_inbox().is_none());
        let take = || std::future::poll_fn(|cx| s.poll_take(cx));
        assert_eq!(take().await, Some(Message::text("x")));
        assert_eq!(take().await, Some(Message::binary(vec![1u8; 10])));
        assert_eq!(take().await, None);
        assert_eq!(s.unread.load(Relaxed), 0, "taken messages leave the budget");
        // A burst's memory goes back once it is taken.
        let s = shared(1);
        for i in 0..100 {
            s.deliver(Message::binary(vec![i]));
        }
        for _ in 0..100 {
            assert!(matches!(s.try_take(), Some(Some(_))));
        }
        assert_eq!(lock(&s.inbox).messages.capacity(), 0);
    }

    #[test]
    fn empty_messages_count_against_the_budget_and_a_dropped_app_frees_them() {
        let s = Arc::new(Shared::new(Instant::now(), 10 * size_of::<Message>(), 1));
        for _ in 0..10 {
            assert!(!s.over_budget());
            s.deliver(Message::binary(Vec::new()));
        }
        assert!(
            s.over_budget(),
            "ten empty messages fill a budget of ten slots"
        );
        s.app_dropped(false);
        assert_eq!(s.unread.load(Relaxed), 0);
        assert!(lock(&s.inbox).messages.is_empty());
    }

    #[test]
    fn an_offered_handler_goes_to_the_driver_once_with_the_queue_left_in_order() {
        let s = shared(4);
        s.deliver(Message::text("a"));
        s.deliver(Message::text("b"));
        assert!(s.take_handler().is_none(), "nothing offered yet");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        s.offer_handler(
            Box::new(move |m, reply| {
                log.lock().unwrap().push(m.clone());
                reply.send(m).unwrap();
            }),
            ConnectionId(7),
            1024,
        );
        // Nothing runs on the application's side: the queue is left as is.
        assert!(seen.lock().unwrap().is_empty());
        let mut handler = s.take_handler().expect("offered");
        assert!(s.take_handler().is_none(), "taken once");
        // The driver runs the queue through it, in order.
        let mut waiting = 0;
        while let Some(m) = s.take_queued() {
            handler(m, &mut Reply::new(&s, &mut waiting, ConnectionId(7), 1024));
        }
        assert_eq!(
            *seen.lock().unwrap(),
            [Message::text("a"), Message::text("b")]
        );
        assert_eq!(
            s.unread.load(Relaxed),
            0,
            "handled messages leave the budget"
        );
        // Its replies are queued, in order, and counted for the driver.
        assert_eq!(waiting, 2);
        let replies: Vec<_> = std::iter::from_fn(|| s.next_command()).collect();
        assert!(
            matches!(&replies[..], [Command::Reply(a), Command::Reply(b)]
            if *a == Message::text("a") && *b == Message::text("b"))
        );
    }

    #[tokio::test]
    async fn with_a_handler_recv_yields_no_message_then_none_at_the_end() {
        let s = shared(1);
        s.deliver(Message::text("for the handler"));
        s.offer_handler(Box::new(|_, _| {}), ConnectionId(1), 1024);
        let take = || std::future::poll_fn(|cx| s.poll_end(cx));
        assert!(futures::FutureExt::now_or_never(take()).is_none());
        drop(s.end_inbox());
        assert_eq!(take().await, None);
    }

    /// What a handler the driver never took saw, and whether it was
    /// dropped: it may hold the connection's own `Sender`, and kept, that
    /// would be a cycle through `Shared` that frees neither.
    fn logging_handler(held: &Arc<()>) -> (Handler, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, held) = (seen.clone(), held.clone());
        let handler: Handler = Box::new(move |m, reply| {
            let replied = reply.send(m.clone());
            let mut log = log.lock().unwrap();
            log.push(format!(
                "{} closed={}",
                m.to_text().unwrap(),
                replied.unwrap_err().is_closed()
            ));
            let _ = &held; // held by the handler, to see when it is dropped
        });
        (handler, seen)
    }

    #[test]
    fn a_handler_the_driver_never_took_gets_the_queue_when_the_driver_ends() {
        let s = shared(1);
        let held = Arc::new(());
        s.deliver(Message::text("a"));
        s.deliver(Message::text("b"));
        let (handler, seen) = logging_handler(&held);
        s.offer_handler(handler, ConnectionId(1), 1024);
        assert_eq!(Arc::strong_count(&held), 2);
        // As the driver's drop does: end, close the send queue, run.
        let waiting = s.end_inbox().expect("the handler it never took");
        s.close_outbox();
        run_leftovers(&s, waiting, ConnectionId(1), 1024);
        assert_eq!(*seen.lock().unwrap(), ["a closed=true", "b closed=true"]);
        assert_eq!(Arc::strong_count(&held), 1, "dropped");
    }

    #[test]
    fn a_handler_offered_after_the_end_gets_the_queue_at_once() {
        let s = shared(1);
        let held = Arc::new(());
        s.deliver(Message::text("late"));
        assert!(s.end_inbox().is_none());
        s.close_outbox();
        let (handler, seen) = logging_handler(&held);
        s.offer_handler(handler, ConnectionId(1), 1024);
        assert_eq!(*seen.lock().unwrap(), ["late closed=true"]);
        assert_eq!(Arc::strong_count(&held), 1, "not kept");
    }

    #[tokio::test]
    async fn a_delivery_wakes_a_waiting_receiver() {
        let s = shared(1);
        let receiver = tokio::spawn({
            let s = s.clone();
            async move { std::future::poll_fn(|cx| s.poll_take(cx)).await }
        });
        tokio::task::yield_now().await;
        assert!(!receiver.is_finished());
        s.deliver(Message::text("late"));
        assert_eq!(receiver.await.unwrap(), Some(Message::text("late")));
    }
}
