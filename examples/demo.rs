//! A supervised echo server with a built-in fleet of clients that end in
//! every close reason. One line is printed per closed connection.
//!
//! ```text
//! cargo run --example demo
//! cargo run --example demo -- --no-simulate --listen 127.0.0.1:9001
//! ```
//!
//! Flags (outside tools drive the demo by these, so they are stable):
//!
//! * `--listen ADDR` — where to serve WebSocket (default `127.0.0.1:9001`);
//! * `--ping-interval-ms N` — ping interval (default 1000);
//! * `--pong-timeout-ms N` — pong timeout (default 1000);
//! * `--no-simulate` — serve only: echo every text and binary message;
//! * `--drain-window-ms N` — on Ctrl-C, spread the closes over N ms with
//!   code 1012 "service restart" (default 0: 1001 to everyone at once);
//! * `--metrics-listen ADDR` — where to serve Prometheus metrics, on every
//!   path including `/metrics` (default `127.0.0.1:9000`);
//! * `--app-heartbeat` — heartbeat with JSON messages instead of ping
//!   frames: the server sends `{"op":"ping","t":N}` and expects
//!   `{"op":"pong","t":N}`, and answers a client's (a browser's)
//!   `{"op":"ping","t":N}` the same way (`docs/keepalive.md`). The fleet's
//!   clients answer; a plain WebSocket client that does not ends as
//!   `timeout`.
//!
//! The fleet, one round every few seconds: a client that closes normally
//! (`normal`), one that says 1001 (`going_away`), one that falls silent
//! (`timeout`), one that sends invalid UTF-8 (`protocol_error`), one that
//! drops its socket (`abnormal`), and one whose server-side handler panics
//! (`internal`, on the path `/demo/panic`). Beside them runs a reconnecting
//! client (`Supervisor::reconnecting`, see `examples/client.rs`) on the path
//! `/demo/restart`, whose server side closes with 1012 (service restart)
//! every few seconds, so the dashboard's Clients row has data. Ctrl-C shuts
//! down gracefully.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use ws_supervisor::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use ws_supervisor::{AppPong, CloseCode, Config, Supervisor};

mod common;

use common::{ServeFlags, print_event};

/// The demo's command line.
#[derive(Debug)]
struct Args {
    serve: ServeFlags,
    simulate: bool,
    metrics_listen: SocketAddr,
    app_heartbeat: bool,
    drain_window: Duration,
}

