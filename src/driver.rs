//! The per-connection task: wires the heartbeat, the verdict and the hooks
//! to one socket. See [`Driver`].

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::task::{Context, Poll, Waker};

use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};

use crate::app_heartbeat::{Heard, unsendable};
use crate::close::Cause;
use crate::connection::{Command, Shared};
use crate::error::Error;
use crate::guard::CloseGuard;
use crate::heartbeat::{Heartbeat, OverdueReads, Pong};
use crate::inline::{Handler, Reply, run_leftovers};
use crate::metrics::secs;
use crate::signal::Signal;
use crate::state::{Purpose, Slot, SupervisorState};
use crate::stats::ConnectionId;
use crate::trace;
use crate::transport::{RawClose, ReadLayer, Taken, taken_limit};
use crate::verdict::{close_frame, fallback_cause};

/// Most turns of the loop in one poll before yielding to other tasks. A
/// connection with a flood of frames to read must not keep its worker from
/// the others: each turn is a handful of operations, so 32 turns stay
/// within tokio's own cooperative budget of 128 per poll.
const BUDGET: usize = 32;
/// Most application messages written between two flushes: batching saves
/// system calls, and 16 keeps a flush's worth of data small next to the
/// default write-buffer limit.
const BATCH: usize = 16;

/// What the driver can see and do of its stream beneath the protocol
/// layer: on streams the supervisor built (a [`ReadLayer`]), the bytes the
/// socket accepted, the raw payload of the peer's Close, reads of its own
/// (pongs and plain data messages past tungstenite), and, on a server's,
/// its ping frames written past tungstenite; on a stream given to
/// `supervise`, nothing.
pub(crate) struct Probe<S> {
    /// Bytes the socket has accepted from us, if known.
    pub(crate) written: fn(&S) -> Option<u64>,
    /// The peer's last Close frame as it was on the wire, if known.
    pub(crate) last_close: fn(&S) -> Option<RawClose>,
    /// A pong the stream took out before tungstenite saw it, if any.
    pub(crate) take_pong: fn(&mut S) -> Option<[u8; 8]>,
    /// Reads the next data message past tungstenite where the stream can
    /// (see [`ReadLayer::poll_take`]).
    pub(crate) take: fn(&mut S, &mut Context<'_>) -> Poll<Taken>,
    /// After a message: whether the stream is drained and registered for
    /// its next bytes (then reading again would only find nothing).
    pub(crate) parked: fn(&mut S, &mut Context<'_>) -> bool,
    /// Tells the stream that this driver takes pongs and data messages of
    /// at most the given length, and asks `parked`.
    pub(crate) drive: fn(&mut S, usize),
    /// Queues a ping frame with this payload in the stream itself, past
    /// tungstenite, where the stream can (see [`ReadLayer::queue_ping`]).
    pub(crate) queue_ping: fn(&mut S, [u8; 8]) -> bool,
}

impl<S> Probe<S> {
    /// A stream built elsewhere: nothing to see.
    pub(crate) fn none() -> Self {
        Self {
            written: |_| None,
            last_close: |_| None,
            take_pong: |_| None,
            take: |_, _| Poll::Ready(Taken::Pass),
            parked: |_, _| false,
            drive: |_, _| {},
            queue_ping: |_, _| false,
        }
    }
}

impl<T: AsyncRead + Unpin + 'static> Probe<ReadLayer<T>> {
    /// A stream the supervisor built.
    pub(crate) fn read_layer() -> Self {
        Self {
            written: ReadLayer::bytes_written,
            last_close: ReadLayer::last_close,
            take_pong: ReadLayer::take_pong,
            take: ReadLayer::poll_take,
            parked: ReadLayer::parked,
            drive: ReadLayer::drive,
            queue_ping: ReadLayer::queue_ping,
        }
    }
}

/// One connection's task: owns the socket and wires the heartbeat, the
/// verdict and the hooks together. Policy lives in those types; [`poll`]
/// only runs the steps in order.
///
/// Field order matters: fields drop in declaration order, so `ws` (the
/// transport) is dropped first and `guard` (whose `Drop` runs the hooks if
/// the task ends early) last.
///
/// [`poll`]: Self::poll
pub(crate) struct Driver<S: AsyncRead + AsyncWrite + Unpin> {
    ws: WebSocketStream<S>,
    state: Arc<SupervisorState>,
    shared: Arc<Shared>,
    hb: Heartbeat,
    phase: Phase,
    /// In a drained shutdown, when this connection gets its Close: planned
    /// once, when the driver is told to stop (`None` before, or without a
    /// drain window).
    drain_at: Option<Instant>,
    to_app: ToApp,
    from_app: FromApp,
    write: WriteSide<S>,
    /// The peer's raw Close, where the stream shows it.
    last_close: fn(&S) -> Option<RawClose>,
    /// A pong the stream read past tungstenite, where it does that.
    take_pong: fn(&mut S) -> Option<[u8; 8]>,
    /// The stream's own read of data messages, where it does that.
    take: fn(&mut S, &mut Context<'_>) -> Poll<Taken>,
    /// Whether the stream is drained and registered after a message.
    parked: fn(&mut S, &mut Context<'_>) -> bool,
    /// The stream's own queue for a ping frame, where it has one.
    queue_ping: fn(&mut S, [u8; 8]) -> bool,
    guard: CloseGuard,
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Messages flow; the heartbeat runs.
    Open,
    /// A Close was sent or received: we read until the handshake ends or
    /// `until`, and take no more application messages.
    Closing { until: Instant },
    /// A local failure: we flush a best-effort Close until `until`, then stop.
    Failing { until: Instant },
    /// Nothing left to do: drop the transport and run the hooks.
    Done,
}

/// The read side and delivery to the application (through the inbox in
/// [`Shared`], bounded by the byte budget).
struct ToApp {
    /// Since when reading has been paused for the budget; the application
    /// has `ping_interval + pong_timeout` from then to take a message.
    paused_since: Option<Instant>,
    /// The last read found frames waiting (it did not return a plain
    /// `Pending`): a pong the peer already sent may still be unread.
    frames_waiting: bool,
    /// How long an expired pong deadline waits for those frames.
    overdue: OverdueReads,
    /// The application's message handler, taken on the turn after
    /// [`Connection::on_message`](crate::Connection::on_message) offered it.
    handler: Option<Handler>,
    /// Messages queued before the handler was taken may still wait in the
    /// inbox: the handler gets them first, one per turn, and messages read
    /// meanwhile queue behind them.
    backlog: bool,
    /// The handler's replies queued and not yet written.
    replies: usize,
    /// The waker reads go with ([`Shared::read_waker`]).
    waker: Waker,
    /// The last read was a `Pending` that registered `waker` with the
    /// socket, and the socket has not woken it since: reading again now
    /// would walk the protocol stack only to find nothing.
    armed: bool,
}

/// Commands from the application's `Sender`s (the outbox in [`Shared`]).
struct FromApp {
    /// The outbox takes no new sends: closed when we saw that the
    /// application dropped its `Connection` (while open, that is what it
    /// means), or on leaving [`Phase::Open`].
    closed: bool,
}

/// What the write side owes the socket.
struct WriteSide<S> {
    /// What was handed down and not yet flushed.
    unflushed: Unflushed,
    /// Since when the write side has been blocked without progress (`None`:
    /// it is not blocked): the write timeout counts from here.
    blocked_since: Option<Instant>,
    /// The socket's accepted-bytes count, where it can be seen.
    progress: fn(&S) -> Option<u64>,
    /// Its last reading.
    written: Option<u64>,
    /// Our reply to the peer's application ping, waiting for the message
    /// being written to finish (the latest only; see `reply`).
    reply: Option<Box<Message>>,
}

/// What the write side handed down and the socket has not all taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unflushed {
    Nothing,
    /// A ping frame queued in the stream itself, and nothing else:
    /// tungstenite holds nothing, and the flush need not pass through it.
    Ping,
    /// Bytes handed to tungstenite (and a ping before them, if any).
    Tungstenite,
}

impl<S> WriteSide<S> {
    /// Bytes are waiting for the socket.
    fn dirty(&self) -> bool {
        self.unflushed != Unflushed::Nothing
    }

