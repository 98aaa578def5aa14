//! WebSocket upgrades of hyper 1.x requests. See [`Supervisor::upgrade`].

use std::fmt;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::http::request::Parts;
use tokio_tungstenite::tungstenite::http::{
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
};
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

use crate::connection::{ConnInfo, Connection, Role};
use crate::driver::Probe;
use crate::error::{Error, HandshakeFailure};
use crate::handshake::{self, Checked, Refusal};
use crate::state::{PeerGuard, Slot};
use crate::supervisor::Supervisor;
use crate::transport::ReadLayer;

impl Supervisor {
    /// Starts the WebSocket upgrade of a hyper 1.x request: validates it,
    /// then [`respond`](HttpUpgrade::respond) or
    /// [`on_upgrade`](HttpUpgrade::on_upgrade) gives the response to return
    /// from the service (101, or the refusal). Once hyper has sent the 101,
    /// the connection is built with this supervisor's
    /// [`websocket_config`](crate::Config::websocket_config) and
    /// [`ReadLayer`](crate::ReadLayer), exactly as [`accept`](Self::accept)
    /// builds it.
    ///
    /// The request is validated as `accept` validates it (see the table of
    /// [`Accept`](crate::Accept)), and refusals are counted by cause. Only
    /// HTTP/1.1 upgrades are supported: HTTP/2's extended CONNECT (RFC 8441)
    /// is refused with 400. The hyper server must serve connections with
    /// `.with_upgrades()`.
    ///
    /// # Examples
    ///
    /// ```
    /// use http_body_util::Full;
    /// use hyper::body::{Bytes, Incoming};
    /// use hyper::{Request, Response};
    /// use ws_supervisor::Supervisor;
    ///
    /// async fn handle(
    ///     supervisor: Supervisor,
    ///     mut request: Request<Incoming>,
    /// ) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    ///     Ok(supervisor.upgrade(&mut request).on_upgrade(|mut conn| async move {
    ///         while let Some(message) = conn.recv().await {
    ///             if conn.send(message).await.is_err() {
    ///                 break;
    ///             }
    ///         }
    ///     }))
    /// }
    /// # fn main() { let _ = handle; }
    /// ```
    pub fn upgrade<B>(&self, request: &mut Request<B>) -> HttpUpgrade {
        let on_upgrade = request.extensions_mut().remove::<OnUpgrade>();
        let (method, version) = (request.method(), request.version());
        self.upgrade_from(
            method,
            version,
            request.headers(),
            request.uri(),
            on_upgrade,
        )
    }

    /// [`upgrade`](Self::upgrade) for a request already split into parts
    /// (an axum extractor's view).
    pub(crate) fn upgrade_parts(&self, parts: &mut Parts) -> HttpUpgrade {
        let on_upgrade = parts.extensions.remove::<OnUpgrade>();
        self.upgrade_from(
            &parts.method,
            parts.version,
            &parts.headers,
            &parts.uri,
            on_upgrade,
        )
    }

    /// Validates a request head, with hyper's upgrade handle taken from it.
    fn upgrade_from(
        &self,
        method: &Method,
        version: Version,
        headers: &HeaderMap,
        uri: &Uri,
        on_upgrade: Option<OnUpgrade>,
    ) -> HttpUpgrade {
        HttpUpgrade {
            supervisor: self.clone(),
            checked: handshake::check(method, version, headers, self.config()),
            on_upgrade,
            path: uri.path().into(),
            peer_addr: None,
            protocols: Vec::new(),
        }
    }
}

/// A validated (or refused) WebSocket upgrade of an HTTP request, to refine
/// and then turn into a response: see [`Supervisor::upgrade`].
#[must_use = "an upgrade does nothing until `respond` or `on_upgrade` is called"]
pub struct HttpUpgrade {
    supervisor: Supervisor,
    checked: Result<Checked, Refusal>,
    on_upgrade: Option<OnUpgrade>,
    path: Box<str>,
    peer_addr: Option<SocketAddr>,
    protocols: Vec<Box<str>>,
}

