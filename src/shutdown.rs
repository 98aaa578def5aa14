//! The supervisor's shutdown, in one place. See [`Shutdown`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Whether and when the supervisor shuts down, after mini-redis's
/// `Shutdown`: a flag, a deadline, the token that tells every driver, and
/// the count of connections forced closed.
///
/// "Begun" means [`Supervisor::shutdown`](crate::Supervisor::shutdown) was
/// called; "grace over" means its deadline has passed and connections still
/// closing are forced closed.
#[derive(Debug, Default)]
pub(crate) struct Shutdown {
    /// Held across "not begun?" and the spawn of a driver (see [`admit`]),
    /// and across [`begin`]: a driver is either refused or seen by the drain.
    ///
    /// [`admit`]: Self::admit
    /// [`begin`]: Self::begin
    gate: Mutex<()>,
    /// Set under `gate` before `token` fires: a lock-free "has begun" for
    /// admission, and the hint that lets drivers skip polling `token`.
    /// SeqCst, stored and loaded: the shutdown-remaining gauge relies on it
    /// (see `SupervisorState::write_remaining`).
    begun: AtomicBool,
    /// When the shutdown began (the first call's, if called twice): the
    /// start of the drain window.
    started: OnceLock<Instant>,
    /// The end of the grace period (the first call's, if called twice).
    deadline: OnceLock<Instant>,
    /// Cancelled once the shutdown has begun: wakes every driver.
    token: CancellationToken,
    /// Connections still closing when the grace period ended.
    forced: AtomicU64,
}

impl Shutdown {
    /// Begins the shutdown at `started`, with the grace period ending at
    /// `deadline` (both kept from the first call): admission closes. The
    /// drivers are told by [`stop_drivers`](Self::stop_drivers).
    pub(crate) fn begin(&self, started: Instant, deadline: Instant) {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.started.set(started);
        let _ = self.deadline.set(deadline);
        self.begun.store(true, SeqCst);
    }

    /// Wakes every driver to close its connection.
    pub(crate) fn stop_drivers(&self) {
        self.token.cancel();
    }

    /// Runs `spawn` unless the shutdown has begun, atomically with respect
    /// to [`begin`](Self::begin): what `spawn` starts is either refused or
    /// tracked before the drain waits.
    pub(crate) fn admit<T>(&self, spawn: impl FnOnce() -> T) -> Option<T> {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        (!self.begun.load(Relaxed)).then(spawn)
    }

    /// Whether [`begin`](Self::begin) was called.
    pub(crate) fn has_begun(&self) -> bool {
        self.begun.load(SeqCst)
    }

    /// Whether the driver tasks were told to stop (a task that ends with no
    /// recorded cause after this was stopped by the shutdown).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// When the shutdown began, once it has.
    pub(crate) fn started(&self) -> Option<Instant> {
        self.started.get().copied()
    }

    /// The end of the grace period, once the shutdown has begun.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }

    /// Whether the grace period has ended at `now`.
    pub(crate) fn grace_over(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|deadline| now >= deadline)
    }

    /// Resolves once the shutdown has begun.
    pub(crate) fn begun(&self) -> WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }

    /// Counts a connection forced closed at the end of the grace period.
    pub(crate) fn count_forced(&self) {
        self.forced.fetch_add(1, Relaxed);
    }

    /// Connections forced closed, since the start.
    pub(crate) fn forced(&self) -> u64 {
        self.forced.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn admission_closes_when_the_shutdown_begins() {
        let s = Shutdown::default();
        assert_eq!(s.admit(|| 1), Some(1));
        assert!(!s.has_begun() && !s.is_cancelled());
        let now = Instant::now();
        s.begin(now, now + Duration::from_secs(5));
        assert!(s.has_begun() && !s.is_cancelled());
        s.stop_drivers();
        assert!(s.is_cancelled());
        assert_eq!(s.admit(|| 1), None);
        // A second call keeps the first start and deadline.
        s.begin(now + Duration::from_secs(1), now);
        assert_eq!(s.started(), Some(now));
        assert_eq!(s.deadline(), Some(now + Duration::from_secs(5)));
        assert!(!s.grace_over(now));
        assert!(s.grace_over(now + Duration::from_secs(5)));
    }
}
