//! What a supervisor shares with its connections: config, hooks, counts,
//! admission and shutdown. See [`SupervisorState`].

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::close::{CloseEvent, CloseReason};
use crate::config::Config;
use crate::drain::{DrainPlan, position};
use crate::error::{Error, HandshakeFailure, Refusal};
use crate::hook::Hooks;
use crate::metrics::{Metrics, secs};
use crate::shutdown::Shutdown;
use crate::stats::ConnectionId;
use crate::trace;

/// State shared by the [`Supervisor`](crate::Supervisor) handle and every
/// connection: the supervisor owns its counts and gauges, and the ways in
/// and the drivers report to it through its methods.
pub(crate) struct SupervisorState {
    config: Config,
    hooks: Hooks,
    /// Every driver task (and every upgrade callback) runs on it.
    tracker: TaskTracker,
    shutdown: Shutdown,
    next_id: AtomicU64,
    /// Connections whose driver runs: changed at registration and where the
    /// hooks run, and nowhere else.
    live: AtomicUsize,
    /// Held to read `live` and write the shutdown-remaining gauge as one
    /// step (see [`write_remaining`](Self::write_remaining)); taken only
    /// once the shutdown has begun.
    remaining: Mutex<()>,
    /// Slots held for `max_connections`, including handshakes under way.
    slots: AtomicUsize,
    accepted: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Handshakes in flight per peer IP, when `max_handshakes_per_ip` is set.
    peers: Mutex<HashMap<IpAddr, usize>>,
    hook_panics: AtomicU64,
    /// Handles registered at build time (see `metrics.rs`).
    metrics: Metrics,
    /// Random per supervisor: mixes ids into ping phases and nonce keys.
    seed: RandomState,
    /// Origin of the ping slots of every connection (see `heartbeat.rs`).
    epoch: Instant,
}

/// What a pseudo-random number drawn for a connection is for (each purpose
/// draws an independent number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Purpose {
    /// The connection's phase within the ping jitter.
    PingPhase,
    /// The key that makes its ping nonces unguessable.
    NonceKey,
    /// The phase of the drain plan (drawn once per supervisor, with id 0).
    DrainPhase,
}

