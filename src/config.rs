//! Validated supervisor settings. See [`Config`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::app_heartbeat::{AppHeartbeat, AppPong, unsendable};

/// What counts as a sign of life from the peer for the pong deadline.
///
/// See `docs/keepalive.md` for the full rule. In both modes only a pong whose
/// payload matches one of our pings yields a round-trip-time sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Liveness {
    /// Any pong frame (matching or unsolicited) proves the peer alive; under
    /// an [application-level heartbeat](ConfigBuilder::app_heartbeat), so
    /// does any answer its recogniser accepts.
    ///
    /// Stricter: the peer must be reading our frames and answering them.
    Pong,
    /// Any complete inbound frame (data, ping, pong) proves the peer alive.
    ///
    /// The default: a peer that is busy streaming data to us is alive even
    /// if its pong sits behind that data, so it is never killed for it. A peer
    /// that stops *reading* is caught by the write timeout instead.
    #[default]
    AnyFrame,
}

/// The settings of a [`Supervisor`](crate::Supervisor), validated.
///
/// Built with [`Config::builder`]; every knob has a default chosen for a
/// service holding many mostly idle connections (see each setter's `# Default`).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use ws_supervisor::Config;
///
/// let config = Config::builder()
///     .ping_interval(Duration::from_secs(5))
///     .pong_timeout(Duration::from_secs(2))
///     .build()?;
/// assert_eq!(config.ping_interval(), Duration::from_secs(5));
/// # Ok::<(), ws_supervisor::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    ping_interval: Duration,
    pong_timeout: Duration,
    ping_jitter: Duration,
    liveness: Liveness,
    app_heartbeat: AppHeartbeat,
    handshake_timeout: Duration,
    close_timeout: Duration,
    write_timeout: Duration,
    max_connections: Option<usize>,
    max_handshakes_per_ip: Option<usize>,
    allowed_origins: Option<Arc<[Box<str>]>>,
    max_message_size: usize,
    max_frame_size: usize,
    read_buffer_size: usize,
    write_buffer_limit: usize,
    inbound_queue: usize,
    inbound_buffer_limit: usize,
    outbound_queue: usize,
    drain_window: Duration,
    drain_batches: Option<usize>,
    drain_close_code: u16,
}

impl Default for Config {
    fn default() -> Self {
        ConfigBuilder::new()
            .build()
            .expect("the default configuration is valid")
    }
}

impl Config {
    /// Starts a builder with every default.
    pub const fn builder() -> ConfigBuilder {
        ConfigBuilder::new()
    }

    /// Time between two pings on one connection.
    pub const fn ping_interval(&self) -> Duration {
        self.ping_interval
    }
    /// How long after a ping the peer has to show liveness.
    pub const fn pong_timeout(&self) -> Duration {
        self.pong_timeout
    }
    /// Upper bound of the random phase added to each connection's ping schedule.
    pub const fn ping_jitter(&self) -> Duration {
        self.ping_jitter
    }
    /// What counts as liveness.
    pub const fn liveness(&self) -> Liveness {
        self.liveness
    }
    /// Whether the heartbeat sends application messages instead of ping
    /// frames (see [`ConfigBuilder::app_heartbeat`]).
    pub const fn uses_app_heartbeat(&self) -> bool {
        self.app_heartbeat.probes()
    }
    /// Whether the peer's application-level pings are answered (see
    /// [`ConfigBuilder::answer_app_pings`]).
    pub const fn answers_app_pings(&self) -> bool {
        self.app_heartbeat.replies()
    }
    /// Whether heartbeat messages are delivered to the application too (see
    /// [`ConfigBuilder::deliver_heartbeats`]).
    pub const fn delivers_heartbeats(&self) -> bool {
        self.app_heartbeat.delivers()
    }
    /// The application-level heartbeat's functions.
    pub(crate) const fn app_heartbeat(&self) -> &AppHeartbeat {
        &self.app_heartbeat
    }
    /// Deadline of the opening (HTTP upgrade) handshake.
    pub const fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }
    /// Deadline of the closing handshake.
    pub const fn close_timeout(&self) -> Duration {
        self.close_timeout
    }
    /// How long the write side may stay blocked without progress before the
    /// connection is declared stalled.
    pub const fn write_timeout(&self) -> Duration {
        self.write_timeout
    }
    /// Maximum number of live connections, if limited.
    pub const fn max_connections(&self) -> Option<usize> {
        self.max_connections
    }
    /// Maximum number of opening handshakes in flight from one IP address,
    /// if limited.
    pub const fn max_handshakes_per_ip(&self) -> Option<usize> {
        self.max_handshakes_per_ip
    }
    /// The `Origin` values an upgrade request may carry, if restricted
    /// (normalized to lower case).
    pub fn allowed_origins(&self) -> Option<&[Box<str>]> {
        self.allowed_origins.as_deref()
    }
    /// Largest inbound message, in bytes.
    pub const fn max_message_size(&self) -> usize {
        self.max_message_size
    }
    /// Largest inbound frame payload, in bytes.
    pub const fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }
    /// Most bytes read from the socket in one system call.
    pub const fn read_buffer_size(&self) -> usize {
        self.read_buffer_size
    }
    /// Most bytes a connection may hold waiting to be written to the socket.
    pub const fn write_buffer_limit(&self) -> usize {
        self.write_buffer_limit
    }
    /// What [`ConfigBuilder::inbound_queue`] was given (it has no effect).
    #[deprecated(
        since = "0.3.0",
        note = "has no effect: unread messages are bounded by `inbound_buffer_limit` (bytes) alone"
    )]
    pub const fn inbound_queue(&self) -> usize {
        self.inbound_queue
    }
    /// Bytes of messages read but not yet taken by the application, per
    /// connection, beyond which the supervisor stops reading.
    pub const fn inbound_buffer_limit(&self) -> usize {
        self.inbound_buffer_limit
    }
    /// Messages sent by the application but not yet written, per connection.
    pub const fn outbound_queue(&self) -> usize {
        self.outbound_queue
    }
    /// The window over which [`Supervisor::shutdown`](crate::Supervisor::shutdown)
    /// spreads its closes (`Duration::ZERO`: everyone at once).
    pub const fn drain_window(&self) -> Duration {
        self.drain_window
    }
    /// In how many equal batches the drain window closes connections
    /// (`None`: at a steady rate).
    pub const fn drain_batches(&self) -> Option<usize> {
        self.drain_batches
    }
    /// The close code a shutdown sends.
    pub const fn drain_close_code(&self) -> u16 {
        self.drain_close_code
    }

    /// How long reading may stay paused for `inbound_buffer_limit` before
    /// the application is blamed: one whole heartbeat.
    pub(crate) fn read_stall_limit(&self) -> Duration {
        self.ping_interval + self.pong_timeout
    }

    /// The tungstenite settings these knobs translate to: the message and
    /// frame limits, a bounded write buffer, and a small tungstenite read
    /// buffer that assumes the stream underneath is wrapped in a
    /// [`ReadLayer`](crate::ReadLayer), which does the large reads.
    ///
    /// Every connection the supervisor builds itself (`accept`, `connect`,
    /// the hyper and axum upgrades) uses exactly this. Use it, with a
    /// [`ReadLayer`](crate::ReadLayer), when you build a `WebSocketStream`
    /// yourself for [`Supervisor::supervise`](crate::Supervisor::supervise):
    /// `supervise` keeps whatever config the stream was built with.
    ///
    /// # Examples
    ///
    /// ```
    /// use tokio_tungstenite::WebSocketStream;
    /// use ws_supervisor::tungstenite::protocol::Role;
    /// use ws_supervisor::{Config, ReadLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let config = Config::default();
    /// let (io, _peer) = tokio::io::duplex(64 * 1024); // an upgraded stream
    /// let ws = WebSocketStream::from_raw_socket(
    ///     ReadLayer::new(io, &config),
    ///     Role::Server,
    ///     Some(config.websocket_config()),
    /// )
    /// .await;
    /// assert_eq!(ws.get_config().max_message_size, Some(config.max_message_size()));
    /// # }
    /// ```
    pub fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(crate::transport::TUNGSTENITE_READ_BUFFER)
            // Write each message straight to the socket: the driver flushes
            // after every batch anyway, and a staging buffer per idle
            // connection is memory we do not want to hold.
            .write_buffer_size(0)
            // Room for the frame header of a message at the limit and for
            // the control frames (ping, pong, close) queued behind it.
            .max_write_buffer_size(self.write_buffer_limit + CONTROL_HEADROOM)
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_frame_size))
    }
}

