//! A reconnecting client: connects to a WebSocket server, says hello on
//! every connect (the `on_connect` hook), prints what it receives, and comes
//! back with jittered backoff whenever the connection ends. One line per
//! connect and per disconnect. Try it against the demo server, then stop
//! and restart the demo:
//!
//! ```text
//! cargo run --example demo -- --no-simulate
//! cargo run --example client
//! cargo run --example client -- --url ws://127.0.0.1:9001/ --backoff-min-ms 200 --backoff-max-ms 5000
//! ```
//!
//! Flags:
//!
//! * `--url URL` — where to connect (default `ws://127.0.0.1:9001/`);
//! * `--ping-interval-ms N` — ping interval (default 1000);
//! * `--pong-timeout-ms N` — pong timeout (default 1000);
//! * `--backoff-min-ms N` — the first retry's delay cap (default 1000);
//! * `--backoff-max-ms N` — the largest delay (default 30000).
//!
//! Output: `connected attempt=N downtime=…s id=… peer=…` on each connect,
//! `disconnected id=… reason=… initiator=…` (the demo's fields) on each
//! end. Ctrl-C closes the connection (1001) and exits 0.

use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use ws_supervisor::{Backoff, CloseEvent, Config, Supervisor};

mod common;

use common::{event_fields, millis};

const USAGE: &str = "usage: client [--url URL] [--ping-interval-ms N] [--pong-timeout-ms N] [--backoff-min-ms N] [--backoff-max-ms N]";

/// The client's command line.
#[derive(Debug)]
struct Args {
    url: String,
    ping_interval: Duration,
    pong_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        url: "ws://127.0.0.1:9001/".into(),
        ping_interval: Duration::from_millis(1000),
        pong_timeout: Duration::from_millis(1000),
        backoff_min: Backoff::default().min(),
        backoff_max: Backoff::default().max(),
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => parsed.url = value()?,
            "--ping-interval-ms" => parsed.ping_interval = millis(&value()?)?,
            "--pong-timeout-ms" => parsed.pong_timeout = millis(&value()?)?,
            "--backoff-min-ms" => parsed.backoff_min = millis(&value()?)?,
            "--backoff-max-ms" => parsed.backoff_max = millis(&value()?)?,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match common::args_or_exit(parse_args) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let config = Config::builder()
        .ping_interval(args.ping_interval)
        .pong_timeout(args.pong_timeout)
        .close_timeout(Duration::from_secs(2))
        .build();
    let backoff = Backoff::builder()
        .min(args.backoff_min)
        .max(args.backoff_max)
        .build();
    let (config, backoff) = match (config, backoff) {
        (Ok(config), Ok(backoff)) => (config, backoff),
        (Err(e), _) => return invalid(e),
        (_, Err(e)) => return invalid(e),
    };
    let supervisor = Supervisor::builder(config)
        .on_close(|e: &CloseEvent| println!("disconnected {}", event_fields(e)))
        .build();
    let mut client = match supervisor
        .reconnecting(args.url.as_str())
        .backoff(backoff)
        .on_connect(|sender| async move { sender.send("hello from examples/client.rs").await })
        .build()
    {
        Ok(client) => client,
        Err(e) => return invalid(e),
    };
    println!("connecting to {} (Ctrl-C to stop)", args.url);

    let run = async {
        while let Some(mut conn) = client.next().await {
            println!(
                "connected attempt={} downtime={:.3}s id={} peer={}",
                client.attempts(),
                client.downtime().as_secs_f64(),
                conn.id().as_u64(),
                conn.peer_addr()
                    .map_or_else(|| "-".to_owned(), |a| a.to_string()),
            );
            // The `disconnected` line comes from the close hook, which has
            // run before the stream makes its next attempt.
            while let Some(message) = conn.recv().await {
                println!("message {message}");
            }
        }
        client.stopped().cloned()
    };
    tokio::select! {
        stop = run => {
            println!("stopped: {stop:?}");
            ExitCode::FAILURE
        }
        signal = tokio::signal::ctrl_c() => {
            if let Err(e) = signal {
                eprintln!("cannot wait for Ctrl-C: {e}");
            }
            let summary = supervisor.shutdown(Duration::from_secs(2)).await;
            println!("shutdown: {summary}");
            ExitCode::SUCCESS
        }
    }
}

/// Prints invalid settings (exit status 2).
fn invalid(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("invalid settings: {e}");
    ExitCode::from(2)
}
