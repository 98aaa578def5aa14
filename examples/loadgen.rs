//! Load generator for the benchmarks: starts one `bench_server` process,
//! drives it over loopback from this process (sockets spread over several
//! 127.0.0.x source addresses), reads the server's RSS and CPU time from
//! /proc, and prints one JSON line. `benches/run` runs the whole matrix.
//!
//! ```text
//! cargo build --release --examples
//! target/release/examples/loadgen --server target/release/examples/bench_server \
//!     --kind supervisor --scenario idle --conns 10000
//! ```
//!
//! Scenarios:
//!
//! * `idle` — N connections that only answer pings; over a fixed window:
//!   server RSS per connection (RSS with N minus RSS with 0), server CPU per
//!   heartbeat (pings the clients actually answered), connections wrongly
//!   closed.
//! * `detection` — N connections, M of them go silent (TCP open, reading,
//!   never answering); for each silent one, the time from its first
//!   unanswered ping to the server's close; false kills among the rest.
//! * `echo` — 64 connections in a closed loop of text messages of
//!   `--message-bytes N` bytes (default 128): round trips per second and
//!   server CPU per round trip.
//! * `pingfloor` — the reverse heartbeat: N clients each send a ping every
//!   interval and the server only answers (tungstenite's automatic pong):
//!   server CPU per ping/pong exchange with no timer on the server side.
//!   Against `raw`, the floor that any heartbeat over tokio-tungstenite and
//!   loopback TCP pays.
//!
//! The clients are minimal hand-written WebSocket clients (this file), so
//! the generator costs little and measures only the server. Against the
//! `tls` kind they speak TLS (tokio-rustls, ring; built with the `rustls`
//! feature): the server writes its self-signed certificate to a temporary
//! file (`--cert-out`) and the clients trust exactly that certificate.
//!
//! Other flags: `--path /ws` (the request path, default `/`),
//! `--server-args "ARGS"` (extra flags for `bench_server`, e.g.
//! `--tls-tickets 0`; echoed in the JSON), `--tag T` (echoed in the JSON,
//! so a script can tell its runs apart), `--at-window "CMD"` (idle and
//! echo: runs `sh -c CMD` with `SERVER_PID` and `WINDOW_S` in its
//! environment when the measuring window starts, e.g. a profiler attached
//! to the server for the window; waited for after the window).
//!
//! Every result also gives the generator's own CPU time over the window
//! (`gen_cpu_ms`, all its threads), so a table can say how much of the
//! machine the generator took when it is not pinned.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::sync::Mutex;
use tokio::time::{Instant, sleep, timeout};

#[derive(Debug, Clone)]
struct Args {
    server: String,
    kind: String,
    scenario: String,
    conns: usize,
    silent: usize,
    window: Duration,
    interval_ms: u64,
    timeout_ms: u64,
    server_cpu: Option<String>,
    sources: u8,
    path: String,
    server_args: String,
    tag: String,
    message_bytes: usize,
    at_window: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        server: String::new(),
        kind: "supervisor".into(),
        scenario: "idle".into(),
        conns: 1000,
        silent: 100,
        window: Duration::from_secs(10),
        interval_ms: 1000,
        timeout_ms: 1000,
        server_cpu: None,
        sources: 4,
        path: "/".into(),
        server_args: String::new(),
        tag: String::new(),
        message_bytes: 128,
        at_window: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--server" => a.server = v,
            "--kind" => a.kind = v,
            "--scenario" => a.scenario = v,
            "--conns" => a.conns = num(&v)? as usize,
            "--silent" => a.silent = num(&v)? as usize,
            "--window-s" => a.window = Duration::from_secs(num(&v)?),
            "--interval-ms" => a.interval_ms = num(&v)?,
            "--timeout-ms" => a.timeout_ms = num(&v)?,
            "--server-cpu" => a.server_cpu = Some(v),
            "--sources" => a.sources = num(&v)?.clamp(1, 200) as u8,
            "--path" => a.path = v,
            "--server-args" => a.server_args = v,
            "--tag" => a.tag = v,
            "--message-bytes" => a.message_bytes = num(&v)? as usize,
            "--at-window" => a.at_window = Some(v),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.message_bytes == 0 {
        return Err("--message-bytes must be at least 1".into());
    }
    if a.server.is_empty() {
        return Err("--server PATH is required".into());
    }
    if a.kind == "tls" && cfg!(not(feature = "rustls")) {
        return Err(
            "kind tls needs the `rustls` feature (build with --features axum,rustls)".into(),
        );
    }
    Ok(a)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let mut server = Server::start(&args).await;
    let result = match args.scenario.as_str() {
        "idle" => idle(&args, &server).await,
        "detection" => detection(&args, &server).await,
        "echo" => echo(&args, &server).await,
        "pingfloor" => ping_floor(&args, &server).await,
        other => {
            eprintln!("loadgen: unknown scenario {other}");
            std::process::exit(2);
        }
    };
    server.stop();
    // The common fields, first: which server, with what, under which tag.
    let result = result.strip_prefix('{').expect("a JSON object");
    println!(
        r#"{{"tag":{},"server_args":{},"path":{},{result}"#,
        json_str(&args.tag),
        json_str(&args.server_args),
        json_str(&args.path),
    );
}

