//! Application-level heartbeats: the probe message, the answer it expects,
//! and replies to the peer's own application pings, with no I/O. See
//! [`AppHeartbeat`].

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

/// What a message recognised as the answer to an application-level probe
/// says about which probe it answers; returned by the recogniser given to
/// [`ConfigBuilder::app_heartbeat`](crate::ConfigBuilder::app_heartbeat).
///
/// # Examples
///
/// ```
/// use ws_supervisor::AppPong;
/// use ws_supervisor::tungstenite::Message;
///
/// // `{"op":"pong","t":<nonce>}` answers the probe that carried the nonce;
/// // a bare `pong` answers the oldest probe still outstanding.
/// fn recognise(message: &Message) -> Option<AppPong> {
///     let text = message.to_text().ok()?;
///     if text == "pong" {
///         return Some(AppPong::Oldest);
///     }
///     let nonce = text.strip_prefix(r#"{"op":"pong","t":"#)?.strip_suffix('}')?;
///     nonce.parse().ok().map(AppPong::Nonce)
/// }
/// assert_eq!(recognise(&Message::text(r#"{"op":"pong","t":42}"#)), Some(AppPong::Nonce(42)));
/// assert_eq!(recognise(&Message::text("pong")), Some(AppPong::Oldest));
/// assert_eq!(recognise(&Message::text("hello")), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AppPong {
    /// The answer echoes the nonce its probe carried: it answers that probe
    /// (and every earlier one) and gives a round-trip sample if the probe
    /// is one of the last four; a nonce that matches none of them is an
    /// unmatched pong (liveness only), as for ping frames.
    Nonce(u64),
    /// The answer carries no nonce: it answers the oldest probe still
    /// outstanding (answers are assumed to come in order) and gives its
    /// round-trip sample; with no probe outstanding it is an unmatched pong.
    Oldest,
}

/// The largest nonce handed to a probe builder, `2^53 - 1`: every nonce is
/// a JSON number that JavaScript's `JSON.parse` reads back exactly.
pub(crate) const MAX_NONCE: u64 = (1 << 53) - 1;

/// Builds the probe for a nonce.
type ProbeFn = dyn Fn(u64) -> Message + Send + Sync;
/// Recognises the answer to a probe.
type AnswerFn = dyn Fn(&Message) -> Option<AppPong> + Send + Sync;
/// Recognises the peer's application ping and builds the reply.
type ReplyFn = dyn Fn(&Message) -> Option<Message> + Send + Sync;

/// The application-level heartbeat of a [`Config`](crate::Config): how
/// probes are built and their answers recognised (when the heartbeat sends
/// application messages instead of ping frames), how the peer's own
/// application pings are answered, and whether any of those messages reach
/// the application.
///
/// The user's functions sit behind `Arc<dyn Fn>`, not `fn` pointers: they
/// may capture what the protocol needs (an op name, a channel id, a parser's
/// settings), and the config stays `Clone` at the cost of one allocation per
/// supervisor, none per connection. They run on the connection's task, on
/// every inbound text and binary message while either mode is on; a panic in
/// one is caught and ends that connection as
/// [`Internal`](crate::CloseReason::Internal), local, "application
/// panicked".
#[derive(Clone)]
pub(crate) struct AppHeartbeat {
    /// Probe builder and answer recogniser, when probes are messages.
    probe: Option<(Arc<ProbeFn>, Arc<AnswerFn>)>,
    /// Reply to the peer's application pings, when they are answered.
    reply: Option<Arc<ReplyFn>>,
    /// Hand heartbeat messages to the application as well.
    deliver: bool,
}

/// What an inbound data message is to the heartbeat.
#[derive(Debug, PartialEq)]
pub(crate) enum Heard {
    /// An ordinary message for the application.
    Data,
    /// The answer to one of our probes.
    Answer(AppPong),
    /// The peer's application ping, with our reply to send.
    PeerPing(Message),
}

/// A user function panicked; the connection ends as `Internal`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Panicked;

impl AppHeartbeat {
    /// Off: ping frames, every message delivered.
    pub(crate) const fn new() -> Self {
        Self {
            probe: None,
            reply: None,
            deliver: false,
        }
    }

    pub(crate) fn set_probe(&mut self, probe: Arc<ProbeFn>, answer: Arc<AnswerFn>) {
        self.probe = Some((probe, answer));
    }

    pub(crate) fn set_reply(&mut self, reply: Arc<ReplyFn>) {
        self.reply = Some(reply);
    }

    pub(crate) const fn set_deliver(&mut self, deliver: bool) {
        self.deliver = deliver;
    }

    /// Probes are application messages (not ping frames).
    pub(crate) const fn probes(&self) -> bool {
        self.probe.is_some()
    }

    /// The peer's application pings are answered.
    pub(crate) const fn replies(&self) -> bool {
        self.reply.is_some()
    }

    /// Inbound messages must be inspected (either mode is on).
    pub(crate) const fn inspects(&self) -> bool {
        self.probe.is_some() || self.reply.is_some()
    }

    /// Heartbeat messages reach the application too.
    pub(crate) const fn delivers(&self) -> bool {
        self.deliver
    }

