//! Errors of this crate. See [`Error`].

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

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
    /// on the client side, any refusal or invalid answer from the server.
    Protocol,
    /// The transport failed during the handshake (connect refused, reset,
    /// EOF before the request was complete).
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
}

impl HandshakeFailure {
    /// Every cause, in declaration order (for pre-registering metrics).
    pub const ALL: [Self; 10] = [
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
        })
    }
}

impl Error {
    pub(crate) fn new(kind: Kind, source: Option<Source>) -> Self {
        Self {
            inner: Arc::new(Inner { kind, source }),
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
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ws_supervisor::Error");
        d.field("kind", &self.inner.kind);
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
            Kind::Handshake(cause) => fmt::Display::fmt(&cause, f),
            Kind::Transport => f.write_str("connection failed"),
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
