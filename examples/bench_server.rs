//! The echo servers the benchmark compares, in one binary, so the load
//! generator can drive each from a separate process (see `benches/run`).
//!
//! ```text
//! cargo run --release --example bench_server -- --kind supervisor --listen 127.0.0.1:0
//! cargo run --release --features axum,rustls --example bench_server -- --kind tls
//! ```
//!
//! Baselines and the crate's own handshake:
//!
//! * `raw` — baseline (a): tokio-tungstenite, default config, no heartbeat.
//! * `handwritten` — baseline (b): what users write by hand: default config,
//!   one task per connection, a `tokio::time::interval` in a `select!` that
//!   checks the pong deadline at each tick and sends a ping.
//! * `tuned` — baseline (b′): exactly `handwritten`, but the stream is built
//!   with `accept_async_with_config` and a `WebSocketConfig` whose
//!   `read_buffer_size` is 4 KiB (tungstenite's default allocates 128 KiB
//!   per connection up front): the strongest baseline a careful user writes.
//! * `floor` — the lowest cost a per-connection design reaches: one task per
//!   connection, tungstenite only for the handshake (on `&mut TcpStream`),
//!   then plain tokio: one `sleep_until` per connection (the next ping or
//!   the pong deadline, whichever is first), a pre-encoded server Ping frame
//!   written with one write, and whatever the client sends read into a
//!   small stack buffer and only counted (any bytes count as the pong; EOF
//!   ends the connection). No echo, no parsing, no library beyond tokio: a
//!   yardstick for the heartbeat, not a usable server.
//! * `supervisor` — ws-supervisor with its defaults, except the ping
//!   interval and pong timeout given on the command line: `accept`.
//! * `inline` — `supervisor`, with the echo given to
//!   `Connection::on_message` (run on the connection's own task) instead of
//!   a task that loops on `recv` and `send`.
//!
//! The other ways in, each the same supervisor and the same echo task
//! (docs/benchmarks.md, "Ways in"):
//!
//! * `axum` — an axum `Router` (`/` and `/ws`) with the
//!   `ws_supervisor::axum::WebSocketUpgrade` extractor, served by
//!   `axum::serve` with `ConnectInfo` (feature `axum`);
//! * `hyper` — a hand-rolled hyper 1 HTTP/1 server calling
//!   `Supervisor::upgrade` (feature `hyper`);
//! * `tls` — tokio-rustls (ring provider, a self-signed certificate made at
//!   start), then `accept` on the TLS stream (feature `rustls`, for its
//!   optional tokio-rustls dependency; the crate's own TLS code is not used);
//! * `supervise-default` — `tokio_tungstenite::accept_async` with
//!   tungstenite's default config, then `Supervisor::supervise`: what the
//!   `supervise` path costs when the stream is not built with the
//!   supervisor's `websocket_config` and `ReadLayer`.
//!
//! Every kind gets the peer address (the supervised ones record it), and
//! every kind runs with the same metrics setup: none by default (the metric
//! handles are no-ops), or with `--recorder` the demo's, the Prometheus
//! recorder and its HTTP listener (`ws_supervisor::prometheus::install`, on
//! 127.0.0.1:0), installed before the supervisor is built. So the kinds
//! differ only in the way in.
//!
//! Prints `listening ADDR` once it accepts connections. `--threads 1` (the
//! default) runs a current-thread runtime: the whole server on one core.
//!
//! TLS flags (kind `tls`; the defaults are rustls's):
//!
//! * `--cert-out PATH` — writes the self-signed certificate (DER) there
//!   before printing `listening`, for the load generator to trust;
//! * `--tls-tickets N` — TLS 1.3 tickets sent after each handshake
//!   (`ServerConfig::send_tls13_tickets`, rustls default 2);
//! * `--tls-session-cache N` — server session cache entries (default 256;
//!   0 = no session storage);
//! * `--tls-suite aes256|aes128|chacha20` — offer only this TLS 1.3 suite
//!   (default: all of ring's, and the client's first choice, AES-256-GCM,
//!   wins);
//! * `--tls-inline-handshake 1` — await the TLS handshake future inline
//!   instead of boxed (the default, see `ways::tls`): shows what that
//!   costs each connection.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use ws_supervisor::{Config, Connection, Supervisor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Raw,
    Handwritten,
    Tuned,
    Floor,
    Supervisor,
    Inline,
    Axum,
    Hyper,
    Tls,
    SuperviseDefault,
}