/// `s` as a JSON string (the values here are plain ASCII flags).
fn json_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

// ===== the server process =====

struct Server {
    child: Child,
    addr: SocketAddr,
    /// The TLS client side, for the `tls` kind.
    tls: Option<tls::Client>,
}

impl Server {
    async fn start(args: &Args) -> Self {
        let mut command = match &args.server_cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpu, &args.server]);
                c
            }
            None => Command::new(&args.server),
        };
        command
            .args(["--kind", &args.kind])
            .args(["--ping-interval-ms", &args.interval_ms.to_string()])
            .args(["--pong-timeout-ms", &args.timeout_ms.to_string()])
            .args(args.server_args.split_whitespace())
            .stdout(Stdio::piped());
        let cert = std::env::temp_dir().join(format!("bench-cert-{}.der", std::process::id()));
        if args.kind == "tls" {
            command.arg("--cert-out").arg(&cert);
        }
        let mut child = command.spawn().expect("start bench_server");
        let stdout = child.stdout.take().expect("piped");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line).map(|_| line)
        })
        .await
        .expect("join")
        .expect("server output");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected server output: {line:?}"));
        let tls = (args.kind == "tls").then(|| {
            let der = std::fs::read(&cert).expect("the server's certificate");
            let _ = std::fs::remove_file(&cert);
            tls::Client::trusting(der)
        });
        // Let the runtime settle before the zero-connection reading.
        sleep(Duration::from_millis(500)).await;
        Server { child, addr, tls }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size, KiB.
    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU time of every thread, nanoseconds (schedstat is exact, unlike ticks).
    fn cpu_ns(&self) -> u64 {
        cpu_ns_of(&self.pid().to_string())
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time of every thread of this process (the generator), nanoseconds.
fn own_cpu_ns() -> u64 {
    cpu_ns_of("self")
}

/// CPU time of every thread of process `pid` ("self" for this one), from
/// schedstat (exact, unlike ticks), nanoseconds.
fn cpu_ns_of(pid: &str) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Starts `--at-window`'s command, if any, as the measuring window starts.
fn at_window(args: &Args, server: &Server) -> Option<Child> {
    let cmd = args.at_window.as_ref()?;
    let child = Command::new("sh")
        .args(["-c", cmd])
        .env("SERVER_PID", server.pid().to_string())
        .env("WINDOW_S", args.window.as_secs().to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the --at-window command");
    Some(child)
}

/// Waits for `--at-window`'s command (bounded: it gets the window plus 60 s,
/// then it is killed).
async fn wait_at_window(child: Option<Child>, window: Duration) {
    let Some(mut child) = child else { return };
    let bound = Instant::now() + window + Duration::from_secs(60);
    while Instant::now() < bound {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        sleep(Duration::from_millis(100)).await;
    }
    eprintln!("loadgen: the --at-window command did not end in time; killed");
    let _ = child.kill();
    let _ = child.wait();
}

/// The server goes with the generator, also when a scenario panics (a
/// refused upgrade, a failed connect): no server is left running.
impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

// ===== a minimal WebSocket client =====

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

struct Client {
    reader: BufReader<Reader>,
    writer: Writer,
}

impl Client {
    async fn connect(server: &Server, source: IpAddr, path: &str) -> io::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = socket.connect(server.addr).await?;
        tcp.set_nodelay(true)?;
        let (reader, mut writer): (Reader, Writer) = match &server.tls {
            Some(tls) => tls.connect(tcp).await?,
            None => {
                let (reader, writer) = tcp.into_split();
                (Box::new(reader), Box::new(writer))
            }
        };
        let mut reader = BufReader::with_capacity(1024, reader);
        let host = server.addr;
        writer
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
        writer.flush().await?;
        let mut status = String::new();
        reader.read_line(&mut status).await?;
        if !status.starts_with("HTTP/1.1 101") {
            return Err(io::Error::other(format!("not upgraded: {status}")));
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await? == 0 || line == "\r\n" {
                break;
            }
        }
        Ok(Client { reader, writer })
    }

    /// The next frame: (opcode, payload); `None` at EOF.
    async fn read(&mut self) -> io::Result<Option<(u8, Vec<u8>)>> {
        let mut head = [0u8; 2];
        match self.reader.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = match head[1] & 0x7f {
            126 => self.reader.read_u16().await? as usize,
            127 => self.reader.read_u64().await? as usize,
            n => n as usize,
        };
        let mut payload = vec![0; len];
        self.reader.read_exact(&mut payload).await?;
        Ok(Some((head[0] & 0x0f, payload)))
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        // A zero mask: valid, and the payload goes out as is.
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        self.writer.write_all(&frame).await?;
        // A no-op on TCP; over TLS, sends the records out.
        self.writer.flush().await
    }
}

/// The clients' TLS side (kind `tls`).
#[cfg(feature = "rustls")]
mod tls {
    use super::{Reader, Writer};
    use std::io;
    use std::sync::Arc;
    use tokio::net::TcpStream;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};

    /// A TLS client that trusts exactly the server's self-signed certificate.
    pub(super) struct Client {
        connector: tokio_rustls::TlsConnector,
    }

    impl Client {
        pub(super) fn trusting(der: Vec<u8>) -> Self {
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from(der)).expect("a certificate");
            let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Self {
                connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            }
        }

        pub(super) async fn connect(&self, tcp: TcpStream) -> io::Result<(Reader, Writer)> {
            let name = ServerName::try_from("localhost").expect("a DNS name");
            let stream = self.connector.connect(name, tcp).await?;
            let (reader, writer) = tokio::io::split(stream);
            Ok((Box::new(reader), Box::new(writer)))
        }
    }
}

