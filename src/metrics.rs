//! Metric names, descriptions and the handles one supervisor emits through.
//! See [`names`] and `docs/metrics.md`.
//!
//! The library only emits through the [`metrics`] facade: install a recorder
//! (for example with [`prometheus::install`](crate::prometheus::install))
//! **before** building the [`Supervisor`](crate::Supervisor), because its
//! handles are registered when it is built — which is also what makes every
//! series exist, at zero, from the start.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Label, Unit};

use crate::close::{CloseReason, Initiator};
use crate::error::HandshakeFailure;

/// The name of every metric the crate emits.
///
/// All are prefixed `ws_supervisor_`; counters end in `_total`, durations
/// are histograms in seconds. Labels: `reason` and `initiator` on closes,
/// `cause` on handshake failures, plus the constant labels set with
/// [`SupervisorBuilder::metric_label`](crate::SupervisorBuilder::metric_label).
pub mod names {
    /// Gauge: connections being supervised now.
    pub const CONNECTIONS: &str = "ws_supervisor_connections";
    /// Counter: connections that completed their opening handshake.
    pub const ACCEPTED: &str = "ws_supervisor_connections_accepted_total";
    /// Counter, label `cause`: opening handshakes that failed or were refused.
    pub const HANDSHAKE_FAILURES: &str = "ws_supervisor_handshake_failures_total";
    /// Counter, labels `reason` and `initiator`: connections that ended.
    pub const CLOSED: &str = "ws_supervisor_connections_closed_total";
    /// Counter: pings sent (ping frames or application-level probes).
    pub const PINGS_SENT: &str = "ws_supervisor_pings_sent_total";
    /// Counter: pongs received (frames or application-level answers), matching or not.
    pub const PONGS_RECEIVED: &str = "ws_supervisor_pongs_received_total";
    /// Counter: pongs that matched none of our recent pings (late or unsolicited).
    pub const PONGS_UNMATCHED: &str = "ws_supervisor_pongs_unmatched_total";
    /// Histogram, seconds: round-trip time of matched pongs.
    pub const RTT: &str = "ws_supervisor_rtt_seconds";
    /// Histogram, seconds: how long connections lived.
    pub const LIFETIME: &str = "ws_supervisor_connection_duration_seconds";
    /// Histogram, seconds: from the peer's last inbound frame to its declared timeout.
    pub const DETECTION: &str = "ws_supervisor_timeout_detection_seconds";
    /// Counter: text and binary messages received.
    pub const MESSAGES_RECEIVED: &str = "ws_supervisor_messages_received_total";
    /// Counter: text and binary messages sent.
    pub const MESSAGES_SENT: &str = "ws_supervisor_messages_sent_total";
    /// Counter, bytes: payload of messages received.
    pub const BYTES_RECEIVED: &str = "ws_supervisor_received_bytes_total";
    /// Counter, bytes: payload of messages sent.
    pub const BYTES_SENT: &str = "ws_supervisor_sent_bytes_total";
    /// Histogram, seconds: time spent running the close hooks of one connection.
    pub const HOOK_DURATION: &str = "ws_supervisor_hook_duration_seconds";
    /// Counter: close-hook calls that panicked.
    pub const HOOK_PANICS: &str = "ws_supervisor_hook_panics_total";
    /// Gauge: connections a running shutdown still waits for (0 otherwise).
    pub const SHUTDOWN_REMAINING: &str = "ws_supervisor_shutdown_remaining_connections";

    /// Counter: connection attempts of [`Reconnecting`](crate::Reconnecting) clients.
    pub const CLIENT_ATTEMPTS: &str = "ws_supervisor_client_connect_attempts_total";
    /// Counter: attempts of reconnecting clients that gave the application a connection.
    pub const CLIENT_CONNECTS: &str = "ws_supervisor_client_connects_total";
    /// Counter, label `cause`: attempts of reconnecting clients that failed.
    pub const CLIENT_FAILURES: &str = "ws_supervisor_client_connect_failures_total";
    /// Histogram, seconds: how long a reconnecting client was without a connection.
    pub const CLIENT_DISCONNECTED: &str = "ws_supervisor_client_disconnected_seconds";
    /// Gauge, seconds: the backoff delays reconnecting clients are waiting out now (summed).
    pub const CLIENT_BACKOFF: &str = "ws_supervisor_client_backoff_seconds";