#[derive(Debug)]
struct Args {
    kind: Kind,
    listen: SocketAddr,
    threads: usize,
    ping_interval: Duration,
    pong_timeout: Duration,
    recorder: bool,
    tls: TlsArgs,
}

/// The `tls` kind's knobs (see the module doc).
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "rustls"), allow(dead_code))]
struct TlsArgs {
    cert_out: Option<std::path::PathBuf>,
    tickets: Option<usize>,
    session_cache: Option<usize>,
    suite: Option<String>,
    inline_handshake: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        kind: Kind::Supervisor,
        listen: "127.0.0.1:0".parse().expect("valid"),
        threads: 1,
        ping_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_secs(1),
        recorder: false,
        tls: TlsArgs::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--recorder" {
            args.recorder = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let ms = |v: &str| {
            v.parse()
                .map(Duration::from_millis)
                .map_err(|e| format!("{flag}: {e}"))
        };
        let count = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--kind" => {
                args.kind = match value.as_str() {
                    "raw" => Kind::Raw,
                    "handwritten" => Kind::Handwritten,
                    "tuned" => Kind::Tuned,
                    "floor" => Kind::Floor,
                    "supervisor" => Kind::Supervisor,
                    "inline" => Kind::Inline,
                    "axum" => Kind::Axum,
                    "hyper" => Kind::Hyper,
                    "tls" => Kind::Tls,
                    "supervise-default" => Kind::SuperviseDefault,
                    other => return Err(format!("unknown kind {other}")),
                }
            }
            "--listen" => args.listen = value.parse().map_err(|e| format!("--listen: {e}"))?,
            "--threads" => args.threads = count(&value)?,
            "--ping-interval-ms" => args.ping_interval = ms(&value)?,
            "--pong-timeout-ms" => args.pong_timeout = ms(&value)?,
            "--cert-out" => args.tls.cert_out = Some(value.into()),
            "--tls-tickets" => args.tls.tickets = Some(count(&value)?),
            "--tls-session-cache" => args.tls.session_cache = Some(count(&value)?),
            "--tls-suite" => args.tls.suite = Some(value),
            "--tls-inline-handshake" => args.tls.inline_handshake = value == "1",
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let missing = match args.kind {
        Kind::Axum if cfg!(not(feature = "axum")) => Some("axum"),
        Kind::Hyper if cfg!(not(feature = "hyper")) => Some("hyper"),
        Kind::Tls if cfg!(not(feature = "rustls")) => Some("rustls"),
        _ => None,
    };
    if let Some(feature) = missing {
        return Err(format!(
            "kind {:?} needs the `{feature}` feature (build with --features axum,rustls)",
            args.kind
        ));
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
    if args.recorder {
        install_recorder();
    }
    let config = Config::builder()
        .ping_interval(args.ping_interval)
        .pong_timeout(args.pong_timeout)
        .build()
        .expect("valid config");
    let supervisor = Supervisor::new(config);
    match args.kind {
        #[cfg(feature = "axum")]
        Kind::Axum => return ways::axum(listener, supervisor).await,
        #[cfg(feature = "hyper")]
        Kind::Hyper => return ways::hyper(listener, supervisor).await,
        #[cfg(feature = "rustls")]
        Kind::Tls => return ways::tls(listener, supervisor, &args.tls).await,
        _ => {}
    }
    println!("listening {}", listener.local_addr().expect("bound"));
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        match args.kind {
            Kind::Raw => {
                tokio::spawn(raw(tcp));
            }
            Kind::Handwritten => {
                let (interval, timeout) = (args.ping_interval, args.pong_timeout);
                tokio::spawn(handwritten(tcp, None, interval, timeout));
            }
            Kind::Tuned => {
                let (interval, timeout) = (args.ping_interval, args.pong_timeout);
                tokio::spawn(handwritten(tcp, Some(tuned_config()), interval, timeout));
            }
            Kind::Floor => {
                tokio::spawn(floor(tcp, args.ping_interval, args.pong_timeout));
            }
            Kind::Supervisor => {
                let supervisor = supervisor.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = supervisor.accept(tcp).peer_addr(peer).await {
                        echo(conn).await;
                    }
                });
            }
            Kind::Inline => {
                let supervisor = supervisor.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = supervisor.accept(tcp).peer_addr(peer).await {
                        echo_inline(conn).await;
                    }
                });
            }
            Kind::SuperviseDefault => {
                let supervisor = supervisor.clone();
                tokio::spawn(async move {
                    // tungstenite's defaults: no ReadLayer, no websocket_config.
                    let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    if let Ok(conn) = supervisor.supervise(ws, Some(peer)).await {
                        echo(conn).await;
                    }
                });
            }
            Kind::Axum | Kind::Hyper | Kind::Tls => unreachable!("served above"),
        }
    }
}

