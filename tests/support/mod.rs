//! Shared test support: in-memory peers (a real tungstenite client and a
//! raw-frame peer for hostile or silent behaviour), and a hook recorder.
#![allow(dead_code, unreachable_pub)]

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf,
};
use tokio_tungstenite::WebSocketStream;
use ws_supervisor::{CloseEvent, Config, ConfigBuilder, Connection, Supervisor};

pub mod recorder;
pub mod ways;

pub const MS: Duration = Duration::from_millis(1);
pub const SEC: Duration = Duration::from_secs(1);

/// Bytes of the in-memory pipe between supervisor and peer.
pub const PIPE: usize = 64 * 1024;

/// A builder with the given heartbeat and no jitter (exact schedules).
pub fn heartbeat(interval: Duration, timeout: Duration) -> ConfigBuilder {
    Config::builder()
        .ping_interval(interval)
        .pong_timeout(timeout)
        .ping_jitter(Duration::ZERO)
}

/// Every close event a supervisor reported, in order.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<CloseEvent>>>, Arc<tokio::sync::Notify>);

impl Events {
    pub fn push(&self, event: CloseEvent) {
        self.0.lock().unwrap().push(event);
        self.1.notify_waiters();
    }

    pub fn all(&self) -> Vec<CloseEvent> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Waits until at least `n` events were recorded, for at most `bound`;
    /// returns whether they were. Woken by each event, not by polling, so a
    /// long bound under paused time costs one jump of the clock.
    pub async fn wait_within(&self, n: usize, bound: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.1.notified();
                tokio::pin!(notified);
                // Register before checking, so a push in between is not missed.
                notified.as_mut().enable();
                if self.len() >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(bound, wait).await.is_ok()
    }

    /// Waits until at least `n` events were recorded: bounded to 10 000
    /// steps of 1 ms (virtual under paused time), then fails.
    pub async fn wait_for(&self, n: usize) {
        for _ in 0..10_000 {
            if self.len() >= n {
                return;
            }
            tokio::time::sleep(MS).await;
        }
        panic!("expected {n} close events, got {}", self.len());
    }

    /// The single event recorded; fails if there are zero or several.
    pub fn only(&self) -> CloseEvent {
        let all = self.all();
        assert_eq!(all.len(), 1, "expected exactly one close event: {all:#?}");
        all.into_iter().next().unwrap()
    }
}

/// A supervisor whose only hook records into the returned [`Events`].
pub fn supervisor(config: Config) -> (Supervisor, Events) {
    let events = Events::default();
    let sink = events.clone();
    let sup = Supervisor::builder(config)
        .on_close(move |e: &CloseEvent| sink.push(e.clone()))
        .build();
    (sup, events)
}

/// A supervised server connection whose peer is a real tungstenite client.
pub async fn accept_ws(sup: &Supervisor) -> (Connection, WebSocketStream<DuplexStream>) {
    let (server, client) = tokio::io::duplex(PIPE);
    let (conn, peer) = tokio::join!(
        sup.accept(server).into_future(),
        tokio_tungstenite::client_async("ws://localhost/", client)
    );
    (conn.expect("accept"), peer.expect("client handshake").0)
}

/// A supervised server connection whose peer is a [`RawPeer`].
pub async fn accept_raw(sup: &Supervisor) -> (Connection, RawPeer<DuplexStream>) {
    accept_raw_with(sup, PIPE).await
}

/// As [`accept_raw`], over a pipe of `capacity` bytes.
pub async fn accept_raw_with(
    sup: &Supervisor,
    capacity: usize,
) -> (Connection, RawPeer<DuplexStream>) {
    let (server, client) = tokio::io::duplex(capacity);
    let (conn, peer) = tokio::join!(sup.accept(server).into_future(), RawPeer::handshake(client));
    (conn.expect("accept"), peer)
}

/// A connection `sup` accepted over loopback TCP (`accept_tcp`, so the
/// read layer sits on a plain `TcpStream`), and its tungstenite client.
pub async fn accept_over_tcp(
    sup: &Supervisor,
) -> (
    Connection,
    WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) {
    accept_over_tcp_from(sup, |addr| async move {
        let url = format!("ws://{addr}/");
        tokio_tungstenite::connect_async(url).await.unwrap().0
    })
    .await
}

/// A connection `sup` accepted over loopback TCP, and the peer `connect`
/// made to its address.
pub async fn accept_over_tcp_from<F, Fut, P>(sup: &Supervisor, connect: F) -> (Connection, P)
where
    F: FnOnce(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = P>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = {
        let sup = sup.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            sup.accept_tcp(tcp).await.unwrap()
        })
    };
    let peer = connect(addr).await;
    (accept.await.unwrap(), peer)
}

/// Polls `done` every 10 ms until it holds: at most 2000 times (20 s, of
/// virtual time under `start_paused`), then fails with `what`.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Connects to `addr` and sends an upgrade request, then reads nothing:
/// the caller writes what it likes and never reads (a peer that stops
/// reading).
pub async fn non_reader(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    tcp
}