/// Builds a [`Config`]; [`build`](Self::build) checks the combination.
#[derive(Debug, Clone)]
#[must_use]
pub struct ConfigBuilder {
    ping_interval: Duration,
    pong_timeout: Duration,
    ping_jitter: Option<Duration>,
    liveness: Liveness,
    app_heartbeat: AppHeartbeat,
    handshake_timeout: Duration,
    close_timeout: Duration,
    write_timeout: Duration,
    max_connections: Option<usize>,
    max_handshakes_per_ip: Option<usize>,
    allowed_origins: Option<Vec<String>>,
    max_message_size: usize,
    max_frame_size: usize,
    read_buffer_size: usize,
    write_buffer_limit: usize,
    inbound_queue: usize,
    inbound_buffer_limit: usize,
    outbound_queue: usize,
    drain_window: Duration,
    drain_batches: Option<usize>,
    drain_close_code: u16,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigBuilder {
    /// A builder holding every default.
    pub const fn new() -> Self {
        Self {
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            ping_jitter: None,
            liveness: Liveness::AnyFrame,
            app_heartbeat: AppHeartbeat::new(),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connections: None,
            max_handshakes_per_ip: None,
            allowed_origins: None,
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            read_buffer_size: 4 << 10,
            write_buffer_limit: 4 << 20,
            inbound_queue: 32,
            inbound_buffer_limit: 4 << 20,
            outbound_queue: 64,
            drain_window: Duration::ZERO,
            drain_batches: None,
            drain_close_code: 1001,
        }
    }

    /// Time between two pings on one connection; the first goes out one
    /// interval (plus this connection's jitter) after the connection opens.
    ///
    /// # Default
    /// 20 s: well inside the 60 s idle timeout of common load balancers and
    /// NATs, at one small frame per connection per 20 s.
    pub const fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// How long after a ping the peer has to show liveness (see
    /// [`Liveness`]) before the connection dies with
    /// [`CloseReason::Timeout`](crate::CloseReason::Timeout).
    ///
    /// # Default
    /// 10 s: above any sane round trip, even on a congested mobile link. A dead
    /// peer is then detected at most `ping_interval + ping_jitter + pong_timeout`
    /// (30 s + jitter by default) after the last frame it sent.
    pub const fn pong_timeout(mut self, timeout: Duration) -> Self {
        self.pong_timeout = timeout;
        self
    }

    /// Upper bound of a random phase added once to each connection's ping
    /// schedule, so connections accepted together do not ping together.
    /// Must not exceed the ping interval; `Duration::ZERO` disables it.
    ///
    /// # Default
    /// One tenth of the ping interval.
    pub const fn ping_jitter(mut self, jitter: Duration) -> Self {
        self.ping_jitter = Some(jitter);
        self
    }

    /// What counts as liveness for the pong deadline.
    ///
    /// # Default
    /// [`Liveness::AnyFrame`]: see its docs for why.
    pub const fn liveness(mut self, liveness: Liveness) -> Self {
        self.liveness = liveness;
        self
    }

    /// Sends an application message on the heartbeat's schedule instead of
    /// a ping frame, for protocols and peers that cannot use ping frames
    /// (browsers' JavaScript cannot answer them; some upstream APIs require
    /// a JSON ping). `probe` builds the message for a nonce (a number at
    /// most `2^53 - 1`, so it survives a JSON number in JavaScript; embed
    /// it to have answers matched); `answer` recognises the peer's answer
    /// and says which probe it answers ([`AppPong`]), or returns `None` for
    /// any other message.
    ///
    /// Everything else is as for ping frames (`docs/keepalive.md`): the
    /// schedule and its jitter, the pong deadline and the detection bound,
    /// the reason ([`Timeout`](crate::CloseReason::Timeout), local, Close
    /// 1011 "ping timeout"), the RTT and the counters (`pings_sent`,
    /// `pongs_received`, `pongs_unmatched` in [`Stats`](crate::Stats) and
    /// the metrics). An answer is a pong for [`Liveness`]. A probe waits
    /// for the write side like a ping frame: it never interleaves with a
    /// message being sent, and one that comes due while our own bytes wait
    /// for the socket is skipped (the write timeout judges a stuck write
    /// side). Answers are neither delivered to the application nor counted
    /// as messages received, unless
    /// [`deliver_heartbeats`](Self::deliver_heartbeats) says so.
    ///
    /// The peer's ping frames are still answered with pongs.
    ///
    /// Both functions run on the connection's task; `answer` runs on every
    /// inbound text and binary message, so keep it cheap (look at a prefix
    /// before parsing). A panic in either ends the connection as
    /// [`Internal`](crate::CloseReason::Internal), local, "application
    /// panicked". `build()` calls `probe` once (nonce 0) to check that it
    /// returns a text or binary message within
    /// [`write_buffer_limit`](Self::write_buffer_limit); a probe that
    /// breaks that rule later is not sent (the ping is skipped).
    ///
    /// # Examples
    ///
    /// ```
    /// use ws_supervisor::tungstenite::Message;
    /// use ws_supervisor::{AppPong, Config};
    ///
    /// let config = Config::builder()
    ///     .app_heartbeat(
    ///         |nonce| Message::text(format!(r#"{{"op":"ping","t":{nonce}}}"#)),
    ///         |message| {
    ///             let text = message.to_text().ok()?;
    ///             let t = text.strip_prefix(r#"{"op":"pong","t":"#)?.strip_suffix('}')?;
    ///             t.parse().ok().map(AppPong::Nonce)
    ///         },
    ///     )
    ///     .build()?;
    /// assert!(config.uses_app_heartbeat());
    /// # Ok::<(), ws_supervisor::ConfigError>(())
    /// ```
    ///
    /// # Default
    /// Off: the heartbeat sends ping frames, which every WebSocket stack
    /// answers without any application code.
    pub fn app_heartbeat<P, A>(mut self, probe: P, answer: A) -> Self
    where
        P: Fn(u64) -> Message + Send + Sync + 'static,
        A: Fn(&Message) -> Option<AppPong> + Send + Sync + 'static,
    {
        self.app_heartbeat
            .set_probe(Arc::new(probe), Arc::new(answer));
        self
    }

    /// Answers the peer's application-level pings: `reply` looks at each
    /// inbound text or binary message and returns the reply to send if it
    /// is such a ping, or `None` for any other message. One function both
    /// recognises the ping and builds the reply, so a reply can echo the
    /// ping's nonce without parsing it twice.
    ///
    /// For servers whose browser clients check the server's liveness with
    /// a message of their own. The reply goes out as soon as the write side
    /// has finished the message it is writing (never inside it); while our
    /// own bytes wait for the socket, only the latest reply waits with
    /// them. The peer's pings are not delivered to the application unless
    /// [`deliver_heartbeats`](Self::deliver_heartbeats) says so, and count
    /// as liveness as ping frames do (under [`Liveness::AnyFrame`]). A reply
    /// that is not a text or binary message within
    /// [`write_buffer_limit`](Self::write_buffer_limit) is not sent; a
    /// panic in `reply` ends the connection as
    /// [`Internal`](crate::CloseReason::Internal), local. Works in either
    /// role, and beside [`app_heartbeat`](Self::app_heartbeat) (whose
    /// `answer` is asked first).
    ///
    /// # Examples
    ///
    /// ```
    /// use ws_supervisor::Config;
    /// use ws_supervisor::tungstenite::Message;
    ///
    /// // `{"op":"ping","t":N}` from the browser gets `{"op":"pong","t":N}`.
    /// let config = Config::builder()
    ///     .answer_app_pings(|message| {
    ///         let text = message.to_text().ok()?;
    ///         let rest = text.strip_prefix(r#"{"op":"ping""#)?;
    ///         Some(Message::text(format!(r#"{{"op":"pong"{rest}"#)))
    ///     })
    ///     .build()?;
    /// assert!(config.answers_app_pings());
    /// # Ok::<(), ws_supervisor::ConfigError>(())
    /// ```
    ///
    /// # Default
    /// Off: every message goes to the application.
    pub fn answer_app_pings<R>(mut self, reply: R) -> Self
    where
        R: Fn(&Message) -> Option<Message> + Send + Sync + 'static,
    {
        self.app_heartbeat.set_reply(Arc::new(reply));
        self
    }

    /// Also delivers heartbeat messages to the application: the answers to
    /// [`app_heartbeat`](Self::app_heartbeat) probes and the peer's pings
    /// recognised by [`answer_app_pings`](Self::answer_app_pings), after the
    /// supervisor has handled them. Delivered, they count as messages
    /// received and against the inbound budget like any other. Requires one
    /// of those two modes.
    ///
    /// # Default
    /// `false`: the application sees only its own protocol's messages.
    pub const fn deliver_heartbeats(mut self, deliver: bool) -> Self {
        self.app_heartbeat.set_deliver(deliver);
        self
    }

    /// Deadline of the opening handshake (the HTTP upgrade), for
    /// [`Supervisor::accept`](crate::Supervisor::accept) and
    /// [`Supervisor::connect`](crate::Supervisor::connect). A connection that
    /// does not finish in time is refused and never reaches the close hook.
    ///
    /// # Default
    /// 10 s.
    pub const fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long to wait for the peer to finish a closing handshake before
    /// the transport is dropped.
    ///
    /// # Default
    /// 5 s.
    pub const fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// How long the write side may stay blocked **without progress** (the
    /// socket accepts none of our bytes: the peer does not read) before the
    /// connection dies with
    /// [`CloseReason::Timeout`](crate::CloseReason::Timeout). A peer that
    /// reads slowly but steadily restarts the clock with every byte the
    /// socket takes. (For a stream given to
    /// [`supervise`](crate::Supervisor::supervise), whose writes the
    /// supervisor cannot see, it counts from the last time everything was
    /// flushed.)
    ///
    /// # Default
    /// 10 s.
    pub const fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Maximum number of live connections; beyond it new ones are refused
    /// (HTTP 503 on [`accept`](crate::Supervisor::accept)).
    ///
    /// Must be at least 1.
    ///
    /// # Default
    /// Unlimited (the process's file-descriptor limit still applies).
    pub const fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = Some(max);
        self
    }