/// As the demo: the recorder goes in before the supervisor registers its
/// metrics. Port 0: nothing scrapes it here, the recorder's cost is the point.
#[cfg(feature = "prometheus")]
fn install_recorder() {
    let listen = "127.0.0.1:0".parse().expect("valid");
    ws_supervisor::prometheus::install(listen).expect("install the Prometheus recorder");
}

#[cfg(not(feature = "prometheus"))]
fn install_recorder() {
    panic!("--recorder needs the `prometheus` feature (a default feature)");
}

/// The application of every supervised kind: echo text and binary messages.
async fn echo(mut conn: Connection) {
    while let Some(message) = conn.recv().await {
        if conn.send(message).await.is_err() {
            break;
        }
    }
}

/// The echo of kind `inline`: on the connection's own task; the
/// application's task only holds the connection until it ends.
async fn echo_inline(mut conn: Connection) {
    let echo = conn.on_message(|message, reply| {
        let _ = reply.send(message);
    });
    if echo.is_ok() {
        conn.closed().await;
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

/// Baseline (b′)'s only change to (b): a 4 KiB read buffer.
fn tuned_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4 * 1024)
}

/// Baseline (b): the per-connection interval most people write by hand;
/// with `Some(config)`, baseline (b′).
async fn handwritten(
    tcp: TcpStream,
    config: Option<WebSocketConfig>,
    interval: Duration,
    timeout: Duration,
) {
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, config).await else {
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

/// A server Ping frame with the payload `hb`: FIN + opcode 0x9, unmasked,
/// length 2.
const PING_FRAME: [u8; 4] = [0x89, 0x02, b'h', b'b'];

/// A server Close frame, code 1011 (a pong did not come in time).
const CLOSE_FRAME: [u8; 4] = [0x88, 0x02, 0x03, 0xF3];

/// The floor: the heartbeat with nothing but tokio after the handshake.
async fn floor(mut tcp: TcpStream, interval: Duration, timeout: Duration) {
    // The handshake by tungstenite on a borrowed stream; the small read
    // buffer keeps it from allocating 128 KiB for a few hundred bytes. The
    // client sends nothing before the 101 arrives, so nothing is left in
    // tungstenite's buffer when it is dropped. Boxed: a task is allocated
    // at the size of its largest state, and the handshake's would otherwise
    // stay in the task for the connection's whole life.
    let config = WebSocketConfig::default().read_buffer_size(1024);
    let handshake = tokio_tungstenite::accept_async_with_config(&mut tcp, Some(config));
    if Box::pin(handshake).await.is_err() {
        return;
    }
    let mut next_ping = Instant::now() + interval;
    let mut deadline: Option<Instant> = None;
    let mut buf = [0u8; 64];
    loop {
        let wake = match deadline {
            Some(d) if d < next_ping => d,
            _ => next_ping,
        };
        tokio::select! {
            biased;
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                // Whatever the client sends counts as its pong.
                Ok(_) => deadline = None,
            },
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    let _ = tcp.write_all(&CLOSE_FRAME).await;
                    return;
                }
                if now >= next_ping {
                    if tcp.write_all(&PING_FRAME).await.is_err() {
                        return;
                    }
                    // A later ping does not move an earlier deadline.
                    deadline.get_or_insert(now + timeout);
                    next_ping = now + interval;
                }
            }
        }
    }
}

/// The ways in that need an optional feature.
#[cfg(any(feature = "hyper", feature = "rustls"))]
mod ways {
    use super::*;