    /// Bytes were handed to tungstenite.
    fn queued(&mut self) {
        self.unflushed = Unflushed::Tungstenite;
    }

    /// A ping frame was queued in the stream itself; nothing else waits
    /// (pings go out only once everything is flushed).
    fn queued_ping(&mut self) {
        debug_assert!(!self.dirty(), "a ping past tungstenite behind its bytes");
        self.unflushed = Unflushed::Ping;
    }

    /// The write side could not finish at `now`. The write timeout measures
    /// time without progress: if the socket took any of our bytes since the
    /// last look, the clock starts again.
    fn blocked(&mut self, io: &S, now: Instant) {
        let written = (self.progress)(io);
        if written != self.written || self.blocked_since.is_none() {
            self.written = written;
            self.blocked_since = Some(now);
        }
    }

    /// Everything was flushed.
    fn flushed(&mut self) {
        self.unflushed = Unflushed::Nothing;
        self.blocked_since = None;
    }
}

impl<S> Driver<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        mut ws: WebSocketStream<S>,
        state: Arc<SupervisorState>,
        shared: Arc<Shared>,
        id: ConnectionId,
        peer_addr: Option<SocketAddr>,
        slot: Slot,
        probe: Probe<S>,
    ) -> Self {
        let max_len = taken_limit(ws.get_config());
        (probe.drive)(ws.get_mut(), max_len);
        let config = state.config();
        let unit = state.random_unit(id, Purpose::PingPhase);
        let hb = Heartbeat::new(
            state.epoch(),
            shared.opened,
            config.ping_interval(),
            config.pong_timeout(),
            config.ping_jitter(),
            unit,
            config.liveness(),
            state.random(id, Purpose::NonceKey),
        );
        let guard = CloseGuard::new(state.clone(), shared.clone(), id, peer_addr, slot);
        let read_waker = shared.read_waker();
        Self {
            ws,
            state,
            shared,
            hb,
            phase: Phase::Open,
            drain_at: None,
            to_app: ToApp {
                paused_since: None,
                frames_waiting: false,
                overdue: OverdueReads::default(),
                handler: None,
                backlog: false,
                replies: 0,
                waker: read_waker,
                armed: false,
            },
            from_app: FromApp { closed: false },
            last_close: probe.last_close,
            take_pong: probe.take_pong,
            take: probe.take,
            parked: probe.parked,
            queue_ping: probe.queue_ping,
            write: WriteSide {
                unflushed: Unflushed::Nothing,
                blocked_since: None,
                progress: probe.written,
                written: None,
                reply: None,
            },
            guard,
        }
    }

