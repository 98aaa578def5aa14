//! The ping schedule, pong matching and RTT estimate, with no I/O. See [`Heartbeat`].

use std::time::Duration;

use tokio::time::Instant;

use crate::app_heartbeat::{AppPong, MAX_NONCE};
use crate::config::Liveness;

/// How many recent pings keep their send time for RTT matching. A pong for
/// an older ping still counts as liveness, just not as an RTT sample.
const RING: usize = 4;

/// Pings are aligned to slots of `interval / SLOTS` (at least 1 ms).
pub(crate) const SLOTS: u32 = 64;

/// The slot length for `interval`.
pub(crate) fn slot(interval: Duration) -> Duration {
    (interval / SLOTS).max(Duration::from_millis(1))
}

/// The first ping time `at` or later that falls on a slot boundary counted
/// from `epoch`. Connections of one supervisor then ping in shared slots, so
/// one timer wake-up serves many of them instead of one each; the random
/// phase still spreads them over the interval's `SLOTS` slots.
fn align(epoch: Instant, at: Instant, slot: Duration) -> Instant {
    let since = at.saturating_duration_since(epoch).as_nanos();
    let slot_ns = slot.as_nanos();
    let slots = since.div_ceil(slot_ns);
    // Durations here are at most a week (`MAX_DURATION`): no overflow.
    epoch + Duration::from_nanos((slots * slot_ns) as u64)
}

/// One connection's heartbeat: when to ping, when the peer is overdue, and
/// what its pongs say about the round trip.
///
/// Pure state: every method takes the current [`Instant`], so it is tested
/// without sockets or timers. The schedule (see `docs/keepalive.md`):
///
/// A *ping* here is any probe: a ping frame, or an application message
/// (`app_heartbeat.rs`) carrying the same nonce; the schedule, the deadline
/// and the matching do not depend on which.
///
/// * the first ping at `open + interval + phase` (phase < jitter; on a
///   shared slot boundary when the jitter spans a slot, see `new`), then
///   every `interval`; a ping that comes due
///   late (the task was stalled) goes out once, and the next one is an
///   interval after it: missed pings never burst;
/// * a *liveness event* at `t` (a pong, or any frame under
///   [`Liveness::AnyFrame`]) answers every ping sent up to `t`;
/// * the deadline is `first unanswered ping + timeout`;
/// * while [suspended](Self::suspend) (our own inbound queue is full, so we
///   are not reading) there is no deadline; on resume the peer gets a fresh
///   `timeout` from the moment we read again.
#[derive(Debug)]
pub struct Heartbeat {
    /// Time between pings.
    interval: Duration,
    /// Time the peer has to show liveness after a ping.
    timeout: Duration,
    /// What counts as liveness.
    liveness: Liveness,
    /// XORed into sequence numbers so that foreign pongs rarely match;
    /// below 2^53, so that nonces survive a JSON number (`MAX_NONCE`).
    key: u64,
    /// When the next ping is due.
    next_ping: Instant,
    /// Sequence number of the next ping.
    seq: u64,
    /// Lowest sequence number not yet acknowledged by a matching pong.
    unacked: u64,
    /// Send times of the last `RING` pings, indexed by `seq % RING`.
    sent_at: [Instant; RING],
    /// Send time of the first ping after the last liveness event.
    anchor: Option<Instant>,
    /// Earliest deadline allowed after a resume.
    not_before: Option<Instant>,
    /// Reading is suspended by our own backpressure.
    suspended: bool,
    /// When the last inbound frame arrived (or the connection opened).
    last_inbound: Instant,
    /// Counters and RTT, as reported to the application.
    stats: HeartbeatStats,
}

/// Counters and round-trip estimates of one heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HeartbeatStats {
    pub(crate) pings_sent: u64,
    pub(crate) pongs_received: u64,
    pub(crate) pongs_unmatched: u64,
    pub(crate) last_rtt: Option<Duration>,
    pub(crate) smoothed_rtt: Option<Duration>,
}

/// What a received pong turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pong {
    /// It answered one of our recent pings; the sample is its round trip.
    Matched(Duration),
    /// Unsolicited, stale, or foreign: liveness only.
    Unmatched,
}

/// The size of a ping payload: a masked sequence number.
pub(crate) const PAYLOAD_LEN: usize = 8;