    /// `axum::serve` with the crate's extractor on `/` and `/ws` (the load
    /// generator asks for `/`; `--path /ws` takes the other route).
    #[cfg(feature = "axum")]
    pub(super) async fn axum(listener: TcpListener, supervisor: Supervisor) {
        use axum::serve::ListenerExt;
        use ws_supervisor::axum::WebSocketUpgrade;

        async fn ws(upgrade: WebSocketUpgrade) -> axum::response::Response {
            upgrade.on_upgrade(echo)
        }
        let app = axum::Router::new()
            .route("/", axum::routing::get(ws))
            .route("/ws", axum::routing::get(ws))
            .with_state(supervisor);
        println!("listening {}", listener.local_addr().expect("bound"));
        // TCP_NODELAY as every other kind sets it.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("serve");
    }

    /// hyper 1, HTTP/1 only, one `serve_connection(..).with_upgrades()` task
    /// per TCP connection.
    #[cfg(feature = "hyper")]
    pub(super) async fn hyper(listener: TcpListener, supervisor: Supervisor) {
        use hyper::server::conn::http1;
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        println!("listening {}", listener.local_addr().expect("bound"));
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let supervisor = supervisor.clone();
            let service = service_fn(move |mut request| {
                let response: hyper::Response<String> = supervisor
                    .upgrade(&mut request)
                    .peer_addr(peer)
                    .on_upgrade(echo);
                std::future::ready(Ok::<_, std::convert::Infallible>(response))
            });
            tokio::spawn(
                http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades(),
            );
        }
    }

    /// tokio-rustls in front of `accept`.
    #[cfg(feature = "rustls")]
    pub(super) async fn tls(listener: TcpListener, supervisor: Supervisor, args: &TlsArgs) {
        let acceptor = tls_acceptor(args);
        println!("listening {}", listener.local_addr().expect("bound"));
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (supervisor, acceptor) = (supervisor.clone(), acceptor.clone());
            if args.inline_handshake {
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Ok(conn) = supervisor.accept(tls).peer_addr(peer).await {
                        echo(conn).await;
                    }
                });
                continue;
            }
            tokio::spawn(async move {
                // Boxed: the handshake future holds a whole `TlsStream`
                // (1.2 KiB), and a task is allocated once, at the size of
                // its largest state: awaited inline, it would keep that
                // size for the connection's whole life.
                let Ok(tls) = Box::pin(acceptor.accept(tcp)).await else {
                    return;
                };
                if let Ok(conn) = supervisor.accept(tls).peer_addr(peer).await {
                    echo(conn).await;
                }
            });
        }
    }

    /// The rustls server configuration: ring provider, a certificate made
    /// now (rcgen), and the `--tls-*` settings.
    #[cfg(feature = "rustls")]
    fn tls_acceptor(args: &TlsArgs) -> tokio_rustls::TlsAcceptor {
        use std::sync::Arc;
        use tokio_rustls::rustls::crypto::ring;
        use tokio_rustls::rustls::pki_types::PrivatePkcs8KeyDer;
        use tokio_rustls::rustls::server::{NoServerSessionStorage, ServerSessionMemoryCache};
        use tokio_rustls::rustls::{ServerConfig, SupportedCipherSuite};

        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let made = rcgen::generate_simple_self_signed(names).expect("self-signed certificate");
        let cert = made.cert.der().clone();
        if let Some(path) = &args.cert_out {
            std::fs::write(path, &cert).expect("write --cert-out");
        }
        let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
        let mut provider = ring::default_provider();
        if let Some(suite) = &args.suite {
            let only: SupportedCipherSuite = match suite.as_str() {
                "aes256" => ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                "aes128" => ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                "chacha20" => ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                other => panic!("--tls-suite {other}: aes256, aes128 or chacha20"),
            };
            provider.cipher_suites = vec![only];
        }
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key.into())
            .expect("certificate and key");
        if let Some(n) = args.tickets {
            config.send_tls13_tickets = n;
        }
        match args.session_cache {
            Some(0) => config.session_storage = Arc::new(NoServerSessionStorage {}),
            Some(n) => config.session_storage = ServerSessionMemoryCache::new(n),
            None => {}
        }
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}
