//! The ways in a supervised server connection is made (`accept`, the hyper
//! upgrade, the axum extractor), to run one test over each.

use std::net::SocketAddr;

use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use ws_supervisor::{Connection, Supervisor};

use super::{PIPE, RawPeer};

/// How the supervised server got its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Accept,
    #[cfg(feature = "hyper")]
    Hyper,
    #[cfg(feature = "axum")]
    Axum,
}

pub const WAYS: &[Way] = &[
    Way::Accept,
    #[cfg(feature = "hyper")]
    Way::Hyper,
    #[cfg(feature = "axum")]
    Way::Axum,
];

/// The subprotocol every server of these tests speaks.
pub const PROTOCOL: &str = "echo.v1";

/// Serves one connection on `io` the given way; supervised connections
/// arrive on `conns`.
pub fn serve<T>(
    way: Way,
    sup: &Supervisor,
    io: T,
    peer: SocketAddr,
    conns: mpsc::UnboundedSender<Connection>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let sup = sup.clone();
    match way {
        Way::Accept => {
            tokio::spawn(async move {
                if let Ok(conn) = sup.accept(io).peer_addr(peer).protocols([PROTOCOL]).await {
                    let _ = conns.send(conn);
                }
            });
        }
        #[cfg(feature = "hyper")]
        Way::Hyper => {
            let service = hyper::service::service_fn(move |mut req| {
                let conns = conns.clone();
                let response: hyper::Response<String> = sup
                    .upgrade(&mut req)
                    .peer_addr(peer)
                    .protocols([PROTOCOL])
                    .on_upgrade(move |conn| async move {
                        let _ = conns.send(conn);
                    });
                std::future::ready(Ok::<_, std::convert::Infallible>(response))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                    .with_upgrades(),
            );
        }
        #[cfg(feature = "axum")]
        Way::Axum => {
            use axum::extract::{FromRef, State};
            use axum::routing::get;
            #[derive(Clone, FromRef)]
            struct AppState {
                supervisor: Supervisor,
                conns: mpsc::UnboundedSender<Connection>,
            }
            async fn handler(
                State(conns): State<mpsc::UnboundedSender<Connection>>,
                ws: ws_supervisor::axum::WebSocketUpgrade,
            ) -> axum::response::Response {
                ws.protocols([PROTOCOL]).on_upgrade(move |conn| async move {
                    let _ = conns.send(conn);
                })
            }
            let app = axum::Router::new()
                .route("/", get(handler))
                .route("/ws", get(handler))
                .with_state(AppState {
                    supervisor: sup,
                    conns,
                })
                .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
            let service = hyper_util::service::TowerToHyperService::new(app);
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                    .with_upgrades(),
            );
        }
    }
}

pub const PEER: &str = "192.0.2.7:40000";

/// A supervised connection made `way`, and its raw peer.
pub async fn open(way: Way, sup: &Supervisor) -> (Connection, RawPeer<DuplexStream>) {
    let (server, client) = tokio::io::duplex(PIPE);
    let (tx, mut rx) = mpsc::unbounded_channel();
    serve(way, sup, server, PEER.parse().unwrap(), tx);
    let peer = RawPeer::handshake(client).await;
    let conn = rx.recv().await.expect("a supervised connection");
    (conn, peer)
}
