//! Why a connection ended: the reason table. See [`CloseReason`] and [`classify`].

use std::fmt;
use std::io;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::error::Error;
use crate::stats::{ConnectionId, Stats};

/// The category of a connection's death. Exactly one per connection.
///
/// The full table, with the close code sent in each case, is
/// `docs/close-reasons.md`; the code that implements it is one function,
/// `classify` in `src/close.rs`, with [`from_close_code`](Self::from_close_code)
/// for the rows keyed by close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum CloseReason {
    /// A completed close handshake with 1000 (`Normal`), an empty Close
    /// (1005), or any code not listed below; or the application closed.
    Normal,
    /// The peer sent 1001 (`Away`), 1012 or 1013, or this supervisor shut down.
    GoingAway,
    /// A deadline passed: pong, close handshake, or a stalled write.
    Timeout,
    /// Invalid frames or data from the peer, or a peer Close with
    /// 1002/1003/1007/1009/1010 (`Protocol`, `Unsupported`, `Invalid`, `Size`,
    /// `Extension`).
    ProtocolError,
    /// The transport ended without a Close frame: EOF or reset (RFC 6455's
    /// 1006, `Abnormal`).
    Abnormal,
    /// A side failed internally: our application panicked while holding the
    /// connection or a local I/O error (Local), or the peer closed with 1011
    /// (`Error`) or 1014 (Remote).
    Internal,
}

impl CloseReason {
    /// Every reason, in declaration order (for pre-registering metrics).
    pub const ALL: [Self; 6] = [
        Self::Normal,
        Self::GoingAway,
        Self::Timeout,
        Self::ProtocolError,
        Self::Abnormal,
        Self::Internal,
    ];

    /// A stable `snake_case` label, for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::GoingAway => "going_away",
            Self::Timeout => "timeout",
            Self::ProtocolError => "protocol_error",
            Self::Abnormal => "abnormal",
            Self::Internal => "internal",
        }
    }

    /// Position in [`ALL`](Self::ALL).
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// The reason a clean close handshake with `code` stands for (the rows
    /// "Close with code …" of the table). `None` is an empty Close (1005).
    pub fn from_close_code(code: Option<CloseCode>) -> Self {
        let Some(code) = code else {
            return Self::Normal;
        };
        match u16::from(code) {
            1000 | 1005 => Self::Normal,
            1001 | 1012 | 1013 => Self::GoingAway,
            1002 | 1003 | 1006 | 1007 | 1009 | 1010 | 1015 => Self::ProtocolError,
            1011 | 1014 => Self::Internal,
            // 1008 (policy), 3000-4999 (registered and private codes) and
            // anything else a peer may legally send: the handshake itself
            // went fine; the code is in the event for the application.
            _ => Self::Normal,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "closed normally",
            Self::GoingAway => "going away",
            Self::Timeout => "timed out",
            Self::ProtocolError => "protocol error",
            Self::Abnormal => "closed abnormally (no close frame)",
            Self::Internal => "internal error",
        })
    }
}

/// Which side started the end of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Initiator {
    /// This process: the application, the supervisor's deadlines, or shutdown.
    Local,
    /// The peer: its Close frame, its invalid data, or its transport going away.
    Remote,
}

impl Initiator {
    /// Both values, for pre-registering metrics.
    pub const ALL: [Self; 2] = [Self::Local, Self::Remote];

    /// A stable label: `local` or `remote`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Remote => "remote",
        }
    }

    /// Position in [`ALL`](Self::ALL).
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything known about one connection's end, passed to every close hook
/// and returned by [`Connection::closed`](crate::Connection::closed).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CloseEvent {
    /// The connection.
    pub id: ConnectionId,
    /// The peer's address, when the transport has one.
    pub peer_addr: Option<std::net::SocketAddr>,
    /// Why it ended.
    pub reason: CloseReason,
    /// Who started the end.
    pub initiator: Initiator,
    /// The close code we sent, if we sent a Close frame (`None` for an
    /// empty Close or none at all).
    pub code_sent: Option<CloseCode>,
    /// The close code the peer sent, if it sent a Close frame with a code.
    pub code_received: Option<CloseCode>,
    /// The text of the Close frame that decided the reason (ours or the
    /// peer's), possibly empty.
    pub text: String,
    /// How long the connection lived after its handshake.
    pub duration: Duration,
    /// Heartbeat statistics at the end.
    pub stats: Stats,
    /// The underlying error, when an error ended the connection.
    pub error: Option<Error>,
}

