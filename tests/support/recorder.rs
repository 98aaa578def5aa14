//! A global recorder for tests on a multi-thread runtime, where
//! `with_local_recorder` (thread-local) cannot see the driver tasks. See
//! [`Recorder`].

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use ws_supervisor::metrics::names;
use ws_supervisor::{CloseEvent, Config, Supervisor};

use super::Events;

/// The global recorder of a test binary (installed by [`install`]): every series in a `metrics-util`
/// [`Registry`] of atomics, read without being reset.
///
/// Not `DebuggingRecorder`: its `snapshot()` swaps every gauge and counter
/// to 0, so one test's snapshot would wipe the gauges of the tests running
/// next to it in the same binary, and a second snapshot reads 0 whatever the
/// truth.
///
/// Its `ws_supervisor_connections` gauge first sleeps a pseudo-random
/// 0–200 µs on each decrement. The pause stands for a worker thread
/// preempted between two steps of closing a connection (the live count and
/// the gauges); random, so that of two threads the one that came first may
/// come out last. It turns an ordering race that a fast machine loses
/// rarely into one it loses often, so a regression shows on the first run.
struct Recorder(Registry<Key, AtomicStorage>);

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let gauge = self.0.get_or_create_gauge(key, |g| g.clone());
        if key.name() == names::CONNECTIONS {
            Gauge::from_arc(Arc::new(SlowDecrement(gauge)))
        } else {
            Gauge::from_arc(gauge)
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// A gauge whose decrement first sleeps a pseudo-random 0–200 µs (see
/// [`Recorder`]).
struct SlowDecrement(Arc<AtomicU64>);

impl GaugeFn for SlowDecrement {
    fn increment(&self, value: f64) {
        self.0.increment(value);
    }

    fn decrement(&self, value: f64) {
        std::thread::sleep(jitter());
        self.0.decrement(value);
    }

    fn set(&self, value: f64) {
        self.0.set(value);
    }
}

/// A pseudo-random pause of 0–200 µs.
fn jitter() -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    Duration::from_micros(RandomState::new().hash_one(nanos) % 200)
}

/// Installs the global recorder (once per test binary) and returns its
/// registry. Call it before building a supervisor: handles are registered
/// at build.
pub fn install() -> &'static Registry<Key, AtomicStorage> {
    static RECORDER: OnceLock<&'static Recorder> = OnceLock::new();
    let recorder = RECORDER.get_or_init(|| {
        let recorder: &'static Recorder = Box::leak(Box::new(Recorder(Registry::atomic())));
        metrics::set_global_recorder(recorder).expect("the only global recorder");
        recorder
    });
    &recorder.0
}

/// The value of gauge `name` of the supervisor labelled `label`.
pub fn gauge(name: &str, label: &str) -> f64 {
    let mut value = None;
    install().visit_gauges(|key, gauge| {
        if key.name() == name
            && key
                .labels()
                .any(|l| l.key() == "supervisor" && l.value() == label)
        {
            value = Some(f64::from_bits(gauge.load(Relaxed)));
        }
    });
    value.unwrap_or_else(|| panic!("no gauge {name}{{supervisor={label}}}"))
}

/// A supervisor whose series carry `supervisor=label` in the global
/// recorder (so tests sharing the binary keep apart), with a hook that
/// records into the returned [`Events`].
pub fn supervisor(config: Config, label: &str) -> (Supervisor, Events) {
    install();
    let events = Events::default();
    let sink = events.clone();
    let sup = Supervisor::builder(config)
        .metric_label("supervisor", label)
        .on_close(move |e: &CloseEvent| sink.push(e.clone()))
        .build();
    (sup, events)
}

/// Asserts that both gauges of the supervisor labelled `label` are back at
/// 0: the connections gauge and the shutdown-remaining gauge.
pub fn assert_gauges_at_zero(label: &str) {
    assert_eq!(
        gauge(names::CONNECTIONS, label),
        0.0,
        "{label}: connections gauge"
    );
    assert_eq!(
        gauge(names::SHUTDOWN_REMAINING, label),
        0.0,
        "{label}: shutdown-remaining gauge"
    );
}
