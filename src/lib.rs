//! Supervised WebSocket connections for long-lived tokio services.
//!
//! A [`Supervisor`] keeps every WebSocket connection of a service honest: it
//! pings each peer on a schedule, holds each peer to a pong deadline, and,
//! whenever a connection ends for any reason, runs the service's close hooks
//! exactly once with a categorized [`CloseReason`] — `Normal`, `GoingAway`,
//! `Timeout`, `ProtocolError`, `Abnormal` or `Internal`.
//!
//! Half-open connections (a peer that vanished without FIN or RST, a
//! process that is stopped, a NAT that forgot the flow) look alive to the
//! kernel for hours; the supervisor finds them within
//! `ping_interval + ping_jitter + pong_timeout` of the last frame the peer
//! sent. And "why did it close?" gets one answer from one table
//! (`docs/close-reasons.md`), instead of a bare 1006.
//!
//! # Examples
//!
//! A supervised echo server:
//!
//! ```
//! use std::time::Duration;
//! use ws_supervisor::{CloseEvent, Config, Supervisor};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::builder()
//!     .ping_interval(Duration::from_secs(15))
//!     .pong_timeout(Duration::from_secs(5))
//!     .build()?;
//! let supervisor = Supervisor::builder(config)
//!     .on_close(|e: &CloseEvent| println!("{} {} ({}), rtt {:?}", e.id, e.reason, e.initiator, e.stats.smoothed_rtt))
//!     .build();
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let addr = listener.local_addr()?;
//! # tokio::spawn(async move {
//! #     let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await.unwrap();
//! #     ws.close(None).await.unwrap();
//! #     while let Some(Ok(_)) = futures::StreamExt::next(&mut ws).await {}
//! # });
//! let (tcp, _) = listener.accept().await?;
//! let mut conn = supervisor.accept_tcp(tcp).await?;
//! let echo = tokio::spawn(async move {
//!     while let Some(message) = conn.recv().await {
//!         if conn.send(message).await.is_err() {
//!             break;
//!         }
//!     }
//! });
//! # echo.await?;
//! # assert_eq!(supervisor.closed_total(ws_supervisor::CloseReason::Normal), 1);
//! supervisor.shutdown(Duration::from_secs(10)).await;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! * [`Config`] (`config.rs`): every knob, validated by [`ConfigBuilder::build`].
//! * [`Supervisor`] (`supervisor.rs`): the handle —
//!   [`supervise`](Supervisor::supervise), [`shutdown`](Supervisor::shutdown),
//!   registration of every connection; `state.rs`: what the handle shares
//!   with the connections (counts, gauges, admission) and `shutdown.rs`: the
//!   shutdown's state in one type; `drain.rs`: when each connection closes
//!   in a drained shutdown, with no I/O.
//! * [`Connect`] (`connect.rs`): [`Supervisor::connect`], the client side,
//!   with `tls.rs` for `wss://` (feature `rustls`).
//! * [`Reconnecting`] (`client/mod.rs`): [`Supervisor::reconnecting`], a
//!   stream of client connections that comes back after each one ends;
//!   `client/backoff.rs`: the delays ([`Backoff`], pure);
//!   `client/policy.rs`: what close codes and `Retry-After` mean
//!   ([`Decision`], pure). See `docs/client.md`.
//! * [`Accept`] (`accept.rs`): [`Supervisor::accept`], the server handshake
//!   on any stream, reading the request itself so that it can answer it.
//! * `handshake.rs`: what every server way in shares — request validation,
//!   subprotocol choice, the 101 response and the refusals (400, 403, 426,
//!   429, 503), with no I/O.
//! * [`ReadLayer`] (`transport.rs`): the lean read layer under every
//!   connection the supervisor builds; it also hands the driver the peer's
//!   pongs without a pass through tungstenite.
//! * `hyper.rs` (`Supervisor::upgrade`, feature `hyper`) and `axum`
//!   (`axum.rs`, feature `axum`): the HTTP upgrade integrations.
//! * [`Connection`] and [`Sender`] (`connection.rs`): what the application
//!   holds — a stream of messages, a cloneable sender, close, stats — and
//!   the state it shares with the driver: the queues both ways and the
//!   waker that tells the driver whether its socket woke it. [`Reply`]
//!   (`inline.rs`): how a message handler given to
//!   [`Connection::on_message`] answers, on the driver's task.
//! * `driver.rs`: the per-connection task that owns the socket and runs the
//!   steps (read, deliver, write, flush, timers) over the pieces below;
//!   `signal.rs`: its one-shot wake-up for the shutdown.
//! * `heartbeat.rs`: the ping schedule, pong matching and RTT estimate, with
//!   no I/O; `app_heartbeat.rs`: application-level pings ([`AppPong`]) —
//!   the probe message, its answer, replies to the peer's own — with no I/O.
//! * [`CloseReason`] and [`CloseEvent`] (`close.rs`): the reason table;
//!   `verdict.rs`: the close decision (which cause wins, the codes sent and
//!   received, the frame each cause sends), with no I/O.
//! * [`CloseHook`] (`hook.rs`): hooks with panic containment; `guard.rs`:
//!   the guard that runs them exactly once per connection.
//! * [`ConnectionId`] and [`Stats`] (`stats.rs`): plain data.
//! * `trace.rs`: the `tracing` shim (nothing without the feature).
//! * [`Error`] (`error.rs`): handshake and send errors.
//!
//! * [`metrics`] (`metrics.rs`): metric names, descriptions and the handles
//!   emitted through the `metrics` facade; [`prometheus`] (`prometheus.rs`):
//!   the optional exporter helper.
//!
//! Behaviour in depth lives in `docs/`: `keepalive.md` (the heartbeat
//! rules and the detection bound), `close-reasons.md` (the table),
//! `client.md` (the reconnect policy and its defaults),
//! `metrics.md` (the catalog) and `operations.md` (dashboard, alerts).
//!
//! ## Features
//!
//! All optional integrations are off by default; the default build stays
//! lean.
//!
//! * `prometheus` (default): [`prometheus::install`] serves the metrics over
//!   HTTP with the recommended histogram buckets, through
//!   `metrics-exporter-prometheus` (HTTP listener only, no push gateway or
//!   TLS). Without it the crate still emits through the `metrics` facade to
//!   whatever recorder the application installs.
//! * `tracing` (off by default): a `ws_connection` span per connection
//!   (fields `conn_id`, `peer`, `role`, and `path` and `protocol` where
//!   known), a DEBUG event when it opens and one event when it closes with
//!   the [`CloseEvent`]'s reason, initiator, codes, duration, RTT and ping
//!   counts. The close is DEBUG for `Normal` and `GoingAway`; INFO for
//!   `Timeout`, `ProtocolError`, `Abnormal` and a peer's `Internal`; WARN
//!   for our own `Internal`. A panicking close hook is a WARN event; pings
//!   and pongs are TRACE; messages log nothing. Target: `ws_supervisor`.
//!   Without the feature it costs nothing: no span field, no allocation, no
//!   branch (`docs/operations.md`, "Logs with tracing").
//! * `hyper` (off by default): `Supervisor::upgrade` validates a hyper 1.x
//!   request as a WebSocket upgrade and builds the connection exactly as
//!   [`Supervisor::accept`] does.
//! * `axum` (off by default; implies `hyper`): `axum::WebSocketUpgrade`,
//!   an axum 0.8 extractor. axum's own `ws` feature is not used (it would
//!   bring a second tokio-tungstenite).
//! * `rustls` (off by default): [`Supervisor::connect`] to `wss://` URLs through rustls with
//!   the ring provider (aws-lc, rustls' default, is not built), trusting
//!   Mozilla's roots from `webpki-roots` by default, or any
//!   `rustls::ClientConfig` given to [`Connect`]'s `tls_config`. `rustls` is
//!   re-exported for the matching version. Servers already take TLS streams:
//!   [`Supervisor::accept`] takes any `AsyncRead + AsyncWrite`, e.g. a
//!   `tokio_rustls` server stream (see `examples/tls_server.rs`).

