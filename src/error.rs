//! Errors of this crate. See [`Error`].

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

type Source = Box<dyn StdError + Send + Sync>;

/// An error from the supervisor: a refused or failed handshake, a send on a
/// closed connection, or invalid input.
///
/// Opaque on purpose: ask it with the `is_*` predicates and
/// [`handshake_failure`](Self::handshake_failure), and walk
/// [`source`](StdError::source) for the underlying error. The `Display` text
/// is for people and may change between versions. Cloning is cheap.
///
/// A connection that *ends* is not an error: its end is a
/// [`CloseEvent`](crate::CloseEvent) with a [`CloseReason`](crate::CloseReason).
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: Kind,
    source: Option<Source>,
    /// The server's answer, when it refused a client's upgrade.
    refusal: Option<Refusal>,
}

/// A server's refusal of a client's upgrade: its status and, when it sent a
/// valid `Retry-After`, the wait it asked for (measured when received).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The connection is closed (or closing): nothing more can be sent.
    Closed,
    /// The application passed something that cannot be sent.
    InvalidInput(&'static str),
    /// The opening handshake did not produce a connection.
    Handshake(HandshakeFailure),
    /// Reading or writing the connection failed (in a `CloseEvent`).
    Transport,
    /// A reconnecting client's `on_connect` hook failed, timed out or
    /// panicked.
    OnConnect,
}

/// Why an opening handshake did not produce a connection. No close hook runs
/// for these: the connection never existed for the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// Not finished within the handshake timeout (e.g. a slow or silent client).
    Timeout,
    /// The application's request callback refused it (e.g. failed auth).
    Refused,
    /// The supervisor already holds `max_connections` (HTTP 503 sent).
    AtCapacity,
    /// The supervisor is shutting down (HTTP 503 sent).
    ShuttingDown,
    /// The peer spoke invalid HTTP or WebSocket during the handshake: a
    /// malformed request, not `GET`, no `Connection: upgrade`, a bad
    /// `Sec-WebSocket-Key`, a request head over 16 KiB (HTTP 400 or 431 sent);
    /// on the client side, an invalid URL or an invalid answer from the
    /// server (not HTTP, or a 101 without a valid `Sec-WebSocket-Accept`).
    Protocol,
    /// The transport failed during the handshake (a reset, EOF before the
    /// request or response was complete).
    Io,
    /// A plain HTTP request, with no `Upgrade: websocket` (HTTP 426 sent):
    /// a browser pointed at the WebSocket URL, a load balancer's health
    /// check, a scanner.
    NotWebSocket,
    /// `Sec-WebSocket-Version` missing or not 13 (HTTP 426 sent, with
    /// `Sec-WebSocket-Version: 13`).
    UnsupportedVersion,
    /// The `Origin` header is not in
    /// [`allowed_origins`](crate::ConfigBuilder::allowed_origins) (HTTP 403 sent):
    /// possibly a cross-site WebSocket hijacking attempt.
    Origin,
    /// More handshakes in flight from the peer's IP address than
    /// [`max_handshakes_per_ip`](crate::ConfigBuilder::max_handshakes_per_ip)
    /// (HTTP 429 sent).
    PeerLimit,
    /// Client side: the host name could not be resolved.
    Dns,
    /// Client side: the server's host refused the TCP connection (nothing
    /// listens on the port).
    ConnectionRefused,
    /// Client side: the TLS handshake of a `wss://` URL failed (an
    /// untrusted, expired or mismatched certificate, a TLS alert).
    Tls,
    /// Client side: the server answered the upgrade with an HTTP status
    /// other than 101 (e.g. 401, 404, 429, 503); see
    /// [`Error::http_status`] and [`Error::retry_after`].
    HttpStatus,
}

impl HandshakeFailure {
    /// Every cause, in declaration order (for pre-registering metrics).
    pub const ALL: [Self; 14] = [
        Self::Timeout,
        Self::Refused,
        Self::AtCapacity,
        Self::ShuttingDown,
        Self::Protocol,
        Self::Io,
        Self::NotWebSocket,
        Self::UnsupportedVersion,
        Self::Origin,
        Self::PeerLimit,
        Self::Dns,
        Self::ConnectionRefused,
        Self::Tls,
        Self::HttpStatus,
    ];

