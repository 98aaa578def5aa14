//! The `tracing` shim: one span per connection, events at open and close,
//! compiled to nothing without the `tracing` feature. See [`ConnSpan`].
//!
//! Every `#[cfg(feature = "tracing")]` of the crate lives in this file (as
//! `tokio-util/src/tracing.rs` does it): the driver and the supervisor call
//! the functions below unconditionally, and without the feature they are
//! empty and inlined away — no span field in any struct, no allocation, no
//! branch.
//!
//! What is emitted, and at which level, is listed in `docs/operations.md`
//! ("Logs with tracing"); the level of the close event comes from one
//! function, `close_level`.

pub(crate) use imp::{
    ConnSpan, closed, hooks_panicked, opened, ping_sent, pong_matched, pong_unmatched,
};

// ===== with the feature =====

#[cfg(feature = "tracing")]
mod imp {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::time::Duration;

    use tracing::{Level, Span, event, field};

    use crate::close::{CloseEvent, CloseReason, Initiator};
    use crate::stats::ConnectionId;

    /// The target of every span and event: the crate's root path, so that
    /// `ws_supervisor=info` filters them all, and so that moving code
    /// between (private) modules does not change it.
    pub(super) const TARGET: &str = "ws_supervisor";

    /// The level of the close event for `reason` and `initiator`.
    ///
    /// * `Normal`, `GoingAway`: DEBUG — the ends that should happen.
    /// * `Timeout`, `ProtocolError`, `Abnormal`: INFO — dead peers, broken
    ///   clients, cut transports. They are the peer's or the network's
    ///   doing and happen all day on a busy server: visible, but not WARN.
    /// * `Internal` started here (our application panicked, a local I/O
    ///   error): WARN, look at this process. `Internal` started by the peer
    ///   (it closed with 1011 or 1014, its own failure): INFO, like any
    ///   other peer-side failure.
    pub(super) fn close_level(reason: CloseReason, initiator: Initiator) -> Level {
        match (reason, initiator) {
            (CloseReason::Normal | CloseReason::GoingAway, _) => Level::DEBUG,
            (CloseReason::Internal, Initiator::Local) => Level::WARN,
            // Timeout, ProtocolError, Abnormal, a peer's Internal, and any
            // reason added later: a new reason should be seen, not hidden.
            _ => Level::INFO,
        }
    }

    /// The span of one connection: created in `Supervisor::register`, then
    /// carried by the driver's future ([`instrument`](Self::instrument)),
    /// which enters it on every poll and while it is dropped. No struct of
    /// the driver holds it.
    #[derive(Debug)]
    pub(crate) struct ConnSpan(Span);

    /// The driver's future, instrumented with its connection's span.
    pub(crate) type Traced<F> = tracing::instrument::Instrumented<F>;

    impl ConnSpan {
        /// Creates the `ws_connection` span (INFO, so that it is enabled
        /// whenever the INFO close events are, and they carry its fields).
        ///
        /// It is a root span that `follows_from` the caller's span: a
        /// connection outlives the request or accept loop that admitted it,
        /// and a child would hold that parent open for the connection's
        /// whole life.
        #[inline]
        pub(crate) fn new(
            id: ConnectionId,
            peer: Option<SocketAddr>,
            role: &'static str,
            path: Option<&str>,
            protocol: Option<&str>,
        ) -> Self {
            let span = tracing::info_span!(
                target: TARGET,
                parent: None,
                "ws_connection",
                conn_id = id.as_u64(),
                peer = peer.map(field::display),
                role,
                path,
                protocol,
            );
            span.follows_from(Span::current());
            Self(span)
        }

        /// Runs `future` inside the span.
        #[inline]
        pub(crate) fn instrument<F: Future>(self, future: F) -> Traced<F> {
            tracing::Instrument::instrument(future, self.0)
        }
    }

    /// The handshake completed and the driver started (DEBUG).
    #[inline]
    pub(crate) fn opened() {
        event!(target: TARGET, Level::DEBUG, "connection opened");
    }

