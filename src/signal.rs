//! A one-shot wake-up source for the driver's loop. See [`Signal`].

use std::future::Future;
use std::pin::Pin;
use std::task::Context;

use pin_project_lite::pin_project;

pin_project! {
    /// A future that fires once (the supervisor's shutdown), after mini-redis's `Shutdown`: the future,
    /// a latch that remembers it fired, and the cheap check that spares a
    /// poll.
    ///
    /// The driver's loop runs on every heartbeat of every connection, and
    /// polling these futures takes a lock. Once a poll returned `Pending`,
    /// the future holds our waker until it fires; the source also sets an
    /// atomic flag *before* firing. So after the first `Pending`, the future
    /// is polled again only when that flag (the `hint`) says it may be ready.
    #[derive(Debug)]
    pub(crate) struct Signal<F> {
        #[pin]
        future: F,
        // A poll returned `Pending`: the future holds our waker.
        registered: bool,
        // The future has fired.
        fired: bool,
    }
}

impl<F: Future<Output = ()>> Signal<F> {
    pub(crate) fn new(future: F) -> Self {
        Self {
            future,
            registered: false,
            fired: false,
        }
    }

    /// Polls for the firing; `hint` is the source's flag, set before the
    /// future becomes ready. Returns `true` exactly once: on the poll that
    /// sees it fire.
    pub(crate) fn poll_fire(self: Pin<&mut Self>, cx: &mut Context<'_>, hint: bool) -> bool {
        let this = self.project();
        if *this.fired || (*this.registered && !hint) {
            return false;
        }
        if this.future.poll(cx).is_ready() {
            *this.fired = true;
            true
        } else {
            *this.registered = true;
            false
        }
    }

    /// Whether it has fired (the latch).
    pub(crate) fn has_fired(&self) -> bool {
        self.fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::task::{Poll, Waker};

    #[test]
    fn fires_once_and_polls_only_when_the_hint_says_so() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, r) = (polls.clone(), ready.clone());
        let mut signal = pin!(Signal::new(std::future::poll_fn(move |_| {
            p.fetch_add(1, Relaxed);
            if r.load(Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(!signal.as_mut().poll_fire(&mut cx, false));
        assert_eq!(polls.load(Relaxed), 1, "the first poll registers");
        for _ in 0..10 {
            assert!(!signal.as_mut().poll_fire(&mut cx, false));
        }
        assert_eq!(polls.load(Relaxed), 1, "no hint, no poll");
        ready.store(true, Relaxed);
        assert!(
            signal.as_mut().poll_fire(&mut cx, true),
            "fires with the hint"
        );
        assert!(signal.has_fired());
        assert!(!signal.as_mut().poll_fire(&mut cx, true), "only once");
        assert_eq!(polls.load(Relaxed), 2);
    }
}