    /// Drives the connection to its end, then runs the hooks.
    // Not an `async fn`, as clippy suggests: an async fn moves its
    // arguments into locals and keeps both copies in its future
    // (rust-lang/rust#62958), i.e. the whole driver, socket included, twice
    // per connection (2032 B instead of 1200 B; 0.7 KiB per idle connection
    // in all, docs/benchmarks.md). The async block uses `self` in place.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn run(mut self) -> impl Future<Output = ()> + Send + 'static {
        async move {
            trace::opened();
            {
                let mut sleep = pin!(tokio::time::sleep_until(self.hb.next_wakeup()));
                let mut shutdown = pin!(Signal::new(self.state.shutdown().begun()));
                std::future::poll_fn(|cx| self.poll(cx, sleep.as_mut(), shutdown.as_mut())).await;
            }
            // Dropping `self` now drops the transport first, then the guard,
            // which runs the hooks: they see a closed connection.
        }
    }

    // ===== the poll loop =====

    /// The steps, in order, until none makes progress and the next timer is
    /// armed.
    fn poll<A>(
        &mut self,
        cx: &mut Context<'_>,
        mut sleep: Pin<&mut Sleep>,
        mut shutdown: Pin<&mut Signal<A>>,
    ) -> Poll<()>
    where
        A: Future<Output = ()>,
    {
        // Whatever woke us, the socket's wakes and the application's (a
        // send, a take, a drop) reach this task through the waker in
        // `Shared`: register the task there; each turn then sees whether
        // the socket was among them.
        self.shared.register_driver(cx.waker());
        for _ in 0..BUDGET {
            // A socket wake during an earlier turn of this poll counts too
            // (the pong deadline must not miss a pong that just arrived).
            if self.shared.take_read_wake() {
                self.to_app.armed = false;
            }
            let now = Instant::now();
            let mut progress = false;
            progress |= self.poll_shutdown(cx, shutdown.as_mut(), now);
            progress |= self.poll_app_gone(now);
            progress |= self.poll_read(now);
            progress |= self.poll_commands(cx, now);
            progress |= self.poll_flush(cx, now);
            if self.on_timers(now) {
                progress = true;
                // A ping or Close the timers queued goes out in this turn.
                self.poll_flush(cx, now);
            }
            self.refuse_sends_once_closing();
            if self.phase == Phase::Done {
                return Poll::Ready(());
            }
            if !progress {
                let at = self.next_deadline();
                if sleep.deadline() != at {
                    sleep.as_mut().reset(at);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // The deadline is already here: go round once more.
            }
        }
        // Still busy: let other connections run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Since when reading has been paused for the inbound budget, which the
    /// application alone can free (not with a message handler, whose queue
    /// and replies the driver and the socket free).
    fn stalled_since(&self) -> Option<Instant> {
        // With a handler, the driver itself takes what is queued (as its
        // replies leave room): the application has nothing left to do.
        self.to_app
            .paused_since
            .filter(|_| self.to_app.handler.is_none() && self.shared.over_budget())
    }

    /// The next instant at which a timer needs us.
    fn next_deadline(&self) -> Instant {
        match self.phase {
            Phase::Open => {
                let config = self.state.config();
                let mut at = self.hb.next_wakeup();
                if let Some(since) = self.write.blocked_since {
                    at = at.min(since + config.write_timeout());
                }
                if let Some(since) = self.stalled_since() {
                    at = at.min(since + config.read_stall_limit());
                }
                if let Some(close_at) = self.drain_at {
                    at = at.min(close_at);
                }
                at
            }
            Phase::Closing { until } | Phase::Failing { until } => until,
            // Not polled again once done.
            Phase::Done => Instant::now(),
        }
    }

    // ===== signals =====

    fn poll_shutdown<A>(
        &mut self,
        cx: &mut Context<'_>,
        mut shutdown: Pin<&mut Signal<A>>,
        now: Instant,
    ) -> bool
    where
        A: Future<Output = ()>,
    {
        if self.phase == Phase::Done {
            return false;
        }
        let hint = self.state.shutdown().has_begun();
        if !shutdown.as_mut().poll_fire(cx, hint) {
            // In a drain, an open connection's planned time may have come.
            return shutdown.has_fired()
                && self.phase == Phase::Open
                && self.close_for_shutdown(now);
        }
        let deadline = self.state.shutdown().deadline().unwrap_or(now);
        match self.phase {
            Phase::Open => {
                self.drain_at = self.state.drain_close_at(self.guard.id());
                self.close_for_shutdown(now);
            }
            // Already closing: the grace period caps the wait.
            Phase::Closing { until } => {
                self.phase = Phase::Closing {
                    until: until.min(deadline),
                }
            }
            Phase::Failing { until } => {
                self.phase = Phase::Failing {
                    until: until.min(deadline),
                }
            }
            Phase::Done => {}
        }
        true
    }

    /// Sends an open connection the shutdown's Close, if its time has come:
    /// at once by default, with the whole grace for the handshake; in a
    /// drain at its planned time, with `close_timeout` (within the grace).
    fn close_for_shutdown(&mut self, now: Instant) -> bool {
        let state = &self.state;
        let deadline = state.shutdown().deadline().unwrap_or(now);
        let until = if state.config().drain_window().is_zero() {
            deadline
        } else {
            match self.drain_at {
                Some(at) if now >= at => deadline.min(now + state.config().close_timeout()),
                _ => return false,
            }
        };
        let cause = Cause::Shutdown(state.config().drain_close_code());
        self.close_with(cause, until);
        true
    }

    /// What the application queued before dropping its `Connection`
    /// (messages, a Close with its own code) goes out first; then we close.
    fn poll_app_gone(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Open {
            return false;
        }
        if !self.from_app.closed && self.shared.app_gone.load(Acquire) {
            // Write what was queued, but take nothing new: other `Sender`s
            // must not keep a dropped connection open.
            self.from_app.closed = true;
            self.shared.close_outbox();
        }
        if !self.from_app.closed || !self.shared.outbox_is_empty() {
            return false;
        }
        let until = now + self.state.config().close_timeout();
        if self.shared.app_panicked.load(Relaxed) {
            self.close_with(Cause::AppPanicked, until);
        } else {
            self.close_with(Cause::AppDropped, until);
        }
        true
    }

    // ===== inbound =====

    /// Whether reading pauses for the inbound byte budget (only while open:
    /// once closing we must read the peer's Close reply, and data is
    /// dropped from then on anyway). The pong deadline is suspended while
    /// paused: the peer's pong may be sitting unread behind the data.
    ///
    /// A message handler's replies pause reading the same way while
    /// `outbound_queue` of them wait to be written (the driver itself
    /// writes them, as the socket takes our bytes); only the inbound budget
    /// counts towards `read_stall_limit`.
    fn paused_for_budget(&mut self, now: Instant) -> bool {
        // `poll` registered the task before this look: a take after it
        // wakes us.
        if self.phase == Phase::Open && (self.shared.over_budget() || self.replies_full()) {
            if self.to_app.paused_since.is_none() {
                self.to_app.paused_since = Some(now);
                self.hb.suspend();
            }
            return true;
        }
        if self.to_app.paused_since.take().is_some() {
            self.hb.resume(now);
        }
        false
    }

    fn poll_read(&mut self, now: Instant) -> bool {
        let reading = matches!(self.phase, Phase::Open | Phase::Closing { .. });
        self.to_app.frames_waiting = false;
        if !reading {
            self.to_app.armed = false;
            return false;
        }
        // A message handler gets what was queued before it first, one per
        // turn; reading goes on meanwhile (pongs count at once, messages
        // queue behind the rest).
        let handled = self.handle_backlog(now);
        handled | self.read_socket(now)
    }

    /// One read of the socket, unless paused or armed; returns whether it
    /// made progress.
    fn read_socket(&mut self, now: Instant) -> bool {
        // The budget first: a message that filled it pauses reading now,
        // even if the socket has nothing new (the registration stays).
        if self.paused_for_budget(now) {
            return false;
        }
        if self.to_app.armed {
            // Nothing new since our last read found nothing.
            return false;
        }
        let mut cx = Context::from_waker(&self.to_app.waker);
        let (pong, read) = read_next(&mut self.ws, self.take, self.take_pong, &mut cx);
        // After a message, the stream may know that nothing is left.
        let parked =
            matches!(read, Poll::Ready(Some(Ok(_)))) && (self.parked)(self.ws.get_mut(), &mut cx);
        if let Some(payload) = pong {
            self.shared.touch(now);
            let pong = self.hb.on_pong(now, &payload);
            self.count_pong(pong);
        }
        match read {
            // A Pending from tokio's cooperative budget says nothing about
            // the socket: frames (a pong) may still wait behind it, and
            // nothing was registered (the budget woke the read waker).
            Poll::Pending => {
                let budget_left = tokio::task::coop::has_budget_remaining();
                self.to_app.frames_waiting = !budget_left;
                self.to_app.armed = budget_left;
                pong.is_some()
            }
            Poll::Ready(Some(Ok(message))) => {
                self.to_app.frames_waiting = !parked;
                self.to_app.armed = parked;
                self.on_message(message, now);
                true
            }
            Poll::Ready(Some(Err(e))) => {
                self.to_app.frames_waiting = true;
                self.on_read_error(e, now);
                true
            }
            Poll::Ready(None) => {
                // The close handshake completed (or the stream was already
                // ended by an error we handled).
                self.record(Cause::TransportEnded, String::new());
                self.phase = Phase::Done;
                true
            }
        }
    }

    fn on_message(&mut self, message: Message, now: Instant) {
        self.shared.touch(now);
        match message {
            Message::Text(_) | Message::Binary(_) => {
                if self.state.config().app_heartbeat().inspects() && !self.hear(&message, now) {
                    return;
                }
                self.hb.on_frame(now);
                let metrics = self.state.metrics();
                metrics.messages_received.increment(1);
                metrics.bytes_received.increment(message.len() as u64);
                self.deliver(message, now);
            }
            Message::Ping(_) => {
                self.hb.on_frame(now);
                // tungstenite queued the pong: get it on the wire now.
                self.write.queued();
            }
            Message::Pong(payload) => {
                let pong = self.hb.on_pong(now, &payload);
                self.count_pong(pong);
            }
            Message::Close(frame) => {
                self.hb.on_frame(now);
                let raw = (self.last_close)(self.ws.get_ref());
                self.guard.verdict.peer_closed(frame.as_ref(), raw);
                // tungstenite queued the Close reply; flush it, then read on
                // until the peer ends the transport (or we time out).
                self.write.queued();
                if self.phase == Phase::Open {
                    self.phase = Phase::Closing {
                        until: now + self.state.config().close_timeout(),
                    };
                }
            }
            Message::Frame(_) => {}
        }
    }

    /// Counts a pong of either kind, already recorded by the heartbeat.
    fn count_pong(&mut self, pong: Pong) {
        let metrics = self.state.metrics();
        metrics.pongs_received.increment(1);
        match pong {
            Pong::Matched(rtt) => {
                metrics.rtt.record(secs(rtt));
                trace::pong_matched(rtt);
            }
            Pong::Unmatched => {
                metrics.pongs_unmatched.increment(1);
                trace::pong_unmatched();
            }
        }
        self.shared.publish(&self.hb.stats());
    }

    /// Handles a data message that may belong to the application-level
    /// heartbeat; returns whether it goes on to the application.
    fn hear(&mut self, message: &Message, now: Instant) -> bool {
        let app = self.state.config().app_heartbeat();
        let deliver = app.delivers();
        match app.hear(message) {
            Ok(Heard::Data) => true,
            Ok(Heard::Answer(answer)) => {
                let pong = self.hb.on_answer(now, answer);
                self.count_pong(pong);
                deliver
            }
            Ok(Heard::PeerPing(reply)) => {
                // A ping, as a ping frame is for liveness.
                self.hb.on_frame(now);
                self.reply(reply);
                deliver
            }
            Err(_) => {
                if self.phase == Phase::Open {
                    let until = now + self.state.config().close_timeout();
                    self.close_with(Cause::AppPanicked, until);
                }
                false
            }
        }
    }

    /// Sends our reply to the peer's application ping: at once if the write
    /// side is idle, else after the message being written (data frames of
    /// two messages cannot interleave), keeping only the latest, so that
    /// replies never pile up in the write buffer's headroom (it is for the
    /// Close).
    fn reply(&mut self, reply: Message) {
        let limit = self.state.config().write_buffer_limit();
        if self.phase != Phase::Open || unsendable(&reply, limit).is_some() {
            return;
        }
        if self.write.dirty() {
            self.write.reply = Some(Box::new(reply));
        } else {
            self.start_send(reply);
        }
    }

    /// Hands a data message to the application: to its message handler,
    /// or queued (counted against the byte budget until it takes it). Once
    /// closing, queued only within the budget (reading no longer pauses for
    /// it); once the application is gone, nobody will read it.
    fn deliver(&mut self, message: Message, now: Instant) {
        if self.shared.app_gone.load(Relaxed) {
            return;
        }
        // A handler with no backlog takes it now; behind a backlog, the
        // message waits its turn in the queue.
        if self.to_app.handler.is_some() && !self.to_app.backlog {
            return self.handle(message, now);
        }
        if self.phase != Phase::Open && self.shared.over_budget() {
            return;
        }
        self.shared.deliver(message);
    }

    /// Whether `outbound_queue` of the handler's replies wait to be
    /// written (only while open: once closing, nothing more is written, and
    /// replies fail instead of queueing).
    fn replies_full(&self) -> bool {
        self.phase == Phase::Open
            && self.to_app.replies != 0
            && self.to_app.replies >= self.state.config().outbound_queue()
    }

    /// Takes the handler the application offered, if any, and hands it the
    /// next queued message, if any and if its replies leave room; returns
    /// whether it did.
    fn handle_backlog(&mut self, now: Instant) -> bool {
        if self.to_app.handler.is_none() {
            let Some(handler) = self.shared.take_handler() else {
                return false;
            };
            self.to_app.handler = Some(handler);
            self.to_app.backlog = true;
        }
        if !self.to_app.backlog || self.replies_full() {
            return false;
        }
        match self.shared.take_queued() {
            Some(message) => {
                self.handle(message, now);
                true
            }
            None => {
                self.to_app.backlog = false;
                false
            }
        }
    }

    /// Calls the application's message handler with `message`; a panic
    /// ends the connection, and the handler is not called again.
    fn handle(&mut self, message: Message, now: Instant) {
        let Some(handler) = self.to_app.handler.as_mut() else {
            return;
        };
        let limit = self.state.config().write_buffer_limit();
        let waiting = &mut self.to_app.replies;
        let mut reply = Reply::new(&self.shared, waiting, self.guard.id(), limit);
        if catch_unwind(AssertUnwindSafe(|| handler(message, &mut reply))).is_ok() {
            return;
        }
        // In its place, a closure that captures nothing: no allocation, and
        // dropping it cannot panic. Dropping the one that panicked may.
        let panicked = self.to_app.handler.replace(Box::new(|_, _| {}));
        let _ = catch_unwind(AssertUnwindSafe(move || drop(panicked)));
        if self.phase == Phase::Open {
            let until = now + self.state.config().close_timeout();
            self.close_with(Cause::AppPanicked, until);
        }
    }

    fn on_read_error(&mut self, e: WsError, now: Instant) {
        let frame = close_frame(&Cause::Failed(&e));
        self.guard.verdict.record_error(e);
        match frame {
            Some(frame) if self.phase == Phase::Open => self.fail_with_close(frame, now),
            _ => self.phase = Phase::Done,
        }
    }

    // ===== outbound =====

    fn poll_commands(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        for _ in 0..BATCH {
            if self.phase != Phase::Open {
                break;
            }
            // Nothing queued (a send wakes us), and no blocked write side
            // for `poll_ready` to clear: nothing to do.
            let idle_write = self.write.dirty() || self.write.blocked_since.is_none();
            if idle_write && self.shared.outbox_is_empty() {
                break;
            }
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Pending => {
                    self.write.blocked(self.ws.get_ref(), now);
                    break;
                }
                Poll::Ready(Err(e)) => {
                    self.on_write_error(e);
                    return true;
                }
                // Ready to take a message is not "flushed": tungstenite may
                // still hold control frames it could not write.
                Poll::Ready(Ok(())) if !self.write.dirty() => self.write.blocked_since = None,
                Poll::Ready(Ok(())) => {}
            }
            match self.shared.next_command() {
                Some(Command::Send(message)) => {
                    progress = true;
                    self.send_message(message);
                }
                Some(Command::Reply(message)) => {
                    progress = true;
                    self.to_app.replies -= 1;
                    self.send_message(message);
                }
                Some(Command::Close(frame)) => {
                    progress = true;
                    let code = frame.as_ref().map(|f| f.code);
                    let text = frame
                        .as_ref()
                        .map_or_else(String::new, |f| f.reason.to_string());
                    self.record(Cause::AppClose(code), text);
                    let until = now + self.state.config().close_timeout();
                    self.send_close(frame, until);
                }
                None => break,
            }
        }
        progress
    }

    /// Writes an application message (counted).
    fn send_message(&mut self, message: Message) {
        let metrics = self.state.metrics();
        metrics.messages_sent.increment(1);
        metrics.bytes_sent.increment(message.len() as u64);
        self.start_send(message);
    }

    /// Once the connection leaves [`Phase::Open`], senders get `is_closed`
    /// errors instead of a silent drop.
    fn refuse_sends_once_closing(&mut self) {
        if self.phase != Phase::Open && !self.from_app.closed {
            self.shared.close_outbox();
            self.from_app.closed = true;
        }
    }

    /// Hands `message` to tungstenite; a failure ends the connection.
    fn start_send(&mut self, message: Message) {
        match Pin::new(&mut self.ws).start_send(message) {
            Ok(()) => self.write.queued(),
            Err(e) => self.on_write_error(e),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        if !self.write.dirty() || self.phase == Phase::Done {
            return false;
        }
        let flush = if self.write.unflushed == Unflushed::Ping {
            Pin::new(self.ws.get_mut())
                .poll_flush(cx)
                .map_err(WsError::Io)
        } else {
            Pin::new(&mut self.ws).poll_flush(cx)
        };
        match flush {
            Poll::Pending => {
                self.write.blocked(self.ws.get_ref(), now);
                false
            }
            Poll::Ready(Ok(())) => {
                self.write.flushed();
                if matches!(self.phase, Phase::Failing { .. }) {
                    // The best-effort Close is out: we are done.
                    self.phase = Phase::Done;
                }
                true
            }
            Poll::Ready(Err(e)) => {
                self.on_write_error(e);
                true
            }
        }
    }

    fn on_write_error(&mut self, e: WsError) {
        match e {
            // The handshake already completed: nothing more to write.
            WsError::ConnectionClosed | WsError::AlreadyClosed => {
                self.record(Cause::TransportEnded, String::new());
            }
            // Only control frames can overflow (data is checked by `Sender`):
            // the peer stopped reading long enough to fill the buffer.
            WsError::WriteBufferFull(_) => {
                let error = Some(Error::transport(e));
                self.guard
                    .verdict
                    .record(Cause::WriteStalled, String::new(), error);
            }
            e => self.guard.verdict.record_error(e),
        }
        self.phase = Phase::Done;
    }

    // ===== closing =====

    /// Records `cause` and starts the closing handshake with the Close frame
    /// the verdict assigns it, waiting for the peer until `until`.
    fn close_with(&mut self, cause: Cause<'_>, until: Instant) {
        let frame = close_frame(&cause);
        let text = frame
            .as_ref()
            .map_or_else(String::new, |f| f.reason.to_string());
        self.record(cause, text);
        self.send_close(frame, until);
    }

    /// Queues our Close (if the protocol still allows one) and waits for
    /// the handshake until `until`.
    fn send_close(&mut self, frame: Option<CloseFrame>, until: Instant) {
        self.queue_close(frame);
        if self.phase != Phase::Done {
            self.phase = Phase::Closing { until };
        }
    }

    /// Ends the connection for a local failure: a best-effort Close, flushed
    /// within the write timeout, then the transport is dropped.
    fn fail_with_close(&mut self, frame: CloseFrame, now: Instant) {
        self.queue_close(Some(frame));
        if self.phase != Phase::Done {
            self.phase = Phase::Failing {
                until: now + self.state.config().write_timeout(),
            };
        }
    }

    /// Hands our Close to tungstenite; the verdict records it as sent only
    /// if it was queued. It always fits a buffer this driver filled (one
    /// message at most, no pings behind it, see `on_heartbeat`); a stream
    /// built with a smaller buffer for `supervise` may refuse it, and then
    /// the event says no Close was sent.
    fn queue_close(&mut self, frame: Option<CloseFrame>) {
        let code = frame.as_ref().map(|f| f.code);
        match Pin::new(&mut self.ws).start_send(Message::Close(frame)) {
            Ok(()) => {
                self.guard.verdict.sent(code);
                self.write.queued();
            }
            // tungstenite dropped the frame but counts itself closing: the
            // handshake deadline ends the wait, with no code sent.
            Err(WsError::WriteBufferFull(_)) => {}
            Err(e) => self.on_write_error(e),
        }
    }

    fn record(&mut self, cause: Cause<'_>, text: String) {
        self.guard.verdict.record(cause, text, None);
    }

    // ===== timers =====

    /// Acts on every deadline that has passed; returns whether any did.
    fn on_timers(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Open => self.on_heartbeat(now),
            Phase::Closing { until } if now >= until => {
                // Our shutdown Close unanswered: in a drain, within
                // `close_timeout`; otherwise by the end of the grace.
                if self.state.shutdown().grace_over(now) || self.guard.verdict.closed_by_shutdown()
                {
                    self.state.shutdown().count_forced();
                }
                self.record(Cause::CloseHandshakeTimeout, String::new());
                self.phase = Phase::Done;
                true
            }
            Phase::Failing { until } if now >= until => {
                if self.state.shutdown().grace_over(now) {
                    self.state.shutdown().count_forced();
                }
                self.phase = Phase::Done;
                true
            }
            _ => false,
        }
    }

    /// The open connection's deadlines: the pong deadline, the write
    /// timeout, and the next ping.
    fn on_heartbeat(&mut self, now: Instant) -> bool {
        if let Some(since) = self.stalled_since()
            && now >= since + self.state.config().read_stall_limit()
        {
            // The application has taken nothing for a whole heartbeat while
            // its unread data filled the budget: its fault, not the peer's.
            let until = now + self.state.config().close_timeout();
            self.close_with(Cause::AppStalled, until);
            return true;
        }
        let expired = self.hb.is_expired(now);
        // Frames are still waiting to be read, and the pong may be among
        // them: read on before blaming the peer (bounded, see
        // `OverdueReads`; turns that could not read for lack of budget do
        // not count).
        let counted = tokio::task::coop::has_budget_remaining();
        if self
            .to_app
            .overdue
            .read_on(expired && self.to_app.frames_waiting, counted)
        {
            return false;
        }
        if expired {
            let silent = now.saturating_duration_since(self.hb.last_inbound());
            self.state.metrics().detection.record(secs(silent));
            let frame = close_frame(&Cause::PongTimeout).expect("a timeout sends 1011");
            self.record(Cause::PongTimeout, frame.reason.to_string());
            self.fail_with_close(frame, now);
            return true;
        }
        let write_timeout = self.state.config().write_timeout();
        if self
            .write
            .blocked_since
            .is_some_and(|since| now >= since + write_timeout)
        {
            // The write side is stuck: a Close could not get out either.
            self.record(Cause::WriteStalled, "write timeout".into());
            self.phase = Phase::Done;
            return true;
        }
        if let Some(nonce) = self.hb.nonce_due(now) {
            if self.write.dirty() {
                // Our own bytes still wait for the socket: a ping queued
                // behind them would not reach the peer, and holding the
                // peer to it would blame it for our backlog. Nor may pings
                // pile up in the buffer: its headroom is for the pong and
                // the Close. The write timeout judges a stuck write side.
                self.hb.ping_skipped(now);
                return true;
            }
            let sent = match self.probe(nonce, now) {
                None => return true,
                // A ping frame goes into the stream itself where it can:
                // no pass through tungstenite, no allocation.
                Some(Ping::Frame(payload)) if (self.queue_ping)(self.ws.get_mut(), payload) => {
                    self.write.queued_ping();
                    Ok(())
                }
                Some(Ping::Frame(payload)) => Pin::new(&mut self.ws)
                    .start_send(Message::Ping(Bytes::copy_from_slice(&payload)))
                    .map(|()| self.write.queued()),
                Some(Ping::Probe(probe)) => Pin::new(&mut self.ws)
                    .start_send(probe)
                    .map(|()| self.write.queued()),
            };
            match sent {
                Ok(()) => {
                    self.hb.ping_sent(now);
                    self.state.metrics().pings_sent.increment(1);
                    self.shared.publish(&self.hb.stats());
                    trace::ping_sent();
                }
                // Our write buffer is full: the write timeout judges that;
                // the peer is not held to a ping it never got.
                Err(WsError::WriteBufferFull(_)) => self.hb.ping_skipped(now),
                Err(e) => self.on_write_error(e),
            }
            return true;
        }
        self.send_waiting_reply()
    }

    /// The ping carrying `nonce`: a ping frame, or the application-level
    /// probe. `None` (and the ping is over) if the probe cannot be sent
    /// (skipped) or its builder panicked (the connection ends).
    fn probe(&mut self, nonce: u64, now: Instant) -> Option<Ping> {
        let config = self.state.config();
        match config.app_heartbeat().probe(nonce) {
            Ok(None) => Some(Ping::Frame(nonce.to_be_bytes())),
            Ok(Some(probe)) if unsendable(&probe, config.write_buffer_limit()).is_none() => {
                Some(Ping::Probe(probe))
            }
            // `build()` checked a sample; the peer is not held to a ping
            // that was not sent.
            Ok(Some(_)) => {
                self.hb.ping_skipped(now);
                None
            }
            Err(_) => {
                let until = now + config.close_timeout();
                self.close_with(Cause::AppPanicked, until);
                None
            }
        }
    }

    /// Sends the reply to the peer's application ping that waited for the
    /// write side; returns whether it did.
    fn send_waiting_reply(&mut self) -> bool {
        if self.write.dirty() {
            return false;
        }
        match self.write.reply.take() {
            Some(reply) => {
                self.start_send(*reply);
                true
            }
            None => false,
        }
    }
}

