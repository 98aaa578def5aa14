//! Real network faults on the real kernel stack. These need root, nftables
//! and a private network namespace, so they are ignored by `cargo test` and
//! run by .ci/run as:
//!
//! ```text
//! unshare -n sh -c 'ip link set lo up && exec cargo test --offline --test netfaults -- --ignored'
//! ```
//!
//! Each test first checks that it is in a namespace with only a loopback
//! link, so its firewall rules can never touch the host; the rules vanish
//! with the namespace, even when a test fails.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use support::*;
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::{Instant, timeout};
use ws_supervisor::{CloseReason, Initiator, Supervisor};

/// Panics (never skips) unless this is a private namespace with only `lo`
/// and the tools are there.
fn require_private_namespace() {
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("`ip` missing: install iproute2");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        links.lines().count() == 1 && links.contains(": lo:"),
        "not in a private network namespace (links: {links}); run under \
         `unshare -n sh -c 'ip link set lo up && exec cargo test --offline --test netfaults -- --ignored'`"
    );
    let nft = Command::new("nft").arg("--version").output();
    assert!(
        nft.is_ok_and(|o| o.status.success()),
        "`nft` missing: apt-get install nftables (needs root)"
    );
}

/// Drops every packet of the one TCP connection between local ports
/// `client` and `server`, both ways, until the returned guard is dropped.
///
/// The rule names both ports: Linux gives the same ephemeral port to
/// connections to different servers, so a rule on the client's port alone
/// also cuts whatever else in the namespace (another test running beside
/// this one) got that port (`a_blackhole_cuts_one_connection_not_a_port`).
fn blackhole(client: u16, server: u16) -> RulesGuard {
    let table = format!("blackhole_{client}_{server}");
    let rules = format!(
        "table inet {table} {{ chain input {{ type filter hook input priority 0; \
         tcp sport {client} tcp dport {server} drop; tcp sport {server} tcp dport {client} drop; }}; }}"
    );
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    use std::io::Write;
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft refused the rules");
    RulesGuard(table)
}

/// Removes the rules when the test ends, failed or not.
struct RulesGuard(String);

impl Drop for RulesGuard {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

#[tokio::test]
#[ignore = "needs root, nftables and a private network namespace: see the file header"]
async fn blackholed_peer_is_declared_timeout_within_the_bound() {
    require_private_namespace();
    let interval = Duration::from_millis(300);
    let pong_timeout = Duration::from_millis(300);
    let config = heartbeat(interval, pong_timeout).build().unwrap();
    let (sup, events) = supervisor(config);
    let (conn, client) = accept_over_tcp(&sup).await;
    let tcp = client.get_ref().get_ref();
    let ports = (
        tcp.local_addr().unwrap().port(),
        tcp.peer_addr().unwrap().port(),
    );
    // The client answers pings as long as it is polled.
    let client_task = tokio::spawn(async move {
        let mut client = client;
        while let Some(Ok(_)) = client.next().await {}
    });
    wait_until("healthy before the blackhole", || {
        conn.stats().pongs_received >= 2
    })
    .await;

    let _rules = blackhole(ports.0, ports.1);
    let cut = Instant::now();
    let event = timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("detected");
    let after_cut = cut.elapsed();

    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Timeout, Initiator::Local)
    );
    // Last inbound frame was at most one interval before the cut; the bound
    // counts from it: interval + jitter + one ping slot + timeout, plus slack.
    let bound =
        interval + interval / 10 + interval / 64 + pong_timeout + Duration::from_millis(100);
    assert!(
        after_cut <= bound,
        "detected {after_cut:?} after the cut, bound {bound:?}"
    );
    assert!(event.stats.since_last_inbound >= pong_timeout);
    assert_eq!(events.len(), 1);
    client_task.abort();
}

