//! Every way in is equal: `accept`, the hyper upgrade and the axum
//! extractor give the same close reasons, answer bad requests the same way,
//! count them by the same causes, and apply the same origin and per-IP rules.
//!
//! The hyper and axum ways run with `--features axum` (`.ci/run` runs
//! `cargo test --all-features`); the default build tests `accept` alone.

mod support;

use std::future::IntoFuture;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::sleep;
use ws_supervisor::{CloseCode, CloseReason as R, Config, HandshakeFailure, Initiator};
use ws_supervisor::{Initiator::Local, Initiator::Remote, Supervisor};

use support::ways::{PEER, PROTOCOL, WAYS, Way, open, serve};
use support::*;

// ===== close reasons, each way =====

fn reason(e: &ws_supervisor::CloseEvent) -> (R, Initiator) {
    (e.reason, e.initiator)
}

#[tokio::test(start_paused = true)]
async fn each_close_reason_is_the_same_on_every_way_in() {
    quiet_expected_panics();
    for &way in WAYS {
        let (sup, events) = supervisor(heartbeat(SEC, SEC).build().unwrap());

        // normal: the peer closes with 1000.
        let (conn, mut peer) = open(way, &sup).await;
        peer.close(1000, "bye").await;
        assert_eq!(
            peer.read_until(OP_CLOSE).await.unwrap().close_code(),
            Some(1000)
        );
        assert_eq!(reason(&conn.closed().await), (R::Normal, Remote), "{way:?}");
        assert_eq!(conn.peer_addr(), Some(PEER.parse().unwrap()), "{way:?}");

        // going_away: the peer closes with 1001.
        let (conn, mut peer) = open(way, &sup).await;
        peer.close(1001, "tab closed").await;
        assert_eq!(
            reason(&conn.closed().await),
            (R::GoingAway, Remote),
            "{way:?}"
        );

        // timeout: the peer reads but never answers a ping.
        let (conn, peer) = open(way, &sup).await;
        let drained = tokio::spawn(peer.drain());
        let event = conn.closed().await;
        assert_eq!(reason(&event), (R::Timeout, Local), "{way:?}");
        assert_eq!(event.code_sent, Some(CloseCode::Error));
        drained.await.unwrap();

        // protocol_error: invalid UTF-8 in a text frame.
        let (conn, mut peer) = open(way, &sup).await;
        peer.send(OP_TEXT, &[0xff, 0xfe]).await;
        assert_eq!(
            reason(&conn.closed().await),
            (R::ProtocolError, Remote),
            "{way:?}"
        );

        // abnormal: the transport ends with no Close.
        let (conn, peer) = open(way, &sup).await;
        drop(peer);
        assert_eq!(
            reason(&conn.closed().await),
            (R::Abnormal, Remote),
            "{way:?}"
        );

        // internal: the application panics holding the connection.
        let (conn, peer) = open(way, &sup).await;
        let id = conn.id();
        let app = tokio::spawn(async move {
            let _conn = conn;
            panic!("application bug {EXPECTED_PANIC}");
        });
        assert!(app.await.unwrap_err().is_panic());
        let answered = tokio::spawn(peer.answer_pings());
        assert_eq!(answered.await.unwrap(), Some(1011), "{way:?}");
        events.wait_for(6).await;
        let all = events.all();
        let internal = all.iter().find(|e| e.id == id).expect("its event");
        assert_eq!(reason(internal), (R::Internal, Local), "{way:?}");
        assert_eq!(all.len(), 6, "one hook call per connection, {way:?}");
        assert_eq!(sup.accepted_total(), 6);
        sup.shutdown(SEC).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_agreed_subprotocol_reaches_the_connection_on_every_way_in() {
    for &way in WAYS {
        let (sup, _events) = supervisor(Config::default());
        let (server, client) = tokio::io::duplex(PIPE);
        let (tx, mut rx) = mpsc::unbounded_channel();
        serve(way, &sup, server, PEER.parse().unwrap(), tx);
        let (head, _peer) =
            raw_upgrade(client, "Sec-WebSocket-Protocol: chat.v0, echo.v1\r\n").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{way:?}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-protocol: echo.v1\r\n"),
            "{way:?}: {head}"
        );
        let conn = rx.recv().await.unwrap();
        assert_eq!(conn.protocol(), Some(PROTOCOL), "{way:?}");

        // A client that offers nothing we speak gets no subprotocol.
        let (server, client) = tokio::io::duplex(PIPE);
        let (tx, mut rx) = mpsc::unbounded_channel();
        serve(way, &sup, server, PEER.parse().unwrap(), tx);
        let (head, _peer) = raw_upgrade(client, "Sec-WebSocket-Protocol: mqtt\r\n").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{way:?}: {head}");
        assert!(!head.to_ascii_lowercase().contains("sec-websocket-protocol"));
        assert_eq!(rx.recv().await.unwrap().protocol(), None);
    }
}

/// Sends an upgrade request with `extra` header lines; returns the
/// response head and the peer.
async fn raw_upgrade(io: DuplexStream, extra: &str) -> (String, RawPeer<DuplexStream>) {
    let (mut reader, mut writer) = tokio::io::split(io);
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    writer.write_all(request.as_bytes()).await.unwrap();
    let head = read_http_head(&mut reader).await;
    (head, RawPeer { reader, writer })
}

// ===== bad requests, over real loopback sockets =====

/// A server on 127.0.0.1 serving `way`; returns its address.
async fn listen(way: Way, sup: &Supervisor) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sup = sup.clone();
    tokio::spawn(async move {
        // Bounded: the test opens far fewer connections.
        for _ in 0..100 {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            let (tx, mut rx) = mpsc::unbounded_channel();
            serve(way, &sup, tcp, peer, tx);
            // Echo whatever connects, so a valid upgrade is usable.
            tokio::spawn(async move {
                while let Some(mut conn) = rx.recv().await {
                    tokio::spawn(async move {
                        while let Some(m) = conn.recv().await {
                            let _ = conn.send(m).await;
                        }
                    });
                }
            });
        }
    });
    addr
}

