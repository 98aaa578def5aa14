//! Interoperability with WebSocket peers nobody here wrote: Python's
//! `websockets` and Node's `ws`, run as real processes (the scripts in
//! `tests/interop/`) on real sockets on 127.0.0.1, in real time.
//!
//! Every test is ignored by default because it needs those two libraries:
//!
//! ```sh
//! eval "$(bash .ci/interop-setup)"   # installs them under target/interop/, exports the paths
//! cargo test --test interop -- --ignored
//! ```
//!
//! Timeouts here are hang guards, never speed assertions, except the
//! documented detection bound of a stopped peer (`docs/keepalive.md`).
//! Every child process is owned by a [`Peer`], which kills and reaps it when
//! dropped, so a failing test leaves none behind.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::io::{BufRead, BufReader, Read, Write};
use support::*;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use ws_supervisor::tungstenite::Message;
use ws_supervisor::{CloseCode, CloseEvent, CloseReason, Config, Initiator, Stats};

/// Hang guard for any single wait.
const BOUND: Duration = Duration::from_secs(20);
/// Our heartbeat in these tests (no jitter: `support::heartbeat`).
const PING: Duration = Duration::from_millis(200);
const PONG: Duration = Duration::from_millis(400);
/// Slack on the detection bound for a real, possibly loaded, machine:
/// scheduling of our task and of the timer, not the protocol.
const MARGIN: Duration = Duration::from_millis(250);

fn config() -> Config {
    heartbeat(PING, PONG).build().unwrap()
}

// ===== the foreign peers =====

/// Where `.ci/interop-setup` put the foreign libraries.
struct Tools {
    python: PathBuf,
    node_path: PathBuf,
}

fn tools() -> Tools {
    fn var(name: &str) -> PathBuf {
        let hint = "run `eval \"$(bash .ci/interop-setup)\"` first: it installs Python \
                    websockets and Node ws under target/interop/ and prints the exports";
        match std::env::var_os(name) {
            Some(value) if !value.is_empty() => {
                let path = PathBuf::from(value);
                assert!(
                    path.exists(),
                    "{name}={} does not exist: {hint}",
                    path.display()
                );
                path
            }
            _ if std::env::var_os("CI").is_some() => {
                panic!("{name} is not set in CI: .ci/run must {hint}")
            }
            _ => panic!("{name} is not set: {hint}"),
        }
    }
    Tools {
        python: var("WS_INTEROP_PYTHON"),
        node_path: var("WS_INTEROP_NODE_PATH"),
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop")
        .join(name)
}

/// A foreign peer process. Reads its stdout line by line (the scripts print
/// one machine-readable line per step) and keeps its stderr for failure
/// messages. Dropping it kills and reaps the process.
struct Peer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Peer {
    fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err_pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    fn python(script_name: &str, args: &[&str]) -> Self {
        let mut command = Command::new(tools().python);
        command
            .arg(script(script_name))
            .args(args)
            .env("PYTHONUNBUFFERED", "1");
        Self::spawn(&format!("python {script_name}"), command)
    }

    fn node(script_name: &str, args: &[&str]) -> Self {
        let mut command = Command::new("node");
        command
            .arg(script(script_name))
            .args(args)
            .env("NODE_PATH", tools().node_path);
        Self::spawn(&format!("node {script_name}"), command)
    }

    /// Everything the peer said so far, for failure messages.
    fn transcript(&self) -> String {
        format!(
            "{} (pid {}) stdout:\n  {}\nstderr:\n{}",
            self.name,
            self.child.id(),
            self.seen.join("\n  "),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits (bounded) for the next line starting with `prefix`, skipping
    /// others; returns the rest of that line. Fails on `error` lines.
    async fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                    assert!(
                        !line.starts_with("error"),
                        "waiting for {prefix:?}: {}",
                        self.transcript()
                    );
                }
                Ok(None) => panic!("ended before {prefix:?}: {}", self.transcript()),
                Err(_) => panic!("no {prefix:?} within {BOUND:?}: {}", self.transcript()),
            }
        }
    }

    fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("writing to the peer");
        stdin.flush().expect("flushing to the peer");
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to this child, and only to it.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {}", self.child.id());
    }

    /// Waits (bounded) for the peer to exit by itself.
    async fn exited(&mut self) -> ExitStatus {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Collect what it printed last.
                while let Ok(Some(line)) =
                    timeout(Duration::from_millis(200), self.lines.recv()).await
                {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {BOUND:?}: {}",
                self.transcript()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn exits_cleanly(&mut self) {
        let status = self.exited().await;
        assert!(status.success(), "{status}: {}", self.transcript());
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Closing stdin first lets a healthy script finish by itself; a
        // stopped or hung one is killed (SIGKILL also ends a stopped process).
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ===== our side =====

/// A supervised echo server for one connection on 127.0.0.1:0.
struct EchoServer {
    addr: SocketAddr,
    /// The connection's stats, refreshed every 20 ms while it lives.
    stats: watch::Receiver<Stats>,
    /// The connection's close event, once it ended.
    done: JoinHandle<CloseEvent>,
    events: Events,
    sup: ws_supervisor::Supervisor,
}

async fn echo_server() -> EchoServer {
    let (sup, events) = supervisor(config());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stats_tx, stats) = watch::channel(Stats::default());
    let server = sup.clone();
    let done = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = server.accept_tcp(tcp).await.expect("handshake");
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                message = conn.recv() => match message {
                    Some(message) => {
                        if conn.send(message).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    let _ = stats_tx.send(conn.stats());
                }
            }
        }
        let _ = stats_tx.send(conn.stats());
        conn.closed().await
    });
    EchoServer {
        addr,
        stats,
        done,
        events,
        sup,
    }
}