    /// Every name above.
    pub const ALL: [&str; 22] = [
        CONNECTIONS,
        ACCEPTED,
        HANDSHAKE_FAILURES,
        CLOSED,
        PINGS_SENT,
        PONGS_RECEIVED,
        PONGS_UNMATCHED,
        RTT,
        LIFETIME,
        DETECTION,
        MESSAGES_RECEIVED,
        MESSAGES_SENT,
        BYTES_RECEIVED,
        BYTES_SENT,
        HOOK_DURATION,
        HOOK_PANICS,
        SHUTDOWN_REMAINING,
        CLIENT_ATTEMPTS,
        CLIENT_CONNECTS,
        CLIENT_FAILURES,
        CLIENT_DISCONNECTED,
        CLIENT_BACKOFF,
    ];
}

/// The `cause` label of a reconnecting client's attempt whose `on_connect`
/// hook failed, timed out or panicked; the other causes are
/// [`HandshakeFailure::as_str`]'s.
pub const ON_CONNECT_CAUSE: &str = "on_connect";

/// Registers every description, with its unit, in the current recorder.
fn describe_all() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_gauge!(
        CONNECTIONS,
        Unit::Count,
        "Connections being supervised now."
    );
    describe_counter!(
        ACCEPTED,
        Unit::Count,
        "Connections that completed their opening handshake."
    );
    describe_counter!(
        HANDSHAKE_FAILURES,
        Unit::Count,
        "Opening handshakes that failed or were refused, by cause (no close hook runs)."
    );
    describe_counter!(
        CLOSED,
        Unit::Count,
        "Connections that ended, by reason and initiator."
    );
    describe_counter!(
        PINGS_SENT,
        Unit::Count,
        "Pings sent by the supervisor (ping frames or application-level probes)."
    );
    describe_counter!(
        PONGS_RECEIVED,
        Unit::Count,
        "Pongs received (pong frames or application-level answers), matching or not."
    );
    describe_counter!(
        PONGS_UNMATCHED,
        Unit::Count,
        "Pongs that matched none of the recent pings (late or unsolicited)."
    );
    describe_histogram!(
        RTT,
        Unit::Seconds,
        "Round-trip time of pings answered by a matching pong."
    );
    describe_histogram!(
        LIFETIME,
        Unit::Seconds,
        "How long connections lived after their handshake."
    );
    describe_histogram!(
        DETECTION,
        Unit::Seconds,
        "Time from a peer's last inbound frame to its declared timeout."
    );
    describe_counter!(
        MESSAGES_RECEIVED,
        Unit::Count,
        "Text and binary messages received."
    );
    describe_counter!(MESSAGES_SENT, Unit::Count, "Text and binary messages sent.");
    describe_counter!(
        BYTES_RECEIVED,
        Unit::Bytes,
        "Payload bytes of messages received."
    );
    describe_counter!(BYTES_SENT, Unit::Bytes, "Payload bytes of messages sent.");
    describe_histogram!(
        HOOK_DURATION,
        Unit::Seconds,
        "Time spent running the close hooks of one connection."
    );
    describe_counter!(
        HOOK_PANICS,
        Unit::Count,
        "Close-hook calls that panicked (caught)."
    );
    describe_gauge!(
        SHUTDOWN_REMAINING,
        Unit::Count,
        "Connections a running graceful shutdown still waits for; 0 otherwise."
    );
    describe_counter!(
        CLIENT_ATTEMPTS,
        Unit::Count,
        "Connection attempts of reconnecting clients."
    );
    describe_counter!(
        CLIENT_CONNECTS,
        Unit::Count,
        "Attempts of reconnecting clients that handed the application a connection."
    );
    describe_counter!(
        CLIENT_FAILURES,
        Unit::Count,
        "Attempts of reconnecting clients that failed, by cause."
    );
    describe_histogram!(
        CLIENT_DISCONNECTED,
        Unit::Seconds,
        "Time a reconnecting client spent without a connection, recorded when it connects again."
    );
    describe_gauge!(
        CLIENT_BACKOFF,
        Unit::Seconds,
        "Backoff delays reconnecting clients are waiting out now, summed; 0 when none waits."
    );
}

/// The handles one supervisor emits through, registered once at build time.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) connections: Gauge,
    pub(crate) accepted: Counter,
    handshake_failures: [Counter; HandshakeFailure::ALL.len()],
    closed: [[Counter; Initiator::ALL.len()]; CloseReason::ALL.len()],
    pub(crate) pings_sent: Counter,
    pub(crate) pongs_received: Counter,
    pub(crate) pongs_unmatched: Counter,
    pub(crate) rtt: Histogram,
    pub(crate) lifetime: Histogram,
    pub(crate) detection: Histogram,
    pub(crate) messages_received: Counter,
    pub(crate) messages_sent: Counter,
    pub(crate) bytes_received: Counter,
    pub(crate) bytes_sent: Counter,
    pub(crate) hook_duration: Histogram,
    pub(crate) hook_panics: Counter,
    pub(crate) shutdown_remaining: Gauge,
    pub(crate) client: ClientMetrics,
}