/// Sends `request` over a new TCP connection; returns the response head and
/// body (read to EOF or to the length the head gives).
async fn exchange(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let head = read_http_head(&mut tcp).await;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body).await.unwrap();
    (
        status,
        head.to_ascii_lowercase(),
        String::from_utf8(body).unwrap(),
    )
}

fn upgrade_request(method: &str, headers: &[(&str, &str)]) -> String {
    let mut r = format!("{method} /ws HTTP/1.1\r\nHost: localhost\r\n");
    for (name, value) in headers {
        r.push_str(&format!("{name}: {value}\r\n"));
    }
    r.push_str("\r\n");
    r
}

const UPGRADE: (&str, &str) = ("Upgrade", "websocket");
const CONNECTION: (&str, &str) = ("Connection", "Upgrade");
const VERSION: (&str, &str) = ("Sec-WebSocket-Version", "13");
const KEY: (&str, &str) = ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");

#[tokio::test]
async fn bad_upgrade_requests_get_a_status_a_body_and_a_counted_cause_on_every_way_in() {
    use HandshakeFailure as F;
    let cases: [(&str, String, u16, F); 5] = [
        (
            "POST",
            upgrade_request("POST", &[UPGRADE, CONNECTION, VERSION, KEY]),
            400,
            F::Protocol,
        ),
        (
            "missing key",
            upgrade_request("GET", &[UPGRADE, CONNECTION, VERSION]),
            400,
            F::Protocol,
        ),
        (
            "wrong version",
            upgrade_request(
                "GET",
                &[UPGRADE, CONNECTION, ("Sec-WebSocket-Version", "8"), KEY],
            ),
            426,
            F::UnsupportedVersion,
        ),
        (
            "plain HTTP",
            upgrade_request("GET", &[]),
            426,
            F::NotWebSocket,
        ),
        (
            "no Connection: upgrade",
            upgrade_request("GET", &[UPGRADE, VERSION, KEY]),
            400,
            F::Protocol,
        ),
    ];
    for &way in WAYS {
        let (sup, events) = supervisor(Config::default());
        let addr = listen(way, &sup).await;
        for (name, request, status, cause) in &cases {
            let before = sup.handshake_failures(*cause);
            let (got, head, body) = exchange(addr, request).await;
            #[cfg(feature = "axum")]
            if way == Way::Axum && *name == "POST" {
                // axum's router answers a POST to a `get` route itself, by
                // its own convention, before the extractor runs.
                assert_eq!(got, 405, "{head}");
                assert_eq!(sup.handshake_failures(*cause), before);
                continue;
            }
            assert_eq!(got, *status, "{way:?} {name}: {head}{body}");
            assert!(
                head.contains("content-type: text/plain"),
                "{way:?} {name}: {head}"
            );
            assert!(
                !body.trim().is_empty(),
                "{way:?} {name}: a body that says why"
            );
            if *status == 426 {
                assert!(
                    head.contains("sec-websocket-version: 13\r\n"),
                    "{way:?} {name}: {head}"
                );
                assert!(
                    head.contains("upgrade: websocket\r\n"),
                    "{way:?} {name}: {head}"
                );
            }
            assert_eq!(sup.handshake_failures(*cause), before + 1, "{way:?} {name}");
        }
        // Nothing was admitted, no hook ran, and a good request still works.
        assert_eq!(sup.accepted_total(), 0, "{way:?}");
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(upgrade_request("GET", &[UPGRADE, CONNECTION, VERSION, KEY]).as_bytes())
            .await
            .unwrap();
        let head = read_http_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{way:?}: {head}");
        drop(tcp);
        events.wait_for(1).await;
        assert_eq!(events.len(), 1);
    }
}

