//! Close hooks and their panic containment. See [`CloseHook`].

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::close::CloseEvent;

/// Code the application runs when a supervised connection ends.
///
/// Every registered hook runs exactly once per connection that completed its
/// opening handshake, on the connection's own task, after the transport is
/// closed. Hooks are synchronous and should be quick: spawn a task for slow
/// work. A hook that panics is caught and counted (see
/// [`Supervisor::hook_panics`](crate::Supervisor::hook_panics)); the other
/// hooks still run and the connection's cleanup still completes.
///
/// Any `Fn(&CloseEvent) + Send + Sync + 'static` is a hook.
pub trait CloseHook: Send + Sync + 'static {
    /// Called once when the connection has ended.
    fn on_close(&self, event: &CloseEvent);
}

impl<F> CloseHook for F
where
    F: Fn(&CloseEvent) + Send + Sync + 'static,
{
    fn on_close(&self, event: &CloseEvent) {
        self(event)
    }
}

/// The hooks of one supervisor, run in registration order.
#[derive(Clone, Default)]
pub(crate) struct Hooks(Vec<Arc<dyn CloseHook>>);

impl Hooks {
    pub(crate) fn push(&mut self, hook: Arc<dyn CloseHook>) {
        self.0.push(hook);
    }

    /// Runs every hook once with `event`; returns how many panicked.
    pub(crate) fn run(&self, event: &CloseEvent) -> u64 {
        let mut panics = 0;
        for hook in &self.0 {
            // The event is only read, and a panicking hook's own state is
            // its own business: nothing of ours is left half-updated.
            if catch_unwind(AssertUnwindSafe(|| hook.on_close(event))).is_err() {
                panics += 1;
            }
        }
        panics
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks").field("len", &self.0.len()).finish()
    }
}