/// The handles of the reconnecting clients of one supervisor.
#[derive(Debug)]
pub(crate) struct ClientMetrics {
    pub(crate) attempts: Counter,
    pub(crate) connects: Counter,
    /// One per [`HandshakeFailure`], then [`ON_CONNECT_CAUSE`].
    failures: [Counter; HandshakeFailure::ALL.len() + 1],
    pub(crate) disconnected: Histogram,
    pub(crate) backoff: Gauge,
}

impl ClientMetrics {
    /// An attempt failed with `cause` (`None`: the `on_connect` hook).
    pub(crate) fn failed(&self, cause: Option<HandshakeFailure>) {
        let i = cause.map_or(HandshakeFailure::ALL.len(), HandshakeFailure::index);
        self.failures[i].increment(1);
    }
}

impl Metrics {
    /// Describes every metric and registers every series (all reasons,
    /// initiators and causes) with `labels` added, so each starts at zero.
    pub(crate) fn register(labels: &[(String, String)]) -> Self {
        describe_all();
        let base: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(k.clone(), v.clone()))
            .collect();
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = base.clone();
            all.extend(extra.iter().map(|&(k, v)| Label::new(k, v)));
            all
        };
        let counter = |name: &'static str, extra: &[(&'static str, &'static str)]| {
            metrics::counter!(name, with(extra))
        };
        let histogram = |name: &'static str| metrics::histogram!(name, with(&[]));
        let gauge = |name: &'static str| metrics::gauge!(name, with(&[]));
        use names::*;
        Self {
            connections: gauge(CONNECTIONS),
            accepted: counter(ACCEPTED, &[]),
            handshake_failures: HandshakeFailure::ALL
                .map(|cause| counter(HANDSHAKE_FAILURES, &[("cause", cause.as_str())])),
            closed: CloseReason::ALL.map(|reason| {
                Initiator::ALL.map(|initiator| {
                    counter(
                        CLOSED,
                        &[
                            ("reason", reason.as_str()),
                            ("initiator", initiator.as_str()),
                        ],
                    )
                })
            }),
            pings_sent: counter(PINGS_SENT, &[]),
            pongs_received: counter(PONGS_RECEIVED, &[]),
            pongs_unmatched: counter(PONGS_UNMATCHED, &[]),
            rtt: histogram(RTT),
            lifetime: histogram(LIFETIME),
            detection: histogram(DETECTION),
            messages_received: counter(MESSAGES_RECEIVED, &[]),
            messages_sent: counter(MESSAGES_SENT, &[]),
            bytes_received: counter(BYTES_RECEIVED, &[]),
            bytes_sent: counter(BYTES_SENT, &[]),
            hook_duration: histogram(HOOK_DURATION),
            hook_panics: counter(HOOK_PANICS, &[]),
            shutdown_remaining: gauge(SHUTDOWN_REMAINING),
            client: ClientMetrics {
                attempts: counter(CLIENT_ATTEMPTS, &[]),
                connects: counter(CLIENT_CONNECTS, &[]),
                failures: std::array::from_fn(|i| {
                    let cause = HandshakeFailure::ALL
                        .get(i)
                        .map_or(ON_CONNECT_CAUSE, |c| c.as_str());
                    counter(CLIENT_FAILURES, &[("cause", cause)])
                }),
                disconnected: histogram(CLIENT_DISCONNECTED),
                backoff: gauge(CLIENT_BACKOFF),
            },
        }
    }

    pub(crate) fn handshake_failed(&self, cause: HandshakeFailure) {
        self.handshake_failures[cause.index()].increment(1);
    }

    pub(crate) fn closed(&self, reason: CloseReason, initiator: Initiator) {
        self.closed[reason.index()][initiator.index()].increment(1);
    }
}

/// Recommended histogram buckets (seconds), used by the Prometheus helper.
pub mod buckets {
    /// Round-trip time: 100 µs to 10 s.
    pub const RTT: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    /// Connection lifetime: 1 s to 1 day.
    pub const LIFETIME: &[f64] = &[
        1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0,
    ];
    /// Detection latency: 10 ms to 5 min.
    pub const DETECTION: &[f64] = &[
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0,
    ];
    /// Time a reconnecting client was disconnected: 10 ms to 1 h.
    pub const DISCONNECTED: &[f64] = &[
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
        3600.0,
    ];
    /// Hook duration: 1 µs to 1 s.
    pub const HOOK: &[f64] = &[
        0.000001, 0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
    ];
}

/// Seconds as the histograms want them.
pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