impl HttpUpgrade {
    /// Records the peer's address (reported in stats and events, and the key
    /// of [`max_handshakes_per_ip`](crate::ConfigBuilder::max_handshakes_per_ip)).
    pub fn peer_addr(mut self, addr: SocketAddr) -> Self {
        self.peer_addr = Some(addr);
        self
    }

    /// The subprotocols this server speaks, most preferred first: the first
    /// one the client also offered is agreed (see
    /// [`Connection::protocol`]); if none is, the connection opens with no
    /// subprotocol.
    pub fn protocols<I, T>(mut self, protocols: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.protocols = handshake::protocol_list(protocols);
        self
    }

    /// Whether the request is a valid upgrade (admission is decided later,
    /// by [`respond`](Self::respond)).
    pub fn is_valid(&self) -> bool {
        self.checked.is_ok()
    }

    /// Admits the connection (the connection limit, the per-IP handshake
    /// cap, shutdown) and returns the 101 response with the [`Upgrading`]
    /// future that yields the [`Connection`] once hyper has switched
    /// protocols; or the refusal, already counted, whose
    /// [`into_response`](UpgradeRejection::into_response) is the answer to
    /// send.
    ///
    /// `R` is the service's response body: `String`, `Full<Bytes>`, axum's
    /// `Body`…
    ///
    /// # Errors
    /// An [`UpgradeRejection`] for an invalid request (400 or 426), a
    /// disallowed `Origin` (403), the per-IP cap (429), a full or stopping
    /// supervisor (503).
    pub fn respond<R>(self) -> Result<(Response<R>, Upgrading), UpgradeRejection>
    where
        R: Default,
    {
        let inner = self.supervisor.state().clone();
        let refuse = |refusal: Refusal| {
            inner.fail_handshake(refusal.cause, None);
            UpgradeRejection { refusal }
        };
        let checked = self.checked.map_err(refuse)?;
        let Some(on_upgrade) = self.on_upgrade else {
            return Err(refuse(Refusal {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: "this server cannot upgrade connections (serve hyper connections with .with_upgrades())",
                ..Refusal::of(HandshakeFailure::Protocol)
            }));
        };
        let peer_guard = inner
            .enter_handshake(self.peer_addr)
            .map_err(|cause| refuse(Refusal::of(cause)))?;
        let slot = self
            .supervisor
            .reserve()
            .map_err(|cause| refuse(Refusal::of(cause)))?;
        let protocol = checked.select_protocol(&self.protocols);
        let response = checked.response(protocol.as_deref());
        let upgrading = Upgrading {
            supervisor: self.supervisor,
            on_upgrade,
            deadline: Instant::now() + inner.config().handshake_timeout(),
            peer_addr: self.peer_addr,
            slot,
            peer_guard,
            info: ConnInfo {
                role: Role::Server,
                path: Some(self.path),
                protocol,
            },
        };
        Ok((response, upgrading))
    }

    /// Like [`respond`](Self::respond), and runs `callback` with the
    /// [`Connection`] once the upgrade completes, in a task the supervisor
    /// tracks: [`shutdown`](Supervisor::shutdown) waits for it (it should
    /// return once [`Connection::recv`] yields `None`). Returns the response
    /// to send, 101 or the refusal. An upgrade that fails after the 101 is
    /// counted as a handshake failure and `callback` does not run.
    pub fn on_upgrade<R, F, Fut>(self, callback: F) -> Response<R>
    where
        R: Default + From<String>,
        F: FnOnce(Connection) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tracker = self.supervisor.state().tracker().clone();
        match self.respond() {
            Ok((response, upgrading)) => {
                // Boxed now, so the task keeps a pointer for the
                // connection's whole life instead of the 144 B `Upgrading`.
                let upgrading = upgrading.into_future();
                tracker.spawn(async move {
                    if let Ok(conn) = upgrading.await {
                        callback(conn).await;
                    }
                });
                response
            }
            Err(rejection) => rejection.into_response(),
        }
    }
}

