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

use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use support::*;
use tokio::net::TcpListener;
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

/// Drops every packet to or from local TCP port `port`, both ways, until
/// the returned guard is dropped.
fn blackhole(port: u16) -> RulesGuard {
    let rules = format!(
        "table inet blackhole{port} {{ chain input {{ type filter hook input priority 0; \
         tcp sport {port} drop; tcp dport {port} drop; }}; }}"
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
    RulesGuard(port)
}

/// Removes the rules when the test ends, failed or not.
struct RulesGuard(u16);

impl Drop for RulesGuard {
    fn drop(&mut self) {
        let table = format!("blackhole{}", self.0);
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &table])
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
    let client_port = client.get_ref().get_ref().local_addr().unwrap().port();
    // The client answers pings as long as it is polled.
    let client_task = tokio::spawn(async move {
        let mut client = client;
        while let Some(Ok(_)) = client.next().await {}
    });
    timeout(Duration::from_secs(10), async {
        while conn.stats().pongs_received < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("healthy before the blackhole");

    let _rules = blackhole(client_port);
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
    let _rules = blackhole(ports[0]);
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
