//! Serves the metrics to Prometheus, with the recommended buckets. See [`install`].

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::metrics::{buckets, names};

/// A [`PrometheusBuilder`] with explicit buckets for every histogram of this
/// crate, so they render as real Prometheus histograms (which aggregate
/// across instances) rather than summaries (which do not).
///
/// Use it to add your own settings before installing; [`install`] is the
/// one-call version.
///
/// # Errors
/// Never in practice: the bucket lists are non-empty constants.
pub fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(names::RTT.into()), buckets::RTT)?
        .set_buckets_for_metric(Matcher::Full(names::LIFETIME.into()), buckets::LIFETIME)?
        .set_buckets_for_metric(Matcher::Full(names::DETECTION.into()), buckets::DETECTION)?
        .set_buckets_for_metric(Matcher::Full(names::HOOK_DURATION.into()), buckets::HOOK)?
        .set_buckets_for_metric(
            Matcher::Full(names::CLIENT_DISCONNECTED.into()),
            buckets::DISCONNECTED,
        )
}

/// Installs the global Prometheus recorder **without** an HTTP listener, for
/// applications that serve `/metrics` from their own router (see
/// `examples/axum.rs`): render the exposition with
/// [`PrometheusHandle::render`]. A task on the current tokio runtime runs
/// the recorder's upkeep every 5 s (draining histogram data, so memory stays
/// bounded). Call it inside a tokio runtime, **before** building any
/// [`Supervisor`](crate::Supervisor).
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let handle = ws_supervisor::prometheus::install_recorder()?;
/// let supervisor = ws_supervisor::Supervisor::new(ws_supervisor::Config::default());
/// assert!(supervisor.is_empty());
/// // e.g. in a `/metrics` route:
/// assert!(handle.render().contains("ws_supervisor_connections 0"));
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// If a global recorder is already installed.
///
/// # Panics
/// Outside a tokio runtime.
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    let handle = builder()?.install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// How often [`install_recorder`]'s task runs the recorder's upkeep: the
/// exporter's own default.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the global Prometheus recorder and serves the exposition over
/// HTTP on `listen` (on every path, e.g. `/metrics`). Call it inside a tokio
/// runtime, **before** building any [`Supervisor`](crate::Supervisor).
///
/// Returns a handle that renders the same text (for tests, or your own
/// endpoint).
///
/// # Examples
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let handle = ws_supervisor::prometheus::install("127.0.0.1:9000".parse()?)?;
/// // Build supervisors after installing: their series are registered at build.
/// let supervisor = ws_supervisor::Supervisor::new(ws_supervisor::Config::default());
/// assert!(supervisor.is_empty());
/// assert!(handle.render().contains("ws_supervisor_connections 0"));
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// If a global recorder is already installed, or the listener cannot bind.
///
/// # Panics
/// Outside a tokio runtime.
pub fn install(listen: SocketAddr) -> Result<PrometheusHandle, BuildError> {
    let (recorder, exporter) = builder()?.with_http_listener(listen).build()?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(BuildError::FailedToSetGlobalRecorder)?;
    tokio::spawn(async move {
        // The exporter only returns on a listener error; nothing to retry.
        let _ = exporter.await;
    });
    Ok(handle)
}
