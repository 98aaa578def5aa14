//! The reconnect delays: exponential backoff with jitter, pure. See [`Backoff`].

use std::fmt;
use std::time::Duration;

use crate::MAX_DURATION;
use crate::client::BuildError;

/// How a delay is randomized, so that clients that lost their server at the
/// same moment do not come back at the same moment.
///
/// With `cap(n) = min(max, min × factor^n)` for the `n`-th retry of an
/// outage (`n = 0` first):
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Jitter {
    /// `cap(n)` exactly: every client waits the same (only for tests and
    /// single clients; it is what causes reconnect storms).
    None,
    /// Uniform in `[0, cap(n)]` (AWS's "full jitter", centrifuge's
    /// default). Spreads a fleet the most; a delay may be close to zero.
    Full,
    /// Uniform in `[min, previous × factor]`, capped at `max`, starting
    /// from `previous = min` (AWS's "decorrelated jitter", which uses a
    /// factor of 3). Never below `min`; grows more slowly and less
    /// predictably than `Full`.
    Decorrelated,
}

/// The reconnect delay policy of a [`Reconnecting`](crate::Reconnecting)
/// client: exponential backoff between `min` and `max` with [`Jitter`], a
/// reset once a connection has stayed up for a stable period, and optional
/// limits on the attempts and on the time of one outage.
///
/// Pure and deterministic for a given seed: [`schedule`](Self::schedule)
/// yields the delays, so a schedule can be checked (or plotted) without any
/// socket or clock.
///
/// An *outage* starts when a connection ends, or with the first attempt,
/// and lasts until a connection stays up for
/// [`reset_after`](BackoffBuilder::reset_after): a server that accepts and
/// drops at once (flapping) does not reset the backoff.
///
/// # Default
///
/// `min` 1 s, `max` 30 s, `factor` 2, [`Jitter::Full`], reset after 60 s
/// up, no limit on attempts or time (see `docs/client.md` for why).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use ws_supervisor::{Backoff, Jitter};
///
/// # fn main() -> Result<(), ws_supervisor::BuildError> {
/// let backoff = Backoff::builder()
///     .min(Duration::from_millis(500))
///     .max(Duration::from_secs(20))
///     .factor(2.0)
///     .jitter(Jitter::None)
///     .build()?;
/// let delays: Vec<_> = backoff.schedule(7).take(7).collect();
/// assert_eq!(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0].map(Duration::from_secs_f64));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    factor: f64,
    jitter: Jitter,
    reset_after: Duration,
    max_attempts: Option<u32>,
    max_elapsed: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(1),
            max: Duration::from_secs(30),
            factor: 2.0,
            jitter: Jitter::Full,
            reset_after: Duration::from_secs(60),
            max_attempts: None,
            max_elapsed: None,
        }
    }
}

impl Backoff {
    /// Starts a builder from the defaults.
    pub fn builder() -> BackoffBuilder {
        BackoffBuilder(Self::default())
    }

    /// The smallest delay cap (the first retry's).
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The largest delay, also the cap on a server's `Retry-After`.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The growth of the cap per retry.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// How delays are randomized.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// How long a connection must stay up to end the outage (and reset the
    /// backoff and the attempt count).
    pub fn reset_after(&self) -> Duration {
        self.reset_after
    }

    /// The most attempts in one outage before the client gives up; `None`:
    /// no limit.
    pub fn max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// The longest one disconnection (from a connection's end, or the
    /// start, to the next connection) may last before the client gives
    /// up; `None`: no limit. Unlike the backoff, it starts again at every
    /// connection, flapping or not.
    pub fn max_elapsed(&self) -> Option<Duration> {
        self.max_elapsed
    }

    /// The delays of one outage, drawn from a generator seeded with `seed`:
    /// the `n`-th item is the wait before retry `n` (see [`Jitter`]). It
    /// never ends; [`max_attempts`](Self::max_attempts) is applied by the
    /// client. The same seed gives the same delays.
    pub fn schedule(&self, seed: u64) -> Schedule {
        Schedule {
            backoff: *self,
            rng: SplitMix64(seed),
            retry: 0,
            previous: self.min,
        }
    }

    /// The cap of retry `n`: `min(max, min × factor^n)`.
    pub fn cap(&self, n: u32) -> Duration {
        let exp = i32::try_from(n).unwrap_or(i32::MAX);
        let secs = self.min.as_secs_f64() * self.factor.powi(exp);
        if secs.is_finite() && secs < self.max.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max
        }
    }
}

// ===== impl BackoffBuilder =====

/// Builds a [`Backoff`]; every setter's default is on [`Backoff`].
#[derive(Debug, Clone)]
#[must_use]
pub struct BackoffBuilder(Backoff);