/// Without the `rustls` feature there is no TLS client (`parse_args`
/// refuses the `tls` kind).
#[cfg(not(feature = "rustls"))]
mod tls {
    use super::{Reader, Writer};
    use std::io;
    use tokio::net::TcpStream;

    pub(super) enum Client {}

    impl Client {
        pub(super) fn trusting(_der: Vec<u8>) -> Self {
            unreachable!("parse_args refuses the tls kind without the rustls feature")
        }

        pub(super) async fn connect(&self, _tcp: TcpStream) -> io::Result<(Reader, Writer)> {
            match *self {}
        }
    }
}

/// Source address `i` of the `k` used: 127.0.0.2, 127.0.0.3, …
fn source(i: usize, k: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % k as usize) as u8))
}

/// Opens `n` connections, `parallel` handshakes at a time.
async fn open(args: &Args, server: &Server, n: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(n);
    open_each(args, server, n, |_, client| clients.push(client)).await;
    clients
}

/// Opens `n` connections, `parallel` handshakes at a time, handing each to
/// `each` as soon as it is open (so it can start answering pings at once:
/// a ramp of 15k connections takes longer than a pong timeout).
async fn open_each(args: &Args, server: &Server, n: usize, mut each: impl FnMut(usize, Client)) {
    let parallel = 200;
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + parallel).min(n))
            .map(|j| Client::connect(server, source(j, args.sources), &args.path))
            .collect();
        for (j, result) in futures::future::join_all(batch)
            .await
            .into_iter()
            .enumerate()
        {
            each(i + j, result.expect("connect"));
        }
        i += parallel;
    }
}

/// Counters the client tasks share with the scenario.
#[derive(Default)]
struct Shared {
    /// Pings answered (all clients).
    pongs: AtomicU64,
    /// Connections the server closed.
    closed: AtomicU64,
    /// Set: silent clients stop answering from their next ping on.
    silent: AtomicBool,
    /// Detection samples, seconds, of silent clients.
    samples: Mutex<Vec<f64>>,
    /// Closes of clients that were not silent.
    false_kills: AtomicU64,
}

