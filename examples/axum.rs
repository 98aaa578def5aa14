//! A small but real axum service with supervised WebSockets: an echo at
//! `/ws`, Prometheus metrics at `/metrics` from the same router, a health
//! route, and a graceful shutdown on Ctrl-C (axum's, plus the supervisor's
//! Close 1001 to every connection, with the summary printed).
//!
//! ```text
//! cargo run --example axum --features axum
//! cargo run --example axum --features axum -- --listen 127.0.0.1:9002 --ping-interval-ms 500
//! ```
//!
//! Flags (the demo's, so outside tools and benchmarks drive it alike):
//!
//! * `--listen ADDR` — where to serve HTTP and WebSocket (default `127.0.0.1:9002`);
//! * `--ping-interval-ms N` — ping interval (default 1000);
//! * `--pong-timeout-ms N` — pong timeout (default 1000).
//!
//! Routes:
//!
//! * `GET /ws` — a supervised echo of every text and binary message; the
//!   subprotocol `echo.v1` is agreed if the client offers it;
//! * `GET /metrics` — the Prometheus exposition;
//! * `GET /healthz` — `ok`, or 503 `shutting down` once shutdown began.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use ws_supervisor::Supervisor;
use ws_supervisor::axum::WebSocketUpgrade;

mod common;

use common::{ServeFlags, print_event};

const USAGE: &str = "usage: axum [--listen ADDR] [--ping-interval-ms N] [--pong-timeout-ms N]";

/// How long shutdown waits for closing handshakes before forcing.
const GRACE: Duration = Duration::from_secs(5);

/// The router's state: the extractor finds the supervisor through `FromRef`.
#[derive(Clone, FromRef)]
struct AppState {
    supervisor: Supervisor,
    metrics: PrometheusHandle,
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .protocols(["echo.v1"])
        .on_upgrade(|mut conn| async move {
            while let Some(message) = conn.recv().await {
                if conn.send(message).await.is_err() {
                    break;
                }
            }
        })
}

async fn render_metrics(State(handle): State<PrometheusHandle>) -> String {
    handle.render()
}

async fn healthz(State(supervisor): State<Supervisor>) -> Response {
    if supervisor.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        "ok\n".into_response()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = match common::args_or_exit(|args| {
        ServeFlags::new("127.0.0.1:9002").parse(args, USAGE, |_, _| Ok(false))
    }) {
        Ok(flags) => flags,
        Err(code) => return code,
    };
    let config = match flags.config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    // The recorder goes in before the supervisor registers its metrics.
    let metrics = match ws_supervisor::prometheus::install_recorder() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("cannot install the metrics recorder: {e}");
            return ExitCode::FAILURE;
        }
    };
    let supervisor = Supervisor::builder(config)
        .on_close(print_event)
        .metric_label("supervisor", "axum")
        .build();
    let app = Router::new()
        .route("/ws", get(ws))
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .with_state(AppState {
            supervisor: supervisor.clone(),
            metrics,
        });
    let listener = match flags.bind().await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let addr = listener.local_addr().expect("bound");
    println!(
        "listening on ws://{addr}/ws, metrics on http://{addr}/metrics (ping every {:?}, pong timeout {:?}); Ctrl-C to stop",
        flags.ping_interval, flags.pong_timeout
    );

    let stop = CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .into_future(),
    );
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("cannot wait for Ctrl-C: {e}");
    }
    println!("shutting down ({} live connections)", supervisor.len());
    // Stop taking HTTP requests, and close every WebSocket with 1001.
    stop.cancel();
    let summary = supervisor.shutdown(GRACE).await;
    println!("shutdown: {summary}");
    match server.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("server failed: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("server task failed: {e}");
            ExitCode::FAILURE
        }
    }
}