    /// Maximum number of opening handshakes in flight from one IP address
    /// (from the first byte of the request to the upgraded connection);
    /// beyond it new ones are refused with HTTP 429 and
    /// [`HandshakeFailure::PeerLimit`](crate::HandshakeFailure::PeerLimit).
    /// It caps what one host can hold with slow or silent handshakes;
    /// established connections do not count. Applies where the peer's
    /// address is known (`accept_tcp`, [`Accept::peer_addr`](crate::Accept::peer_addr),
    /// the hyper and axum upgrades given the address). Must be at least 1.
    ///
    /// # Default
    /// Unlimited: behind a reverse proxy or a large NAT, every peer shares
    /// one address, and a default cap would refuse them all under load.
    pub const fn max_handshakes_per_ip(mut self, max: usize) -> Self {
        self.max_handshakes_per_ip = Some(max);
        self
    }

    /// Restricts the `Origin` header of upgrade requests to `origins`
    /// (each `scheme://host[:port]`, compared case-insensitively, or
    /// `null`): a request from any other origin is refused with HTTP 403 and
    /// [`HandshakeFailure::Origin`](crate::HandshakeFailure::Origin).
    ///
    /// This is the defence against cross-site WebSocket hijacking: browsers
    /// attach cookies to a WebSocket upgrade from any site, and always send
    /// the page's `Origin`. A request *without* an `Origin` header (a
    /// non-browser client) is allowed. An empty list refuses every request
    /// that carries an `Origin`, i.e. every browser.
    ///
    /// # Default
    /// Off: every origin is allowed. Turn it on for any service that browsers
    /// reach with credentials (cookies, HTTP auth).
    pub fn allowed_origins<I, T>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.allowed_origins = Some(origins.into_iter().map(Into::into).collect());
        self
    }

    /// Largest inbound message in bytes; a larger one is a protocol error
    /// (close code 1009).
    ///
    /// # Default
    /// 1 MiB (tungstenite's own default, 64 MiB, lets one peer pin 64 MiB).
    pub const fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Largest inbound frame payload in bytes; must not exceed
    /// [`max_message_size`](Self::max_message_size).
    ///
    /// # Default
    /// 1 MiB.
    pub const fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// Most bytes read from the socket in one system call (at most 64 KiB),
    /// except within a plain data message read past tungstenite, whose
    /// payload is read straight into the message's memory, up to 64 KiB
    /// per call.
    ///
    /// For connections made by [`accept`](crate::Supervisor::accept) and
    /// [`connect`](crate::Supervisor::connect), the read buffer lives on the
    /// stack during a read; only bytes not yet parsed are kept on the heap,
    /// and an idle connection keeps none. (A stream given to
    /// [`supervise`](crate::Supervisor::supervise) keeps its own config.)
    ///
    /// # Default
    /// 4 KiB. tungstenite's own default allocates 128 KiB per connection up
    /// front and zero-fills it on every read.
    pub const fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.read_buffer_size = bytes;
        self
    }

    /// Most message bytes one connection may hold waiting for the socket
    /// (plus 1 KiB for frame headers and control frames). A single outbound
    /// message larger than this is refused by
    /// [`Sender::send`](crate::Sender::send).
    ///
    /// # Default
    /// 4 MiB.
    pub const fn write_buffer_limit(mut self, bytes: usize) -> Self {
        self.write_buffer_limit = bytes;
        self
    }

    /// Has no effect since 0.3.0. It was the message count of the queue to
    /// the application, behind which the supervisor kept reading into a
    /// backlog anyway; the two are now one queue, bounded by
    /// [`inbound_buffer_limit`](Self::inbound_buffer_limit) bytes alone.
    #[deprecated(
        since = "0.3.0",
        note = "has no effect: unread messages are bounded by `inbound_buffer_limit` (bytes) alone"
    )]
    pub const fn inbound_queue(mut self, messages: usize) -> Self {
        self.inbound_queue = messages;
        self
    }

    /// Bytes of messages read but not yet taken by the application (each
    /// counts its payload plus its queue slot, about 40 bytes, so a flood of
    /// empty messages fills it too). Within it the supervisor keeps
    /// reading even while the application does not, so a silent peer is
    /// still found by its pong deadline. Beyond it, reading pauses (TCP
    /// pushes back on the peer) and the pong deadline is suspended, for at
    /// most `ping_interval + pong_timeout`: an application that takes
    /// nothing for that long ends the connection as
    /// [`Internal`](crate::CloseReason::Internal), local, "application not
    /// reading". Must be at least `max_message_size`.
    ///
    /// # Default
    /// 4 MiB: the memory bound of a connection whose application does not
    /// read, as `write_buffer_limit` is for one whose peer does not.
    pub const fn inbound_buffer_limit(mut self, bytes: usize) -> Self {
        self.inbound_buffer_limit = bytes;
        self
    }

    /// Messages the application has sent but the supervisor has not yet
    /// written. While it is full, [`Sender::send`](crate::Sender::send) waits.
    ///
    /// Must be at least 1.
    ///
    /// # Default
    /// 64.
    pub const fn outbound_queue(mut self, messages: usize) -> Self {
        self.outbound_queue = messages;
        self
    }

    /// Spreads the closes of [`Supervisor::shutdown`](crate::Supervisor::shutdown)
    /// over `window`, so that a rolling restart of a fleet does not send
    /// every client back at the same second (see `docs/operations.md`).
    ///
    /// Each open connection gets a planned close time within the window, a
    /// fixed function of the connection's id and the supervisor's random
    /// seed, spread evenly (see [`drain_batches`](Self::drain_batches) for
    /// steps instead of a steady rate). Until its time comes, a connection
    /// works as before (messages, heartbeat); a connection already closing
    /// is left alone. At its time it is sent the Close of
    /// [`drain_close_code`](Self::drain_close_code) and has
    /// [`close_timeout`](Self::close_timeout) for the closing handshake.
    /// The `grace` given to `shutdown` counts from the **end** of the
    /// window: whatever is still open or closing `window + grace` after the
    /// shutdown began is dropped (and counted as forced). New connections
    /// are refused from the start of the shutdown. At most a week.
    ///
    /// # Default
    /// `Duration::ZERO`: no drain. Every connection is sent its Close at
    /// once and has the whole `grace` to answer.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::StreamExt;
    /// use tokio_tungstenite::WebSocketStream;
    /// use ws_supervisor::tungstenite::protocol::Role;
    /// use ws_supervisor::{CloseCode, Config, Supervisor};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = Config::builder()
    ///     .drain_window(Duration::from_secs(30))
    ///     .drain_close_code(1012) // "service restart": come back
    ///     .build()?;
    /// let supervisor = Supervisor::new(config);
    /// # let (server, client) = tokio::io::duplex(4096);
    /// # let ws = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
    /// # let _conn = supervisor.supervise(ws, None).await?;
    /// # let mut peer = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    /// # let peer = tokio::spawn(async move {
    /// #     let mut close = None;
    /// #     // Pings come first if the turn is late; reading on flushes the Close reply.
    /// #     while let Some(Ok(m)) = peer.next().await {
    /// #         if m.is_close() { close.get_or_insert(m); }
    /// #     }
    /// #     close
    /// # });
    /// // On SIGTERM: the Closes go out over 30 s, then up to 10 s of grace.
    /// let summary = supervisor.shutdown(Duration::from_secs(10)).await;
    /// assert!(summary.elapsed() < Duration::from_secs(30));
    /// # let close = peer.await?.unwrap();
    /// # assert!(matches!(close, ws_supervisor::tungstenite::Message::Close(Some(f)) if f.code == CloseCode::Restart));
    /// # Ok(())
    /// # }
    /// ```
    pub const fn drain_window(mut self, window: Duration) -> Self {
        self.drain_window = window;
        self
    }

    /// Closes the drain window's connections in `batches` equal steps,
    /// `window / batches` apart, the first at the start of the shutdown
    /// (Phoenix's drainer style), instead of at a steady rate. Each batch
    /// holds about `1 / batches` of the connections. Must be at least 1;
    /// has no effect without a [`drain_window`](Self::drain_window).
    ///
    /// # Default
    /// Unset: a steady rate, each connection at its own instant.
    pub const fn drain_batches(mut self, batches: usize) -> Self {
        self.drain_batches = Some(batches);
        self
    }

    /// The close code [`Supervisor::shutdown`](crate::Supervisor::shutdown)
    /// sends, drained or not: 1001 (going away), 1012 (service restart:
    /// "come back", the hint reconnecting clients honour), 1013 (try again
    /// later), 1000, or an application code 3000–4999. Other codes mean an
    /// error or are not for servers to send, and are refused by `build()`.
    /// The close hook reports [`GoingAway`](crate::CloseReason::GoingAway),
    /// local, whatever the code (the event's `code_sent` has it).
    ///
    /// # Default
    /// 1001, text "server shutting down" (1012 sends "service restart").
    pub const fn drain_close_code(mut self, code: u16) -> Self {
        self.drain_close_code = code;
        self
    }

    /// Checks the combination and builds the [`Config`].
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first invalid setting: a zero duration,
    /// jitter above the interval, a zero size or count, a frame limit above
    /// the message limit, a write-buffer limit below the read buffer, or an
    /// origin that is not `scheme://host[:port]`, an application-level
    /// probe that is not a text or binary message within the write-buffer
    /// limit, heartbeat delivery without an application-level heartbeat, or
    /// a drain close code a server should not send.
    pub fn build(self) -> Result<Config, ConfigError> {
        for (name, value) in [
            ("ping_interval", self.ping_interval),
            ("pong_timeout", self.pong_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("close_timeout", self.close_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
            if value > MAX_DURATION {
                return Err(ConfigError::DurationTooLong(name));
            }
        }
        if self.drain_window > MAX_DURATION {
            return Err(ConfigError::DurationTooLong("drain_window"));
        }
        if !matches!(
            self.drain_close_code,
            1000 | 1001 | 1012 | 1013 | 3000..=4999
        ) {
            return Err(ConfigError::InvalidDrainCloseCode(self.drain_close_code));
        }
        let ping_jitter = self.ping_jitter.unwrap_or(self.ping_interval / 10);
        if ping_jitter > self.ping_interval {
            return Err(ConfigError::JitterAboveInterval {
                jitter: ping_jitter,
                interval: self.ping_interval,
            });
        }
        for (name, value) in [
            ("max_message_size", self.max_message_size),
            ("max_frame_size", self.max_frame_size),
            ("read_buffer_size", self.read_buffer_size),
            ("write_buffer_limit", self.write_buffer_limit),
            ("inbound_buffer_limit", self.inbound_buffer_limit),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroSize(name));
            }
        }
        // One message at the limit must be deliverable.
        if self.inbound_buffer_limit < self.max_message_size {
            return Err(ConfigError::InboundBufferBelowMessage {
                limit: self.inbound_buffer_limit,
                message: self.max_message_size,
            });
        }
        for (name, value) in [
            ("outbound_queue", Some(self.outbound_queue)),
            ("max_connections", self.max_connections),
            ("max_handshakes_per_ip", self.max_handshakes_per_ip),
            ("drain_batches", self.drain_batches),
        ] {
            if value == Some(0) {
                return Err(ConfigError::ZeroCount(name));
            }
        }
        let allowed_origins = match self.allowed_origins {
            None => None,
            Some(list) => {
                let mut normalized = Vec::with_capacity(list.len());
                for origin in list {
                    if !is_origin(&origin) {
                        return Err(ConfigError::InvalidOrigin(origin));
                    }
                    normalized.push(origin.to_ascii_lowercase().into_boxed_str());
                }
                Some(Arc::from(normalized))
            }
        };
        if self.read_buffer_size > crate::transport::CHUNK {
            return Err(ConfigError::ReadBufferTooLarge {
                size: self.read_buffer_size,
                max: crate::transport::CHUNK,
            });
        }
        if self.max_frame_size > self.max_message_size {
            return Err(ConfigError::FrameAboveMessage {
                frame: self.max_frame_size,
                message: self.max_message_size,
            });
        }
        // Control frames (pongs, the close reply) must always fit.
        if self.write_buffer_limit < MIN_WRITE_BUFFER {
            return Err(ConfigError::WriteBufferTooSmall {
                limit: self.write_buffer_limit,
                min: MIN_WRITE_BUFFER,
            });
        }
        if self.app_heartbeat.delivers() && !self.app_heartbeat.inspects() {
            return Err(ConfigError::DeliverWithoutAppHeartbeat);
        }
        match self.app_heartbeat.probe(0) {
            Ok(None) => {}
            Ok(Some(sample)) => {
                if let Some(why) = unsendable(&sample, self.write_buffer_limit) {
                    return Err(ConfigError::InvalidAppProbe(why));
                }
            }
            Err(_) => return Err(ConfigError::InvalidAppProbe("the probe builder panicked")),
        }
        Ok(Config {
            ping_interval: self.ping_interval,
            pong_timeout: self.pong_timeout,
            ping_jitter,
            liveness: self.liveness,
            app_heartbeat: self.app_heartbeat,
            handshake_timeout: self.handshake_timeout,
            close_timeout: self.close_timeout,
            write_timeout: self.write_timeout,
            max_connections: self.max_connections,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            allowed_origins,
            max_message_size: self.max_message_size,
            max_frame_size: self.max_frame_size,
            read_buffer_size: self.read_buffer_size,
            write_buffer_limit: self.write_buffer_limit,
            inbound_queue: self.inbound_queue,
            inbound_buffer_limit: self.inbound_buffer_limit,
            outbound_queue: self.outbound_queue,
            drain_window: self.drain_window,
            drain_batches: self.drain_batches,
            drain_close_code: self.drain_close_code,
        })
    }
}

