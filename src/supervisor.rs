//! The supervisor handle: accept, connect, supervise, shut down. See [`Supervisor`].

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;

use crate::close::CloseReason;
use crate::config::Config;
use crate::connection::{ConnInfo, Connection, Sender, Shared};
use crate::driver::{Driver, Probe};
use crate::error::{Error, HandshakeFailure};
use crate::hook::{CloseHook, Hooks};
use crate::state::{Slot, SupervisorState};
use crate::verdict::refusal_frame;

/// Supervises WebSocket connections: pings each peer on a schedule, holds it
/// to a pong deadline, and runs the close hooks exactly once per connection
/// with a categorized [`CloseReason`].
///
/// A cheap handle: clones share the same connections, hooks and counters.
/// Each connection is driven by its own task (tracked by a
/// [`TaskTracker`](tokio_util::task::TaskTracker), stopped through a
/// [`CancellationToken`](tokio_util::sync::CancellationToken)), so pings go out
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
    state: Arc<SupervisorState>,
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
            state: Arc::new(SupervisorState::new(self.config, self.hooks, &self.labels)),
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
        self.state.config()
    }

    /// The state shared with the drivers, for the ways in.
    pub(crate) fn state(&self) -> &Arc<SupervisorState> {
        &self.state
    }

    /// Supervises a WebSocket someone else built (a handshake of your own,
    /// another framework). `peer_addr` is reported in events if known.
    ///
    /// **It keeps the stream's own config.** tokio-tungstenite cannot change
    /// a stream's config after it is built, so whatever the stream was built
    /// with stays in force: built with tungstenite's defaults it holds a
    /// 128 KiB read buffer (about 135 KiB per idle connection instead of
    /// 3.7 KiB), accepts 64 MiB messages and has an unbounded write buffer.
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
    /// [`HandshakeFailure::ShuttingDown`]: the socket is sent a Close (1013,
    /// or the shutdown's code: 1001 unless
    /// [`drain_close_code`](crate::ConfigBuilder::drain_close_code) says
    /// otherwise) within the close timeout and dropped; no hook runs.
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
            // A stream built elsewhere: nothing to see beneath tungstenite.
            Ok(slot) => self.register(ws, peer_addr, slot, ConnInfo::default(), Probe::none()),
            Err(cause) => {
                let frame = refusal_frame(cause, self.config().drain_close_code());
                let close_timeout = self.config().close_timeout();
                let _ = tokio::time::timeout(close_timeout, ws.close(Some(frame))).await;
                Err(self.state.fail_handshake(cause, None))
            }
        }
    }

    /// Takes a slot for one connection, if allowed.
    pub(crate) fn reserve(&self) -> Result<Slot, HandshakeFailure> {
        self.state.reserve()
    }

    /// Starts the driver task of an upgraded connection.
    pub(crate) fn register<S>(
        &self,
        ws: WebSocketStream<S>,
        peer_addr: Option<SocketAddr>,
        slot: Slot,
        info: ConnInfo,
        probe: Probe<S>,
    ) -> Result<Connection, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let state = &self.state;
        let config = state.config();
        let id = state.next_id();
        let shared = Arc::new(Shared::new(
            Instant::now(),
            config.inbound_buffer_limit(),
            config.outbound_queue(),
        ));
        let sender = Sender::new(shared.clone(), id, config.write_buffer_limit());
        // Nothing at all without the `tracing` feature (see `trace.rs`).
        let span = crate::trace::ConnSpan::new(
            id,
            peer_addr,
            info.role.as_str(),
            info.path.as_deref(),
            info.protocol.as_deref(),
        );
        // A concurrent `shutdown` either sees this task in the tracker or
        // makes us refuse it: no connection escapes the drain.
        let mut ws = Some(ws);
        state.admit(|tracker| {
            let driver = Driver::new(
                ws.take().expect("admitted once"),
                state.clone(),
                shared.clone(),
                id,
                peer_addr,
                slot,
                probe,
            );
            tracker.spawn(span.instrument(driver.run()));
        });
        if let Some(ws) = ws {
            // Shutdown began after the handshake completed: the peer has
            // its 101 and is told with the shutdown's Close (1001 unless
            // `drain_close_code`), within the close timeout. No hook: the
            // connection never existed for the app.
            self.refuse_upgraded(ws, HandshakeFailure::ShuttingDown);
            return Err(state.fail_handshake(HandshakeFailure::ShuttingDown, None));
        }
        Ok(Connection::new(sender, shared, peer_addr, info.protocol))
    }

    /// Refuses an upgraded stream in the background: its Close (1013 or the
    /// shutdown's code, see [`refusal_frame`]) and the peer's answer, within
    /// the close timeout, on the tracker (so a `shutdown` under way waits
    /// for it).
    fn refuse_upgraded<S>(&self, mut ws: WebSocketStream<S>, cause: HandshakeFailure)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let close_timeout = self.config().close_timeout();
        let frame = refusal_frame(cause, self.config().drain_close_code());
        self.state.tracker().spawn(async move {
            let _ = tokio::time::timeout(close_timeout, async {
                ws.close(Some(frame)).await?;
                // Read on until the peer answers or leaves.
                while let Some(Ok(_)) = futures::StreamExt::next(&mut ws).await {}
                Ok::<_, tokio_tungstenite::tungstenite::Error>(())
            })
            .await;
        });
    }

    /// Number of live supervised connections (hooks not yet run).
    pub fn len(&self) -> usize {
        self.state.live()
    }

    /// Whether no supervised connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether [`shutdown`](Self::shutdown) has started.
    pub fn is_shutting_down(&self) -> bool {
        self.state.shutdown().has_begun()
    }

    /// Connections that completed their handshake, since the start.
    pub fn accepted_total(&self) -> u64 {
        self.state.accepted()
    }

    /// Connections closed with `reason`, since the start (hooks included).
    pub fn closed_total(&self, reason: CloseReason) -> u64 {
        self.state.closed(reason)
    }

    /// Handshakes that failed with `cause`, since the start.
    pub fn handshake_failures(&self, cause: HandshakeFailure) -> u64 {
        self.state.handshake_failures(cause)
    }

    /// Close-hook calls that panicked, since the start.
    pub fn hook_panics(&self) -> u64 {
        self.state.hook_panics()
    }

    /// Shuts down gracefully: refuses new connections, sends Close 1001 to
    /// every connection at once, waits up to `grace` for their closing
    /// handshakes, drops the transports of the rest, waits for every close
    /// hook, and returns what closed meanwhile.
    ///
    /// With a [`drain_window`](crate::ConfigBuilder::drain_window), the
    /// Closes are spread over the window instead (steadily, or in
    /// [`drain_batches`](crate::ConfigBuilder::drain_batches)), each
    /// connection keeps working until its turn and then has
    /// `close_timeout` to answer, and `grace` counts from the end of the
    /// window: the shutdown takes at most `drain_window + grace`. The code
    /// is [`drain_close_code`](crate::ConfigBuilder::drain_close_code)
    /// (1001 by default, 1012 to say "service restart"), drained or not.
    ///
    /// Every connection ends with [`CloseReason::GoingAway`] (local),
    /// whatever the code, unless it had already started ending for another
    /// reason. Calling it again waits for the same drain. The
    /// `ws_supervisor_shutdown_remaining_connections` gauge reports the
    /// connections left throughout.
    ///
    /// # Cancel safety
    /// Cancel safe in that the shutdown goes on in the driver tasks, and the
    /// `ws_supervisor_shutdown_remaining_connections` gauge still falls to 0
    /// with the last connection; the summary of a dropped call is lost.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownSummary {
        let started = Instant::now();
        let before = self.counts();
        let shutdown = self.state.shutdown();
        let forced_before = shutdown.forced();
        let panics_before = self.hook_panics();
        // `grace` counts from the end of the drain window (zero by default).
        shutdown.begin(started, started + self.config().drain_window() + grace);
        // From here each finishing driver sets the shutdown-remaining gauge
        // to what is left, the last one to 0, whether or not this future is
        // still polled (see `SupervisorState::write_remaining`).
        self.state.write_remaining();
        shutdown.stop_drivers();
        let tracker = self.state.tracker();
        tracker.close();
        tracker.wait().await;
        // Every driver has finished: this writes 0.
        self.state.write_remaining();
        let after = self.counts();
        let mut by_reason = [0; CloseReason::ALL.len()];
        for (i, n) in by_reason.iter_mut().enumerate() {
            *n = after[i] - before[i];
        }
        ShutdownSummary {
            by_reason,
            forced: shutdown.forced() - forced_before,
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
            .field("hooks", self.state.hooks())
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

    /// Connections whose transport was dropped because the peer had not
    /// finished the closing handshake in time: by the end of the grace
    /// period, or, in a drain, within `close_timeout` of the shutdown's
    /// Close.
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
