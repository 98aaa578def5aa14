//! `wss://` over real TLS on 127.0.0.1:0: a certificate made at test time
//! (rcgen), terminated by tokio-rustls, with a supervisor on both sides.
//! Real time, short. Timeouts here are safety bounds against hangs, never
//! assertions about speed.
#![cfg(feature = "rustls")]

mod support;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use ws_supervisor::rustls::crypto::{CryptoProvider, ring};
use ws_supervisor::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use ws_supervisor::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use ws_supervisor::tungstenite::handshake::server::{Request, Response};
use ws_supervisor::tungstenite::{self, Message};
use ws_supervisor::{
    CloseCode, CloseReason, Config, Error, HandshakeFailure, Initiator, Supervisor,
};

const BOUND: Duration = Duration::from_secs(20);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A self-signed certificate for `names` and its key, made now.
fn self_signed(names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let made = rcgen::generate_simple_self_signed(names).unwrap();
    let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    (made.cert.der().clone(), key.into())
}

/// A client configuration that trusts exactly `roots`.
fn trusting(roots: &[&CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    Arc::new(config)
}

/// What the server side saw of one TLS connection, before the upgrade.
#[derive(Debug)]
struct Seen {
    /// The SNI the client sent (`None` for an IP address).
    sni: Option<String>,
    path: String,
    host: Option<String>,
}

/// A TLS listener on 127.0.0.1:0 whose connections `server` accepts and
/// echoes. Reports each TLS handshake failure, and each upgrade's SNI, path
/// and Host header.
struct TlsServer {
    addr: SocketAddr,
    tls_failures: mpsc::UnboundedReceiver<io::Error>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

async fn tls_echo_server(
    server: Supervisor,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> TlsServer {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (fail_tx, tls_failures) = mpsc::unbounded_channel();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let (server, acceptor) = (server.clone(), acceptor.clone());
            let (fail_tx, seen_tx) = (fail_tx.clone(), seen_tx.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = fail_tx.send(e);
                        return;
                    }
                };
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                let request = Arc::new(Mutex::new(None));
                let record = request.clone();
                // The signature is tungstenite's `Callback`, whose error
                // type is a whole HTTP response.
                #[allow(clippy::result_large_err)]
                let callback = move |req: &Request, res: Response| {
                    let host = req.headers().get("host").and_then(|h| h.to_str().ok());
                    *record.lock().unwrap() =
                        Some((req.uri().path().to_owned(), host.map(str::to_owned)));
                    Ok(res)
                };
                let Ok(mut conn) = server
                    .accept(tls)
                    .peer_addr(peer)
                    .on_request(callback)
                    .await
                else {
                    return;
                };
                let (path, host) = request.lock().unwrap().take().unwrap_or_default();
                let _ = seen_tx.send(Seen { sni, path, host });
                while let Some(message) = conn.recv().await {
                    if conn.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    TlsServer {
        addr,
        tls_failures,
        seen,
    }
}

/// The `rustls::Error` under a failed `connect`, if that is what failed.
fn tls_error(err: &Error) -> Option<&rustls::Error> {
    let source = std::error::Error::source(err)?;
    match source.downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
}

#[tokio::test]
async fn wss_echo_and_normal_close_between_two_supervisors() {
    let (cert, key) = self_signed(&["localhost", "127.0.0.1"]);
    let (server, server_events) = supervisor(Config::default());
    let mut tls_server = tls_echo_server(server.clone(), cert.clone(), key).await;
    let port = tls_server.addr.port();
    let (client, client_events) = supervisor(Config::default());

    let mut conn = timeout(
        BOUND,
        client
            .connect(format!("wss://localhost:{port}/echo"))
            .tls_config(trusting(&[&cert])),
    )
    .await
    .unwrap()
    .expect("the handshake succeeds with the certificate trusted");
    // Whichever address `localhost` resolves to first, the connection made
    // is the one to the listener on 127.0.0.1.
    assert_eq!(conn.peer_addr(), Some(tls_server.addr));

    conn.send("hello over tls").await.unwrap();
    assert_eq!(
        timeout(BOUND, conn.recv()).await.unwrap(),
        Some(Message::text("hello over tls"))
    );
    let seen = timeout(BOUND, tls_server.seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen.sni.as_deref(),
        Some("localhost"),
        "SNI is the URL host"
    );
    assert_eq!(seen.path, "/echo");
    assert_eq!(seen.host, Some(format!("localhost:{port}")));

    conn.close(CloseCode::Normal, "done").await.unwrap();
    let event = timeout(BOUND, conn.closed()).await.unwrap();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::Normal, Initiator::Local)
    );
    assert_eq!(event.code_sent, Some(CloseCode::Normal));
    assert_eq!(event.code_received, Some(CloseCode::Normal));
    server_events.wait_for(1).await;

    // Both sides drained: every driver has finished, so no late second
    // hook call can still arrive.
    assert_eq!(client.shutdown(BOUND).await.total(), 0);
    assert_eq!(server.shutdown(BOUND).await.total(), 0);
    let client_event = client_events.only();
    assert_eq!(
        (client_event.reason, client_event.initiator),
        (CloseReason::Normal, Initiator::Local)
    );
    let server_event = server_events.only();
    assert_eq!(
        (server_event.reason, server_event.initiator),
        (CloseReason::Normal, Initiator::Remote)
    );
    assert_eq!(server_event.code_received, Some(CloseCode::Normal));
    assert_eq!(server_event.text, "done");
    assert!(tls_server.tls_failures.try_recv().is_err());
}

#[tokio::test]
async fn an_ip_address_url_is_checked_against_the_certificate_ip() {
    let (cert, key) = self_signed(&["localhost", "127.0.0.1"]);
    let (server, _server_events) = supervisor(Config::default());
    let mut tls_server = tls_echo_server(server, cert.clone(), key).await;
    let (client, client_events) = supervisor(Config::default());
    let conn = timeout(
        BOUND,
        client
            .connect(format!("wss://{}/ip", tls_server.addr))
            .tls_config(trusting(&[&cert])),
    )
    .await
    .unwrap()
    .expect("the certificate names 127.0.0.1");
    let seen = timeout(BOUND, tls_server.seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.sni, None, "no SNI is sent for an IP address");
    assert_eq!(seen.path, "/ip");
    conn.close(CloseCode::Normal, "").await.unwrap();
    assert_eq!(
        timeout(BOUND, conn.closed()).await.unwrap().reason,
        CloseReason::Normal
    );
    client.shutdown(BOUND).await;
    assert_eq!(client_events.len(), 1);
}

/// Connects to `url` with `tls` (the default configuration if `None`),
/// expects the certificate to be refused, and checks that nothing was
/// supervised on either side.
async fn expect_refused_certificate(
    tls_server: &mut TlsServer,
    server: &Supervisor,
    url: String,
    tls: Option<Arc<ClientConfig>>,
) -> rustls::Error {
    let (client, client_events) = supervisor(Config::default());
    let connect = client.connect(url);
    let connect = match tls {
        Some(tls) => connect.tls_config(tls),
        None => connect,
    };
    let err = timeout(BOUND, connect)
        .await
        .unwrap()
        .expect_err("the certificate is not trusted");
    assert_eq!(
        err.handshake_failure(),
        Some(HandshakeFailure::Tls),
        "{err:?}"
    );
    assert_eq!(client.handshake_failures(HandshakeFailure::Tls), 1);
    let cause = tls_error(&err)
        .unwrap_or_else(|| panic!("a rustls error under {err:?}"))
        .clone();
    // The client aborted the TLS handshake with an alert: the server's
    // supervisor never saw an upgrade.
    let server_side = timeout(BOUND, tls_server.tls_failures.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        server_side.kind(),
        io::ErrorKind::InvalidData,
        "{server_side}"
    );
    assert_eq!(server.accepted_total(), 0);
    assert!(client.is_empty());
    assert_eq!(client.shutdown(BOUND).await.total(), 0);
    assert_eq!(client_events.len(), 0, "no hook for a failed handshake");
    cause
}

#[tokio::test]
async fn an_untrusted_certificate_fails_the_handshake_without_a_hook() {
    let (cert, key) = self_signed(&["localhost", "127.0.0.1"]);
    let (server, server_events) = supervisor(Config::default());
    let mut tls_server = tls_echo_server(server.clone(), cert, key).await;
    let port = tls_server.addr.port();

    // The default configuration trusts Mozilla's roots, not this certificate.
    let url = format!("wss://localhost:{port}/");
    let cause = expect_refused_certificate(&mut tls_server, &server, url, None).await;
    assert_eq!(
        cause,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    );

    // A configuration that trusts some other certificate. rcgen gives every
    // self-signed certificate the same subject, so webpki finds this root as
    // the issuer and then rejects the signature (another key signed it).
    let (other, _) = self_signed(&["localhost"]);
    let url = format!("wss://localhost:{port}/");
    let tls = Some(trusting(&[&other]));
    let cause = expect_refused_certificate(&mut tls_server, &server, url, tls).await;
    assert_eq!(
        cause,
        rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
    );
    assert_eq!(server_events.len(), 0);
}

#[tokio::test]
async fn a_trusted_certificate_for_another_name_fails_the_handshake() {
    // Trusted, but it names only `localhost`, and the URL says 127.0.0.1.
    let (cert, key) = self_signed(&["localhost"]);
    let (server, _server_events) = supervisor(Config::default());
    let mut tls_server = tls_echo_server(server.clone(), cert.clone(), key).await;
    let url = format!("wss://{}/", tls_server.addr);
    let tls = Some(trusting(&[&cert]));
    let cause = expect_refused_certificate(&mut tls_server, &server, url, tls).await;
    assert!(
        matches!(
            cause,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{cause:?}"
    );
}

#[tokio::test]
async fn heartbeats_flow_both_ways_over_tls() {
    let (cert, key) = self_signed(&["localhost", "127.0.0.1"]);
    let fast = || {
        heartbeat(Duration::from_millis(50), Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let (server, server_events) = supervisor(fast());
    let tls_server = tls_echo_server(server.clone(), cert.clone(), key).await;
    let port = tls_server.addr.port();
    let (client, client_events) = supervisor(fast());
    let conn = timeout(
        BOUND,
        client
            .connect(format!("wss://localhost:{port}/"))
            .tls_config(trusting(&[&cert])),
    )
    .await
    .unwrap()
    .unwrap();

    wait_until("the client's pings got three pongs", || {
        conn.stats().pongs_received >= 3
    })
    .await;
    let stats = conn.stats();
    assert!(stats.pings_sent >= stats.pongs_received);
    assert!(stats.last_rtt.is_some());

    let summary = client.shutdown(BOUND).await;
    assert_eq!(summary.count(CloseReason::GoingAway), 1);
    assert_eq!(summary.forced(), 0);
    server_events.wait_for(1).await;
    assert_eq!(server.shutdown(BOUND).await.total(), 0);

    let event = client_events.only();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::GoingAway, Initiator::Local)
    );
    assert!(event.stats.pongs_received >= 3);
    let event = server_events.only();
    assert_eq!(
        (event.reason, event.initiator),
        (CloseReason::GoingAway, Initiator::Remote)
    );
    assert!(
        event.stats.pongs_received >= 1,
        "the server's pings were answered over TLS too: {event:?}"
    );
}