impl EchoServer {
    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Waits (bounded) until the connection's stats satisfy `ok`.
    async fn wait_stats(&mut self, what: &str, ok: impl Fn(&Stats) -> bool) -> Stats {
        let waited = timeout(BOUND, self.stats.wait_for(|s| ok(s)))
            .await
            .map(|r| r.map(|stats| *stats));
        match waited {
            Ok(Ok(stats)) => stats,
            Ok(Err(_)) => panic!(
                "the connection ended before {what}: {:?}",
                self.events.all()
            ),
            Err(_) => panic!("no {what} within {BOUND:?}: {:?}", *self.stats.borrow()),
        }
    }

    /// The close event (bounded wait), checked against the hook's.
    async fn closed(&mut self, peer: &Peer) -> CloseEvent {
        let event = match timeout(BOUND, &mut self.done).await {
            Ok(joined) => joined.expect("server task"),
            Err(_) => panic!("not closed within {BOUND:?}: {}", peer.transcript()),
        };
        let hooked = self.events.only();
        assert_eq!((hooked.id, hooked.reason), (event.id, event.reason));
        assert!(self.sup.is_empty());
        event
    }
}

// ===== a, b: foreign clients against a supervised echo server =====

#[derive(Clone, Copy, Debug)]
enum Client {
    /// Python `websockets`, its own keepalive on (ping every 0.2 s, 1 s timeout).
    Python,
    /// Node `ws`: answers pings, no keepalive of its own.
    Node,
}

fn spawn_client(kind: Client, url: &str, code: u16) -> Peer {
    let code = code.to_string();
    match kind {
        Client::Python => Peer::python(
            "py_client.py",
            &[
                url,
                "--ping-interval",
                "0.2",
                "--ping-timeout",
                "1",
                "--close",
                &code,
            ],
        ),
        Client::Node => Peer::node("node_client.js", &[url, &code]),
    }
}

/// Connects, checks the echo of every message, waits until the peer has
/// answered our pings over at least 8 intervals, then lets it close with
/// `code` and checks the reason.
async fn foreign_client_exchange_pings_and_close(kind: Client, code: u16, reason: CloseReason) {
    let mut server = echo_server().await;
    let mut peer = spawn_client(kind, &server.url(), code);
    peer.expect("ready").await;
    for i in 0..3 {
        assert_eq!(peer.expect("received text").await, format!("hello-{i}"));
    }
    assert_eq!(peer.expect("received binary").await, "000102ff");
    peer.expect("waiting").await;

    let stats = server
        .wait_stats("8 pings and 5 pongs", |s| {
            s.pings_sent >= 8 && s.pongs_received >= 5
        })
        .await;
    assert_eq!(server.events.len(), 0, "still open after {stats:?}");
    assert!(!server.done.is_finished());

    peer.tell("close");
    if let Client::Node = kind {
        // Printed when the connection has closed, before `closed`.
        let pings: u64 = peer.expect("pings").await.parse().unwrap();
        assert!(pings >= 8, "node saw {pings} of our pings");
    }
    // The peer sees our echo of its Close.
    let closed = peer.expect("closed").await;
    assert!(
        closed.starts_with(&code.to_string()),
        "{closed}: {}",
        peer.transcript()
    );
    let event = server.closed(&peer).await;
    assert_eq!(
        (event.reason, event.initiator),
        (reason, Initiator::Remote),
        "{event:#?}"
    );
    assert_eq!(event.code_received, Some(CloseCode::from(code)));
    assert_eq!(event.code_sent, Some(CloseCode::from(code)), "echoed");
    assert!(event.stats.pongs_received >= 5, "{event:#?}");
    assert_eq!(
        event.stats.pongs_unmatched, 0,
        "every pong carried one of our nonces: {event:#?}"
    );
    assert!(event.stats.smoothed_rtt.is_some());
    peer.exits_cleanly().await;
}

