//! The close decision of one connection, with no I/O. See [`Verdict`].

use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::close::{Cause, CloseReason, Initiator, classify, code_for_error};
use crate::error::{Error, HandshakeFailure};
use crate::transport::RawClose;

/// The close verdict of one connection, after python-websockets'
/// `fail()` with its `close_sent`/`close_rcvd`: which cause ended it (the
/// first final one), whether that is still provisional, the codes sent and
/// received, and which Close frame each cause sends.
///
/// The driver tells it what happened and asks it what to send; it decides.
/// With [`classify`], it is the whole of `docs/close-reasons.md`, and its
/// unit tests below walk that table's rules without sockets.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    /// The first final cause, as it will be reported.
    outcome: Option<Outcome>,
    /// We queued a Close frame, or the protocol layer answered the peer's
    /// (`close_sent`): the protocol allows no second one.
    close_sent: bool,
    /// The code of that Close frame (`None`: an empty one, or none sent).
    code_sent: Option<CloseCode>,
    /// The code of the Close frame the peer sent (`close_rcvd`).
    code_received: Option<CloseCode>,
}

/// A decided cause, as it will be reported.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) reason: CloseReason,
    pub(crate) initiator: Initiator,
    pub(crate) text: String,
    pub(crate) error: Option<Error>,
    /// A close the application started (`close()`, or dropping its
    /// `Connection`): final once the handshake ends, but replaced by
    /// `Timeout` if the peer never answers it (rule 2 of the table).
    provisional: bool,
}

/// The Close frame we send, where the cause lets us choose it: `None` where
/// none can be sent (the transport is gone or stuck) or where the peer's
/// own Close is answered by the protocol layer.
///
/// This is the "code we send" column of `docs/close-reasons.md`; an
/// application close sends the application's own frame.
pub(crate) fn close_frame(cause: &Cause<'_>) -> Option<CloseFrame> {
    let (code, text) = match cause {
        Cause::AppDropped => (CloseCode::Normal, ""),
        Cause::AppPanicked => (CloseCode::Error, "application panicked"),
        Cause::AppStalled => (CloseCode::Error, "application not reading"),
        // Whatever the code, the same text but for 1012.
        Cause::Shutdown(1012) => (CloseCode::Restart, "service restart"),
        Cause::Shutdown(code) => (CloseCode::from(*code), "server shutting down"),
        Cause::RuntimeStopped => (CloseCode::Away, "runtime stopped"),
        Cause::PongTimeout => (CloseCode::Error, "ping timeout"),
        Cause::Failed(e) => {
            let code = code_for_error(e)?;
            let text = match code {
                CloseCode::Size => "message too big",
                CloseCode::Invalid => "invalid data",
                _ => "protocol error",
            };
            (code, text)
        }
        Cause::PeerClose(_)
        | Cause::PeerCloseInvalid
        | Cause::AppClose(_)
        | Cause::WriteStalled
        | Cause::CloseHandshakeTimeout
        | Cause::TransportEnded => return None,
    };
    Some(CloseFrame {
        code,
        reason: text.into(),
    })
}