/// Whether `s` is an origin as browsers serialize it (RFC 6454):
/// `scheme://host[:port]` with no path, or the opaque `null`.
fn is_origin(s: &str) -> bool {
    if s == "null" {
        return true;
    }
    let Some((scheme, authority)) = s.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !authority.is_empty()
        && !authority
            .chars()
            .any(|c| matches!(c, '/' | '?' | '#' | '@') || c.is_whitespace())
}

/// Smallest accepted write-buffer limit.
const MIN_WRITE_BUFFER: usize = 1024;

/// Bytes the write buffer may hold beyond the limit: a data frame's header
/// plus the control frames queued behind it.
pub(crate) const CONTROL_HEADROOM: usize = 1024;

/// Longest accepted duration: far beyond any sane setting, and small enough
/// that deadline arithmetic never overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why [`ConfigBuilder::build`] refused a combination of settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration that must be positive was zero; names the setting.
    ZeroDuration(&'static str),
    /// A duration exceeded [`MAX_DURATION`] (a week); names the setting.
    DurationTooLong(&'static str),
    /// A size that must be positive was zero; names the setting.
    ZeroSize(&'static str),
    /// A count that must be at least 1 was zero; names the setting.
    ZeroCount(&'static str),
    /// An allowed origin is not `scheme://host[:port]` (nor `null`).
    InvalidOrigin(String),
    /// The inbound buffer limit cannot hold one message at the size limit.
    InboundBufferBelowMessage {
        /// `inbound_buffer_limit`.
        limit: usize,
        /// `max_message_size`.
        message: usize,
    },
    /// The ping jitter exceeds the ping interval.
    JitterAboveInterval {
        /// The jitter asked for.
        jitter: Duration,
        /// The ping interval.
        interval: Duration,
    },
    /// The frame limit exceeds the message limit.
    FrameAboveMessage {
        /// `max_frame_size`.
        frame: usize,
        /// `max_message_size`.
        message: usize,
    },
    /// The read buffer exceeds the largest supported (64 KiB).
    ReadBufferTooLarge {
        /// `read_buffer_size`.
        size: usize,
        /// The largest accepted.
        max: usize,
    },
    /// The shutdown's close code is not one a server should send to say
    /// "going away": 1000, 1001, 1012, 1013 or 3000–4999.
    InvalidDrainCloseCode(u16),
    /// The write-buffer limit cannot hold control frames.
    WriteBufferTooSmall {
        /// The limit asked for.
        limit: usize,
        /// The smallest accepted limit.
        min: usize,
    },
    /// The application-level heartbeat's probe (built for nonce 0) cannot be
    /// sent; says why: not a text or binary message, larger than the
    /// write-buffer limit, or the builder panicked.
    InvalidAppProbe(&'static str),
    /// [`deliver_heartbeats`](ConfigBuilder::deliver_heartbeats) was set
    /// with neither [`app_heartbeat`](ConfigBuilder::app_heartbeat) nor
    /// [`answer_app_pings`](ConfigBuilder::answer_app_pings): there are no
    /// heartbeat messages to deliver.
    DeliverWithoutAppHeartbeat,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroDuration(name) => write!(f, "{name} must be greater than zero"),
            Self::DurationTooLong(name) => write!(f, "{name} must not exceed one week"),
            Self::ZeroSize(name) => write!(f, "{name} must be greater than zero"),
            Self::ZeroCount(name) => write!(f, "{name} must be at least 1"),
            Self::InboundBufferBelowMessage { limit, message } => write!(
                f,
                "inbound_buffer_limit ({limit}) must be at least max_message_size ({message})"
            ),
            Self::InvalidOrigin(origin) => write!(
                f,
                "allowed origin {origin:?} is not scheme://host[:port] (e.g. https://example.com)"
            ),
            Self::JitterAboveInterval { jitter, interval } => write!(
                f,
                "ping_jitter ({jitter:?}) must not exceed ping_interval ({interval:?})"
            ),
            Self::FrameAboveMessage { frame, message } => write!(
                f,
                "max_frame_size ({frame}) must not exceed max_message_size ({message})"
            ),
            Self::ReadBufferTooLarge { size, max } => {
                write!(f, "read_buffer_size ({size}) must not exceed {max} bytes")
            }
            Self::InvalidDrainCloseCode(code) => write!(
                f,
                "drain_close_code {code} is not 1000, 1001, 1012, 1013 or 3000-4999"
            ),
            Self::WriteBufferTooSmall { limit, min } => {
                write!(
                    f,
                    "write_buffer_limit ({limit}) must be at least {min} bytes"
                )
            }
            Self::InvalidAppProbe(why) => {
                write!(f, "the app_heartbeat probe cannot be sent: {why}")
            }
            Self::DeliverWithoutAppHeartbeat => write!(
                f,
                "deliver_heartbeats needs app_heartbeat or answer_app_pings"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = Config::default();
        assert_eq!(c.ping_interval(), Duration::from_secs(20));
        assert_eq!(c.pong_timeout(), Duration::from_secs(10));
        assert_eq!(c.ping_jitter(), Duration::from_secs(2));
        assert_eq!(c.liveness(), Liveness::AnyFrame);
        assert_eq!(c.read_buffer_size(), 4096);
        assert_eq!(c.max_message_size(), 1 << 20);
        let ws = c.websocket_config();
        assert_eq!(ws.max_write_buffer_size, (4 << 20) + CONTROL_HEADROOM);
        assert_eq!(ws.max_message_size, Some(1 << 20));
    }

    #[test]
    fn zero_interval_is_rejected() {
        let err = Config::builder()
            .ping_interval(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::ZeroDuration("ping_interval"));
        assert!(err.to_string().contains("ping_interval"));
    }

    #[test]
    fn each_invalid_combination_is_rejected() {
        let b = Config::builder;
        assert!(matches!(
            b().pong_timeout(Duration::ZERO).build(),
            Err(ConfigError::ZeroDuration("pong_timeout"))
        ));
        assert!(matches!(
            b().ping_interval(Duration::from_secs(1))
                .ping_jitter(Duration::from_secs(2))
                .build(),
            Err(ConfigError::JitterAboveInterval { .. })
        ));
        assert!(matches!(
            b().max_message_size(10).max_frame_size(11).build(),
            Err(ConfigError::FrameAboveMessage { .. })
        ));
        assert!(matches!(
            b().read_buffer_size(0).build(),
            Err(ConfigError::ZeroSize("read_buffer_size"))
        ));
        assert!(matches!(
            b().write_buffer_limit(10).build(),
            Err(ConfigError::WriteBufferTooSmall { .. })
        ));
        assert!(matches!(
            b().read_buffer_size(1 << 20).build(),
            Err(ConfigError::ReadBufferTooLarge { .. })
        ));
        assert!(matches!(
            b().pong_timeout(Duration::MAX).build(),
            Err(ConfigError::DurationTooLong("pong_timeout"))
        ));
        assert!(
            b().ping_interval(Duration::from_secs(1))
                .ping_jitter(Duration::ZERO)
                .build()
                .is_ok()
        );
    }

    #[test]
    fn counts_are_plain_numbers_and_zero_is_rejected() {
        let b = Config::builder;
        let c = b()
            .outbound_queue(8)
            .max_connections(100)
            .max_handshakes_per_ip(3)
            .build()
            .unwrap();
        assert_eq!(c.outbound_queue(), 8);
        assert_eq!(c.max_connections(), Some(100));
        assert_eq!(c.max_handshakes_per_ip(), Some(3));
        assert_eq!(
            Config::default().max_connections(),
            None,
            "unlimited by default"
        );
        assert_eq!(Config::default().max_handshakes_per_ip(), None);
        for (err, name) in [
            (b().outbound_queue(0).build(), "outbound_queue"),
            (b().max_connections(0).build(), "max_connections"),
            (
                b().max_handshakes_per_ip(0).build(),
                "max_handshakes_per_ip",
            ),
        ] {
            let err = err.unwrap_err();
            assert_eq!(err, ConfigError::ZeroCount(name));
            assert_eq!(err.to_string(), format!("{name} must be at least 1"));
        }
    }

    #[test]
    fn the_app_heartbeat_is_off_by_default_and_validated() {
        let c = Config::default();
        assert!(!c.uses_app_heartbeat() && !c.answers_app_pings() && !c.delivers_heartbeats());
        let answer = |_: &Message| None;
        let c = Config::builder()
            .app_heartbeat(|n| Message::text(n.to_string()), answer)
            .answer_app_pings(|_| None)
            .deliver_heartbeats(true)
            .build()
            .unwrap();
        assert!(c.uses_app_heartbeat() && c.answers_app_pings() && c.delivers_heartbeats());
        let b = Config::builder;
        for (builder, why) in [
            (
                b().app_heartbeat(|_| Message::Ping(Default::default()), answer),
                "not a text or binary message",
            ),
            (
                b().write_buffer_limit(1024)
                    .app_heartbeat(|_| Message::binary(vec![0; 1025]), answer),
                "larger than write_buffer_limit",
            ),
            (
                b().app_heartbeat(|_| panic!("[expected panic] probe"), answer),
                "the probe builder panicked",
            ),
        ] {
            let err = builder.build().unwrap_err();
            assert_eq!(err, ConfigError::InvalidAppProbe(why));
            assert!(err.to_string().contains(why), "{err}");
        }
        assert_eq!(
            b().deliver_heartbeats(true).build().unwrap_err(),
            ConfigError::DeliverWithoutAppHeartbeat
        );
        assert!(b().deliver_heartbeats(false).build().is_ok());
    }

    #[test]
    fn the_drain_is_off_by_default_and_its_settings_are_validated() {
        let c = Config::default();
        assert_eq!(c.drain_window(), Duration::ZERO);
        assert_eq!(c.drain_batches(), None);
        assert_eq!(c.drain_close_code(), 1001);
        let c = Config::builder()
            .drain_window(Duration::from_secs(30))
            .drain_batches(15)
            .drain_close_code(1012)
            .build()
            .unwrap();
        assert_eq!(c.drain_window(), Duration::from_secs(30));
        assert_eq!(c.drain_batches(), Some(15));
        assert_eq!(c.drain_close_code(), 1012);
        for code in [1000, 1001, 1012, 1013, 3000, 4000, 4999] {
            assert!(
                Config::builder().drain_close_code(code).build().is_ok(),
                "{code}"
            );
        }
        for code in [0, 999, 1002, 1005, 1006, 1011, 1014, 1015, 2999, 5000] {
            let err = Config::builder()
                .drain_close_code(code)
                .build()
                .unwrap_err();
            assert_eq!(err, ConfigError::InvalidDrainCloseCode(code));
            assert!(err.to_string().contains(&code.to_string()), "{err}");
        }
        assert_eq!(
            Config::builder().drain_batches(0).build().unwrap_err(),
            ConfigError::ZeroCount("drain_batches")
        );
        assert_eq!(
            Config::builder()
                .drain_window(MAX_DURATION + Duration::from_secs(1))
                .build()
                .unwrap_err(),
            ConfigError::DurationTooLong("drain_window")
        );
    }

    #[test]
    fn origins_are_validated_and_normalized() {
        let c = Config::builder()
            .allowed_origins(["https://Chat.Example.com", "http://127.0.0.1:8080", "null"])
            .build()
            .unwrap();
        let got: Vec<&str> = c.allowed_origins().unwrap().iter().map(|o| &**o).collect();
        assert_eq!(
            got,
            ["https://chat.example.com", "http://127.0.0.1:8080", "null"]
        );
        assert_eq!(Config::default().allowed_origins(), None, "off by default");
        for bad in [
            "example.com",
            "https://example.com/",
            "https://",
            "://x",
            "https://a b",
        ] {
            assert_eq!(
                Config::builder()
                    .allowed_origins([bad])
                    .build()
                    .unwrap_err(),
                ConfigError::InvalidOrigin(bad.to_owned()),
                "{bad}"
            );
        }
    }
}