#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod accept;
mod app_heartbeat;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
mod client;
mod close;
mod config;
mod connect;
mod connection;
mod drain;
mod driver;
mod error;
mod guard;
mod handshake;
mod heartbeat;
mod hook;
#[cfg(feature = "hyper")]
mod hyper;
mod inline;
pub mod metrics;
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub mod prometheus;
mod shutdown;
mod signal;
mod state;
mod stats;
mod supervisor;
mod taken;
#[cfg(feature = "rustls")]
mod tls;
mod trace;
mod transport;
mod verdict;

pub use accept::Accept;
pub use app_heartbeat::AppPong;
pub use client::backoff::{Backoff, BackoffBuilder, Jitter, Schedule};
pub use client::policy::Decision;
pub use client::{BuildError, Reconnecting, ReconnectingBuilder, Stop};
pub use close::{CloseEvent, CloseReason, Initiator, MAX_CLOSE_TEXT};
pub use config::{Config, ConfigBuilder, ConfigError, Liveness, MAX_DURATION};
pub use connect::Connect;
pub use connection::{Connection, Sender};
pub use error::{Error, HandshakeFailure};
pub use hook::CloseHook;
#[cfg(feature = "hyper")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper")))]
pub use hyper::{HttpUpgrade, UpgradeRejection, Upgrading};
pub use inline::Reply;
pub use stats::{ConnectionId, Stats};
pub use supervisor::{ShutdownSummary, Supervisor, SupervisorBuilder};
pub use transport::ReadLayer;

/// The TLS implementation behind `wss://`, re-exported so that the
/// [`ClientConfig`](rustls::ClientConfig) given to [`Connect::tls_config`] is
/// of the matching version.
#[cfg(feature = "rustls")]
#[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
pub use rustls;
/// The WebSocket implementation underneath, re-exported for its types
/// ([`Message`](tungstenite::Message), request and response types).
pub use tokio_tungstenite::tungstenite;
/// RFC 6455 close codes, as tungstenite names them.
pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Internals exposed for `benches/heartbeat.rs` only: not a public API, no
/// semver guarantees.
#[doc(hidden)]
pub mod __bench {
    pub use crate::heartbeat::{Heartbeat, Pong};
}

// The README's examples are compiled with the doctests; some need the
// optional integrations, so with all features (as `.ci/run` runs them).
#[cfg(all(doctest, feature = "axum", feature = "rustls"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