/// Whether a peer may send `code` in a Close frame: RFC 6455 §7.4 and the
/// IANA registry (1000–1003, 1007–1014, 3000–4999). Anything else (1004,
/// 1005, 1006, 1015, 1016–2999, below 1000, 5000 and up) is a protocol error.
pub(crate) fn valid_on_the_wire(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The Close frame that refuses an already upgraded stream (given to
/// `supervise`, or upgraded as a shutdown began): 1013 (try again later) at
/// capacity, otherwise the shutdown's own code, `shutdown_code`
/// (`drain_close_code`: 1001 unless set).
pub(crate) fn refusal_frame(cause: HandshakeFailure, shutdown_code: u16) -> CloseFrame {
    let code = match cause {
        HandshakeFailure::AtCapacity => CloseCode::Again,
        _ => CloseCode::from(shutdown_code),
    };
    CloseFrame {
        code,
        reason: cause.as_str().into(),
    }
}

impl Verdict {
    /// Records what happened; the first final cause wins (rule 1).
    pub(crate) fn record(&mut self, cause: Cause<'_>, text: String, error: Option<Error>) {
        let overrides = matches!(cause, Cause::CloseHandshakeTimeout);
        // One rule for `close()` and for dropping the `Connection`.
        let provisional = matches!(cause, Cause::AppClose(_) | Cause::AppDropped);
        self.settle(classify(&cause), provisional, overrides, text, error);
    }

    /// Records a read or write error, which the event keeps.
    pub(crate) fn record_error(&mut self, e: WsError) {
        let class = classify(&Cause::Failed(&e));
        self.settle(
            class,
            false,
            false,
            String::new(),
            Some(Error::transport(e)),
        );
    }

    /// Keeps the first final cause; `overrides` replaces a provisional one.
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

    /// The peer's Close frame arrived: `frame` as tungstenite reports it,
    /// `raw` as it was on the wire where the stream shows it (tungstenite
    /// reports a code it does not allow as its own 1002 "Protocol
    /// violation"). The event keeps what the peer sent. If we had sent no
    /// Close, tungstenite answers: with the same code, or 1002 for a code it
    /// does not allow.
    pub(crate) fn peer_closed(&mut self, frame: Option<&CloseFrame>, raw: Option<RawClose>) {
        let (code, text) = match raw {
            Some(raw) => (
                raw.code.map(CloseCode::from),
                String::from_utf8_lossy(&raw.text).into_owned(),
            ),
            None => (
                frame.map(|f| f.code),
                frame.map_or_else(String::new, |f| f.reason.to_string()),
            ),
        };
        self.code_received = code;
        if !self.close_sent {
            self.close_sent = true;
            self.code_sent = code.map(|c| {
                if c.is_allowed() {
                    c
                } else {
                    CloseCode::Protocol
                }
            });
        }
        let cause = match code {
            Some(c) if !valid_on_the_wire(u16::from(c)) => Cause::PeerCloseInvalid,
            _ => Cause::PeerClose(code),
        };
        self.record(cause, text, None);
    }

    /// Our Close frame (with `code`, `None` for an empty one) was queued.
    pub(crate) fn sent(&mut self, code: Option<CloseCode>) {
        self.close_sent = true;
        self.code_sent = code;
    }

    /// Whether the shutdown's Close ended this connection: the decided
    /// cause is [`Cause::Shutdown`], the only final one that is going away,
    /// local (an application close with 1001 is provisional until the peer
    /// answers; the runtime stopping is decided as the driver is dropped).
    pub(crate) fn closed_by_shutdown(&self) -> bool {
        self.outcome.as_ref().is_some_and(|o| {
            !o.provisional && (o.reason, o.initiator) == (CloseReason::GoingAway, Initiator::Local)
        })
    }

    /// The code of our Close frame, if one went out.
    pub(crate) fn code_sent(&self) -> Option<CloseCode> {
        self.code_sent
    }

    /// The code of the peer's Close frame, if one came in.
    pub(crate) fn code_received(&self) -> Option<CloseCode> {
        self.code_received
    }

    /// The verdict, once the connection is over. `fallback` stands for a
    /// task that ended with no cause recorded (see [`fallback_cause`]).
    pub(crate) fn take_outcome(&mut self, fallback: Cause<'_>) -> Outcome {
        self.outcome.take().unwrap_or_else(|| {
            let (reason, initiator) = classify(&fallback);
            Outcome {
                reason,
                initiator,
                text: String::new(),
                error: None,
                provisional: false,
            }
        })
    }
}

/// What ended a task that recorded no cause: the supervisor's shutdown
/// (`cancelled`), our own code panicking (`panicking`), or else the runtime
/// dropping the task without a shutdown.
pub(crate) fn fallback_cause(shutdown: Option<u16>, panicking: bool) -> Cause<'static> {
    if let Some(code) = shutdown {
        Cause::Shutdown(code)
    } else if panicking {
        Cause::AppPanicked
    } else {
        Cause::RuntimeStopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CloseReason as R;
    use Initiator::{Local, Remote};

    fn reason(v: &mut Verdict) -> (R, Initiator, String) {
        let o = v.take_outcome(Cause::AppPanicked);
        (o.reason, o.initiator, o.text)
    }

    fn frame(code: u16, text: &str) -> CloseFrame {
        CloseFrame {
            code: CloseCode::from(code),
            reason: text.into(),
        }
    }

    #[test]
    fn the_shutdown_frame_carries_the_configured_code() {
        let frame = |code| close_frame(&Cause::Shutdown(code)).expect("a Close");
        assert_eq!(frame(1001), self::frame(1001, "server shutting down"));
        assert_eq!(frame(1012), self::frame(1012, "service restart"));
        assert_eq!(frame(4000), self::frame(4000, "server shutting down"));
        // Whatever the code, a shutdown is going away, local.
        assert_eq!(classify(&Cause::Shutdown(4000)), (R::GoingAway, Local));
    }

    #[test]
    fn only_the_shutdown_cause_is_closed_by_shutdown() {
        let mut v = Verdict::default();
        assert!(!v.closed_by_shutdown());
        v.record(Cause::Shutdown(1001), "server shutting down".into(), None);
        assert!(v.closed_by_shutdown());
        // An application close with 1001, still waiting for the peer.
        let mut v = Verdict::default();
        v.record(Cause::AppClose(Some(CloseCode::Away)), String::new(), None);
        assert!(!v.closed_by_shutdown());
        // The peer's 1001 is remote.
        let mut v = Verdict::default();
        v.peer_closed(Some(&frame(1001, "")), None);
        assert!(!v.closed_by_shutdown());
    }

    #[test]
    fn the_first_final_cause_wins() {
        let mut v = Verdict::default();
        v.record(Cause::PongTimeout, "ping timeout".into(), None);
        v.record(Cause::TransportEnded, String::new(), None);
        v.peer_closed(Some(&frame(1000, "late")), None);
        assert_eq!(reason(&mut v), (R::Timeout, Local, "ping timeout".into()));
    }

    #[test]
    fn an_unanswered_application_close_becomes_a_timeout_keeping_its_text() {
        let mut v = Verdict::default();
        v.record(Cause::AppClose(Some(CloseCode::Normal)), "bye".into(), None);
        v.sent(Some(CloseCode::Normal));
        v.record(Cause::CloseHandshakeTimeout, String::new(), None);
        assert_eq!(reason(&mut v), (R::Timeout, Local, "bye".into()));
        assert_eq!(v.code_sent(), Some(CloseCode::Normal));
    }

    #[test]
    fn an_answered_application_close_is_final() {
        for then in [
            Cause::PeerClose(Some(CloseCode::Normal)),
            Cause::TransportEnded,
        ] {
            let mut v = Verdict::default();
            v.record(
                Cause::AppClose(Some(CloseCode::Away)),
                "moving".into(),
                None,
            );
            v.record(then, String::new(), None);
            // The handshake ended: a later deadline changes nothing.
            v.record(Cause::CloseHandshakeTimeout, String::new(), None);
            assert_eq!(reason(&mut v), (R::GoingAway, Local, "moving".into()));
        }
    }

    #[test]
    fn a_dropped_connection_follows_the_same_rule_as_close() {
        let mut v = Verdict::default();
        v.record(Cause::AppDropped, String::new(), None);
        v.record(Cause::CloseHandshakeTimeout, String::new(), None);
        assert_eq!(reason(&mut v).0, R::Timeout);
        let mut v = Verdict::default();
        v.record(Cause::AppDropped, String::new(), None);
        v.record(Cause::TransportEnded, String::new(), None);
        v.record(Cause::CloseHandshakeTimeout, String::new(), None);
        assert_eq!(reason(&mut v).0, R::Normal);
    }

    #[test]
    fn only_an_application_close_is_provisional() {
        let mut v = Verdict::default();
        v.record(Cause::Shutdown(1001), "server shutting down".into(), None);
        v.record(Cause::CloseHandshakeTimeout, String::new(), None);
        assert_eq!(reason(&mut v).0, R::GoingAway);
    }

    #[test]
    fn a_peer_close_is_answered_with_its_code_or_1002() {
        let mut v = Verdict::default();
        v.peer_closed(Some(&frame(1001, "tab closed")), None);
        assert_eq!(v.code_received(), Some(CloseCode::Away));
        assert_eq!(v.code_sent(), Some(CloseCode::Away));
        assert_eq!(reason(&mut v), (R::GoingAway, Remote, "tab closed".into()));

        let mut v = Verdict::default();
        v.peer_closed(Some(&frame(1005, "")), None);
        assert_eq!(v.code_sent(), Some(CloseCode::Protocol));

        // Our own Close went out first: the peer's answers it.
        let mut v = Verdict::default();
        v.record(Cause::Shutdown(1001), "server shutting down".into(), None);
        v.sent(Some(CloseCode::Away));
        v.peer_closed(Some(&frame(1000, "")), None);
        assert_eq!(v.code_sent(), Some(CloseCode::Away));
        assert_eq!(v.code_received(), Some(CloseCode::Normal));
        assert_eq!(reason(&mut v).0, R::GoingAway);

        // Our empty Close went out first: nothing answers the peer's.
        let mut v = Verdict::default();
        v.record(Cause::AppClose(None), String::new(), None);
        v.sent(None);
        v.peer_closed(Some(&frame(1000, "")), None);
        assert_eq!(v.code_sent(), None);
        assert_eq!(v.code_received(), Some(CloseCode::Normal));
    }

    // tungstenite reports a code it does not allow as 1002 "Protocol
    // violation"; the raw payload says what the peer sent.
    #[test]
    fn the_event_keeps_the_raw_close_the_peer_sent() {
        let substituted = frame(1002, "Protocol violation");
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let mut v = Verdict::default();
            let raw = RawClose {
                code: Some(bad),
                text: b"nonsense".to_vec(),
            };
            v.peer_closed(Some(&substituted), Some(raw));
            assert_eq!(v.code_received().map(u16::from), Some(bad));
            assert_eq!(
                v.code_sent(),
                Some(CloseCode::Protocol),
                "tungstenite answers 1002"
            );
            let o = v.take_outcome(Cause::AppPanicked);
            assert_eq!(
                (o.reason, o.initiator, o.text.as_str()),
                (R::ProtocolError, Remote, "nonsense")
            );
        }
        // 1014 (bad gateway) is registered: the table's row, Internal/remote.
        let mut v = Verdict::default();
        let raw = RawClose {
            code: Some(1014),
            text: b"upstream down".to_vec(),
        };
        v.peer_closed(Some(&substituted), Some(raw));
        assert_eq!(v.code_received().map(u16::from), Some(1014));
        let o = v.take_outcome(Cause::AppPanicked);
        assert_eq!(
            (o.reason, o.initiator, o.text.as_str()),
            (R::Internal, Remote, "upstream down")
        );
        for good in [1000u16, 1003, 1007, 1013, 3000, 4999] {
            assert!(valid_on_the_wire(good), "{good}");
        }
    }

    #[test]
    fn an_error_after_a_cause_is_not_the_verdict() {
        let mut v = Verdict::default();
        v.record(Cause::Shutdown(1001), String::new(), None);
        v.record_error(WsError::ConnectionClosed);
        let o = v.take_outcome(Cause::AppPanicked);
        assert_eq!((o.reason, o.error.is_none()), (R::GoingAway, true));

        let mut v = Verdict::default();
        v.record_error(WsError::Utf8(String::new()));
        let o = v.take_outcome(Cause::AppPanicked);
        assert_eq!((o.reason, o.initiator), (R::ProtocolError, Remote));
        assert!(o.error.is_some(), "the error is kept in the event");
    }

    #[test]
    fn a_task_that_ended_without_a_cause() {
        let mut v = Verdict::default();
        let o = v.take_outcome(fallback_cause(Some(1001), false));
        assert_eq!(
            (o.reason, o.initiator),
            (R::GoingAway, Local),
            "cancelled by shutdown"
        );
        let mut v = Verdict::default();
        let o = v.take_outcome(fallback_cause(None, true));
        assert_eq!((o.reason, o.initiator), (R::Internal, Local), "our panic");
        let mut v = Verdict::default();
        let o = v.take_outcome(fallback_cause(None, false));
        assert_eq!(
            (o.reason, o.initiator),
            (R::GoingAway, Local),
            "the runtime stopped"
        );
    }

    // The "code we send" column, row by row.
    #[test]
    fn the_close_frame_of_each_cause() {
        let code =
            |c: Cause<'_>| close_frame(&c).map(|f| (u16::from(f.code), f.reason.to_string()));
        assert_eq!(code(Cause::AppDropped), Some((1000, String::new())));
        assert_eq!(
            code(Cause::AppPanicked),
            Some((1011, "application panicked".into()))
        );
        assert_eq!(
            code(Cause::Shutdown(1001)),
            Some((1001, "server shutting down".into()))
        );
        assert_eq!(
            code(Cause::RuntimeStopped),
            Some((1001, "runtime stopped".into()))
        );
        assert_eq!(
            code(Cause::PongTimeout),
            Some((1011, "ping timeout".into()))
        );
        let big = WsError::Capacity(
            tokio_tungstenite::tungstenite::error::CapacityError::MessageTooLong {
                size: 2,
                max_size: 1,
            },
        );
        assert_eq!(
            code(Cause::Failed(&big)),
            Some((1009, "message too big".into()))
        );
        let utf8 = WsError::Utf8(String::new());
        assert_eq!(
            code(Cause::Failed(&utf8)),
            Some((1007, "invalid data".into()))
        );
        let reset = WsError::ConnectionClosed;
        assert_eq!(code(Cause::Failed(&reset)), None);
        for none in [
            Cause::PeerClose(None),
            Cause::AppClose(None),
            Cause::WriteStalled,
            Cause::CloseHandshakeTimeout,
            Cause::TransportEnded,
        ] {
            assert_eq!(code(none), None);
        }
        for shutdown_code in [1001, 1012] {
            assert_eq!(
                refusal_frame(HandshakeFailure::AtCapacity, shutdown_code).code,
                CloseCode::Again
            );
            assert_eq!(
                refusal_frame(HandshakeFailure::ShuttingDown, shutdown_code).code,
                CloseCode::from(shutdown_code)
            );
        }
    }
}