impl BackoffBuilder {
    /// The first retry's delay cap. Must be above zero.
    ///
    /// # Default
    /// 1 s.
    pub const fn min(mut self, min: Duration) -> Self {
        self.0.min = min;
        self
    }

    /// The largest delay, also the cap on a server's `Retry-After`. Must be
    /// at least `min` and at most [`MAX_DURATION`].
    ///
    /// # Default
    /// 30 s.
    pub const fn max(mut self, max: Duration) -> Self {
        self.0.max = max;
        self
    }

    /// The growth of the delay cap per retry. Must be finite and at least 1
    /// (1 gives a constant cap of `min`).
    ///
    /// # Default
    /// 2.
    pub const fn factor(mut self, factor: f64) -> Self {
        self.0.factor = factor;
        self
    }

    /// How delays are randomized.
    ///
    /// # Default
    /// [`Jitter::Full`].
    pub const fn jitter(mut self, jitter: Jitter) -> Self {
        self.0.jitter = jitter;
        self
    }

    /// How long a connection must stay up to count as stable: it then ends
    /// the outage, so the next loss starts again from `min` with a fresh
    /// attempt count. `Duration::ZERO` resets on every successful connect
    /// (python-websockets' behaviour), which a flapping server turns into
    /// a retry every `min`.
    ///
    /// # Default
    /// 60 s.
    pub const fn reset_after(mut self, stable: Duration) -> Self {
        self.0.reset_after = stable;
        self
    }

    /// Gives up after this many attempts in one outage. Must be at least 1.
    ///
    /// # Default
    /// No limit.
    pub const fn max_attempts(mut self, attempts: u32) -> Self {
        self.0.max_attempts = Some(attempts);
        self
    }

    /// Gives up once one disconnection (from a connection's end, or the
    /// start, to the next connection; unlike the backoff, it starts again
    /// at every connection) would last longer than this: checked before
    /// each wait. Must be above zero.
    ///
    /// # Default
    /// No limit.
    pub const fn max_elapsed(mut self, elapsed: Duration) -> Self {
        self.0.max_elapsed = Some(elapsed);
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// A zero `min`, `max_attempts` or `max_elapsed`; a duration above
    /// [`MAX_DURATION`]; `min` above `max`; a `factor` below 1 or not
    /// finite.
    pub fn build(self) -> Result<Backoff, BuildError> {
        let b = self.0;
        if b.min.is_zero() {
            return Err(BuildError::ZeroDuration("min"));
        }
        for (name, d) in [
            ("max", Some(b.max)),
            ("reset_after", Some(b.reset_after)),
            ("max_elapsed", b.max_elapsed),
        ] {
            if d.is_some_and(|d| d > MAX_DURATION) {
                return Err(BuildError::DurationTooLong(name));
            }
        }
        if b.max_elapsed.is_some_and(|d| d.is_zero()) {
            return Err(BuildError::ZeroDuration("max_elapsed"));
        }
        if b.max_attempts == Some(0) {
            return Err(BuildError::ZeroCount("max_attempts"));
        }
        if b.min > b.max {
            return Err(BuildError::MinAboveMax {
                min: b.min,
                max: b.max,
            });
        }
        if !(b.factor.is_finite() && b.factor >= 1.0) {
            return Err(BuildError::InvalidFactor(b.factor));
        }
        Ok(b)
    }
}

// ===== impl Schedule =====

/// The delays of one outage: see [`Backoff::schedule`].
#[derive(Clone)]
pub struct Schedule {
    backoff: Backoff,
    rng: SplitMix64,
    /// The retry the next delay is for (0: the first of the outage).
    retry: u32,
    /// The last delay drawn (`min` before the first): decorrelated jitter
    /// grows from it.
    previous: Duration,
}

impl Schedule {
    /// The backoff this schedule draws from.
    pub(crate) fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The next delay (the schedule never ends).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let b = &self.backoff;
        let delay = match b.jitter {
            Jitter::None => b.cap(self.retry),
            Jitter::Full => b.cap(self.retry).mul_f64(self.rng.unit()),
            Jitter::Decorrelated => {
                let high = self.previous.as_secs_f64() * b.factor;
                let low = b.min.as_secs_f64();
                let secs = low + (high - low) * self.rng.unit();
                Duration::from_secs_f64(secs.min(b.max.as_secs_f64()))
            }
        };
        self.previous = delay;
        self.retry = self.retry.saturating_add(1);
        delay
    }

    /// The retry the next delay is for (0 for the first of the outage).
    pub fn retry(&self) -> u32 {
        self.retry
    }

