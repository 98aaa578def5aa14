//! The supervisor handle: accept, connect, supervise, shut down. See [`Supervisor`].

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::close::CloseReason;
use crate::config::Config;
use crate::connection::{ConnInfo, Connection, ConnectionId, Sender, Shared};
use crate::driver::Driver;
use crate::error::{Error, HandshakeFailure};
use crate::hook::{CloseHook, Hooks};
use crate::metrics::Metrics;

/// Supervises WebSocket connections: pings each peer on a schedule, holds it
/// to a pong deadline, and runs the close hooks exactly once per connection
/// with a categorized [`CloseReason`].
///
/// A cheap handle: clones share the same connections, hooks and counters.
/// Each connection is driven by its own task (tracked by a
/// [`TaskTracker`], stopped through a [`CancellationToken`]), so pings go out
/// and deadlines fire even while the application is busy elsewhere.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use ws_supervisor::{CloseEvent, CloseReason, Config, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let supervisor = Supervisor::builder(Config::default())
///     .on_close(|event: &CloseEvent| {
///         println!("{} closed: {} ({})", event.id, event.reason, event.initiator);
///     })
///     .build();
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let addr = listener.local_addr()?;
/// # let client = tokio::spawn(async move {
/// #     use futures::{SinkExt, StreamExt};
/// #     let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await.unwrap();
/// #     ws.send("hi".into()).await.unwrap();
/// #     assert_eq!(ws.next().await.unwrap().unwrap(), "hi".into());
/// #     ws.close(None).await.unwrap();
/// #     while let Some(Ok(_)) = ws.next().await {}
/// # });
/// let (tcp, peer) = listener.accept().await?;
/// let mut conn = supervisor.accept(tcp).peer_addr(peer).await?;
/// while let Some(message) = conn.recv().await {
///     conn.send(message).await?; // echo
/// }
/// let event = conn.closed().await;
/// assert_eq!(event.reason, CloseReason::Normal);
///
/// supervisor.shutdown(Duration::from_secs(5)).await;
/// # client.await?;
/// # Ok(())
/// # }
/// ```
///
/// # Comparison to TCP keepalive and tungstenite's automatic pong
///
/// TCP keepalive probes the kernel, not the application: a peer whose
/// process is stopped, or whose event loop is wedged, still ACKs them, and
/// the defaults wait two hours. tungstenite answers pings automatically but
/// only while someone polls the stream, never sends pings itself, and
/// reports a peer that vanished as `ResetWithoutClosingHandshake` — or not at
/// all, if no one reads. The supervisor sends its own pings from its own
/// task, matches each pong to its ping, and turns every way a connection can
/// end into one [`CloseReason`].
#[derive(Clone)]
pub struct Supervisor {
    pub(crate) inner: Arc<Inner>,
}

/// State shared by the handle and every driver task.
pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) hooks: Hooks,
    pub(crate) tracker: TaskTracker,
    pub(crate) cancel: CancellationToken,
    /// Set by `shutdown` before it cancels: when forced closes happen.
    pub(crate) shutdown_deadline: OnceLock<Instant>,
    /// Guards "not shutting down" + spawn against `shutdown` (see `register`).
    closing: Mutex<bool>,
    /// Set with `closing`, before `cancel` fires: a lock-free "shutting down"
    /// for `reserve`, and lets drivers skip polling `cancel` until then.
    pub(crate) shutting_down: AtomicBool,
    next_id: AtomicU64,
    /// Connections whose driver runs (changed only where the hooks run).
    pub(crate) live: AtomicUsize,
    /// Slots held for `max_connections`, including handshakes under way.
    slots: AtomicUsize,
    accepted: AtomicU64,
    pub(crate) closed: [AtomicU64; CloseReason::ALL.len()],
    pub(crate) forced: AtomicU64,
    handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Handshakes in flight per peer IP, when `max_handshakes_per_ip` is set.
    peers: Mutex<HashMap<IpAddr, usize>>,
    pub(crate) hook_panics: AtomicU64,
    /// Handles registered at build time (see `metrics.rs`).
    pub(crate) metrics: Metrics,
    /// Random per supervisor: mixes ids into ping phases and nonce keys.
    seed: RandomState,
    /// Origin of the ping slots of every connection (see `heartbeat.rs`).
    pub(crate) epoch: Instant,
}