/// Answers pings until the server closes; a `silent` client stops
/// answering once `shared.silent` is set, and records its detection time.
async fn ping_answerer(mut client: Client, shared: Arc<Shared>, can_go_silent: bool) {
    let mut first_unanswered: Option<Instant> = None;
    loop {
        match client.read().await {
            Ok(Some((OP_PING, payload))) => {
                if can_go_silent && shared.silent.load(Relaxed) {
                    first_unanswered.get_or_insert_with(Instant::now);
                    continue;
                }
                if client.send(OP_PONG, &payload).await.is_err() {
                    break;
                }
                shared.pongs.fetch_add(1, Relaxed);
            }
            Ok(Some((OP_CLOSE, _))) | Ok(None) | Err(_) => break,
            Ok(Some(_)) => {}
        }
    }
    shared.closed.fetch_add(1, Relaxed);
    match first_unanswered {
        Some(at) => shared.samples.lock().await.push(at.elapsed().as_secs_f64()),
        None => {
            shared.false_kills.fetch_add(1, Relaxed);
        }
    }
}

fn heartbeat_kind(kind: &str) -> bool {
    kind != "raw"
}

// ===== scenarios =====

async fn idle(args: &Args, server: &Server) -> String {
    let rss_zero = server.rss_kib();
    let shared = Arc::new(Shared::default());
    open_each(args, server, args.conns, |_, client| {
        tokio::spawn(ping_answerer(client, shared.clone(), false));
    })
    .await;
    // Settle: every connection has had its first pings.
    sleep(Duration::from_millis(args.interval_ms * 2 + 1000)).await;
    let (cpu0, pongs0, closed0, gen0) = (
        server.cpu_ns(),
        shared.pongs.load(Relaxed),
        shared.closed.load(Relaxed),
        own_cpu_ns(),
    );
    let started = Instant::now();
    let profiler = at_window(args, server);
    sleep(args.window).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_ns = server.cpu_ns() - cpu0;
    let gen_ns = own_cpu_ns() - gen0;
    let heartbeats = shared.pongs.load(Relaxed) - pongs0;
    wait_at_window(profiler, args.window).await;
    let rss = server.rss_kib();
    let wrongly_closed = shared.closed.load(Relaxed);
    let per_heartbeat = if heartbeat_kind(&args.kind) && heartbeats > 0 {
        format!("{:.3}", cpu_ns as f64 / 1e3 / heartbeats as f64)
    } else {
        "null".into()
    };
    format!(
        concat!(
            r#"{{"scenario":"idle","kind":"{}","conns":{},"interval_ms":{},"timeout_ms":{},"#,
            r#""rss_zero_kib":{},"rss_kib":{},"rss_per_conn_kib":{:.3},"window_s":{:.1},"#,
            r#""cpu_ms":{:.1},"heartbeats":{},"cpu_us_per_heartbeat":{},"cpu_us_per_conn_s":{:.3},"#,
            r#""wrongly_closed":{},"closed_during_window":{},"gen_cpu_ms":{:.1}}}"#
        ),
        args.kind,
        args.conns,
        args.interval_ms,
        args.timeout_ms,
        rss_zero,
        rss,
        (rss.saturating_sub(rss_zero)) as f64 / args.conns as f64,
        elapsed,
        cpu_ns as f64 / 1e6,
        heartbeats,
        per_heartbeat,
        cpu_ns as f64 / 1e3 / args.conns as f64 / elapsed,
        wrongly_closed,
        wrongly_closed - closed0,
        gen_ns as f64 / 1e6,
    )
}