impl Heartbeat {
    /// A heartbeat for a connection opened at `now`. The first ping comes
    /// at `now + interval + phase`, where the phase is `unit` (uniform in
    /// `[0, 1)`) of the `jitter`; `key` masks nonces.
    ///
    /// When the jitter spans at least one slot, the phase is drawn from
    /// `[0, jitter - slot)` and the first ping moved up to the next slot
    /// boundary counted from `epoch`: still within `interval + jitter`, but
    /// on a grid shared by every connection of the supervisor.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        epoch: Instant,
        now: Instant,
        interval: Duration,
        timeout: Duration,
        jitter: Duration,
        unit: f64,
        liveness: Liveness,
        key: u64,
    ) -> Self {
        let slot = slot(interval);
        let first_ping = if jitter >= slot {
            align(epoch, now + interval + (jitter - slot).mul_f64(unit), slot)
        } else {
            now + interval + jitter.mul_f64(unit)
        };
        Self {
            interval,
            timeout,
            liveness,
            key: key & MAX_NONCE,
            next_ping: first_ping,
            seq: 0,
            unacked: 0,
            sent_at: [now; RING],
            anchor: None,
            not_before: None,
            suspended: false,
            last_inbound: now,
            stats: HeartbeatStats::default(),
        }
    }

    /// When the peer is overdue, if a ping is unanswered and we are reading.
    pub fn deadline(&self) -> Option<Instant> {
        if self.suspended {
            return None;
        }
        let due = self.anchor? + self.timeout;
        Some(match self.not_before {
            Some(nb) if nb > due => nb,
            _ => due,
        })
    }

    /// The earliest instant at which the heartbeat has something to do: the
    /// pong deadline or the next ping.
    pub fn next_wakeup(&self) -> Instant {
        match self.deadline() {
            Some(d) if d < self.next_ping => d,
            _ => self.next_ping,
        }
    }

    /// Whether the peer missed its deadline at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// The payload of the next ping frame, if one is due at `now`: its
    /// [nonce](Self::nonce_due), big-endian.
    pub fn ping_due(&self, now: Instant) -> Option<[u8; PAYLOAD_LEN]> {
        self.nonce_due(now).map(u64::to_be_bytes)
    }

    /// The nonce of the next ping (of either kind), if one is due at `now`:
    /// a masked sequence number, at most `2^53 - 1`. Nothing is recorded
    /// until [`ping_sent`](Self::ping_sent) or
    /// [`ping_skipped`](Self::ping_skipped).
    pub fn nonce_due(&self, now: Instant) -> Option<u64> {
        (now >= self.next_ping).then_some(self.seq ^ self.key)
    }

    /// The due ping went out at `now`: it starts the deadline, if none runs.
    pub fn ping_sent(&mut self, now: Instant) {
        self.advance(now);
        let seq = self.seq;
        self.seq += 1;
        self.sent_at[(seq % RING as u64) as usize] = now;
        self.anchor.get_or_insert(now);
        self.stats.pings_sent += 1;
    }

    /// The due ping could not be queued (our write side is full): the
    /// schedule moves on, and the peer is not held to a ping it never got.
    pub fn ping_skipped(&mut self, now: Instant) {
        self.advance(now);
    }

    fn advance(&mut self, now: Instant) {
        self.next_ping += self.interval;
        if self.next_ping <= now {
            // We were stalled past a whole interval: one ping now, and the
            // schedule restarts from here instead of bursting.
            self.next_ping = now + self.interval;
        }
    }

    /// Records a pong frame received at `now` with `payload`.
    pub fn on_pong(&mut self, now: Instant, payload: &[u8]) -> Pong {
        let seq = <[u8; PAYLOAD_LEN]>::try_from(payload)
            .ok()
            .map(|p| u64::from_be_bytes(p) ^ self.key);
        self.answered(now, seq)
    }

    /// Records the answer to an application-level ping, received at `now`:
    /// a pong exactly as [`on_pong`](Self::on_pong) counts one. Without a
    /// nonce ([`AppPong::Oldest`]) it answers the oldest ping still
    /// outstanding.
    pub fn on_answer(&mut self, now: Instant, answer: AppPong) -> Pong {
        match answer {
            AppPong::Nonce(nonce) => self.answered(now, Some(nonce ^ self.key)),
            AppPong::Oldest if self.unacked < self.seq => {
                let oldest = self.unacked;
                let pong = self.answered(now, Some(oldest));
                // Answers come in order: this ping is spent even if its
                // send time has left the ring (then it gave no RTT sample).
                self.unacked = self.unacked.max(oldest + 1);
                pong
            }
            AppPong::Oldest => self.answered(now, None),
        }
    }

    /// A pong (of either kind) for sequence number `seq`, if it names one.
    fn answered(&mut self, now: Instant, seq: Option<u64>) -> Pong {
        self.stats.pongs_received += 1;
        self.alive(now);
        let matched =
            seq.filter(|&s| s >= self.unacked && s < self.seq && self.seq - s <= RING as u64);
        let Some(s) = matched else {
            self.stats.pongs_unmatched += 1;
            return Pong::Unmatched;
        };
        // A later pong acknowledges every earlier ping as well.
        self.unacked = s + 1;
        let rtt = now.saturating_duration_since(self.sent_at[(s % RING as u64) as usize]);
        self.stats.last_rtt = Some(rtt);
        self.stats.smoothed_rtt = Some(match self.stats.smoothed_rtt {
            // RFC 6298's alpha = 1/8.
            Some(srtt) => (srtt * 7 + rtt) / 8,
            None => rtt,
        });
        Pong::Matched(rtt)
    }

    /// Records any other inbound frame (data, ping, close) received at `now`.
    pub fn on_frame(&mut self, now: Instant) {
        match self.liveness {
            Liveness::AnyFrame => self.alive(now),
            Liveness::Pong => self.last_inbound = now,
        }
    }

    fn alive(&mut self, now: Instant) {
        self.last_inbound = now;
        self.anchor = None;
        self.not_before = None;
    }

    /// Our inbound queue is full: we stop reading, so the peer cannot be
    /// blamed for what we do not read.
    pub fn suspend(&mut self) {
        self.suspended = true;
    }

    /// We read again at `now`: the peer gets a full timeout from here.
    /// Pongs to pings sent before now may have waited in our own buffer, so
    /// they no longer give RTT samples (they still count as liveness).
    pub fn resume(&mut self, now: Instant) {
        if self.suspended {
            self.suspended = false;
            self.not_before = Some(now + self.timeout);
            self.unacked = self.seq;
        }
    }

    /// When the last inbound frame arrived (the open time if none yet).
    pub fn last_inbound(&self) -> Instant {
        self.last_inbound
    }

    /// The counters so far.
    pub(crate) fn stats(&self) -> HeartbeatStats {
        self.stats
    }
}