impl Inner {
    /// Counts a failed handshake and returns its error.
    pub(crate) fn fail_handshake(
        &self,
        cause: HandshakeFailure,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        self.handshake_failures[cause.index()].fetch_add(1, Relaxed);
        self.metrics.handshake_failed(cause);
        Error::handshake(cause, source)
    }

    /// Counts a handshake in flight from `peer`'s address against
    /// `max_handshakes_per_ip`, until the guard drops. `Ok(None)` when there
    /// is no cap or no address.
    pub(crate) fn enter_handshake(
        self: &Arc<Self>,
        peer: Option<SocketAddr>,
    ) -> Result<Option<PeerGuard>, HandshakeFailure> {
        let (Some(max), Some(peer)) = (self.config.max_handshakes_per_ip(), peer) else {
            return Ok(None);
        };
        let ip = peer.ip();
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = peers.entry(ip).or_insert(0);
        if *n >= max {
            return Err(HandshakeFailure::PeerLimit);
        }
        *n += 1;
        Ok(Some(PeerGuard {
            inner: self.clone(),
            ip,
        }))
    }

    /// A pseudo-random `u64` for connection `id` and `purpose`.
    pub(crate) fn random(&self, id: ConnectionId, purpose: u8) -> u64 {
        self.seed.hash_one((id.0, purpose))
    }
}

/// One handshake in flight from `ip`, counted until dropped (see
/// [`Inner::enter_handshake`]).
pub(crate) struct PeerGuard {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = peers.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

impl fmt::Debug for PeerGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerGuard").field("ip", &self.ip).finish()
    }
}

/// A slot counted against `max_connections`, released on drop.
pub(crate) struct Slot(Arc<Inner>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.slots.fetch_sub(1, Relaxed);
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Slot")
    }
}

/// Builds a [`Supervisor`] with its close hooks.
#[must_use]
pub struct SupervisorBuilder {
    config: Config,
    hooks: Hooks,
    labels: Vec<(String, String)>,
}

impl SupervisorBuilder {
    /// Adds a close hook; hooks run in the order they were added.
    pub fn on_close(mut self, hook: impl CloseHook) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// Adds a constant label to every metric of this supervisor, e.g.
    /// `("supervisor", "chat")`, to tell two supervisors of one process
    /// apart. Keep the values few and fixed: never a connection, user or
    /// address (see `docs/metrics.md`).
    pub fn metric_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Builds the supervisor and registers its metrics with the recorder
    /// installed now (install it first; see `docs/metrics.md`).
    pub fn build(self) -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                config: self.config,
                hooks: self.hooks,
                tracker: TaskTracker::new(),
                cancel: CancellationToken::new(),
                shutdown_deadline: OnceLock::new(),
                closing: Mutex::new(false),
                shutting_down: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                live: AtomicUsize::new(0),
                slots: AtomicUsize::new(0),
                accepted: AtomicU64::new(0),
                closed: Default::default(),
                forced: AtomicU64::new(0),
                handshake_failures: Default::default(),
                peers: Mutex::default(),
                hook_panics: AtomicU64::new(0),
                metrics: Metrics::register(&self.labels),
                seed: RandomState::new(),
                epoch: Instant::now(),
            }),
        }
    }
}

impl fmt::Debug for SupervisorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorBuilder")
            .field("config", &self.config)
            .field("hooks", &self.hooks)
            .field("labels", &self.labels)
            .finish()
    }
}

impl Supervisor {
    /// A supervisor with `config` and no close hook.
    pub fn new(config: Config) -> Self {
        Self::builder(config).build()
    }