#[tokio::test]
async fn at_capacity_and_shutting_down_get_503_before_upgrading_on_every_way_in() {
    for &way in WAYS {
        let (sup, _events) = supervisor(Config::builder().max_connections(1).build().unwrap());
        let addr = listen(way, &sup).await;
        let request = upgrade_request("GET", &[UPGRADE, CONNECTION, VERSION, KEY]);
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(request.as_bytes()).await.unwrap();
        assert!(read_http_head(&mut first).await.starts_with("HTTP/1.1 101"));
        let (status, _, body) = exchange(addr, &request).await;
        assert_eq!(status, 503, "{way:?}");
        assert!(body.contains("capacity"), "{way:?}: {body}");
        assert_eq!(
            sup.handshake_failures(HandshakeFailure::AtCapacity),
            1,
            "{way:?}"
        );

        let shutdown = tokio::spawn({
            let sup = sup.clone();
            async move { sup.shutdown(SEC).await }
        });
        // Bounded wait for shutdown to start.
        for _ in 0..1000 {
            if sup.is_shutting_down() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let (status, _, body) = exchange(addr, &request).await;
        assert_eq!(status, 503, "{way:?}");
        assert!(body.contains("shutting down"), "{way:?}: {body}");
        assert_eq!(
            sup.handshake_failures(HandshakeFailure::ShuttingDown),
            1,
            "{way:?}"
        );
        drop(first);
        shutdown.await.unwrap();
    }
}

#[tokio::test]
async fn the_origin_allow_list_refuses_other_sites_with_403_on_every_way_in() {
    let config = Config::builder()
        .allowed_origins(["http://chat.example"])
        .build()
        .unwrap();
    for &way in WAYS {
        let (sup, _events) = supervisor(config.clone());
        let addr = listen(way, &sup).await;
        let evil = upgrade_request(
            "GET",
            &[
                UPGRADE,
                CONNECTION,
                VERSION,
                KEY,
                ("Origin", "http://evil.example"),
            ],
        );
        let (status, _, body) = exchange(addr, &evil).await;
        assert_eq!(status, 403, "{way:?}");
        assert!(body.contains("Origin"), "{way:?}: {body}");
        assert_eq!(
            sup.handshake_failures(HandshakeFailure::Origin),
            1,
            "{way:?}"
        );

        for allowed in [
            upgrade_request(
                "GET",
                &[
                    UPGRADE,
                    CONNECTION,
                    VERSION,
                    KEY,
                    ("Origin", "http://Chat.Example"),
                ],
            ),
            // No Origin at all: not a browser.
            upgrade_request("GET", &[UPGRADE, CONNECTION, VERSION, KEY]),
        ] {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(allowed.as_bytes()).await.unwrap();
            let head = read_http_head(&mut tcp).await;
            assert!(head.starts_with("HTTP/1.1 101"), "{way:?}: {head}");
        }
        assert_eq!(
            sup.handshake_failures(HandshakeFailure::Origin),
            1,
            "{way:?}"
        );
    }
}

/// The per-IP cap counts handshakes in flight from the first byte, so it is
/// tested on `accept`, where a handshake can be held open; the upgrade paths
/// share the same admission code (`Inner::enter_handshake`).
#[tokio::test(start_paused = true)]
async fn the_per_ip_handshake_cap_refuses_the_next_one_with_429() {
    let config = Config::builder().max_handshakes_per_ip(2).build().unwrap();
    let (sup, _events) = supervisor(config);
    let slow: SocketAddr = "198.51.100.1:1000".parse().unwrap();
    let other: SocketAddr = "198.51.100.2:1000".parse().unwrap();
    // Two handshakes from one address that have sent nothing yet.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (server, client) = tokio::io::duplex(PIPE);
        let sup = sup.clone();
        held.push((
            client,
            tokio::spawn(async move { sup.accept(server).peer_addr(slow).await }),
        ));
    }
    sleep(MS).await;
    // The third from that address is refused with 429; another address is not.
    let (server, client) = tokio::io::duplex(PIPE);
    let (third, peer) = tokio::join!(
        sup.accept(server).peer_addr(slow).into_future(),
        RawPeer::handshake_or_refused(client)
    );
    assert_eq!(
        third.unwrap_err().handshake_failure(),
        Some(HandshakeFailure::PeerLimit)
    );
    assert!(peer.is_none());
    let (server, client) = tokio::io::duplex(PIPE);
    let (fourth, _peer) = tokio::join!(
        sup.accept(server).peer_addr(other).into_future(),
        RawPeer::handshake(client)
    );
    assert!(fourth.is_ok());
    // Once one of the held handshakes ends, the address may start another.
    let (client, task) = held.pop().unwrap();
    drop(client);
    assert!(task.await.unwrap().is_err());
    let (server, client) = tokio::io::duplex(PIPE);
    let (fifth, _peer) = tokio::join!(
        sup.accept(server).peer_addr(slow).into_future(),
        RawPeer::handshake(client)
    );
    assert!(fifth.is_ok());
    assert_eq!(sup.handshake_failures(HandshakeFailure::PeerLimit), 1);
}