impl fmt::Debug for HttpUpgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpUpgrade")
            .field("valid", &self.checked.is_ok())
            .field("path", &self.path)
            .field("peer_addr", &self.peer_addr)
            .field("protocols", &self.protocols)
            .finish_non_exhaustive()
    }
}

/// Yields the supervised [`Connection`] once hyper has sent the 101 and
/// handed over the connection: see [`HttpUpgrade::respond`].
///
/// # Errors
/// [`HandshakeFailure::Timeout`] if the upgrade does not complete within the
/// handshake timeout, [`HandshakeFailure::Io`] if hyper fails it (the client
/// went away), [`HandshakeFailure::ShuttingDown`] if shutdown began
/// meanwhile. No hook runs for any of these.
///
/// # Cancel safety
/// Cancel safe: dropping it releases the connection's slot; no hook runs.
#[must_use = "futures do nothing unless awaited"]
pub struct Upgrading {
    supervisor: Supervisor,
    on_upgrade: OnUpgrade,
    deadline: Instant,
    peer_addr: Option<SocketAddr>,
    slot: Slot,
    /// Held until the upgrade completes.
    peer_guard: Option<PeerGuard>,
    info: ConnInfo,
}

impl IntoFuture for Upgrading {
    type Output = Result<Connection, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let Self {
                supervisor,
                on_upgrade,
                deadline,
                peer_addr,
                slot,
                peer_guard,
                info,
            } = self;
            let inner = supervisor.state();
            let upgraded = match timeout_at(deadline, on_upgrade).await {
                Err(_) => return Err(inner.fail_handshake(HandshakeFailure::Timeout, None)),
                Ok(Err(e)) => {
                    return Err(inner.fail_handshake(HandshakeFailure::Io, Some(e.into())));
                }
                Ok(Ok(upgraded)) => upgraded,
            };
            drop(peer_guard);
            let config = supervisor.config();
            let io = ReadLayer::new(TokioIo::new(upgraded), config);
            let ws = WebSocketStream::from_raw_socket(
                io,
                WsRole::Server,
                Some(config.websocket_config()),
            )
            .await;
            supervisor.register(ws, peer_addr, slot, info, Probe::read_layer())
        })
    }
}

impl fmt::Debug for Upgrading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upgrading")
            .field("peer_addr", &self.peer_addr)
            .field("path", &self.info.path)
            .field("protocol", &self.info.protocol)
            .finish_non_exhaustive()
    }
}

/// A refused WebSocket upgrade: the HTTP answer to send, and why.
///
/// Already counted in `ws_supervisor_handshake_failures_total` under
/// [`cause`](Self::cause).
#[derive(Debug, Clone)]
pub struct UpgradeRejection {
    refusal: Refusal,
}

impl UpgradeRejection {
    /// Why the upgrade was refused.
    pub fn cause(&self) -> HandshakeFailure {
        self.refusal.cause
    }

    /// The HTTP status of the answer: 400, 403, 426, 429, 500 or 503.
    pub fn status(&self) -> StatusCode {
        self.refusal.status
    }

    /// The plain-text body of the answer (for people; wording may change).
    pub fn body_text(&self) -> String {
        format!("{}\n", self.refusal.body)
    }

    /// The answer: status, a `text/plain` body, and on 426 the
    /// `Upgrade: websocket` and `Sec-WebSocket-Version: 13` headers.
    pub fn into_response<R: From<String>>(self) -> Response<R> {
        self.refusal.response()
    }
}

impl fmt::Display for UpgradeRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.refusal, f)
    }
}

impl std::error::Error for UpgradeRejection {}