/// What tungstenite's stream yields.
type WsResult<T> = Result<T, WsError>;

/// One read of `ws` as the driver makes it: the stream's own read first
/// (`take`: a data message comes without a pass through tungstenite),
/// anything else tungstenite's; and the pong the stream took aside on the
/// way (`take_pong`), which comes before what was read, as it was read
/// first.
pub(crate) fn read_next<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    take: fn(&mut S, &mut Context<'_>) -> Poll<Taken>,
    take_pong: fn(&mut S) -> Option<[u8; 8]>,
    cx: &mut Context<'_>,
) -> (Option<[u8; 8]>, Poll<Option<WsResult<Message>>>) {
    let read = match take(ws.get_mut(), cx) {
        Poll::Ready(Taken::Message(message)) => Poll::Ready(Some(Ok(message))),
        Poll::Ready(Taken::Pass) => Pin::new(&mut *ws).poll_next(cx),
        Poll::Pending => Poll::Pending,
    };
    (take_pong(ws.get_mut()), read)
}

/// What carries a ping's nonce to the peer.
enum Ping {
    /// A ping frame with this payload.
    Frame([u8; 8]),
    /// The application-level probe.
    Probe(Message),
}

/// A driver dropped before its connection ended: the runtime dropped the
/// task (the process is exiting without a shutdown), or our own code
/// panicked. Without a panic, the peer is told with a best-effort Close
/// (written if the socket takes it at once, never waited for): 1001
/// "runtime stopped", or during a shutdown the shutdown's own code
/// (`drain_close_code`); the verdict says so, and the guard then runs the
/// hooks.
impl<S: AsyncRead + AsyncWrite + Unpin> Drop for Driver<S> {
    fn drop(&mut self) {
        self.shared.unregister_driver();
        // The application gets what was read, then `None`; its senders get
        // `is_closed`.
        let waiting = self.shared.end_inbox();
        self.shared.close_outbox();
        // A message handler gets what was read too (its replies fail).
        if let Some(handler) = self.to_app.handler.take().or(waiting) {
            let limit = self.state.config().write_buffer_limit();
            run_leftovers(&self.shared, handler, self.guard.id(), limit);
        }
        if self.phase == Phase::Done || std::thread::panicking() {
            return;
        }
        let cause = fallback_cause(self.state.shutdown_code(), false);
        let Some(frame) = close_frame(&cause) else {
            return;
        };
        let text = frame.reason.to_string();
        if self.phase == Phase::Open {
            let code = frame.code;
            if Pin::new(&mut self.ws)
                .start_send(Message::Close(Some(frame)))
                .is_ok()
            {
                self.guard.verdict.sent(Some(code));
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let _ = Pin::new(&mut self.ws).poll_flush(&mut cx);
            }
        }
        self.guard.verdict.record(cause, text, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::ConnSpan;
    use tokio::io::DuplexStream;

    /// The size of what `f` returns, without calling it.
    fn output_size<A, F>(_: fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What `Supervisor::register` spawns: the driver's future in its span.
    fn spawned((driver, span): (Driver<DuplexStream>, ConnSpan)) -> impl Future<Output = ()> {
        span.instrument(driver.run())
    }

    // The wiring the pings past tungstenite depend on: a server's read
    // layer takes the driver's ping frames, a stream built elsewhere does
    // not (its pings go through tungstenite).
    #[test]
    fn a_servers_read_layer_takes_the_drivers_pings_and_no_other_stream_does() {
        let (io, _peer) = tokio::io::duplex(64);
        let mut layer = ReadLayer::new(io, &crate::Config::default());
        let probe = Probe::read_layer();
        (probe.drive)(&mut layer, 1 << 20);
        assert!((probe.queue_ping)(&mut layer, [1; 8]));
        let (mut io, _peer) = tokio::io::duplex(64);
        assert!(!(Probe::<DuplexStream>::none().queue_ping)(&mut io, [1; 8]));
    }

    // The promise of the `tracing` feature: off, the span is nothing and the
    // task spawned per connection is the driver's own future, byte for byte.
    #[test]
    #[cfg(not(feature = "tracing"))]
    fn without_tracing_the_task_is_the_driver_future() {
        assert_eq!(std::mem::size_of::<ConnSpan>(), 0);
        assert_eq!(
            output_size(spawned),
            output_size(Driver::<DuplexStream>::run)
        );
    }

    // On, the task grows by the span handle alone; `Core` (every field of a
    // connection but the socket) holds no span in either build.
    #[test]
    #[cfg(feature = "tracing")]
    fn with_tracing_the_task_grows_by_the_span_alone() {
        assert_eq!(
            output_size(spawned),
            output_size(Driver::<DuplexStream>::run) + std::mem::size_of::<tracing::Span>()
        );
    }
}
