//! The three echo servers the benchmark compares, in one binary, so the load
//! generator can drive each from a separate process (see `benches/run`).
//!
//! ```text
//! cargo run --release --example bench_server -- --kind supervisor --listen 127.0.0.1:0
//! ```
//!
//! * `raw` — baseline (a): tokio-tungstenite, default config, no heartbeat.
//! * `handwritten` — baseline (b): what users write by hand: default config,
//!   one task per connection, a `tokio::time::interval` in a `select!` that
//!   checks the pong deadline at each tick and sends a ping.
//! * `supervisor` — ws-supervisor with its defaults, except the ping
//!   interval and pong timeout given on the command line.
//!
//! Prints `listening ADDR` once it accepts connections. `--threads 1` (the
//! default) runs a current-thread runtime: the whole server on one core.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use ws_supervisor::{Config, Supervisor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Raw,
    Handwritten,
    Supervisor,
}

#[derive(Debug)]
struct Args {
    kind: Kind,
    listen: SocketAddr,
    threads: usize,
    ping_interval: Duration,
    pong_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        kind: Kind::Supervisor,
        listen: "127.0.0.1:0".parse().expect("valid"),
        threads: 1,
        ping_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_secs(1),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let ms = |v: &str| {
            v.parse()
                .map(Duration::from_millis)
                .map_err(|e| format!("{flag}: {e}"))
        };
        match flag.as_str() {
            "--kind" => {
                args.kind = match value.as_str() {
                    "raw" => Kind::Raw,
                    "handwritten" => Kind::Handwritten,
                    "supervisor" => Kind::Supervisor,
                    other => return Err(format!("unknown kind {other}")),
                }
            }
            "--listen" => args.listen = value.parse().map_err(|e| format!("--listen: {e}"))?,
            "--threads" => args.threads = value.parse().map_err(|e| format!("--threads: {e}"))?,
            "--ping-interval-ms" => args.ping_interval = ms(&value)?,
            "--pong-timeout-ms" => args.pong_timeout = ms(&value)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("bench_server: {e}");
            std::process::exit(2);
        }
    };
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("runtime");
    runtime.block_on(serve(args));
}

async fn serve(args: Args) {
    let listener = TcpListener::bind(args.listen).await.expect("bind");
    println!("listening {}", listener.local_addr().expect("bound"));
    let supervisor = (args.kind == Kind::Supervisor).then(|| {
        let config = Config::builder()
            .ping_interval(args.ping_interval)
            .pong_timeout(args.pong_timeout)
            .build()
            .expect("valid config");
        Supervisor::new(config)
    });
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        match args.kind {
            Kind::Raw => {
                tokio::spawn(raw(tcp));
            }
            Kind::Handwritten => {
                tokio::spawn(handwritten(tcp, args.ping_interval, args.pong_timeout));
            }
            Kind::Supervisor => {
                let supervisor = supervisor.clone().expect("built above");
                tokio::spawn(async move {
                    let Ok(mut conn) = supervisor.accept(tcp).await else {
                        return;
                    };
                    while let Some(message) = conn.recv().await {
                        if conn.send(message).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }
}

/// Baseline (a): echo, nothing else.
async fn raw(tcp: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            break;
        }
    }
}

/// Baseline (b): the per-connection interval most people write by hand.
async fn handwritten(tcp: TcpStream, interval: Duration, timeout: Duration) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    let mut awaiting: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(sent) = awaiting {
                    if sent.elapsed() >= timeout {
                        let _ = ws.close(None).await;
                        break;
                    }
                } else {
                    if ws.send(Message::Ping(Vec::from(*b"hb").into())).await.is_err() {
                        break;
                    }
                    awaiting = Some(Instant::now());
                }
            }
            message = ws.next() => match message {
                Some(Ok(Message::Pong(_))) => awaiting = None,
                Some(Ok(m)) if m.is_text() || m.is_binary() => {
                    if ws.send(m).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            },
        }
    }
}
