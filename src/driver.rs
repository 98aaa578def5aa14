//! The per-connection task: frames, pings, deadlines. See [`Driver`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::task::{Context, Poll};

use futures::{FutureExt, Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_util::sync::PollSender;

use crate::close::{Cause, CloseEvent, CloseReason, Initiator, classify, code_for_error};
use crate::connection::{Command, ConnectionId, Inbound, Outbound, Shared};
use crate::error::Error;
use crate::heartbeat::{Heartbeat, Pong};
use crate::metrics::secs;
use crate::supervisor::{Inner, Slot};
use crate::trace;

/// Most loop turns in one poll before yielding to other tasks.
const BUDGET: usize = 32;
/// Most application messages written between two flushes.
const BATCH: usize = 16;
/// Most passes that may keep reading after the pong deadline passed, before
/// the timeout is declared anyway.
const MAX_OVERDUE_READS: u32 = 64;

/// One connection's task: owns the socket and wires the heartbeat, the close
/// classification and the hooks together. Policy lives in those modules.
pub(crate) struct Driver<S> {
    ws: WebSocketStream<S>,
    core: Core,
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Messages flow; the heartbeat runs.
    Open,
    /// A Close was sent or received; we read until the handshake ends or
    /// `until`, and take no more application messages.
    Closing { until: Instant },
    /// A fatal error: we flush a best-effort Close until `until`, then stop.
    Draining { until: Instant },
    /// Nothing left to do: drop the transport and run the hooks.
    Done,
}

/// Wake-up sources whose future or queue currently holds our waker.
#[derive(Debug, Default)]
struct Registered {
    shutdown: bool,
    app_gone: bool,
    /// The application dropped its `Connection` (acted on once the
    /// commands it queued before are written).
    app_gone_fired: bool,
    outbound: bool,
}

/// The first final cause, as it will be reported.
#[derive(Debug)]
struct Outcome {
    reason: CloseReason,
    initiator: Initiator,
    text: String,
    error: Option<Error>,
    /// An application close: final once the handshake ends, but replaced by
    /// `Timeout` if the peer never answers it.
    provisional: bool,
}

/// Everything but the socket. Its `Drop` runs the hooks if the task ends
/// without doing so (a panic in our code, or the runtime shutting down), so
/// every admitted connection gets exactly one hook call.
struct Core {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    id: ConnectionId,
    peer_addr: Option<SocketAddr>,
    hb: Heartbeat,
    phase: Phase,
    /// To the application's [`Connection`](crate::Connection).
    inbound: mpsc::Sender<Inbound>,
    /// A message the full inbound queue could not take yet, with the sender
    /// that waits for room. While it is set we do not read.
    stash: Option<(Inbound, PollSender<Inbound>)>,
    /// From the application's [`Sender`](crate::Sender)s.
    outbound: mpsc::Receiver<Outbound>,
    /// `outbound` was closed on leaving [`Phase::Open`].
    outbound_closed: bool,
    /// Which wake-up sources hold our waker (see `poll`).
    registered: Registered,
    /// The last read attempt found nothing buffered (or reading is paused):
    /// a pong the peer already sent cannot be sitting unread.
    read_idle: bool,
    /// Passes in a row that found the pong deadline expired while inbound
    /// frames were still being read (see `on_timers`).
    overdue_reads: u32,
    /// Bytes were handed to tungstenite and not yet flushed.
    dirty: bool,
    /// Since when the write side has been blocked (`None`: it is not).
    blocked_since: Option<Instant>,
    outcome: Option<Outcome>,
    code_sent: Option<CloseCode>,
    code_received: Option<CloseCode>,
    /// Held until the hooks have run.
    slot: Option<Slot>,
    /// The hooks ran (or the driver was abandoned before starting).
    fired: bool,
}

impl<S> Driver<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        ws: WebSocketStream<S>,
        inner: Arc<Inner>,
        shared: Arc<Shared>,
        id: ConnectionId,
        peer_addr: Option<SocketAddr>,
        inbound: mpsc::Sender<Inbound>,
        outbound: mpsc::Receiver<Outbound>,
        slot: Slot,
    ) -> Self {
        let config = &inner.config;
        // Uniform in [0, 1), from the per-supervisor random seed.
        let unit = (inner.random(id, 0) >> 11) as f64 / (1u64 << 53) as f64;
        let hb = Heartbeat::new(
            inner.epoch,
            shared.opened,
            config.ping_interval(),
            config.pong_timeout(),
            config.ping_jitter(),
            unit,
            config.liveness(),
            inner.random(id, 1),
        );
        Self {
            ws,
            core: Core {
                inner,
                shared,
                id,
                peer_addr,
                hb,
                phase: Phase::Open,
                inbound,
                stash: None,
                outbound,
                outbound_closed: false,
                registered: Registered::default(),
                read_idle: true,
                overdue_reads: 0,
                dirty: false,
                blocked_since: None,
                outcome: None,
                code_sent: None,
                code_received: None,
                slot: Some(slot),
                fired: false,
            },
        }
    }

    /// Drops a driver that was never spawned, without running hooks.
    pub(crate) fn abandon(mut self) {
        self.core.fired = true;
    }

    /// Drives the connection to its end, then runs the hooks.
    pub(crate) async fn run(self) {
        let Driver { mut ws, mut core } = self;
        trace::opened();
        {
            let sleep = tokio::time::sleep_until(core.hb.next_wakeup());
            let shutdown = core.inner.cancel.clone().cancelled_owned().fuse();
            let probe = core.inbound.clone();
            let app_gone = probe.closed().fuse();
            tokio::pin!(sleep, shutdown, app_gone);
            std::future::poll_fn(|cx| {
                core.poll(
                    cx,
                    &mut ws,
                    sleep.as_mut(),
                    shutdown.as_mut(),
                    app_gone.as_mut(),
                )
            })
            .await;
        }
        // The transport goes first: the hooks see a closed connection.
        drop(ws);
        core.finish();
    }
}