/// How long an expired pong deadline waits for frames that were already
/// received but not yet read: the pong may be among them, and the peer is
/// not blamed for our own backlog (see `docs/keepalive.md`, "Reading on
/// past the deadline").
///
/// Bounded by passes of the driver's loop, not by time: each pass reads at
/// most one frame that is already buffered (a read that has to wait for the
/// network ends the wait at once), so the verdict comes at most
/// [`MAX_PASSES`](Self::MAX_PASSES) frames late, without waiting on the
/// peer. Passes that could not read because tokio's cooperative budget was
/// spent do not count.
#[derive(Debug, Default)]
pub(crate) struct OverdueReads {
    /// Passes in a row that read on past the deadline.
    passes: u32,
}

impl OverdueReads {
    /// Most frames read past an expired deadline before it is declared: a
    /// flood of buffered frames cannot postpone the verdict further.
    pub(crate) const MAX_PASSES: u32 = 64;

    /// Whether to read one more frame before declaring the timeout.
    /// `overdue`: the deadline has passed and frames are waiting; `counted`:
    /// this pass can read (tokio's budget is not spent).
    pub(crate) fn read_on(&mut self, overdue: bool, counted: bool) -> bool {
        if overdue && self.passes < Self::MAX_PASSES {
            if counted {
                self.passes += 1;
            }
            true
        } else {
            self.passes = 0;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    /// Sends the due ping at `now`, as the driver does; `None` if none is due.
    fn ping(h: &mut Heartbeat, now: Instant) -> Option<[u8; PAYLOAD_LEN]> {
        let payload = h.ping_due(now)?;
        h.ping_sent(now);
        Some(payload)
    }

    fn hb(now: Instant, timeout: Duration) -> Heartbeat {
        let zero = Duration::ZERO;
        Heartbeat::new(now, now, S, timeout, zero, 0.0, Liveness::Pong, 0xdead_beef)
    }

    #[test]
    fn first_pings_fall_on_shared_slots() {
        let epoch = Instant::now();
        let slot = slot(S);
        assert_eq!(slot, S / 64);
        let jitter = 10 * slot;
        let new =
            |open, jitter, unit| Heartbeat::new(epoch, open, S, S, jitter, unit, Liveness::Pong, 0);
        // Opened 3 ms after the epoch, phase 0: the next slot boundary.
        assert_eq!(
            new(epoch + 3 * MS, jitter, 0.0).next_wakeup(),
            epoch + S + slot
        );
        // On a boundary already: unchanged.
        assert_eq!(
            new(epoch + slot, jitter, 0.0).next_wakeup(),
            epoch + S + slot
        );
        // The largest phase still lands within interval + jitter.
        for open_ms in 0..20 {
            let open = epoch + MS * open_ms;
            let first = new(open, jitter, 0.999_999).next_wakeup();
            assert!(
                first <= open + S + jitter && first >= open + S,
                "opened at +{open_ms} ms"
            );
        }
        // A jitter under one slot: no alignment, the exact schedule.
        assert_eq!(
            new(epoch + 3 * MS, Duration::ZERO, 0.0).next_wakeup(),
            epoch + 3 * MS + S
        );
        // Short intervals keep a 1 ms floor.
        assert_eq!(super::slot(10 * MS), MS);
    }

    #[test]
    fn first_ping_one_interval_after_open_with_phase() {
        let t0 = Instant::now();
        // Jitter of 17 slots, unit 15/16: a phase of 15 slots, on a boundary.
        let mut h = Heartbeat::new(t0, t0, S, S, 17 * slot(S), 15.0 / 16.0, Liveness::Pong, 1);
        let phase = 15 * slot(S);
        // The phase rounds up to the next slot boundary.
        assert!(ping(&mut h, t0 + S + phase - MS).is_none());
        assert!(ping(&mut h, t0 + S + phase).is_some());
        assert_eq!(h.next_wakeup(), t0 + 2 * S + phase);
    }

    #[test]
    fn missed_ticks_do_not_burst() {
        let t0 = Instant::now();
        let mut h = hb(t0, 10 * S);
        // Stalled for 5.5 intervals: one ping, then the next a full interval on.
        let late = t0 + 5 * S + 500 * MS;
        assert!(ping(&mut h, late).is_some());
        assert!(ping(&mut h, late).is_none());
        assert!(ping(&mut h, late + S - MS).is_none());
        assert!(ping(&mut h, late + S).is_some());
        assert_eq!(h.stats().pings_sent, 2);
    }

    #[test]
    fn deadline_is_first_unanswered_ping_plus_timeout() {
        let t0 = Instant::now();
        let mut h = hb(t0, 3 * S);
        assert_eq!(h.deadline(), None);
        let p1 = t0 + S;
        ping(&mut h, p1).unwrap();
        ping(&mut h, p1 + S).unwrap(); // a second ping does not move the deadline
        assert_eq!(h.deadline(), Some(p1 + 3 * S));
        assert!(!h.is_expired(p1 + 3 * S - MS));
        assert!(h.is_expired(p1 + 3 * S));
    }

    #[test]
    fn matched_pong_measures_rtt_and_acknowledges_earlier_pings() {
        let t0 = Instant::now();
        let mut h = hb(t0, 3 * S);
        let first = ping(&mut h, t0 + S).unwrap();
        let second = ping(&mut h, t0 + 2 * S).unwrap();
        let at = t0 + 2 * S + 120 * MS;
        assert_eq!(h.on_pong(at, &second), Pong::Matched(120 * MS));
        assert_eq!(h.deadline(), None);
        // The first ping was acknowledged by the later pong: its own pong is stale.
        assert_eq!(h.on_pong(at, &first), Pong::Unmatched);
        let s = h.stats();
        assert_eq!(
            (s.pings_sent, s.pongs_received, s.pongs_unmatched),
            (2, 2, 1)
        );
        assert_eq!(s.last_rtt, Some(120 * MS));
    }

    #[test]
    fn unsolicited_pong_is_liveness_not_rtt() {
        let t0 = Instant::now();
        let mut h = hb(t0, S);
        ping(&mut h, t0 + S).unwrap();
        assert_eq!(h.on_pong(t0 + S + 10 * MS, b"hello"), Pong::Unmatched);
        assert_eq!(h.deadline(), None);
        assert_eq!(h.stats().last_rtt, None);
        assert_eq!(h.stats().smoothed_rtt, None);
    }

    #[test]
    fn smoothed_rtt_is_an_ewma() {
        let t0 = Instant::now();
        let mut h = hb(t0, S);
        let p = ping(&mut h, t0 + S).unwrap();
        h.on_pong(t0 + S + 80 * MS, &p);
        let p = ping(&mut h, t0 + 2 * S).unwrap();
        h.on_pong(t0 + 2 * S + 160 * MS, &p);
        assert_eq!(h.stats().smoothed_rtt, Some(90 * MS));
        assert_eq!(h.stats().last_rtt, Some(160 * MS));
    }

    #[test]
    fn liveness_policy_decides_whether_data_counts() {
        let t0 = Instant::now();
        let mut strict = hb(t0, S);
        ping(&mut strict, t0 + S).unwrap();
        strict.on_frame(t0 + S + MS);
        assert!(strict.deadline().is_some(), "data is not a pong");
        assert_eq!(strict.last_inbound(), t0 + S + MS);

        let zero = Duration::ZERO;
        let mut lenient = Heartbeat::new(t0, t0, S, S, zero, 0.0, Liveness::AnyFrame, 0);
        ping(&mut lenient, t0 + S).unwrap();
        lenient.on_frame(t0 + S + MS);
        assert_eq!(lenient.deadline(), None);
    }

    #[test]
    fn suspension_lifts_the_deadline_and_resume_grants_a_full_timeout() {
        let t0 = Instant::now();
        let mut h = hb(t0, S);
        ping(&mut h, t0 + S).unwrap();
        h.suspend();
        assert_eq!(h.deadline(), None);
        assert!(!h.is_expired(t0 + 10 * S));
        h.resume(t0 + 10 * S);
        assert_eq!(h.deadline(), Some(t0 + 11 * S));
    }

    #[test]
    fn pongs_read_after_a_suspension_are_not_rtt_samples() {
        let t0 = Instant::now();
        let mut h = hb(t0, S);
        let payload = ping(&mut h, t0 + S).unwrap();
        h.suspend();
        h.resume(t0 + 5 * S);
        // The pong sat in our own buffer for 4 s: not the peer's round trip.
        assert_eq!(h.on_pong(t0 + 5 * S, &payload), Pong::Unmatched);
        assert_eq!(h.stats().last_rtt, None);
        assert_eq!(h.deadline(), None, "still liveness");
        // Pings after the resume measure again.
        let payload = ping(&mut h, t0 + 6 * S).unwrap();
        assert_eq!(
            h.on_pong(t0 + 6 * S + 2 * MS, &payload),
            Pong::Matched(2 * MS)
        );
    }

    #[test]
    fn a_skipped_ping_moves_the_schedule_but_starts_no_deadline() {
        let t0 = Instant::now();
        let mut h = hb(t0, S);
        assert!(h.ping_due(t0 + S).is_some());
        h.ping_skipped(t0 + S);
        assert_eq!(h.deadline(), None);
        assert_eq!(h.stats().pings_sent, 0);
        assert!(h.ping_due(t0 + S).is_none());
        assert!(ping(&mut h, t0 + 2 * S).is_some());
        assert_eq!(h.deadline(), Some(t0 + 3 * S));
    }

    #[test]
    fn payloads_are_unique_per_ping() {
        let t0 = Instant::now();
        let mut h = hb(t0, S);
        let a = ping(&mut h, t0 + S).unwrap();
        let b = ping(&mut h, t0 + 2 * S).unwrap();
        assert_ne!(a, b);
    }

    /// Sends the due probe at `now` and returns its nonce.
    fn probe(h: &mut Heartbeat, now: Instant) -> u64 {
        let nonce = h.nonce_due(now).expect("a probe is due");
        h.ping_sent(now);
        nonce
    }

    #[test]
    fn an_app_answer_with_a_nonce_is_matched_as_a_pong_frame_is() {
        let t0 = Instant::now();
        let mut h = hb(t0, 3 * S);
        let first = probe(&mut h, t0 + S);
        let second = probe(&mut h, t0 + 2 * S);
        assert_eq!(h.deadline(), Some(t0 + 4 * S));
        let at = t0 + 2 * S + 40 * MS;
        assert_eq!(
            h.on_answer(at, AppPong::Nonce(second)),
            Pong::Matched(40 * MS)
        );
        assert_eq!(h.deadline(), None);
        // Acknowledged by the later answer: stale now.
        assert_eq!(h.on_answer(at, AppPong::Nonce(first)), Pong::Unmatched);
        // A nonce we never sent.
        assert_eq!(
            h.on_answer(at, AppPong::Nonce(second ^ 0xff)),
            Pong::Unmatched
        );
        let s = h.stats();
        assert_eq!(
            (s.pings_sent, s.pongs_received, s.pongs_unmatched),
            (2, 3, 2)
        );
        assert_eq!(s.last_rtt, Some(40 * MS));
        // The same nonce as a ping-frame payload is the same ping.
        let third = probe(&mut h, t0 + 3 * S);
        assert_eq!(
            h.on_pong(t0 + 3 * S + MS, &third.to_be_bytes()),
            Pong::Matched(MS)
        );
    }

    #[test]
    fn an_app_answer_without_a_nonce_answers_the_oldest_outstanding_ping() {
        let t0 = Instant::now();
        let mut h = hb(t0, 10 * S);
        // Nothing outstanding: liveness only.
        assert_eq!(h.on_answer(t0, AppPong::Oldest), Pong::Unmatched);
        probe(&mut h, t0 + S);
        probe(&mut h, t0 + 2 * S);
        let at = t0 + 2 * S + 500 * MS;
        // In order: the first ping's answer, then the second's.
        assert_eq!(h.on_answer(at, AppPong::Oldest), Pong::Matched(1500 * MS));
        assert_eq!(h.on_answer(at, AppPong::Oldest), Pong::Matched(500 * MS));
        // Both answered: a third answer is unsolicited.
        assert_eq!(h.on_answer(at, AppPong::Oldest), Pong::Unmatched);
        assert_eq!(h.deadline(), None);
        let s = h.stats();
        assert_eq!((s.pongs_received, s.pongs_unmatched), (4, 2));
    }

    #[test]
    fn an_answer_to_a_ping_that_left_the_ring_is_spent_without_a_sample() {
        let t0 = Instant::now();
        let mut h = hb(t0, 100 * S);
        for i in 1..=(RING as u32 + 1) {
            probe(&mut h, t0 + S * i);
        }
        let at = t0 + 10 * S;
        // The oldest of five has no send time left: liveness, no RTT.
        assert_eq!(h.on_answer(at, AppPong::Oldest), Pong::Unmatched);
        assert_eq!(h.stats().last_rtt, None);
        // The next answer is the second ping's, sent at 2 s.
        assert_eq!(h.on_answer(at, AppPong::Oldest), Pong::Matched(8 * S));
    }

    #[test]
    fn nonces_fit_a_json_number() {
        let t0 = Instant::now();
        let zero = Duration::ZERO;
        let mut h = Heartbeat::new(t0, t0, S, S, zero, 0.0, Liveness::Pong, u64::MAX);
        for i in 1..100 {
            let nonce = probe(&mut h, t0 + S * i);
            assert!(nonce <= MAX_NONCE, "{nonce}");
        }
    }

    #[test]
    fn overdue_reads_are_bounded_and_reset() {
        let mut o = OverdueReads::default();
        for _ in 0..OverdueReads::MAX_PASSES {
            assert!(o.read_on(true, true));
        }
        assert!(!o.read_on(true, true), "the bound is reached: declare it");
        // Passes without budget do not count.
        let mut o = OverdueReads::default();
        for _ in 0..1000 {
            assert!(o.read_on(true, false));
        }
        assert!(o.read_on(true, true));
        // Nothing overdue: the count starts over.
        let mut o = OverdueReads::default();
        for _ in 0..10 {
            o.read_on(true, true);
        }
        assert!(!o.read_on(false, true));
        assert_eq!(o.passes, 0);
    }
}
