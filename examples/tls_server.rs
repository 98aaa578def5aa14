//! A supervised `wss://` echo server: tokio-rustls terminates TLS and the
//! supervisor accepts the TLS stream like any other. One line is printed per
//! closed connection, in the demo's format.
//!
//! ```text
//! cargo run --example tls_server --features rustls
//! cargo run --example tls_server --features rustls -- --listen 127.0.0.1:9443 --cert cert.pem --key key.pem
//! ```
//!
//! Flags (the demo's, plus the certificate):
//!
//! * `--listen ADDR` — where to serve `wss://` (default `127.0.0.1:9443`);
//! * `--ping-interval-ms N` — ping interval (default 1000);
//! * `--pong-timeout-ms N` — pong timeout (default 1000);
//! * `--cert PEM --key PEM` — the certificate chain and its private key, as
//!   PEM files. Without them a self-signed certificate for `localhost` and
//!   `127.0.0.1` is made at start: clients must skip verification (e.g.
//!   Python `websockets` with `ssl.CERT_NONE`) or trust it.
//!
//! It prints a line containing `listening` once it accepts connections.
//! Ctrl-C shuts down gracefully and prints the summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use ws_supervisor::Supervisor;
use ws_supervisor::rustls::ServerConfig;
use ws_supervisor::rustls::crypto::ring;
use ws_supervisor::rustls::pki_types::pem::PemObject;
use ws_supervisor::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

mod common;

use common::{ServeFlags, print_event};

/// The server's command line.
#[derive(Debug)]
struct Args {
    serve: ServeFlags,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

const USAGE: &str = "usage: tls_server [--listen ADDR] [--ping-interval-ms N] [--pong-timeout-ms N] [--cert PEM --key PEM]";

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut cert, mut key) = (None, None);
    let serve = ServeFlags::new("127.0.0.1:9443").parse(args, USAGE, |flag, value| {
        match flag {
            "--cert" => cert = Some(PathBuf::from(value()?)),
            "--key" => key = Some(PathBuf::from(value()?)),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if cert.is_some() != key.is_some() {
        return Err(format!("--cert and --key go together\n{USAGE}"));
    }
    Ok(Args { serve, cert, key })
}

/// The certificate chain and key: from the PEM files, or self-signed now.
fn certificate(
    args: &Args,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("--cert {}: {e}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("--key {}: {e}", key.display()))?;
        return Ok((chain, key));
    }
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
    println!("self-signed certificate for localhost and 127.0.0.1 (--cert/--key to use your own)");
    let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    Ok((vec![made.cert.der().clone()], key.into()))
}

/// The TLS side of the server: the ring provider, as the crate's client
/// uses (`ServerConfig::builder()` would need a process default provider).
fn acceptor(args: &Args) -> Result<TlsAcceptor, String> {
    let (chain, key) = certificate(args)?;
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match common::args_or_exit(parse_args) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let config = match args.serve.config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let acceptor = match acceptor(&args) {
        Ok(acceptor) => acceptor,
        Err(e) => {
            eprintln!("cannot set up TLS: {e}");
            return ExitCode::from(2);
        }
    };
    let supervisor = Supervisor::builder(config)
        .on_close(print_event)
        .metric_label("supervisor", "tls_server")
        .build();
    let listener = match args.serve.bind().await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let addr = listener.local_addr().expect("bound");
    println!(
        "listening on wss://{addr}/ (ping every {:?}, pong timeout {:?}); Ctrl-C to stop",
        args.serve.ping_interval, args.serve.pong_timeout
    );

    tokio::spawn(serve(listener, acceptor, supervisor.clone()));

    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("cannot wait for Ctrl-C: {e}");
    }
    println!("shutting down ({} live connections)", supervisor.len());
    let summary = supervisor.shutdown(Duration::from_secs(5)).await;
    println!("shutdown: {summary}");
    ExitCode::SUCCESS
}

/// Accepts TCP, terminates TLS, hands the TLS stream to the supervisor and
/// echoes every text and binary message.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor, supervisor: Supervisor) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            eprintln!("{peer}: cannot set TCP_NODELAY: {e}");
        }
        let (acceptor, supervisor) = (acceptor.clone(), supervisor.clone());
        tokio::spawn(async move {
            // The supervisor's handshake timeout starts at the HTTP upgrade;
            // the TLS handshake before it gets the same bound here, or a
            // client that connects and says nothing holds this task forever.
            let timeout = supervisor.config().handshake_timeout();
            // Boxed: awaited inline, tokio-rustls's handshake future (a whole
            // TLS stream) would set this task's size for the connection's
            // life, 0.5 KiB more per connection (docs/benchmarks.md).
            let handshake = Box::pin(acceptor.accept(tcp));
            let tls = match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    eprintln!("tls handshake from {peer} failed: {e}");
                    return;
                }
                Err(_) => {
                    eprintln!("tls handshake from {peer} timed out");
                    return;
                }
            };
            let mut conn = match supervisor.accept(tls).peer_addr(peer).await {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("handshake from {peer} failed: {e}");
                    return;
                }
            };
            while let Some(message) = conn.recv().await {
                if conn.send(message).await.is_err() {
                    break;
                }
            }
        });
    }
}