    /// Starts a new outage: the next delay is again retry 0's. The random
    /// sequence goes on (two outages do not repeat the same delays).
    pub fn reset(&mut self) {
        self.retry = 0;
        self.previous = self.backoff.min;
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("backoff", &self.backoff)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// splitmix64 (Steele, Lea and Flood, 2014): a tiny, fast, seedable
/// generator, good enough to spread retries (nothing secret depends on it).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        crate::state::unit(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn defaults_are_the_documented_values() {
        let b = Backoff::default();
        assert_eq!(b.min(), secs(1.0));
        assert_eq!(b.max(), secs(30.0));
        assert_eq!(b.factor(), 2.0);
        assert_eq!(b.jitter(), Jitter::Full);
        assert_eq!(b.reset_after(), secs(60.0));
        assert_eq!((b.max_attempts(), b.max_elapsed()), (None, None));
        assert_eq!(Backoff::builder().build(), Ok(b));
    }

    #[test]
    fn without_jitter_the_cap_grows_by_factor_up_to_max() {
        let b = Backoff::builder()
            .min(secs(1.0))
            .max(secs(10.0))
            .factor(1.5)
            .jitter(Jitter::None)
            .build()
            .unwrap();
        let got: Vec<_> = b.schedule(0).take(8).collect();
        let want = [1.0, 1.5, 2.25, 3.375, 5.0625, 7.59375, 10.0, 10.0].map(secs);
        assert_eq!(got, want);
        // Huge retry numbers saturate at max instead of overflowing.
        assert_eq!(b.cap(u32::MAX), secs(10.0));
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_cap_and_covers_it() {
        let b = Backoff::default();
        for seed in 0..200 {
            let mut s = b.schedule(seed);
            for n in 0..10 {
                let d = s.next().unwrap();
                assert!(d <= b.cap(n), "seed {seed} retry {n}: {d:?}");
            }
        }
        // Over many seeds the first delay uses its whole window [0, 1 s]:
        // the lowest and highest draws are near its ends.
        let first: Vec<f64> = (0..1000)
            .map(|seed| b.schedule(seed).next().unwrap().as_secs_f64())
            .collect();
        let lo = first.iter().cloned().fold(f64::MAX, f64::min);
        let hi = first.iter().cloned().fold(0.0, f64::max);
        assert!(lo < 0.01 && hi > 0.99, "{lo} {hi}");
    }

    #[test]
    fn decorrelated_jitter_stays_within_min_previous_times_factor_and_max() {
        let b = Backoff::builder()
            .jitter(Jitter::Decorrelated)
            .factor(3.0)
            .build()
            .unwrap();
        for seed in 0..200 {
            let mut s = b.schedule(seed);
            let mut previous = b.min();
            for _ in 0..20 {
                let d = s.next().unwrap();
                assert!(d >= b.min() && d <= b.max(), "{d:?}");
                assert!(
                    d <= previous.mul_f64(3.0) + Duration::from_nanos(1),
                    "{d:?} {previous:?}"
                );
                previous = d;
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_delays_and_reset_restarts_the_cap() {
        let b = Backoff::default();
        let a: Vec<_> = b.schedule(42).take(5).collect();
        assert_eq!(a, b.schedule(42).take(5).collect::<Vec<_>>());
        assert_ne!(a, b.schedule(43).take(5).collect::<Vec<_>>());
        let mut s = b.schedule(42);
        s.by_ref().take(6).for_each(drop);
        assert_eq!(s.retry(), 6);
        s.reset();
        assert_eq!(s.retry(), 0);
        assert!(s.next().unwrap() <= b.min());
    }

    #[test]
    fn each_invalid_setting_is_refused_with_its_name() {
        let b = Backoff::builder;
        assert_eq!(
            b().min(Duration::ZERO).build(),
            Err(BuildError::ZeroDuration("min"))
        );
        assert_eq!(
            b().min(secs(5.0)).max(secs(2.0)).build(),
            Err(BuildError::MinAboveMax {
                min: secs(5.0),
                max: secs(2.0)
            })
        );
        assert!(matches!(
            b().factor(0.5).build(),
            Err(BuildError::InvalidFactor(_))
        ));
        assert!(matches!(
            b().factor(f64::NAN).build(),
            Err(BuildError::InvalidFactor(_))
        ));
        assert_eq!(
            b().max_attempts(0).build(),
            Err(BuildError::ZeroCount("max_attempts"))
        );
        assert_eq!(
            b().max_elapsed(Duration::ZERO).build(),
            Err(BuildError::ZeroDuration("max_elapsed"))
        );
        assert_eq!(
            b().max(MAX_DURATION + secs(1.0)).build(),
            Err(BuildError::DurationTooLong("max"))
        );
        let err = b().factor(0.5).build().unwrap_err();
        assert!(err.to_string().contains("factor"), "{err}");
        // The edges are allowed.
        assert!(
            b().factor(1.0)
                .min(secs(3.0))
                .max(secs(3.0))
                .build()
                .is_ok()
        );
        assert!(b().reset_after(Duration::ZERO).build().is_ok());
    }
}