    /// The connection ended: one event, at [`close_level`], with every field
    /// of the [`CloseEvent`] (the error as its `Display` text; fields with
    /// no value are left out rather than logged as `None`).
    pub(crate) fn closed(e: &CloseEvent) {
        // `event!` needs its level as a constant: one call site per level,
        // with the same fields.
        macro_rules! close_event {
            ($level:expr) => {
                event!(
                    target: TARGET,
                    $level,
                    conn_id = e.id.as_u64(),
                    reason = e.reason.as_str(),
                    initiator = e.initiator.as_str(),
                    code_sent = e.code_sent.map(u16::from),
                    code_received = e.code_received.map(u16::from),
                    text = (!e.text.is_empty()).then_some(e.text.as_str()),
                    duration = ?e.duration,
                    last_rtt = e.stats.last_rtt.map(field::debug),
                    smoothed_rtt = e.stats.smoothed_rtt.map(field::debug),
                    pings_sent = e.stats.pings_sent,
                    pongs_received = e.stats.pongs_received,
                    pongs_unmatched = e.stats.pongs_unmatched,
                    error = e.error.as_ref().map(field::display),
                    "connection closed: {}",
                    e.reason,
                )
            };
        }
        match close_level(e.reason, e.initiator) {
            Level::DEBUG => close_event!(Level::DEBUG),
            Level::INFO => close_event!(Level::INFO),
            _ => close_event!(Level::WARN),
        }
    }

    /// `panics` close hooks panicked for connection `id` (WARN).
    pub(crate) fn hooks_panicked(id: ConnectionId, panics: u64) {
        event!(
            target: TARGET,
            Level::WARN,
            conn_id = id.as_u64(),
            panics,
            "close hook panicked",
        );
    }

    /// A ping went out (TRACE).
    #[inline]
    pub(crate) fn ping_sent() {
        event!(target: TARGET, Level::TRACE, "ping sent");
    }

    /// A pong matched one of our pings (TRACE).
    #[inline]
    pub(crate) fn pong_matched(rtt: Duration) {
        event!(target: TARGET, Level::TRACE, rtt = ?rtt, "pong matched");
    }

    /// A pong matched none of our pings (TRACE).
    #[inline]
    pub(crate) fn pong_unmatched() {
        event!(target: TARGET, Level::TRACE, "pong unmatched");
    }
}

// ===== without the feature =====

#[cfg(not(feature = "tracing"))]
mod imp {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::close::CloseEvent;
    use crate::stats::ConnectionId;

    /// Nothing: a zero-sized stand-in for the span.
    #[derive(Debug)]
    pub(crate) struct ConnSpan;

    /// The driver's future itself: [`ConnSpan::instrument`] wraps nothing.
    pub(crate) type Traced<F> = F;

    // The promise of this file, checked by the compiler.
    const _: () = assert!(std::mem::size_of::<ConnSpan>() == 0);

    impl ConnSpan {
        #[inline(always)]
        pub(crate) fn new(
            _id: ConnectionId,
            _peer: Option<SocketAddr>,
            _role: &'static str,
            _path: Option<&str>,
            _protocol: Option<&str>,
        ) -> Self {
            Self
        }

        #[inline(always)]
        pub(crate) fn instrument<F: Future>(self, future: F) -> Traced<F> {
            future
        }
    }

    #[inline(always)]
    pub(crate) fn opened() {}

    #[inline(always)]
    pub(crate) fn closed(_: &CloseEvent) {}

    #[inline(always)]
    pub(crate) fn hooks_panicked(_: ConnectionId, _: u64) {}

    #[inline(always)]
    pub(crate) fn ping_sent() {}

    #[inline(always)]
    pub(crate) fn pong_matched(_: Duration) {}

    #[inline(always)]
    pub(crate) fn pong_unmatched() {}
}

#[cfg(all(test, feature = "tracing"))]
mod tests {
    use tracing::Level;

    use super::imp::close_level;
    use crate::close::{CloseReason, Initiator};

    #[test]
    fn close_levels() {
        use CloseReason as R;
        use Initiator::{Local, Remote};
        let rows = [
            (R::Normal, Local, Level::DEBUG),
            (R::Normal, Remote, Level::DEBUG),
            (R::GoingAway, Local, Level::DEBUG),
            (R::GoingAway, Remote, Level::DEBUG),
            (R::Timeout, Local, Level::INFO),
            (R::ProtocolError, Remote, Level::INFO),
            (R::Abnormal, Remote, Level::INFO),
            (R::Internal, Remote, Level::INFO),
            (R::Internal, Local, Level::WARN),
        ];
        for (reason, initiator, level) in rows {
            assert_eq!(
                close_level(reason, initiator),
                level,
                "{reason:?} {initiator:?}"
            );
        }
        // Every reason is covered by the rows.
        for reason in CloseReason::ALL {
            assert!(rows.iter().any(|row| row.0 == reason), "{reason:?}");
        }
    }
}