#[tokio::test(start_paused = true)]
async fn bytes_sent_right_behind_the_request_are_not_lost() {
    // A client may pipeline its first frame with the upgrade request.
    let (sup, _events) = supervisor(Config::default());
    let (server, mut client) = tokio::io::duplex(PIPE);
    let mut bytes = upgrade_request("GET", &[UPGRADE, CONNECTION, VERSION, KEY]).into_bytes();
    bytes.extend(encode(true, OP_TEXT, b"early", true));
    client.write_all(&bytes).await.unwrap();
    let mut conn = sup.accept(server).await.unwrap();
    assert_eq!(conn.recv().await, Some("early".into()));
}

/// Pins a bug (issue "No dead peer outlives its bound", item 5): a
/// handshake that completed (101 sent) just as shutdown began was refused
/// by dropping the socket, and the peer saw 1006 instead of Close 1001.
#[tokio::test(start_paused = true)]
async fn a_handshake_completed_as_shutdown_begins_is_told_with_close_1001() {
    completed_as_shutdown_begins(Config::default(), 1001).await;
}

/// In a drain, the shutdown's own code (here 1012), as every connection
/// that was already open gets.
#[tokio::test(start_paused = true)]
async fn a_handshake_completed_as_a_drain_begins_is_told_with_the_drain_code() {
    let config = Config::builder()
        .drain_window(SEC)
        .drain_close_code(1012)
        .build()
        .unwrap();
    completed_as_shutdown_begins(config, 1012).await;
}

async fn completed_as_shutdown_begins(config: Config, code: u16) {
    let (sup, events) = supervisor(config);
    // A pipe too small for the 101 response: the handshake waits on the
    // client, which reads only once shutdown has begun.
    let (server, client) = tokio::io::duplex(64);
    let accepting = tokio::spawn({
        let sup = sup.clone();
        async move { sup.accept(server).await }
    });
    let (mut reader, mut writer) = tokio::io::split(client);
    let request = upgrade_request("GET", &[UPGRADE, CONNECTION, VERSION, KEY]);
    writer.write_all(request.as_bytes()).await.unwrap();
    sleep(MS).await;
    let shutdown = tokio::spawn({
        let sup = sup.clone();
        async move { sup.shutdown(SEC).await }
    });
    sleep(MS).await;
    assert!(sup.is_shutting_down());
    let head = read_http_head(&mut reader).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let err = accepting.await.unwrap().unwrap_err();
    assert_eq!(
        err.handshake_failure(),
        Some(HandshakeFailure::ShuttingDown)
    );
    let frame = read_frame(&mut reader)
        .await
        .expect("a Close, not a bare EOF");
    assert_eq!((frame.opcode, frame.close_code()), (OP_CLOSE, Some(code)));
    shutdown.await.unwrap();
    assert_eq!(events.len(), 0, "never a connection: no hook");
    assert_eq!(sup.handshake_failures(HandshakeFailure::ShuttingDown), 1);
}