impl Core {
    // ===== the poll loop =====

    fn poll<S, F1, F2>(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut WebSocketStream<S>,
        mut sleep: Pin<&mut Sleep>,
        mut shutdown: Pin<&mut F1>,
        mut app_gone: Pin<&mut F2>,
    ) -> Poll<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
        F1: Future<Output = ()>,
        F2: Future<Output = ()>,
    {
        for _ in 0..BUDGET {
            let now = Instant::now();
            let mut progress = false;

            // The shutdown and app-gone futures keep their waker once a poll
            // returned Pending, until they fire, and each has a flag set
            // before it fires: once registered, poll them only when the flag
            // says they are ready. (This loop runs on every heartbeat of
            // every connection, and each of those polls takes a lock.)
            if self.phase != Phase::Done
                && (!self.registered.shutdown || self.inner.shutting_down.load(Acquire))
            {
                if shutdown.as_mut().poll(cx).is_ready() {
                    self.on_shutdown(ws, now);
                    progress = true;
                } else {
                    self.registered.shutdown = true;
                }
            }
            // What the application queued before dropping its `Connection`
            // (messages, a Close with its own code) goes out first.
            if self.phase == Phase::Open {
                if !self.registered.app_gone_fired
                    && (!self.registered.app_gone || self.shared.app_gone.load(Acquire))
                {
                    if app_gone.as_mut().poll(cx).is_ready() {
                        self.registered.app_gone_fired = true;
                        // Write what was queued, but take nothing new: other
                        // `Sender`s must not keep a dropped connection open.
                        self.outbound.close();
                    } else {
                        self.registered.app_gone = true;
                    }
                }
                if self.registered.app_gone_fired && self.outbound.is_empty() {
                    self.on_app_gone(ws, now);
                    progress = true;
                }
            }
            progress |= self.poll_stash(cx, now);
            progress |= self.poll_read(cx, ws, now);
            progress |= self.poll_commands(cx, ws, now);
            progress |= self.poll_flush(cx, ws, now);
            progress |= self.on_timers(ws, now);

            if self.phase != Phase::Open && !self.outbound_closed {
                // Senders now get `is_closed` errors instead of a silent drop.
                self.outbound.close();
                self.outbound_closed = true;
            }
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

    /// The next instant at which a timer needs us.
    fn next_deadline(&self) -> Instant {
        match self.phase {
            Phase::Open => {
                let mut at = self.hb.next_wakeup();
                if let Some(since) = self.blocked_since {
                    at = at.min(since + self.inner.config.write_timeout());
                }
                at
            }
            Phase::Closing { until } | Phase::Draining { until } => until,
            // Not polled again once done.
            Phase::Done => Instant::now(),
        }
    }

    // ===== inbound =====

    /// Waits for room for the stashed message; returns whether it moved.
    fn poll_stash(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let Some((_, sender)) = &mut self.stash else {
            return false;
        };
        match sender.poll_reserve(cx) {
            Poll::Pending => false,
            Poll::Ready(result) => {
                let (message, mut sender) = self.stash.take().expect("checked above");
                if result.is_ok() {
                    // Cannot fail after a successful reserve, and if the
                    // application just dropped its receiver, `app_gone` sees it.
                    let _ = sender.send_item(message);
                }
                self.hb.resume(now);
                true
            }
        }
    }

    fn poll_read<S>(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut WebSocketStream<S>,
        now: Instant,
    ) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // A stash pauses reading only while open: once closing we must read
        // the peer's Close reply, and data is dropped from then on anyway.
        let paused = self.stash.is_some() && self.phase == Phase::Open;
        let reading = matches!(self.phase, Phase::Open | Phase::Closing { .. });
        self.read_idle = true;
        if !reading || paused {
            return false;
        }
        self.read_idle = false;
        match Pin::new(&mut *ws).poll_next(cx) {
            // A Pending from tokio's cooperative budget says nothing about
            // the socket: frames (a pong) may still wait behind it.
            Poll::Pending => {
                self.read_idle = tokio::task::coop::has_budget_remaining();
                false
            }
            Poll::Ready(Some(Ok(message))) => {
                self.on_message(message, now);
                true
            }
            Poll::Ready(Some(Err(e))) => {
                self.on_read_error(ws, e, now);
                true
            }
            Poll::Ready(None) => {
                // The close handshake completed (or the stream was already
                // ended by an error we handled).
                self.record(Cause::TransportEnded, String::new(), None);
                self.phase = Phase::Done;
                true
            }
        }
    }

    fn on_message(&mut self, message: Message, now: Instant) {
        self.shared.touch(now);
        match message {
            Message::Text(_) | Message::Binary(_) => {
                self.hb.on_frame(now);
                let metrics = &self.inner.metrics;
                metrics.messages_received.increment(1);
                metrics.bytes_received.increment(message.len() as u64);
                self.deliver(message);
            }
            Message::Ping(_) => {
                self.hb.on_frame(now);
                // tungstenite queued the pong: get it on the wire now.
                self.dirty = true;
            }
            Message::Pong(payload) => {
                let metrics = &self.inner.metrics;
                metrics.pongs_received.increment(1);
                match self.hb.on_pong(now, &payload) {
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
            Message::Close(frame) => {
                self.hb.on_frame(now);
                let (code, text) = match frame {
                    Some(f) => (Some(f.code), f.reason.to_string()),
                    None => (None, String::new()),
                };
                self.code_received = code;
                if self.code_sent.is_none() && self.phase == Phase::Open {
                    // tungstenite echoes a valid code and answers an invalid one with 1002.
                    self.code_sent = code.map(|c| {
                        if c.is_allowed() {
                            c
                        } else {
                            CloseCode::Protocol
                        }
                    });
                }
                self.record(Cause::PeerClose(code), text, None);
                // tungstenite queued the Close reply; flush it, then read on
                // until the peer ends the transport (or we time out).
                self.dirty = true;
                if self.phase == Phase::Open {
                    self.phase = Phase::Closing {
                        until: now + self.inner.config.close_timeout(),
                    };
                }
            }
            Message::Frame(_) => {}
        }
    }

    /// Hands a data message to the application, or stashes it and stops
    /// reading when the inbound queue is full.
    fn deliver(&mut self, message: Message) {
        match self.inbound.try_send(Box::new(message)) {
            Ok(()) => {}
            Err(TrySendError::Full(message)) if self.phase == Phase::Open => {
                self.hb.suspend();
                self.stash = Some((message, PollSender::new(self.inbound.clone())));
            }
            // Closing, or the application is gone: nobody will read it.
            Err(_) => {}
        }
    }

    fn on_read_error<S>(&mut self, ws: &mut WebSocketStream<S>, e: WsError, now: Instant)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let code = code_for_error(&e);
        self.record_error(e);
        match code {
            Some(code) if self.phase == Phase::Open => {
                let text = match code {
                    CloseCode::Size => "message too big",
                    CloseCode::Invalid => "invalid data",
                    _ => "protocol error",
                };
                self.fail_with_close(ws, code, text, now);
            }
            _ => self.phase = Phase::Done,
        }
    }

    // ===== outbound =====

    fn poll_commands<S>(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut WebSocketStream<S>,
        now: Instant,
    ) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut progress = false;
        for _ in 0..BATCH {
            if self.phase != Phase::Open {
                break;
            }
            match Pin::new(&mut *ws).poll_ready(cx) {
                Poll::Pending => {
                    self.blocked_since.get_or_insert(now);
                    break;
                }
                Poll::Ready(Err(e)) => {
                    self.on_write_error(e);
                    return true;
                }
                // Ready to take a message is not "flushed": tungstenite may
                // still hold control frames it could not write.
                Poll::Ready(Ok(())) if !self.dirty => self.blocked_since = None,
                Poll::Ready(Ok(())) => {}
            }
            // An empty queue that holds our waker (from a Pending poll)
            // needs no poll: a send pushes, then wakes us.
            if self.registered.outbound && self.outbound.is_empty() {
                break;
            }
            self.registered.outbound = false;
            match self.outbound.poll_recv(cx).map(|c| c.map(|c| *c)) {
                Poll::Ready(Some(Command::Send(message))) => {
                    progress = true;
                    let metrics = &self.inner.metrics;
                    metrics.messages_sent.increment(1);
                    metrics.bytes_sent.increment(message.len() as u64);
                    self.write(ws, message);
                }
                Poll::Ready(Some(Command::Close(frame))) => {
                    progress = true;
                    let code = frame.as_ref().map(|f| f.code);
                    let text = frame
                        .as_ref()
                        .map_or_else(String::new, |f| f.reason.to_string());
                    self.record(Cause::AppClose(code), text, None);
                    let until = now + self.inner.config.close_timeout();
                    self.send_close(ws, frame, until);
                }
                Poll::Pending => {
                    // A Pending from tokio's cooperative budget registered
                    // nothing (the task was woken to run again instead):
                    // only a Pending with budget left holds our waker.
                    self.registered.outbound = tokio::task::coop::has_budget_remaining();
                    break;
                }
                // Every sender is gone, including the `Connection`'s own:
                // `app_gone` handles it.
                Poll::Ready(None) => break,
            }
        }
        progress
    }

    /// Hands `message` to tungstenite; a failure ends the connection.
    fn write<S>(&mut self, ws: &mut WebSocketStream<S>, message: Message)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match Pin::new(ws).start_send(message) {
            Ok(()) => self.dirty = true,
            Err(e) => self.on_write_error(e),
        }
    }