    /// Starts a builder, to register close hooks.
    pub fn builder(config: Config) -> SupervisorBuilder {
        SupervisorBuilder {
            config,
            hooks: Hooks::default(),
            labels: Vec::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The state shared with the drivers, for the ways in.
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Supervises a WebSocket someone else built (a handshake of your own,
    /// another framework). `peer_addr` is reported in events if known.
    ///
    /// **It keeps the stream's own config.** tokio-tungstenite cannot change
    /// a stream's config after it is built, so whatever the stream was built
    /// with stays in force: built with tungstenite's defaults it holds a
    /// 128 KiB read buffer (about 135 KiB per idle connection instead of
    /// 5.9 KiB), accepts 64 MiB messages and has an unbounded write buffer.
    /// The supervisor's heartbeat, deadlines, queues, close rules and metrics
    /// apply all the same. To get the same limits and memory as
    /// [`accept`](Self::accept), build the stream with a
    /// [`ReadLayer`](crate::ReadLayer) and
    /// [`Config::websocket_config`] (the example there shows how). For
    /// hyper and axum, use `upgrade` (feature `hyper`) or the `axum`
    /// extractor instead, which do this for you.
    ///
    /// # Errors
    /// [`HandshakeFailure::AtCapacity`] or
    /// [`HandshakeFailure::ShuttingDown`]: the socket is sent a Close (1013
    /// or 1001) within the close timeout and dropped; no hook runs.
    ///
    /// # Cancel safety
    /// Not cancel safe when refusing: dropping the future drops the socket
    /// before the Close is flushed. When admitted it completes immediately.
    pub async fn supervise<S>(
        &self,
        mut ws: WebSocketStream<S>,
        peer_addr: Option<SocketAddr>,
    ) -> Result<Connection, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self.reserve() {
            Ok(slot) => self.register(ws, peer_addr, slot, ConnInfo::default()),
            Err(cause) => {
                let code = match cause {
                    HandshakeFailure::AtCapacity => CloseCode::Again,
                    _ => CloseCode::Away,
                };
                let frame = CloseFrame {
                    code,
                    reason: cause.as_str().into(),
                };
                let _ =
                    tokio::time::timeout(self.inner.config.close_timeout(), ws.close(Some(frame)))
                        .await;
                Err(self.inner.fail_handshake(cause, None))
            }
        }
    }

    /// Takes a slot for one connection, if allowed.
    pub(crate) fn reserve(&self) -> Result<Slot, HandshakeFailure> {
        if self.is_shutting_down() {
            return Err(HandshakeFailure::ShuttingDown);
        }
        let max = self.inner.config.max_connections().unwrap_or(usize::MAX);
        self.inner
            .slots
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .map_err(|_| HandshakeFailure::AtCapacity)?;
        Ok(Slot(self.inner.clone()))
    }

    /// Starts the driver task of an upgraded connection.
    pub(crate) fn register<S>(
        &self,
        ws: WebSocketStream<S>,
        peer_addr: Option<SocketAddr>,
        slot: Slot,
        info: ConnInfo,
    ) -> Result<Connection, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = &self.inner;
        let config = &inner.config;
        let id = ConnectionId(inner.next_id.fetch_add(1, Relaxed));
        let shared = Arc::new(Shared::new(Instant::now()));
        let (in_tx, in_rx) = mpsc::channel(config.inbound_queue());
        let (out_tx, out_rx) = mpsc::channel(config.outbound_queue());
        let sender = Sender::new(out_tx, id, config.write_buffer_limit());
        // Nothing at all without the `tracing` feature (see `trace.rs`).
        let span = crate::trace::ConnSpan::new(
            id,
            peer_addr,
            info.role.as_str(),
            info.path.as_deref(),
            info.protocol.as_deref(),
        );
        let driver = Driver::new(
            ws,
            inner.clone(),
            shared.clone(),
            id,
            peer_addr,
            in_tx,
            out_rx,
            slot,
        );
        {
            // Holding the lock across the check and the spawn means that a
            // concurrent `shutdown` either sees this task in the tracker or
            // made us refuse it: no connection escapes the drain.
            let closing = inner.closing.lock().unwrap_or_else(|e| e.into_inner());
            if *closing {
                drop(closing);
                // The driver was never started: disarm it without a hook.
                driver.abandon();
                return Err(inner.fail_handshake(HandshakeFailure::ShuttingDown, None));
            }
            inner.live.fetch_add(1, Relaxed);
            inner.metrics.connections.increment(1.0);
            inner.accepted.fetch_add(1, Relaxed);
            inner.metrics.accepted.increment(1);
            inner.tracker.spawn(span.instrument(driver.run()));
        }
        Ok(Connection::new(
            in_rx,
            sender,
            shared,
            peer_addr,
            info.protocol,
        ))
    }

    /// Number of live supervised connections (hooks not yet run).
    pub fn len(&self) -> usize {
        self.inner.live.load(Relaxed)
    }

    /// Whether no supervised connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether [`shutdown`](Self::shutdown) has started.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Acquire)
    }