/// What happened, as the driver saw it: the input of [`classify`].
#[derive(Debug)]
pub(crate) enum Cause<'a> {
    /// The peer sent a Close frame (`None`: an empty one).
    PeerClose(Option<CloseCode>),
    /// The peer sent a Close frame with a code not allowed on the wire.
    PeerCloseInvalid,
    /// The application asked to close with this code (`None`: empty Close).
    AppClose(Option<CloseCode>),
    /// The application dropped its [`Connection`](crate::Connection) normally.
    AppDropped,
    /// The application panicked while holding the connection.
    AppPanicked,
    /// The application took no message for `ping_interval + pong_timeout`
    /// while its unread data filled `inbound_buffer_limit`.
    AppStalled,
    /// [`Supervisor::shutdown`](crate::Supervisor::shutdown), with its close
    /// code (`drain_close_code`, 1001 unless set).
    Shutdown(u16),
    /// The runtime dropped the connection's task without a shutdown (an
    /// ordinary process exit).
    RuntimeStopped,
    /// No liveness within `pong_timeout` of a ping.
    PongTimeout,
    /// A write stayed blocked past `write_timeout`.
    WriteStalled,
    /// We sent Close and the peer did not answer within `close_timeout`.
    CloseHandshakeTimeout,
    /// The transport ended (EOF) with no Close frame.
    TransportEnded,
    /// Reading or writing failed.
    Failed(&'a WsError),
}

/// Maps what happened to the one reason and initiator it stands for.
///
/// This function *is* the table in `docs/close-reasons.md`; each row is a
/// test below and in `tests/close_reason.rs`.
pub(crate) fn classify(cause: &Cause<'_>) -> (CloseReason, Initiator) {
    use CloseReason as R;
    use Initiator::{Local, Remote};
    match cause {
        Cause::PeerClose(code) => (R::from_close_code(*code), Remote),
        Cause::PeerCloseInvalid => (R::ProtocolError, Remote),
        Cause::AppClose(code) => (R::from_close_code(*code), Local),
        Cause::AppDropped => (R::Normal, Local),
        Cause::AppPanicked | Cause::AppStalled => (R::Internal, Local),
        Cause::Shutdown(_) | Cause::RuntimeStopped => (R::GoingAway, Local),
        Cause::PongTimeout | Cause::WriteStalled | Cause::CloseHandshakeTimeout => {
            (R::Timeout, Local)
        }
        Cause::TransportEnded => (R::Abnormal, Remote),
        Cause::Failed(err) => classify_error(err),
    }
}

fn classify_error(err: &WsError) -> (CloseReason, Initiator) {
    use ProtocolError as P;
    match err {
        WsError::Protocol(P::ResetWithoutClosingHandshake) => {
            (CloseReason::Abnormal, Initiator::Remote)
        }
        WsError::Protocol(P::SendAfterClosing) => (CloseReason::Internal, Initiator::Local),
        WsError::Protocol(_) | WsError::Capacity(_) | WsError::Utf8(_) | WsError::AttackAttempt => {
            (CloseReason::ProtocolError, Initiator::Remote)
        }
        WsError::Io(e) if is_transport_gone(e) => (CloseReason::Abnormal, Initiator::Remote),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            (CloseReason::Abnormal, Initiator::Remote)
        }
        WsError::Tls(_) => (CloseReason::Abnormal, Initiator::Remote),
        _ => (CloseReason::Internal, Initiator::Local),
    }
}

/// I/O errors that mean the peer or the path went away, not our own failure.
fn is_transport_gone(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::UnexpectedEof
            | K::NotConnected
            | K::TimedOut
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
    )
}

/// The Close code we send for an error from the peer, if any.
pub(crate) fn code_for_error(err: &WsError) -> Option<CloseCode> {
    match err {
        WsError::Capacity(_) => Some(CloseCode::Size),
        WsError::Utf8(_) => Some(CloseCode::Invalid),
        // The transport is gone: there is no one to send a Close to.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) | WsError::AttackAttempt => Some(CloseCode::Protocol),
        _ => None,
    }
}

/// Longest Close reason text, in bytes (RFC 6455 §5.5: 125 minus the code).
pub const MAX_CLOSE_TEXT: usize = 123;

