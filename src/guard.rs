//! Exactly one close event per admitted connection. See [`CloseGuard`].

use std::net::SocketAddr;
use std::sync::Arc;

use crate::close::CloseEvent;
use crate::connection::Shared;
use crate::state::{Slot, SupervisorState};
use crate::stats::ConnectionId;
use crate::trace;
use crate::verdict::{Verdict, fallback_cause};

/// Runs a connection's close hooks exactly once, after tokio-util's
/// `TaskTrackerToken`: when it is dropped, which happens once however the
/// driver's task ends (the connection's end, a panic in our code, the
/// runtime dropping the task).
///
/// It holds the connection's [`Verdict`], so the event it builds is the
/// verdict as far as it went, and the connection's [`Slot`], so the slot is
/// released only after the hooks have run.
///
/// The driver keeps it as its **last** field: fields drop in declaration
/// order, so the transport is gone before the hooks see the event.
pub(crate) struct CloseGuard {
    /// What ended the connection, and the codes sent and received.
    pub(crate) verdict: Verdict,
    state: Arc<SupervisorState>,
    shared: Arc<Shared>,
    id: ConnectionId,
    peer_addr: Option<SocketAddr>,
    /// Held until the hooks have run.
    slot: Option<Slot>,
}

impl CloseGuard {
    pub(crate) fn new(
        state: Arc<SupervisorState>,
        shared: Arc<Shared>,
        id: ConnectionId,
        peer_addr: Option<SocketAddr>,
        slot: Slot,
    ) -> Self {
        Self {
            verdict: Verdict::default(),
            state,
            shared,
            id,
            peer_addr,
            slot: Some(slot),
        }
    }

    /// The connection's id.
    pub(crate) fn id(&self) -> ConnectionId {
        self.id
    }

    /// Builds the close event from the verdict, runs the hooks (through the
    /// supervisor's [`connection_closed`](SupervisorState::connection_closed)),
    /// releases the slot and publishes the event to the application. Runs
    /// once, from `Drop`: the driver ends by dropping its guard.
    fn finish(&mut self) {
        let fallback = fallback_cause(self.state.shutdown_code(), std::thread::panicking());
        let outcome = self.verdict.take_outcome(fallback);
        let event = CloseEvent {
            id: self.id,
            peer_addr: self.peer_addr,
            reason: outcome.reason,
            initiator: outcome.initiator,
            code_sent: self.verdict.code_sent(),
            code_received: self.verdict.code_received(),
            text: outcome.text,
            duration: self.shared.opened.elapsed(),
            stats: self.shared.stats(),
            error: outcome.error,
        };
        // Logged before the hooks run, so a hook that hangs or panics
        // cannot hide how the connection ended.
        trace::closed(&event);
        self.state.connection_closed(&event);
        self.slot = None;
        self.shared.finish(event);
    }
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        self.finish();
    }
}