async fn detection(args: &Args, server: &Server) -> String {
    let shared = Arc::new(Shared::default());
    let silent = args.silent.min(args.conns);
    open_each(args, server, args.conns, |i, client| {
        tokio::spawn(ping_answerer(client, shared.clone(), i < silent));
    })
    .await;
    sleep(Duration::from_millis(args.interval_ms * 2 + 1000)).await;
    shared.silent.store(true, Relaxed);
    // Bounded wait: every silent client should be closed well within this.
    let bound = Duration::from_millis((args.interval_ms + args.timeout_ms) * 3 + 2000);
    let _ = timeout(bound, async {
        while shared.samples.lock().await.len() < silent {
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Watch the healthy ones a little longer for false kills.
    sleep(Duration::from_millis(args.interval_ms * 2)).await;
    let mut samples = shared.samples.lock().await.clone();
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| -> String {
        if samples.is_empty() {
            return "null".into();
        }
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        format!("{:.1}", samples[i] * 1e3)
    };
    format!(
        concat!(
            r#"{{"scenario":"detection","kind":"{}","conns":{},"silent":{},"interval_ms":{},"timeout_ms":{},"#,
            r#""detected":{},"p50_ms":{},"p99_ms":{},"max_ms":{},"false_kills":{}}}"#
        ),
        args.kind,
        args.conns,
        silent,
        args.interval_ms,
        args.timeout_ms,
        samples.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        shared.false_kills.load(Relaxed),
    )
}

async fn ping_floor(args: &Args, server: &Server) -> String {
    let rss_zero = server.rss_kib();
    let pongs = Arc::new(AtomicU64::new(0));
    let clients = open(args, server, args.conns).await;
    let interval = Duration::from_millis(args.interval_ms);
    // (Nothing pings these clients: the raw server has no heartbeat.)
    for (i, mut client) in clients.into_iter().enumerate() {
        let pongs = pongs.clone();
        // Spread the clients over the interval, as jittered servers do.
        let offset = interval * (i as u32) / (args.conns as u32);
        tokio::spawn(async move {
            sleep(offset).await;
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                if client.send(OP_PING, b"floor").await.is_err() {
                    return;
                }
                loop {
                    match client.read().await {
                        Ok(Some((OP_PONG, _))) => break,
                        Ok(Some(_)) => {}
                        _ => return,
                    }
                }
                pongs.fetch_add(1, Relaxed);
            }
        });
    }
    sleep(interval * 2 + Duration::from_secs(1)).await;
    let (cpu0, pongs0) = (server.cpu_ns(), pongs.load(Relaxed));
    let started = Instant::now();
    sleep(args.window).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_ns = server.cpu_ns() - cpu0;
    let exchanges = pongs.load(Relaxed) - pongs0;
    format!(
        concat!(
            r#"{{"scenario":"pingfloor","kind":"{}","conns":{},"interval_ms":{},"rss_per_conn_kib":{:.3},"#,
            r#""window_s":{:.1},"cpu_ms":{:.1},"exchanges":{},"cpu_us_per_exchange":{:.3}}}"#
        ),
        args.kind,
        args.conns,
        args.interval_ms,
        (server.rss_kib().saturating_sub(rss_zero)) as f64 / args.conns as f64,
        elapsed,
        cpu_ns as f64 / 1e6,
        exchanges,
        cpu_ns as f64 / 1e3 / exchanges.max(1) as f64,
    )
}

async fn echo(args: &Args, server: &Server) -> String {
    let conns = 64;
    let clients = open(args, server, conns).await;
    let round_trips = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let message: Arc<[u8]> = vec![b'x'; args.message_bytes].into();
    sleep(Duration::from_millis(500)).await;
    let (cpu0, gen0) = (server.cpu_ns(), own_cpu_ns());
    let started = Instant::now();
    let profiler = at_window(args, server);
    let mut tasks = Vec::new();
    for mut client in clients {
        let (round_trips, stop, message) = (round_trips.clone(), stop.clone(), message.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                if client.send(OP_TEXT, &message).await.is_err() {
                    return;
                }
                loop {
                    match client.read().await {
                        Ok(Some((OP_TEXT, payload))) => {
                            assert_eq!(payload.len(), message.len());
                            break;
                        }
                        Ok(Some((OP_PING, p))) => {
                            if client.send(OP_PONG, &p).await.is_err() {
                                return;
                            }
                        }
                        Ok(Some(_)) => {}
                        _ => return,
                    }
                }
                round_trips.fetch_add(1, Relaxed);
            }
        }));
    }
    sleep(args.window).await;
    stop.store(true, Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_ns = server.cpu_ns() - cpu0;
    let gen_ns = own_cpu_ns() - gen0;
    let n = round_trips.load(Relaxed);
    wait_at_window(profiler, args.window).await;
    for task in tasks {
        let _ = timeout(Duration::from_secs(5), task).await;
    }
    format!(
        concat!(
            r#"{{"scenario":"echo","kind":"{}","conns":{},"message_bytes":{},"window_s":{:.1},"#,
            r#""round_trips":{},"round_trips_per_s":{:.0},"cpu_ms":{:.1},"cpu_us_per_round_trip":{:.3},"#,
            r#""gen_cpu_ms":{:.1}}}"#
        ),
        args.kind,
        conns,
        args.message_bytes,
        elapsed,
        n,
        n as f64 / elapsed,
        cpu_ns as f64 / 1e6,
        cpu_ns as f64 / 1e3 / n.max(1) as f64,
        gen_ns as f64 / 1e6,
    )
}