    fn poll_flush<S>(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut WebSocketStream<S>,
        now: Instant,
    ) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if !self.dirty || self.phase == Phase::Done {
            return false;
        }
        match Pin::new(&mut *ws).poll_flush(cx) {
            Poll::Pending => {
                self.blocked_since.get_or_insert(now);
                false
            }
            Poll::Ready(Ok(())) => {
                self.dirty = false;
                self.blocked_since = None;
                if matches!(self.phase, Phase::Draining { .. }) {
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
                self.record(Cause::TransportEnded, String::new(), None);
            }
            // Only control frames can overflow (data is checked by `Sender`):
            // the peer stopped reading long enough to fill the buffer.
            WsError::WriteBufferFull(_) => {
                self.record(
                    Cause::WriteStalled,
                    String::new(),
                    Some(Error::transport(e)),
                );
            }
            e => self.record_error(e),
        }
        self.phase = Phase::Done;
    }

    // ===== closing =====

    /// Queues our Close (if the protocol still allows one) and waits for
    /// the handshake until `until`.
    fn send_close<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        frame: Option<CloseFrame>,
        until: Instant,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.code_sent = frame.as_ref().map(|f| f.code);
        self.write(ws, Message::Close(frame));
        if self.phase != Phase::Done {
            self.phase = Phase::Closing { until };
        }
    }

    /// Ends the connection for a local failure: a best-effort Close, flushed
    /// within the write timeout, then the transport is dropped.
    fn fail_with_close<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        code: CloseCode,
        text: &str,
        now: Instant,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.code_sent = Some(code);
        let frame = CloseFrame {
            code,
            reason: text.into(),
        };
        self.write(ws, Message::Close(Some(frame)));
        if self.phase != Phase::Done {
            self.phase = Phase::Draining {
                until: now + self.inner.config.write_timeout(),
            };
        }
    }

    fn on_shutdown<S>(&mut self, ws: &mut WebSocketStream<S>, now: Instant)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let deadline = self.inner.shutdown_deadline.get().copied().unwrap_or(now);
        match self.phase {
            Phase::Open => {
                self.record(Cause::Shutdown, "server shutting down".into(), None);
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: "server shutting down".into(),
                };
                self.send_close(ws, Some(frame), deadline);
            }
            // Already closing: the grace period caps the wait.
            Phase::Closing { until } => {
                self.phase = Phase::Closing {
                    until: until.min(deadline),
                }
            }
            Phase::Draining { until } => {
                self.phase = Phase::Draining {
                    until: until.min(deadline),
                }
            }
            Phase::Done => {}
        }
    }

    fn on_app_gone<S>(&mut self, ws: &mut WebSocketStream<S>, now: Instant)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let until = now + self.inner.config.close_timeout();
        if self.shared.app_panicked.load(Relaxed) {
            let text = "application panicked";
            self.record(Cause::AppPanicked, text.into(), None);
            let frame = CloseFrame {
                code: CloseCode::Error,
                reason: text.into(),
            };
            self.send_close(ws, Some(frame), until);
        } else {
            self.record(Cause::AppDropped, String::new(), None);
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            self.send_close(ws, Some(frame), until);
        }
    }

    // ===== timers =====

    /// Acts on every deadline that has passed; returns whether any did.
    fn on_timers<S>(&mut self, ws: &mut WebSocketStream<S>, now: Instant) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match self.phase {
            Phase::Open => {
                if self.hb.is_expired(now)
                    && !self.read_idle
                    && self.overdue_reads < MAX_OVERDUE_READS
                {
                    // Frames are still waiting to be read, and the pong may
                    // be among them: read on before blaming the peer (bounded,
                    // so a flood cannot postpone the verdict forever; turns
                    // that could not read for lack of budget do not count).
                    if tokio::task::coop::has_budget_remaining() {
                        self.overdue_reads += 1;
                    }
                    return false;
                }
                self.overdue_reads = 0;
                if self.hb.is_expired(now) {
                    let silent = now.saturating_duration_since(self.hb.last_inbound());
                    self.inner.metrics.detection.record(secs(silent));
                    self.record(Cause::PongTimeout, "ping timeout".into(), None);
                    self.fail_with_close(ws, CloseCode::Error, "ping timeout", now);
                    return true;
                }
                if self
                    .blocked_since
                    .is_some_and(|since| now >= since + self.inner.config.write_timeout())
                {
                    // The write side is stuck: a Close could not get out either.
                    self.record(Cause::WriteStalled, "write timeout".into(), None);
                    self.phase = Phase::Done;
                    return true;
                }
                if let Some(payload) = self.hb.ping_due(now) {
                    let ping = Message::Ping(Bytes::copy_from_slice(&payload));
                    match Pin::new(&mut *ws).start_send(ping) {
                        Ok(()) => {
                            self.dirty = true;
                            self.hb.ping_sent(now);
                            self.inner.metrics.pings_sent.increment(1);
                            self.shared.publish(&self.hb.stats());
                            trace::ping_sent();
                        }
                        // Our write buffer is full: the write timeout judges
                        // that; the peer is not held to a ping it never got.
                        Err(WsError::WriteBufferFull(_)) => self.hb.ping_skipped(now),
                        Err(e) => self.on_write_error(e),
                    }
                    return true;
                }
                false
            }
            Phase::Closing { until } if now >= until => {
                if self.is_shutting_down(now) {
                    self.inner.forced.fetch_add(1, Relaxed);
                }
                self.record(Cause::CloseHandshakeTimeout, String::new(), None);
                self.phase = Phase::Done;
                true
            }
            Phase::Draining { until } if now >= until => {
                if self.is_shutting_down(now) {
                    self.inner.forced.fetch_add(1, Relaxed);
                }
                self.phase = Phase::Done;
                true
            }
            _ => false,
        }
    }

    fn is_shutting_down(&self, now: Instant) -> bool {
        self.inner
            .shutdown_deadline
            .get()
            .is_some_and(|&deadline| now >= deadline)
    }

    // ===== the end =====

    /// Keeps the first final cause (see `docs/close-reasons.md`).
    fn record(&mut self, cause: Cause<'_>, text: String, error: Option<Error>) {
        let overrides = matches!(cause, Cause::CloseHandshakeTimeout);
        let provisional = matches!(cause, Cause::AppClose(_));
        self.settle(classify(&cause), provisional, overrides, text, error);
    }

    /// [`record`](Self::record) for an error, which the event keeps.
    fn record_error(&mut self, e: WsError) {
        let class = classify(&Cause::Failed(&e));
        self.settle(
            class,
            false,
            false,
            String::new(),
            Some(Error::transport(e)),
        );
    }

    fn settle(
        &mut self,
        (reason, initiator): (CloseReason, Initiator),
        provisional: bool,
        overrides: bool,
        text: String,
        error: Option<Error>,
    ) {
        let text = match self.outcome.take() {
            None => text,
            // A stalled application close becomes a timeout, and keeps the
            // text it sent.
            Some(previous) if previous.provisional && overrides => previous.text,
            // Otherwise the first cause wins; anything the peer does after
            // an application close (its Close reply, EOF, a reset) ends the
            // handshake and makes the application's reason final.
            Some(mut previous) => {
                previous.provisional = false;
                self.outcome = Some(previous);
                return;
            }
        };
        self.outcome = Some(Outcome {
            reason,
            initiator,
            text,
            error,
            provisional,
        });
    }

    /// Runs the hooks once, then releases the connection's slot.
    fn finish(&mut self) {
        if self.fired {
            return;
        }
        self.fired = true;
        let outcome = self.outcome.take().unwrap_or_else(|| {
            // The task ended without a cause: our own code panicked, or the
            // runtime is dropping the task.
            let cause = if self.inner.cancel.is_cancelled() {
                Cause::Shutdown
            } else {
                Cause::AppPanicked
            };
            let (reason, initiator) = classify(&cause);
            Outcome {
                reason,
                initiator,
                text: String::new(),
                error: None,
                provisional: false,
            }
        });
        let stats = self.shared.stats();
        let event = CloseEvent {
            id: self.id,
            peer_addr: self.peer_addr,
            reason: outcome.reason,
            initiator: outcome.initiator,
            code_sent: self.code_sent,
            code_received: self.code_received,
            text: outcome.text,
            duration: self.shared.opened.elapsed(),
            stats,
            error: outcome.error,
        };
        // Logged before the hooks run, so a hook that hangs or panics
        // cannot hide how the connection ended.
        trace::closed(&event);
        let inner = &*self.inner;
        let metrics = &inner.metrics;
        // Hooks are synchronous: real time, not tokio's (possibly paused) clock.
        let started = std::time::Instant::now();
        let panics = inner.hooks.run(&event);
        metrics.hook_duration.record(secs(started.elapsed()));
        if panics > 0 {
            inner.hook_panics.fetch_add(panics, Relaxed);
            metrics.hook_panics.increment(panics);
            trace::hooks_panicked(event.id, panics);
        }
        inner.closed[event.reason.index()].fetch_add(1, Relaxed);
        metrics.closed(event.reason, event.initiator);
        metrics.lifetime.record(secs(event.duration));
        // The live count and gauge change here and only here (and once, at
        // registration), next to the hooks: they return exactly to zero.
        let remaining = inner.live.fetch_sub(1, Relaxed) - 1;
        metrics.connections.decrement(1.0);
        if inner.shutdown_deadline.get().is_some() {
            // Set, not decremented: exact even for a connection that ended
            // while `shutdown` was taking its first reading.
            metrics.shutdown_remaining.set(remaining as f64);
        }
        self.slot = None;
        self.shared.finish(event);
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.finish();
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