#[tokio::test]
#[ignore = "needs Python websockets and Node ws: run .ci/interop-setup"]
async fn python_websockets_client_with_keepalive_answers_our_pings_and_closes_1000_normal() {
    foreign_client_exchange_pings_and_close(Client::Python, 1000, CloseReason::Normal).await;
}

#[tokio::test]
#[ignore = "needs Python websockets and Node ws: run .ci/interop-setup"]
async fn python_websockets_client_closing_1001_is_going_away() {
    foreign_client_exchange_pings_and_close(Client::Python, 1001, CloseReason::GoingAway).await;
}

#[tokio::test]
#[ignore = "needs Python websockets and Node ws: run .ci/interop-setup"]
async fn node_ws_client_answers_our_pings_and_closes_1000_normal() {
    foreign_client_exchange_pings_and_close(Client::Node, 1000, CloseReason::Normal).await;
}

#[tokio::test]
#[ignore = "needs Python websockets and Node ws: run .ci/interop-setup"]
async fn node_ws_client_closing_1001_is_going_away() {
    foreign_client_exchange_pings_and_close(Client::Node, 1001, CloseReason::GoingAway).await;
}

// ===== c: a foreign client that stops answering, or dies =====

/// A Python client, connected, that has answered at least one of our pings.
async fn connected_python_client() -> (EchoServer, Peer) {
    let mut server = echo_server().await;
    let mut peer = spawn_client(Client::Python, &server.url(), 1000);
    peer.expect("waiting").await;
    server.wait_stats("a pong", |s| s.pongs_received >= 1).await;
    (server, peer)
}

#[tokio::test]
#[ignore = "needs Python websockets and Node ws: run .ci/interop-setup"]
async fn stopped_python_client_is_a_local_timeout_within_the_detection_bound() {
    let (mut server, mut peer) = connected_python_client().await;
    let stopped = Instant::now();
    // The process stops; its kernel still ACKs, so only a ping can tell.
    peer.signal("STOP");
    let event = server.closed(&peer).await;
    let detected_after = stopped.elapsed();
    peer.signal("CONT");

    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Timeout, Initiator::Local),
        "{event:#?}"
    );
    assert_eq!(event.code_sent, Some(CloseCode::Error));
    assert_eq!(event.text, "ping timeout");
    // docs/keepalive.md: dead no later than L + I + J + T after the last
    // inbound frame L (J = 0 here), and never before T after it.
    let bound = PING + PONG;
    let silent = event.stats.since_last_inbound;
    eprintln!(
        "stopped peer declared {silent:?} after its last frame, {detected_after:?} after \
         SIGSTOP (bound {bound:?})"
    );
    assert!(silent >= PONG, "declared early: {silent:?} < {PONG:?}");
    assert!(
        silent <= bound + MARGIN,
        "declared {silent:?} after the last frame (bound {bound:?} + {MARGIN:?})"
    );
    assert!(
        detected_after <= bound + MARGIN,
        "declared {detected_after:?} after SIGSTOP (bound {bound:?} + {MARGIN:?})"
    );

    // Resumed, the peer finds our best-effort Close 1011 in its buffer.
    let closed = peer.expect("closed").await;
    assert_eq!(closed, "1011 ping timeout", "{}", peer.transcript());
    peer.exits_cleanly().await;
}

#[tokio::test]
#[ignore = "needs Python websockets and Node ws: run .ci/interop-setup"]
async fn killed_python_client_is_abnormal_remote() {
    let (mut server, mut peer) = connected_python_client().await;
    // SIGKILL: the kernel closes the socket (FIN, or RST if data was unread).
    peer.child.kill().expect("SIGKILL");
    let event = server.closed(&peer).await;
    eprintln!("killed peer: {:?}", event.error);
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Abnormal, Initiator::Remote),
        "{event:#?}"
    );
    assert_eq!(event.code_received, None);
    assert!(!peer.exited().await.success());
}

// ===== d: our supervised client against a Python websockets server =====