/// Cuts `text` to at most [`MAX_CLOSE_TEXT`] bytes, on a char boundary.
pub(crate) fn truncate_text(text: &str) -> &str {
    if text.len() <= MAX_CLOSE_TEXT {
        return text;
    }
    let mut end = MAX_CLOSE_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use CloseReason as R;
    use Initiator::{Local, Remote};
    use tokio_tungstenite::tungstenite::error::CapacityError;

    fn code(n: u16) -> Option<CloseCode> {
        Some(CloseCode::from(n))
    }

    // One assertion per row of docs/close-reasons.md, in its order.
    #[test]
    fn table_rows() {
        let rows: Vec<(Cause<'_>, CloseReason, Initiator)> = vec![
            (Cause::PeerClose(code(1000)), R::Normal, Remote),
            (Cause::PeerClose(None), R::Normal, Remote),
            (Cause::AppClose(code(1000)), R::Normal, Local),
            (Cause::AppDropped, R::Normal, Local),
            (Cause::PeerClose(code(1008)), R::Normal, Remote),
            (Cause::PeerClose(code(4000)), R::Normal, Remote),
            (Cause::PeerClose(code(1001)), R::GoingAway, Remote),
            (Cause::PeerClose(code(1012)), R::GoingAway, Remote),
            (Cause::PeerClose(code(1013)), R::GoingAway, Remote),
            (Cause::AppStalled, R::Internal, Local),
            (Cause::PeerCloseInvalid, R::ProtocolError, Remote),
            (Cause::Shutdown(1001), R::GoingAway, Local),
            (Cause::Shutdown(1012), R::GoingAway, Local),
            (Cause::RuntimeStopped, R::GoingAway, Local),
            (Cause::PongTimeout, R::Timeout, Local),
            (Cause::WriteStalled, R::Timeout, Local),
            (Cause::CloseHandshakeTimeout, R::Timeout, Local),
            (Cause::PeerClose(code(1002)), R::ProtocolError, Remote),
            (Cause::PeerClose(code(1003)), R::ProtocolError, Remote),
            (Cause::PeerClose(code(1007)), R::ProtocolError, Remote),
            (Cause::PeerClose(code(1009)), R::ProtocolError, Remote),
            (Cause::PeerClose(code(1010)), R::ProtocolError, Remote),
            (Cause::TransportEnded, R::Abnormal, Remote),
            (Cause::AppPanicked, R::Internal, Local),
            (Cause::PeerClose(code(1011)), R::Internal, Remote),
            (Cause::PeerClose(code(1014)), R::Internal, Remote),
        ];
        for (cause, reason, initiator) in rows {
            assert_eq!(classify(&cause), (reason, initiator), "{cause:?}");
        }
    }

    #[test]
    fn error_rows() {
        let reset = WsError::Io(io::ErrorKind::ConnectionReset.into());
        let eof = WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake);
        let utf8 = WsError::Utf8("bad".into());
        let big = WsError::Capacity(CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        });
        let unmasked = WsError::Protocol(ProtocolError::UnmaskedFrameFromClient);
        let local_io = WsError::Io(io::ErrorKind::OutOfMemory.into());
        let rows = [
            (&reset, R::Abnormal, Remote, None),
            (&eof, R::Abnormal, Remote, None),
            (&utf8, R::ProtocolError, Remote, Some(CloseCode::Invalid)),
            (&big, R::ProtocolError, Remote, Some(CloseCode::Size)),
            (
                &unmasked,
                R::ProtocolError,
                Remote,
                Some(CloseCode::Protocol),
            ),
            (&local_io, R::Internal, Local, None),
        ];
        for (err, reason, initiator, code) in &rows {
            assert_eq!(
                classify(&Cause::Failed(err)),
                (*reason, *initiator),
                "{err}"
            );
            assert_eq!(code_for_error(err), *code, "{err}");
        }
    }

    #[test]
    fn labels_are_unique_and_indexed() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut labels: Vec<_> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.dedup();
        assert_eq!(labels.len(), CloseReason::ALL.len());
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_text("bye"), "bye");
        let ascii = "a".repeat(200);
        assert_eq!(truncate_text(&ascii).len(), 123);
        // 'é' is two bytes: 61 of them are 122 bytes, the 62nd would cross 123.
        let accents = "é".repeat(100);
        let cut = truncate_text(&accents);
        assert_eq!(cut.len(), 122);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