/// A connection under `config` (no jitter) whose peer reads everything and
/// never answers: checks that it dies of `Timeout` (local, Close 1011 sent,
/// no pong) within `ping_interval + pong_timeout` and not a millisecond
/// before; returns when it died (after the open), its event, and every
/// frame the peer got. Under paused time.
pub async fn silent_peer_dies(config: Config) -> (Duration, CloseEvent, Vec<Frame>) {
    use tokio::time::{Instant, timeout_at};
    assert!(config.ping_jitter().is_zero(), "an exact schedule");
    let bound = config.ping_interval() + config.pong_timeout();
    let (sup, events) = supervisor(config);
    let (conn, peer) = accept_raw(&sup).await;
    let opened = Instant::now();
    let drained = tokio::spawn(peer.drain());

    // Never at the bare interval, nor a moment before the documented bound.
    let early = timeout_at(opened + bound - MS, conn.closed()).await;
    assert!(early.is_err(), "closed before interval + timeout");
    let event = conn.closed().await;
    let died = Instant::now() - opened;
    assert_eq!(
        (event.reason, event.initiator),
        (
            ws_supervisor::CloseReason::Timeout,
            ws_supervisor::Initiator::Local
        )
    );
    assert_eq!(event.code_sent, Some(ws_supervisor::CloseCode::Error));
    assert_eq!(event.stats.pongs_received, 0);
    assert!(event.stats.since_last_inbound >= bound);
    let frames = drained.await.unwrap();
    assert_eq!(
        frames.last().and_then(Frame::close_code),
        Some(1011),
        "a Close 1011 went out"
    );
    assert_eq!(events.len(), 1);
    (died, event, frames)
}

// ===== runtimes =====

/// A current-thread runtime with real time, for tests that drop one.
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A multi-thread runtime with 2 workers and real time (paused time exists
/// only on the current-thread runtime).
pub fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until `sup` has no live connection: bounded to 3000 steps of
/// 10 ms (30 s of real time; instant under paused time), then fails.
pub async fn wait_empty(sup: &Supervisor) {
    for _ in 0..3000 {
        if sup.is_empty() {
            return;
        }
        tokio::time::sleep(10 * MS).await;
    }
    panic!("{} connections still live", sup.len());
}

// ===== Net =====

/// Any transport a test hands to the supervisor (an in-memory pipe or a
/// loopback socket), so one scenario runs over either.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// Where a scenario's connections run: in-memory pipes (any runtime, and the
/// only choice under paused time, whose clock would run ahead while we wait
/// on the kernel) or real TCP on `127.0.0.1:0` (real time only).
pub enum Net {
    /// `tokio::io::duplex` pipes of [`PIPE`] bytes.
    Memory,
    /// Loopback TCP through this listener.
    Loopback(tokio::net::TcpListener),
}

impl Net {
    /// Loopback TCP on an ephemeral port.
    pub async fn loopback() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self::Loopback(listener)
    }

    /// A connected pair: (the supervisor's end, the peer's end).
    pub async fn pipe(&self) -> (BoxIo, BoxIo) {
        match self {
            Self::Memory => {
                let (server, client) = tokio::io::duplex(PIPE);
                (Box::new(server), Box::new(client))
            }
            Self::Loopback(listener) => {
                let addr = listener.local_addr().unwrap();
                let (client, accepted) =
                    tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
                let (client, server) = (client.expect("connect"), accepted.expect("accept").0);
                // Small frames go out at once, as on the in-memory pipe.
                client.set_nodelay(true).unwrap();
                server.set_nodelay(true).unwrap();
                (Box::new(server), Box::new(client))
            }
        }
    }

    /// A supervised server connection whose peer is a [`RawPeer`].
    pub async fn accept_raw(&self, sup: &Supervisor) -> (Connection, RawPeer<BoxIo>) {
        let (server, client) = self.pipe().await;
        let (conn, peer) =
            tokio::join!(sup.accept(server).into_future(), RawPeer::handshake(client));
        (conn.expect("accept"), peer)
    }

    /// A supervised server connection whose peer is a real tungstenite client.
    pub async fn accept_ws(&self, sup: &Supervisor) -> (Connection, WebSocketStream<BoxIo>) {
        let (server, client) = self.pipe().await;
        let (conn, peer) = tokio::join!(
            sup.accept(server).into_future(),
            tokio_tungstenite::client_async("ws://localhost/", client)
        );
        (conn.expect("accept"), peer.expect("client handshake").0)
    }
}

