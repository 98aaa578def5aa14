//! Micro-benchmark of the pure heartbeat state machine (`src/heartbeat.rs`):
//! what N idle connections cost in schedule, nonce matching and RTT
//! bookkeeping alone, with no I/O and no timers.
//!
//! ```text
//! cargo bench --bench heartbeat
//! ```
//!
//! One iteration runs one full heartbeat for each of N connections: the ping
//! comes due, is sent, and its matching pong arrives 1 ms later.

use std::time::Duration;

use divan::Bencher;
use tokio::time::Instant;
use ws_supervisor::__bench::Heartbeat;
use ws_supervisor::Liveness;

fn main() {
    divan::main();
}

const INTERVAL: Duration = Duration::from_secs(1);

fn fleet(n: usize, t0: Instant) -> Vec<Heartbeat> {
    (0..n)
        .map(|i| {
            let (jitter, unit) = (INTERVAL / 10, (i % 100) as f64 / 100.0);
            let key = i as u64;
            Heartbeat::new(
                t0,
                t0,
                INTERVAL,
                INTERVAL,
                jitter,
                unit,
                Liveness::AnyFrame,
                key,
            )
        })
        .collect()
}

#[divan::bench(args = [1_000, 10_000])]
fn full_heartbeat_per_connection(bencher: Bencher<'_, '_>, n: usize) {
    let t0 = Instant::now();
    let mut fleet = fleet(n, t0);
    let mut now = t0;
    bencher
        .counter(divan::counter::ItemsCount::new(n))
        .bench_local(move || {
            now += INTERVAL;
            let later = now + INTERVAL / 5;
            for hb in &mut fleet {
                if let Some(payload) = hb.ping_due(later) {
                    hb.ping_sent(later);
                    divan::black_box(hb.on_pong(later + Duration::from_millis(1), &payload));
                }
                divan::black_box(hb.next_wakeup());
            }
        });
}

#[divan::bench(args = [1_000, 10_000])]
fn deadline_check_per_connection(bencher: Bencher<'_, '_>, n: usize) {
    let t0 = Instant::now();
    let fleet = fleet(n, t0);
    let at = t0 + INTERVAL / 2;
    bencher
        .counter(divan::counter::ItemsCount::new(n))
        .bench_local(|| {
            fleet
                .iter()
                .filter(|hb| hb.is_expired(divan::black_box(at)))
                .count()
        });
}