#[tokio::test]
#[ignore = "needs root, nftables and a private network namespace: see the file header"]
async fn healthy_peers_are_untouched_while_one_is_blackholed() {
    require_private_namespace();
    let interval = Duration::from_millis(200);
    let config = heartbeat(interval, Duration::from_millis(400))
        .build()
        .unwrap();
    let (sup, events): (Supervisor, _) = supervisor(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = {
        let sup = sup.clone();
        tokio::spawn(async move {
            let mut conns = Vec::new();
            for _ in 0..200 {
                let (tcp, _) = listener.accept().await.unwrap();
                conns.push(sup.accept_tcp(tcp).await.unwrap());
            }
            conns
        })
    };
    let mut ports = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..200 {
        let (client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .unwrap();
        ports.push(client.get_ref().get_ref().local_addr().unwrap().port());
        clients.push(tokio::spawn(async move {
            let mut client = client;
            while let Some(Ok(_)) = client.next().await {}
        }));
    }
    let conns = acceptor.await.unwrap();
    let _rules = blackhole(ports[0], addr.port());
    tokio::time::sleep(interval * 10).await;
    let all = events.all();
    assert_eq!(all.len(), 1, "only the blackholed peer closed: {all:#?}");
    assert_eq!(all[0].reason, CloseReason::Timeout);
    for conn in &conns[1..] {
        assert!(conn.close_event().is_none());
        // Cadence held: at least 8 of the 10 intervals produced a ping.
        assert!(conn.stats().pings_sent >= 8, "{:?}", conn.stats());
    }
    for c in clients {
        c.abort();
    }
}

/// Two connections whose clients share one local port (Linux does this with
/// ephemeral ports too, for connections to different servers): cutting one
/// leaves the other alone. With a rule on the client's port alone both
/// die. That rule once failed `healthy_peers_are_untouched_while_one_is_blackholed`
/// in CI: `blackholed_peer_is_declared_timeout_within_the_bound`, running
/// beside it, cut a port the kernel had also given to one of its 200
/// healthy clients.
#[tokio::test]
#[ignore = "needs root, nftables and a private network namespace: see the file header"]
async fn a_blackhole_cuts_one_connection_not_a_port() {
    require_private_namespace();
    let config = heartbeat(Duration::from_millis(200), Duration::from_millis(400))
        .build()
        .unwrap();
    let (sup, events) = supervisor(config);
    let mut shared_port = 0;
    let mut pairs = Vec::new();
    for _ in 0..2 {
        let (conn, client) = accept_over_tcp_from(&sup, |addr| async move {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            socket
                .bind(SocketAddr::from(([127, 0, 0, 1], shared_port)))
                .unwrap();
            let tcp = socket.connect(addr).await.unwrap();
            let ports = (
                tcp.local_addr().unwrap().port(),
                tcp.peer_addr().unwrap().port(),
            );
            let (client, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp)
                .await
                .unwrap();
            (client, ports)
        })
        .await;
        let (client, ports) = client;
        shared_port = ports.0;
        let task = tokio::spawn(async move {
            let mut client = client;
            while let Some(Ok(_)) = client.next().await {}
        });
        pairs.push((conn, ports, task));
    }
    let (cut, kept) = (&pairs[0], &pairs[1]);
    assert_eq!(cut.1.0, kept.1.0, "both clients on one local port");
    assert_ne!(cut.1.1, kept.1.1, "to two servers");
    wait_until("both healthy before the blackhole", || {
        pairs
            .iter()
            .all(|(conn, ..)| conn.stats().pongs_received > 0)
    })
    .await;

    let _rules = blackhole(cut.1.0, cut.1.1);
    let event = timeout(Duration::from_secs(10), cut.0.closed())
        .await
        .expect("the cut connection is detected");
    assert_eq!(event.reason, CloseReason::Timeout);
    // The other one's pongs still come, past the moment the cut one died.
    let pongs = kept.0.stats().pongs_received;
    wait_until("pongs go on on the connection that was not cut", || {
        kept.0.stats().pongs_received >= pongs + 2
    })
    .await;
    assert!(kept.0.close_event().is_none());
    assert_eq!(events.len(), 1);
    for (.., task) in pairs {
        task.abort();
    }
}