impl SupervisorState {
    pub(crate) fn new(config: Config, hooks: Hooks, labels: &[(String, String)]) -> Self {
        Self {
            config,
            hooks,
            tracker: TaskTracker::new(),
            shutdown: Shutdown::default(),
            next_id: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            remaining: Mutex::new(()),
            slots: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            closed: Default::default(),
            handshake_failures: Default::default(),
            peers: Mutex::default(),
            hook_panics: AtomicU64::new(0),
            metrics: Metrics::register(labels),
            seed: RandomState::new(),
            epoch: Instant::now(),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub(crate) fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// Origin of the ping slots of every connection.
    pub(crate) fn epoch(&self) -> Instant {
        self.epoch
    }

    /// A pseudo-random `u64` for connection `id`, one per `purpose`.
    pub(crate) fn random(&self, id: ConnectionId, purpose: Purpose) -> u64 {
        self.seed.hash_one((id.0, purpose))
    }

    /// As [`random`](Self::random), uniform in `[0, 1)`.
    pub(crate) fn random_unit(&self, id: ConnectionId, purpose: Purpose) -> f64 {
        unit(self.random(id, purpose))
    }

    /// The shutdown's close code (`drain_close_code`) once the drivers
    /// were told to stop; `None` before.
    pub(crate) fn shutdown_code(&self) -> Option<u16> {
        self.shutdown
            .is_cancelled()
            .then(|| self.config.drain_close_code())
    }

    /// When a drained shutdown sends connection `id` its Close: `None`
    /// without a drain window, or before the shutdown began. A pure
    /// function of the plan, the supervisor's seed and `id` (see
    /// [`DrainPlan`]); a driver asks once, when it is told to stop.
    pub(crate) fn drain_close_at(&self, id: ConnectionId) -> Option<Instant> {
        let window = self.config.drain_window();
        if window.is_zero() {
            return None;
        }
        let started = self.shutdown.started()?;
        let phase = self.random(ConnectionId(0), Purpose::DrainPhase);
        let plan = DrainPlan::new(window, self.config.drain_batches());
        Some(started + plan.offset(position(phase, id.0)))
    }

    // ===== admission =====

    /// Counts a failed handshake and returns its error.
    pub(crate) fn fail_handshake(
        &self,
        cause: HandshakeFailure,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        self.count_failure(cause);
        Error::handshake(cause, source)
    }

    fn count_failure(&self, cause: HandshakeFailure) {
        self.handshake_failures[cause.index()].fetch_add(1, Relaxed);
        self.metrics.handshake_failed(cause);
    }

    /// Counts a client upgrade the server refused and returns its error.
    pub(crate) fn refuse_upgrade(
        &self,
        refusal: Refusal,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        self.count_failure(HandshakeFailure::HttpStatus);
        Error::refused_upgrade(refusal, Some(Box::new(source)))
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
            state: self.clone(),
            ip,
        }))
    }

    /// Takes a slot for one connection, if shutdown has not begun and
    /// `max_connections` allows.
    pub(crate) fn reserve(self: &Arc<Self>) -> Result<Slot, HandshakeFailure> {
        if self.shutdown.has_begun() {
            return Err(HandshakeFailure::ShuttingDown);
        }
        let max = self.config.max_connections().unwrap_or(usize::MAX);
        self.slots
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .map_err(|_| HandshakeFailure::AtCapacity)?;
        Ok(Slot(self.clone()))
    }

    /// A fresh connection id.
    pub(crate) fn next_id(&self) -> ConnectionId {
        ConnectionId(self.next_id.fetch_add(1, Relaxed))
    }

    /// Starts a connection's driver with `spawn`, unless the shutdown has
    /// begun (then `None`, and the caller refuses the connection).
    pub(crate) fn admit(&self, spawn: impl FnOnce(&TaskTracker)) -> Option<()> {
        self.shutdown.admit(|| {
            self.live.fetch_add(1, Relaxed);
            self.metrics.connections.increment(1.0);
            self.accepted.fetch_add(1, Relaxed);
            self.metrics.accepted.increment(1);
            spawn(&self.tracker);
        })
    }

    // ===== the end of a connection =====

    /// A connection ended: runs the hooks, then counts it. The live count,
    /// the connections gauge and the shutdown-remaining gauge change here
    /// (and at [`admit`](Self::admit) and in `shutdown`) and nowhere else,
    /// next to the hooks: they return exactly to zero.
    pub(crate) fn connection_closed(&self, event: &CloseEvent) {
        let metrics = &self.metrics;
        // Hooks are synchronous: real time, not tokio's (possibly paused) clock.
        let started = std::time::Instant::now();
        let panics = self.hooks.run(event);
        metrics.hook_duration.record(secs(started.elapsed()));
        if panics > 0 {
            self.hook_panics.fetch_add(panics, Relaxed);
            metrics.hook_panics.increment(panics);
            trace::hooks_panicked(event.id, panics);
        }
        self.closed[event.reason.index()].fetch_add(1, Relaxed);
        metrics.closed(event.reason, event.initiator);
        metrics.lifetime.record(secs(event.duration));
        // SeqCst, with `has_begun` next: see `write_remaining`.
        self.live.fetch_sub(1, SeqCst);
        metrics.connections.decrement(1.0);
        if self.shutdown.has_begun() {
            self.write_remaining();
        }
    }

    /// Sets the shutdown-remaining gauge to the live count, read under
    /// `remaining`. Called by `shutdown` once it has begun (and again when
    /// the drain is over), and by every connection that ends after that.
    ///
    /// Why this is exact on a multi-thread runtime:
    ///
    /// - Reading the count and writing the gauge are one step under the
    ///   lock, so writes land in the order of their readings. (A count taken
    ///   at the decrement and written later lets two drivers finishing on two
    ///   threads write 0 and then 1.) The driver that takes the count to 0
    ///   writes after its decrement, so no write after its own reads more.
    /// - A connection that ends just as the shutdown begins: either it sees
    ///   `has_begun` and writes, or the shutdown's first write, made after
    ///   `begin`, reads a count without it. This needs SeqCst on all four
    ///   steps (the decrement and `has_begun` in `connection_closed`, the
    ///   store in `Shutdown::begin` and the load here); with weaker orderings
    ///   both sides may miss the other.
    /// - No connection is admitted once the shutdown has begun, so the
    ///   last write of a drain is 0, whether or not anyone still awaits
    ///   `shutdown`.
    ///
    /// The lock is taken once per connection ending during a drain, never
    /// in normal operation.
    pub(crate) fn write_remaining(&self) {
        let _one_writer = self.remaining.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.live.load(SeqCst);
        self.metrics.shutdown_remaining.set(live as f64);
    }

    // ===== counts =====

    pub(crate) fn live(&self) -> usize {
        self.live.load(Relaxed)
    }

    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    pub(crate) fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()].load(Relaxed)
    }

    pub(crate) fn handshake_failures(&self, cause: HandshakeFailure) -> u64 {
        self.handshake_failures[cause.index()].load(Relaxed)
    }

    pub(crate) fn hook_panics(&self) -> u64 {
        self.hook_panics.load(Relaxed)
    }
}

/// Uniform in `[0, 1)`, from the top 53 bits of `bits`.
pub(crate) fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

impl fmt::Debug for SupervisorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorState")
            .field("live", &self.live())
            .field("accepted", &self.accepted())
            .field("shutdown", &self.shutdown)
            .field("hooks", &self.hooks)
            .finish_non_exhaustive()
    }
}

// ===== admission guards =====

/// One handshake in flight from `ip`, counted until dropped (see
/// [`SupervisorState::enter_handshake`]).
pub(crate) struct PeerGuard {
    state: Arc<SupervisorState>,
    ip: IpAddr,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut peers = self.state.peers.lock().unwrap_or_else(|e| e.into_inner());
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
pub(crate) struct Slot(Arc<SupervisorState>);

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