// ===== RawPeer =====

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// One frame as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a Close frame, if it has one.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A WebSocket client written by hand, frame by frame, so a test can make it
/// misbehave: stay silent, delay pongs, send invalid data, vanish.
pub struct RawPeer<T> {
    pub reader: ReadHalf<T>,
    pub writer: WriteHalf<T>,
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

impl<T: AsyncRead + AsyncWrite> RawPeer<T> {
    /// Performs the client handshake and checks the 101 answer.
    pub async fn handshake(io: T) -> Self {
        let (mut reader, mut writer) = tokio::io::split(io);
        let request = format!(
            "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        writer.write_all(request.as_bytes()).await.unwrap();
        let head = read_http_head(&mut reader).await;
        assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
        Self { reader, writer }
    }

    /// As [`handshake`](Self::handshake), but `None` when the server refuses.
    pub async fn handshake_or_refused(io: T) -> Option<Self> {
        let (mut reader, mut writer) = tokio::io::split(io);
        let request = format!(
            "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        writer.write_all(request.as_bytes()).await.ok()?;
        let head = try_read_http_head(&mut reader).await?;
        head.starts_with("HTTP/1.1 101")
            .then_some(Self { reader, writer })
    }

    /// Reads the next frame; `None` at EOF or on a broken pipe.
    pub async fn read_frame(&mut self) -> Option<Frame> {
        read_frame(&mut self.reader).await
    }

    /// Reads frames until one with `opcode`, skipping others.
    pub async fn read_until(&mut self, opcode: u8) -> Option<Frame> {
        loop {
            let frame = self.read_frame().await?;
            if frame.opcode == opcode {
                return Some(frame);
            }
        }
    }

    /// Sends one masked frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.send_frame(true, opcode, payload, true).await
    }

    /// Sends one frame with every header bit chosen by the caller.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        let bytes = encode(fin, opcode, payload, masked);
        // A peer that already hung up is fine for these tests.
        let _ = self.writer.write_all(&bytes).await;
    }

    /// Sends a Close frame with `code` and `text`.
    pub async fn close(&mut self, code: u16, text: &str) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(text.as_bytes());
        self.send(OP_CLOSE, &payload).await;
    }

    /// A well-behaved peer: answers every ping, and answers a Close with the
    /// same code. Returns the code of the server's Close (`None`: no Close).
    pub async fn answer_pings(mut self) -> Option<u16> {
        while let Some(frame) = self.read_frame().await {
            match frame.opcode {
                OP_PING => self.send(OP_PONG, &frame.payload).await,
                OP_CLOSE => {
                    self.send(OP_CLOSE, &frame.payload).await;
                    return frame.close_code();
                }
                _ => {}
            }
        }
        None
    }

    /// Reads and discards everything until EOF (a peer that reads but never
    /// answers). Returns the frames it saw.
    pub async fn drain(mut self) -> Vec<Frame> {
        let mut seen = Vec::new();
        while let Some(frame) = self.read_frame().await {
            seen.push(frame);
        }
        seen
    }
}

/// Reads the next server frame from `reader`; `None` at EOF or on a broken pipe.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Option<Frame> {
    let mut head = [0u8; 2];
    reader.read_exact(&mut head).await.ok()?;
    let fin = head[0] & 0x80 != 0;
    let opcode = head[0] & 0x0f;
    assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
    let len = match head[1] & 0x7f {
        126 => reader.read_u16().await.ok()? as usize,
        127 => reader.read_u64().await.ok()? as usize,
        n => n as usize,
    };
    let mut payload = vec![0; len];
    reader.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        fin,
        opcode,
        payload,
    })
}

/// Encodes one client frame (masked with a fixed key when `masked`).
pub fn encode(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

async fn try_read_http_head<R: AsyncRead + Unpin>(reader: &mut R) -> Option<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        head.push(reader.read_u8().await.ok()?);
    }
    String::from_utf8(head).ok()
}

/// Floods `writer` with pings, 100k per (virtual) second for at most 10 s,
/// never reading; returns how many were written before the pipe broke.
pub async fn flood_pings<W: AsyncWrite + Unpin>(mut writer: W) -> u64 {
    let ping = encode(true, OP_PING, b"flood", true);
    let mut sent = 0u64;
    for _ in 0..1000 {
        for _ in 0..1000 {
            if writer.write_all(&ping).await.is_err() {
                return sent;
            }
            sent += 1;
        }
        tokio::time::sleep(10 * MS).await;
    }
    sent
}

/// Reads an HTTP response head byte by byte, so no frame byte is taken.
pub async fn read_http_head<R: AsyncRead + Unpin>(reader: &mut R) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = reader.read_u8().await.expect("handshake response");
        head.push(byte);
        assert!(head.len() < 8192, "handshake response too long");
    }
    String::from_utf8(head).unwrap()
}

/// A tiny deterministic PRNG (xorshift64*), so randomized tests replay.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Marks a deliberate panic; [`quiet_expected_panics`] keeps it out of the output.
pub const EXPECTED_PANIC: &str = "[expected panic]";

/// Silences the default panic message for panics whose text contains
/// [`EXPECTED_PANIC`]; every other panic is reported as usual.
pub fn quiet_expected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let text = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !text.contains(EXPECTED_PANIC) {
                default(info);
            }
        }));
    });
}