    /// Connections that completed their handshake, since the start.
    pub fn accepted_total(&self) -> u64 {
        self.inner.accepted.load(Relaxed)
    }

    /// Connections closed with `reason`, since the start (hooks included).
    pub fn closed_total(&self, reason: CloseReason) -> u64 {
        self.inner.closed[reason.index()].load(Relaxed)
    }

    /// Handshakes that failed with `cause`, since the start.
    pub fn handshake_failures(&self, cause: HandshakeFailure) -> u64 {
        self.inner.handshake_failures[cause.index()].load(Relaxed)
    }

    /// Close-hook calls that panicked, since the start.
    pub fn hook_panics(&self) -> u64 {
        self.inner.hook_panics.load(Relaxed)
    }

    /// Shuts down gracefully: refuses new connections, sends Close 1001 to
    /// every connection at once, waits up to `grace` for their closing
    /// handshakes, drops the transports of the rest, waits for every close
    /// hook, and returns what closed meanwhile.
    ///
    /// Every connection ends with [`CloseReason::GoingAway`] (local) unless
    /// it had already started ending for another reason. Calling it again
    /// waits for the same drain.
    ///
    /// # Cancel safety
    /// Cancel safe in that the shutdown goes on in the driver tasks; the
    /// summary of a dropped call is lost.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownSummary {
        let started = Instant::now();
        let before = self.counts();
        let forced_before = self.inner.forced.load(Relaxed);
        let panics_before = self.hook_panics();
        {
            let mut closing = self.inner.closing.lock().unwrap_or_else(|e| e.into_inner());
            *closing = true;
            let _ = self.inner.shutdown_deadline.set(started + grace);
            self.inner.shutting_down.store(true, Release);
        }
        // From here each finishing driver counts this gauge down.
        let metrics = &self.inner.metrics;
        metrics.shutdown_remaining.set(self.len() as f64);
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        metrics.shutdown_remaining.set(0.0);
        let after = self.counts();
        let mut by_reason = [0; CloseReason::ALL.len()];
        for (i, n) in by_reason.iter_mut().enumerate() {
            *n = after[i] - before[i];
        }
        ShutdownSummary {
            by_reason,
            forced: self.inner.forced.load(Relaxed) - forced_before,
            hook_panics: self.hook_panics() - panics_before,
            elapsed: started.elapsed(),
        }
    }

    fn counts(&self) -> [u64; CloseReason::ALL.len()] {
        CloseReason::ALL.map(|r| self.closed_total(r))
    }
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("live", &self.len())
            .field("accepted", &self.accepted_total())
            .field("shutting_down", &self.is_shutting_down())
            .field("hooks", &self.inner.hooks)
            .finish()
    }
}

// ===== impl ShutdownSummary =====

/// What [`Supervisor::shutdown`] observed: connections closed during the
/// drain, by reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownSummary {
    by_reason: [u64; CloseReason::ALL.len()],
    forced: u64,
    hook_panics: u64,
    elapsed: Duration,
}

impl ShutdownSummary {
    /// Connections closed with `reason` during the drain.
    pub fn count(&self, reason: CloseReason) -> u64 {
        self.by_reason[reason.index()]
    }

    /// All connections closed during the drain.
    pub fn total(&self) -> u64 {
        self.by_reason.iter().sum()
    }

    /// Connections whose transport was dropped at the end of the grace
    /// period because the peer had not finished the closing handshake.
    pub fn forced(&self) -> u64 {
        self.forced
    }

    /// Hook calls that panicked during the drain.
    pub fn hook_panics(&self) -> u64 {
        self.hook_panics
    }

    /// How long the drain took.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

impl fmt::Display for ShutdownSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} closed in {:?}", self.total(), self.elapsed)?;
        for reason in CloseReason::ALL {
            let n = self.count(reason);
            if n > 0 {
                write!(f, ", {} {}", n, reason.as_str())?;
            }
        }
        write!(f, " ({} forced)", self.forced)
    }
}