    /// The probe carrying `nonce`; `Ok(None)` when probes are ping frames.
    pub(crate) fn probe(&self, nonce: u64) -> Result<Option<Message>, Panicked> {
        let Some((probe, _)) = &self.probe else {
            return Ok(None);
        };
        catch_unwind(AssertUnwindSafe(|| probe(nonce)))
            .map(Some)
            .map_err(|_| Panicked)
    }

    /// What `message` is: an answer to our probe is looked for first, then
    /// the peer's own ping.
    pub(crate) fn hear(&self, message: &Message) -> Result<Heard, Panicked> {
        catch_unwind(AssertUnwindSafe(|| {
            if let Some((_, answer)) = &self.probe {
                if let Some(pong) = answer(message) {
                    return Heard::Answer(pong);
                }
            }
            if let Some(reply) = &self.reply {
                if let Some(reply) = reply(message) {
                    return Heard::PeerPing(reply);
                }
            }
            Heard::Data
        }))
        .map_err(|_| Panicked)
    }
}

/// Why a message the heartbeat would send cannot be: it must be a text or
/// binary message within the write-buffer limit (the limit `send` applies to
/// the application's own messages), or it would not fit the write buffer
/// behind which the supervisor keeps room for control frames.
pub(crate) fn unsendable(message: &Message, write_buffer_limit: usize) -> Option<&'static str> {
    match message {
        Message::Text(_) | Message::Binary(_) if message.len() <= write_buffer_limit => None,
        Message::Text(_) | Message::Binary(_) => Some("larger than write_buffer_limit"),
        _ => Some("not a text or binary message"),
    }
}

impl fmt::Debug for AppHeartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppHeartbeat")
            .field("probes", &self.probes())
            .field("replies", &self.replies())
            .field("deliver", &self.deliver)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_probe() -> AppHeartbeat {
        let mut app = AppHeartbeat::new();
        app.set_probe(
            Arc::new(|n| Message::text(format!(r#"{{"op":"ping","t":{n}}}"#))),
            Arc::new(|m| {
                let text = m.to_text().ok()?;
                let n = text
                    .strip_prefix(r#"{"op":"pong","t":"#)?
                    .strip_suffix('}')?;
                n.parse().ok().map(AppPong::Nonce)
            }),
        );
        app
    }

    #[test]
    fn off_by_default_probes_are_ping_frames_and_everything_is_data() {
        let app = AppHeartbeat::new();
        assert!(!app.probes() && !app.replies() && !app.inspects() && !app.delivers());
        assert_eq!(app.probe(7), Ok(None));
        assert_eq!(app.hear(&Message::text("pong")), Ok(Heard::Data));
    }

    #[test]
    fn the_probe_embeds_the_nonce_and_its_answer_is_recognised() {
        let app = json_probe();
        assert!(app.probes() && app.inspects() && !app.replies());
        assert_eq!(
            app.probe(42),
            Ok(Some(Message::text(r#"{"op":"ping","t":42}"#)))
        );
        assert_eq!(
            app.hear(&Message::text(r#"{"op":"pong","t":42}"#)),
            Ok(Heard::Answer(AppPong::Nonce(42)))
        );
        assert_eq!(app.hear(&Message::text("chat")), Ok(Heard::Data));
    }

    #[test]
    fn the_answer_is_looked_for_before_the_peers_ping() {
        let mut app = json_probe();
        // A reply function that would take anything for a ping.
        app.set_reply(Arc::new(|m| Some(m.clone())));
        assert!(app.replies());
        assert_eq!(
            app.hear(&Message::text(r#"{"op":"pong","t":1}"#)),
            Ok(Heard::Answer(AppPong::Nonce(1)))
        );
        assert_eq!(
            app.hear(&Message::text("x")),
            Ok(Heard::PeerPing(Message::text("x")))
        );
    }

    #[test]
    fn a_peer_ping_gets_the_reply_built_from_it() {
        let mut app = AppHeartbeat::new();
        app.set_reply(Arc::new(|m| {
            let id = m.to_text().ok()?.strip_prefix("ping ")?;
            Some(Message::text(format!("pong {id}")))
        }));
        app.set_deliver(true);
        assert!(app.inspects() && app.delivers() && !app.probes());
        assert_eq!(
            app.hear(&Message::text("ping 9")),
            Ok(Heard::PeerPing(Message::text("pong 9")))
        );
        assert_eq!(app.hear(&Message::binary(vec![1])), Ok(Heard::Data));
    }

    #[test]
    fn a_panicking_user_function_is_caught() {
        let mut app = AppHeartbeat::new();
        app.set_probe(
            Arc::new(|_| panic!("probe")),
            Arc::new(|_| panic!("answer")),
        );
        // The default hook prints these two; they are expected.
        assert_eq!(app.probe(1), Err(Panicked));
        assert_eq!(app.hear(&Message::text("x")), Err(Panicked));
    }

    #[test]
    fn only_text_or_binary_within_the_limit_can_be_sent() {
        assert_eq!(unsendable(&Message::text("ok"), 2), None);
        assert_eq!(unsendable(&Message::binary(vec![0; 3]), 3), None);
        assert_eq!(
            unsendable(&Message::text("toolong"), 3),
            Some("larger than write_buffer_limit")
        );
        assert_eq!(
            unsendable(&Message::Ping(Default::default()), 1024),
            Some("not a text or binary message")
        );
    }
}