const USAGE: &str = "usage: demo [--listen ADDR] [--ping-interval-ms N] [--pong-timeout-ms N] [--no-simulate] [--metrics-listen ADDR] [--app-heartbeat] [--drain-window-ms N]";

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut simulate = true;
    let mut app_heartbeat = false;
    let mut drain_window = Duration::ZERO;
    let mut metrics_listen: SocketAddr = "127.0.0.1:9000".parse().expect("valid default");
    let serve = ServeFlags::new("127.0.0.1:9001").parse(args, USAGE, |flag, value| {
        match flag {
            "--no-simulate" => simulate = false,
            "--app-heartbeat" => app_heartbeat = true,
            "--drain-window-ms" => drain_window = common::millis(&value()?)?,
            "--metrics-listen" => {
                let v = value()?;
                metrics_listen = v
                    .parse()
                    .map_err(|e| format!("--metrics-listen {v}: {e}"))?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(Args {
        serve,
        simulate,
        metrics_listen,
        app_heartbeat,
        drain_window,
    })
}

// ===== the JSON heartbeat of `--app-heartbeat` =====

/// `{"op":"<op>","t":N}` → N.
fn json_nonce(message: &Message, op: &str) -> Option<u64> {
    let text = message.to_text().ok()?;
    let rest = text.strip_prefix(r#"{"op":""#)?.strip_prefix(op)?;
    rest.strip_prefix(r#"","t":"#)?
        .strip_suffix('}')?
        .parse()
        .ok()
}

/// `{"op":"<op>","t":N}`.
fn json_message(op: &str, nonce: u64) -> Message {
    Message::text(format!(r#"{{"op":"{op}","t":{nonce}}}"#))
}

/// The supervisor's config: the common flags, and the JSON heartbeat if asked.
fn config(args: &Args) -> Result<Config, ExitCode> {
    args.serve.config_with(|mut builder| {
        if args.app_heartbeat {
            builder = builder
                .app_heartbeat(
                    |nonce| json_message("ping", nonce),
                    |message| json_nonce(message, "pong").map(AppPong::Nonce),
                )
                .answer_app_pings(|message| {
                    json_nonce(message, "ping").map(|t| json_message("pong", t))
                });
        }
        if !args.drain_window.is_zero() {
            builder = builder
                .drain_window(args.drain_window)
                .drain_close_code(1012);
        }
        builder
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match common::args_or_exit(parse_args) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let config = match config(&args) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // The recorder goes in before the supervisor registers its metrics.
    if let Err(e) = ws_supervisor::prometheus::install(args.metrics_listen) {
        eprintln!("cannot serve metrics on {}: {e}", args.metrics_listen);
        return ExitCode::FAILURE;
    }
    println!("metrics on http://{}/metrics", args.metrics_listen);
    // The `internal` client makes a handler panic on purpose: one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    let supervisor = Supervisor::builder(config)
        .on_close(print_event)
        .metric_label("supervisor", "demo")
        .build();
    let listener = match args.serve.bind().await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let addr = listener.local_addr().expect("bound");
    println!(
        "listening on ws://{addr}/ ({} every {:?}, pong timeout {:?}); Ctrl-C to stop",
        if args.app_heartbeat {
            "JSON ping"
        } else {
            "ping"
        },
        args.serve.ping_interval,
        args.serve.pong_timeout
    );

    let hold = args.serve.ping_interval * 5 / 2;
    tokio::spawn(serve(listener, supervisor.clone(), hold));
    if args.simulate {
        tokio::spawn(reconnecting(
            supervisor.clone(),
            format!("ws://{addr}/demo/restart"),
            args.serve.ping_interval,
        ));
        tokio::spawn(fleet(
            addr,
            args.serve.ping_interval,
            args.serve.ping_interval + args.serve.pong_timeout,
        ));
    }

    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("cannot wait for Ctrl-C: {e}");
    }
    println!(
        "shutting down ({} live connections, drain window {:?})",
        supervisor.len(),
        args.drain_window
    );
    let summary = supervisor.shutdown(Duration::from_secs(5)).await;
    println!("shutdown: {summary}");
    ExitCode::SUCCESS
}

/// Accepts connections and echoes; `/demo/panic` makes the handler panic,
/// and `/demo/restart` closes with 1012 after `hold`.
async fn serve(listener: TcpListener, supervisor: Supervisor, hold: Duration) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            let path = Arc::new(Mutex::new(String::new()));
            let seen = path.clone();
            // The signature is tungstenite's `Callback`.
            #[allow(clippy::result_large_err)]
            let remember_path =
                move |req: &Request, res: Response| -> Result<Response, ErrorResponse> {
                    *seen.lock().unwrap() = req.uri().path().to_owned();
                    Ok(res)
                };
            let mut conn = match supervisor
                .accept(tcp)
                .peer_addr(peer)
                .on_request(remember_path)
                .await
            {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("handshake from {peer} failed: {e}");
                    return;
                }
            };
            let crash = *path.lock().unwrap() == "/demo/panic";
            if *path.lock().unwrap() == "/demo/restart" {
                let echo = async { while conn.recv().await.is_some() {} };
                let _ = tokio::time::timeout(hold, echo).await;
                let _ = conn.close(CloseCode::Restart, "demo restart").await;
                conn.closed().await;
                return;
            }
            while let Some(message) = conn.recv().await {
                if crash {
                    panic!("demo: the handler of {} panics on purpose", conn.id());
                }
                if conn.send(message).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// A reconnecting client of `/demo/restart`: connects, is told 1012, comes
/// back after a backoff from `min` to 10 × `min`.
async fn reconnecting(supervisor: Supervisor, url: String, min: Duration) {
    let backoff = ws_supervisor::Backoff::builder()
        .min(min)
        .max(min * 10)
        .build()
        .expect("valid backoff");
    let mut client = supervisor
        .reconnecting(url)
        .backoff(backoff)
        .on_connect(|sender| async move { sender.send("subscribe").await })
        .build()
        .expect("a ws:// URL");
    while let Some(mut conn) = client.next().await {
        while conn.recv().await.is_some() {}
    }
}

/// Runs one client of each ending, round after round.
async fn fleet(addr: SocketAddr, ping_interval: Duration, timeout_bound: Duration) {
    let url = format!("ws://{addr}/");
    // Long enough for the well-behaved clients to answer a couple of pings.
    let hold = ping_interval * 5 / 2;
    for round in 1u64.. {
        let clients = [
            tokio::spawn(normal(url.clone(), hold)),
            tokio::spawn(going_away(url.clone(), hold)),
            tokio::spawn(silent(addr, timeout_bound)),
            tokio::spawn(invalid_utf8(addr)),
            tokio::spawn(dropped(url.clone())),
            tokio::spawn(panics(format!("ws://{addr}/demo/panic"))),
        ];
        for client in clients {
            if let Ok(Err(e)) = client.await {
                eprintln!("fleet round {round}: a client failed: {e}");
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

type ClientResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Reads (so tungstenite answers pings) for `hold`, and answers the
/// server's JSON pings (`--app-heartbeat`).
async fn linger<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, hold: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(hold, async {
        while let Some(Ok(message)) = ws.next().await {
            if let Some(t) = json_nonce(&message, "ping") {
                if ws.send(json_message("pong", t)).await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
}

async fn normal(url: String, hold: Duration) -> ClientResult {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::text("hello")).await?;
    ws.next().await.ok_or("no echo")??;
    linger(&mut ws, hold).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}

async fn going_away(url: String, hold: Duration) -> ClientResult {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    linger(&mut ws, hold).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "page closed".into(),
    }))
    .await?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}

/// Upgrades, then reads but never answers a ping.
async fn silent(addr: SocketAddr, bound: Duration) -> ClientResult {
    let tcp = TcpStream::connect(addr).await?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp).await?;
    let mut tcp = ws.into_inner();
    let mut sink = tokio::io::sink();
    let drain = tokio::io::copy(&mut tcp, &mut sink);
    // The server hangs up within the bound; the extra is a safety margin.
    let _ = tokio::time::timeout(bound * 2 + Duration::from_secs(5), drain).await;
    Ok(())
}

/// Sends a text frame that is not UTF-8.
async fn invalid_utf8(addr: SocketAddr) -> ClientResult {
    let tcp = TcpStream::connect(addr).await?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp).await?;
    let mut tcp = ws.into_inner();
    // FIN + text, masked, 2 bytes: 0xC3 0x28 is an invalid UTF-8 sequence.
    let mask = [1u8, 2, 3, 4];
    let frame = [
        0x81,
        0x82,
        mask[0],
        mask[1],
        mask[2],
        mask[3],
        0xC3 ^ mask[0],
        0x28 ^ mask[1],
    ];
    tcp.write_all(&frame).await?;
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::copy(&mut tcp, &mut tokio::io::sink()),
    )
    .await;
    Ok(())
}

/// Upgrades, then drops the socket without a Close frame.
async fn dropped(url: String) -> ClientResult {
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    drop(ws);
    Ok(())
}

/// Talks to the handler that panics.
async fn panics(url: String) -> ClientResult {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::text("boom")).await?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}