/// Starts `py_server.py` and returns it with its URL.
async fn python_server(args: &[&str]) -> (Peer, String) {
    let mut peer = Peer::python("py_server.py", args);
    let port: u16 = peer.expect("listening").await.parse().unwrap();
    (peer, format!("ws://127.0.0.1:{port}/"))
}

#[tokio::test]
#[ignore = "needs Python websockets and Node ws: run .ci/interop-setup"]
async fn supervised_client_answers_python_server_keepalive_and_its_1011_close_is_internal() {
    let (mut server, url) = python_server(&[
        "echo",
        "--ping-interval",
        "0.3",
        "--ping-timeout",
        "1",
        "--hold",
        "2.5",
        "--close",
        "1011",
        "--reason",
        "keepalive ping timeout",
    ])
    .await;
    let (client, events) = supervisor(config());
    let mut conn = client.connect(url).await.expect("connect");
    server.expect("connected").await;
    conn.send("hello").await.unwrap();
    assert_eq!(
        timeout(BOUND, conn.recv()).await.unwrap(),
        Some(Message::text("hello"))
    );
    server.expect("echoed hello").await;

    // The server's keepalive (ping every 0.3 s, 1 s timeout) would have
    // closed a client that does not answer after about 1.3 s.
    let latency: f64 = server.expect("keepalive-latency").await.parse().unwrap();
    assert!(latency > 0.0, "a keepalive pong reached the server");
    server.expect("probe-pong").await;

    let event = timeout(BOUND, conn.closed())
        .await
        .unwrap_or_else(|_| panic!("not closed: {}", server.transcript()));
    assert!(
        event.duration >= Duration::from_secs(2),
        "closed early: {event:#?}\n{}",
        server.transcript()
    );
    // docs/close-reasons.md: a peer's 1011 is Internal/remote, text kept.
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Internal, Initiator::Remote),
        "{event:#?}"
    );
    assert_eq!(event.code_received, Some(CloseCode::Error));
    assert_eq!(event.text, "keepalive ping timeout");
    assert_eq!(event.code_sent, Some(CloseCode::Error), "echoed");
    assert!(
        event.stats.pongs_received >= 1,
        "the server answered our pings"
    );
    assert_eq!(events.only().reason, CloseReason::Internal);

    assert_eq!(
        server.expect("closed").await,
        "1011 keepalive ping timeout",
        "the server got our echo"
    );
    server.exits_cleanly().await;
    assert!(client.is_empty());
}

/// A Python `websockets` server floods while our application takes
/// nothing. Within the inbound budget the supervisor keeps reading (and so
/// answers the server's pings); here the budget is tiny, so reading pauses,
/// our pong deadline is suspended (the server is not blamed), and after
/// `ping_interval + pong_timeout` our own application is: `Internal`/local,
/// "application not reading", before the server's keepalive (1 s) would
/// give up. (Until 0.2.0 our reading paused with no limit and the server's
/// keepalive ended it with 1011: that rule is replaced on purpose.)
#[tokio::test]
#[ignore = "needs Python websockets and Node ws: run .ci/interop-setup"]
async fn python_server_flood_while_our_app_does_not_read_blames_our_app() {
    let flood = 64;
    let (mut server, url) = python_server(&[
        "flood",
        "--flood",
        &flood.to_string(),
        "--ping-interval",
        "0.3",
        "--ping-timeout",
        "1",
        "--close-timeout",
        "10",
    ])
    .await;
    let config = heartbeat(PING, PONG)
        .max_message_size(256)
        .max_frame_size(256)
        .inbound_buffer_limit(256)
        .build()
        .unwrap();
    let (client, events) = supervisor(config);
    let mut conn = client.connect(url).await.expect("connect");
    server.expect("flooded").await;
    // The application takes nothing until the connection has ended.
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Internal, Initiator::Local),
        "{event:#?}"
    );
    assert_eq!(event.text, "application not reading");
    assert_eq!(event.code_sent, Some(CloseCode::Error));
    assert_eq!(
        server.expect("closing").await,
        "1011 application not reading",
        "the server answered our Close: {}",
        server.transcript()
    );
    // What was read before the end is delivered, in order.
    let mut got = 0;
    while let Some(message) = timeout(BOUND, conn.recv()).await.expect("draining") {
        assert_eq!(message, Message::text(format!("flood-{got}")));
        got += 1;
    }
    assert!(got > 0 && got < flood, "read until the budget: {got}");
    assert_eq!(events.only().reason, CloseReason::Internal);
    server.exits_cleanly().await;
}