    /// A stable `snake_case` label, for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Refused => "refused",
            Self::AtCapacity => "at_capacity",
            Self::ShuttingDown => "shutting_down",
            Self::Protocol => "protocol",
            Self::Io => "io",
            Self::NotWebSocket => "not_websocket",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Origin => "origin",
            Self::PeerLimit => "peer_limit",
            Self::Dns => "dns",
            Self::ConnectionRefused => "connection_refused",
            Self::Tls => "tls",
            Self::HttpStatus => "http_status",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Timeout => "handshake timed out",
            Self::Refused => "handshake refused by the application",
            Self::AtCapacity => "connection limit reached",
            Self::ShuttingDown => "supervisor is shutting down",
            Self::Protocol => "invalid handshake",
            Self::Io => "transport failed during the handshake",
            Self::NotWebSocket => "not a WebSocket upgrade request",
            Self::UnsupportedVersion => "unsupported WebSocket version",
            Self::Origin => "origin not allowed",
            Self::PeerLimit => "too many handshakes in flight from this address",
            Self::Dns => "host name not resolved",
            Self::ConnectionRefused => "connection refused",
            Self::Tls => "TLS handshake failed",
            Self::HttpStatus => "upgrade refused by the server",
        })
    }
}

impl Error {
    pub(crate) fn new(kind: Kind, source: Option<Source>) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                source,
                refusal: None,
            }),
        }
    }

    /// A client's upgrade refused by the server with `refusal`'s status.
    pub(crate) fn refused_upgrade(refusal: Refusal, source: Option<Source>) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind: Kind::Handshake(HandshakeFailure::HttpStatus),
                source,
                refusal: Some(refusal),
            }),
        }
    }

    pub(crate) fn closed() -> Self {
        Self::new(Kind::Closed, None)
    }

    pub(crate) fn invalid(what: &'static str) -> Self {
        Self::new(Kind::InvalidInput(what), None)
    }

    pub(crate) fn handshake(cause: HandshakeFailure, source: Option<Source>) -> Self {
        Self::new(Kind::Handshake(cause), source)
    }

    pub(crate) fn on_connect(source: Option<Source>) -> Self {
        Self::new(Kind::OnConnect, source)
    }

    pub(crate) fn transport(source: impl Into<Source>) -> Self {
        Self::new(Kind::Transport, Some(source.into()))
    }

    /// The connection is closed or closing; the message was not queued.
    pub fn is_closed(&self) -> bool {
        self.inner.kind == Kind::Closed
    }

    /// The input was refused before anything was queued: a control frame
    /// passed to `send`, a message above the write-buffer limit, or a close
    /// code that must not be sent (1005 with text, 1006, 1015, reserved).
    pub fn is_invalid_input(&self) -> bool {
        matches!(self.inner.kind, Kind::InvalidInput(_))
    }

    /// The opening handshake timed out.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == Kind::Handshake(HandshakeFailure::Timeout)
    }

    /// Why the opening handshake failed, if this is a handshake error.
    pub fn handshake_failure(&self) -> Option<HandshakeFailure> {
        match self.inner.kind {
            Kind::Handshake(cause) => Some(cause),
            _ => None,
        }
    }

    /// A [`Reconnecting`](crate::Reconnecting) client's `on_connect` hook
    /// failed (its error is the [`source`](StdError::source)), took longer
    /// than the handshake timeout, or panicked.
    pub fn is_on_connect(&self) -> bool {
        self.inner.kind == Kind::OnConnect
    }

    /// The HTTP status the server answered a client's upgrade with, when it
    /// refused it ([`HandshakeFailure::HttpStatus`]).
    pub fn http_status(&self) -> Option<u16> {
        self.inner.refusal.map(|r| r.status)
    }

    /// How long the server asked the client to wait, from a valid
    /// `Retry-After` header on its refusal of the upgrade: delay-seconds, or
    /// an HTTP date (IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`)
    /// converted to a wait against the system clock when the answer arrived
    /// (a date in the past is a zero wait). `None` when the header was
    /// absent or invalid, or this is not a refused upgrade.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.refusal.and_then(|r| r.retry_after)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ws_supervisor::Error");
        d.field("kind", &self.inner.kind);
        if let Some(refusal) = &self.inner.refusal {
            d.field("refusal", refusal);
        }
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.inner.kind {
            Kind::Closed => f.write_str("connection closed"),
            Kind::InvalidInput(what) => write!(f, "invalid input: {what}"),
            Kind::Handshake(cause) => match self.inner.refusal {
                Some(r) => write!(f, "{cause} (HTTP {})", r.status),
                None => fmt::Display::fmt(&cause, f),
            },
            Kind::Transport => f.write_str("connection failed"),
            Kind::OnConnect => f.write_str("the on_connect hook failed"),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|s| &**s as &(dyn StdError + 'static))
    }
}
