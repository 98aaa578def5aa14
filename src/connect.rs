//! The client side: supervised connections to `ws://` and `wss://` URLs. See [`Connect`].

use std::fmt;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
#[cfg(feature = "rustls")]
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::UrlError;
use tokio_tungstenite::tungstenite::handshake::client::Request;

use crate::client::policy::retry_after;
use crate::config::Config;
use crate::connection::{ConnInfo, Connection, Role};
use crate::driver::Probe;
use crate::error::{Error, HandshakeFailure, Refusal};
use crate::state::Slot;
use crate::supervisor::Supervisor;
use crate::transport::ReadLayer;

impl Supervisor {
    /// Opens a supervised client connection to a `ws://` or `wss://` URL (or
    /// a full request, for custom headers). The TCP connect, the TLS
    /// handshake (`wss://`) and the HTTP upgrade all happen within the
    /// handshake timeout; the heartbeat is the same as on the server side.
    ///
    /// Returns a [`Connect`] to refine before awaiting it: with the `rustls`
    /// feature, `Connect::tls_config` sets the TLS client configuration (a
    /// private CA, client certificates). `wss://` without the `rustls`
    /// feature fails with [`HandshakeFailure::Protocol`].
    ///
    /// The port defaults to 80 for `ws://` and 443 for `wss://`.
    ///
    /// # Errors
    /// See [`Connect`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ws_supervisor::{CloseCode, CloseReason, Config, Supervisor};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let addr = listener.local_addr()?;
    /// # let server = tokio::spawn(async move {
    /// #     use futures::{SinkExt, StreamExt};
    /// #     let (tcp, _) = listener.accept().await.unwrap();
    /// #     let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    /// #     while let Some(Ok(m)) = ws.next().await {
    /// #         if m.is_text() { ws.send(m).await.unwrap(); }
    /// #     }
    /// # });
    /// let supervisor = Supervisor::new(Config::default());
    /// let mut conn = supervisor.connect(format!("ws://{addr}/chat")).await?;
    /// conn.send("hello").await?;
    /// assert_eq!(conn.recv().await, Some("hello".into()));
    /// conn.close(CloseCode::Normal, "bye").await?;
    /// assert_eq!(conn.closed().await.reason, CloseReason::Normal);
    /// # server.await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn connect<R>(&self, request: R) -> Connect<'_>
    where
        R: IntoClientRequest,
    {
        Connect {
            supervisor: self,
            request: request.into_client_request(),
            #[cfg(feature = "rustls")]
            tls: None,
        }
    }
}

// ===== impl Connect =====

/// A client handshake to refine, then await: see [`Supervisor::connect`].
///
/// Awaiting it yields the supervised [`Connection`].
///
/// # Errors
/// A handshake error ([`Error::handshake_failure`]), with no hook call:
///
/// * `Timeout`: the TCP connect, TLS handshake and HTTP upgrade together
///   took longer than the handshake timeout.
/// * `Dns`: the host name could not be resolved.
/// * `ConnectionRefused`: the host refused the TCP connection.
/// * `Tls`: the TLS handshake failed — an untrusted, expired or mismatched
///   certificate, or a TLS alert from the server. The
///   [`source`](std::error::Error::source) is a
///   [`tungstenite::Error::Io`](crate::tungstenite::Error::Io); for a
///   certificate or TLS protocol problem that `io::Error`'s
///   [`get_ref`](std::io::Error::get_ref) is the `rustls::Error`.
/// * `HttpStatus`: the server answered with a status other than 101;
///   [`Error::http_status`] gives it and [`Error::retry_after`] its
///   `Retry-After`, if any.
/// * `Io`: any other transport failure (unreachable, reset, EOF).
/// * `Protocol`: not a `ws://` or `wss://` URL, `wss://` without the
///   `rustls` feature (the source is
///   [`UrlError::TlsFeatureNotEnabled`](crate::tungstenite::error::UrlError::TlsFeatureNotEnabled)),
///   a host that is not a valid TLS server name, or the server spoke
///   invalid HTTP or WebSocket.
/// * `AtCapacity` or `ShuttingDown`: nothing was sent.
///
/// # Cancel safety
/// Cancel safe: dropping it before completion drops the socket (and the TLS
/// session) and releases its connection slot; no hook runs.
#[must_use = "futures do nothing unless awaited"]
pub struct Connect<'a> {
    supervisor: &'a Supervisor,
    /// The request, or why the argument could not make one (reported as a
    /// `Protocol` failure when awaited, like every other handshake error).
    request: Result<Request, WsError>,
    /// The TLS configuration for `wss://`; the shared default when `None`.
    #[cfg(feature = "rustls")]
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Connect<'_> {
    /// Uses `config` for the TLS handshake of a `wss://` URL instead of the
    /// default (Mozilla's root certificates from `webpki-roots`, TLS 1.2 and
    /// 1.3, no client certificate). Ignored for `ws://`.
    ///
    /// Build it with [`rustls::ClientConfig::builder_with_provider`] and the
    /// ring provider, as below: `ClientConfig::builder()` needs a process
    /// default provider installed first. The SNI name and the name the
    /// certificate is checked against is the URL's host (an IP address is
    /// checked against the certificate's IP addresses). Set no ALPN protocol
    /// other than `http/1.1`: the upgrade is HTTP/1.1.
    ///
    /// # Examples
    ///
    /// Trusting a private CA (here the self-signed certificate of a test
    /// server):
    ///
    /// ```
    /// use std::sync::Arc;
    /// use ws_supervisor::rustls::{ClientConfig, RootCertStore, crypto::ring};
    /// use ws_supervisor::{Config, Supervisor};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    /// # let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    /// # let ca_certificate = key.cert.der().clone();
    /// # let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
    /// #     .with_safe_default_protocol_versions()?
    /// #     .with_no_client_auth()
    /// #     .with_single_cert(
    /// #         vec![ca_certificate.clone()],
    /// #         PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der())),
    /// #     )?;
    /// # let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let port = listener.local_addr()?.port();
    /// # let server = tokio::spawn(async move {
    /// #     use futures::StreamExt;
    /// #     let (tcp, _) = listener.accept().await.unwrap();
    /// #     let tls = acceptor.accept(tcp).await.unwrap();
    /// #     let mut ws = tokio_tungstenite::accept_async(tls).await.unwrap();
    /// #     while let Some(Ok(_)) = ws.next().await {}
    /// # });
    /// let mut roots = RootCertStore::empty();
    /// roots.add(ca_certificate)?;
    /// let tls = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
    ///     .with_safe_default_protocol_versions()?
    ///     .with_root_certificates(roots)
    ///     .with_no_client_auth();
    ///
    /// let supervisor = Supervisor::new(Config::default());
    /// let conn = supervisor
    ///     .connect(format!("wss://localhost:{port}/chat"))
    ///     .tls_config(Arc::new(tls))
    ///     .await?;
    /// # conn.close(ws_supervisor::CloseCode::Normal, "").await?;
    /// # conn.closed().await;
    /// # server.await?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

impl<'a> IntoFuture for Connect<'a> {
    type Output = Result<Connection, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let supervisor = self.supervisor;
            let inner = supervisor.state();
            let slot = supervisor
                .reserve()
                .map_err(|cause| inner.fail_handshake(cause, None))?;
            let (request, target) = match self.request.and_then(|r| Ok((Target::of(&r)?, r))) {
                Ok((target, request)) => (request, target),
                Err(e) => {
                    return Err(inner.fail_handshake(HandshakeFailure::Protocol, Some(e.into())));
                }
            };
            let config = inner.config();
            // One future per scheme, each generic over its stream, so `ws://`
            // stays a plain TCP stream with no per-read TLS-or-not branch.
            match target.scheme {
                Scheme::Ws => {
                    let handshake = async {
                        let (tcp, peer_addr) = target.open().await?;
                        upgrade(config, request, tcp, peer_addr).await
                    };
                    establish(supervisor, slot, handshake).await
                }
                #[cfg(feature = "rustls")]
                Scheme::Wss => {
                    let tls = self.tls.unwrap_or_else(crate::tls::default_client_config);
                    let handshake = async {
                        let name = crate::tls::server_name(&target.host)
                            .map_err(|e| Failed(HandshakeFailure::Protocol, WsError::Io(e)))?;
                        let (tcp, peer_addr) = target.open().await?;
                        let stream = crate::tls::connect(tls, name, tcp)
                            .await
                            .map_err(|e| Failed(HandshakeFailure::Tls, WsError::Io(e)))?;
                        upgrade(config, request, stream, peer_addr).await
                    };
                    establish(supervisor, slot, handshake).await
                }
            }
        })
    }
}

impl fmt::Debug for Connect<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Connect");
        match &self.request {
            Ok(request) => d.field("uri", request.uri()),
            Err(e) => d.field("invalid", e),
        };
        #[cfg(feature = "rustls")]
        d.field("tls_config", &self.tls.is_some());
        d.finish_non_exhaustive()
    }
}

/// What an opening handshake produced, before it is supervised.
type Upgraded<S> = (WebSocketStream<S>, Option<SocketAddr>, ConnInfo);

/// A failed step of a client handshake: the cause it is counted as, and the
/// error behind it.
#[derive(Debug)]
struct Failed(HandshakeFailure, WsError);

/// Runs `handshake` within the handshake timeout, then supervises the
/// connection it opened in `slot`.
async fn establish<S>(
    supervisor: &Supervisor,
    slot: Slot,
    handshake: impl Future<Output = Result<Upgraded<ReadLayer<S>>, Failed>>,
) -> Result<Connection, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let inner = supervisor.state();
    match tokio::time::timeout(inner.config().handshake_timeout(), handshake).await {
        Err(_) => Err(inner.fail_handshake(HandshakeFailure::Timeout, None)),
        Ok(Err(Failed(HandshakeFailure::HttpStatus, WsError::Http(response)))) => {
            let refusal = Refusal {
                status: response.status().as_u16(),
                retry_after: response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after(v, std::time::SystemTime::now())),
            };
            Err(inner.refuse_upgrade(refusal, WsError::Http(response)))
        }
        Ok(Err(Failed(cause, e))) => Err(inner.fail_handshake(cause, Some(e.into()))),
        Ok(Ok((ws, peer_addr, info))) => {
            supervisor.register(ws, peer_addr, slot, info, Probe::read_layer())
        }
    }
}

/// The HTTP upgrade over `io` (TCP or TLS), under the same lean read layer
/// and WebSocket settings as every other way in.
async fn upgrade<S>(
    config: &Config,
    request: Request,
    io: S,
    peer_addr: Option<SocketAddr>,
) -> Result<Upgraded<ReadLayer<S>>, Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stream = ReadLayer::for_client(io, config.read_buffer_size());
    let path = request.uri().path().into();
    let (ws, response) = tokio_tungstenite::client_async_with_config(
        request,
        stream,
        Some(config.websocket_config()),
    )
    .await
    .map_err(|e| Failed(failure(&e), e))?;
    let protocol = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(Box::from);
    let info = ConnInfo {
        role: Role::Client,
        path: Some(path),
        protocol,
    };
    Ok((ws, peer_addr, info))
}

/// The handshake failure an error of the HTTP upgrade is counted as.
fn failure(e: &WsError) -> HandshakeFailure {
    match e {
        WsError::Http(_) => HandshakeFailure::HttpStatus,
        WsError::Io(_) => HandshakeFailure::Io,
        _ => HandshakeFailure::Protocol,
    }
}

// ===== impl Target =====

/// Where a request goes.
#[derive(Debug)]
pub(crate) struct Target {
    scheme: Scheme,
    /// Without IPv6 brackets: `::1`, not `[::1]`.
    host: String,
    port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Ws,
    #[cfg(feature = "rustls")]
    Wss,
}

impl Target {
    pub(crate) fn of(request: &Request) -> Result<Self, WsError> {
        let uri = request.uri();
        let (scheme, default_port) = match uri.scheme_str() {
            Some("ws") => (Scheme::Ws, 80),
            #[cfg(feature = "rustls")]
            Some("wss") => (Scheme::Wss, 443),
            #[cfg(not(feature = "rustls"))]
            Some("wss") => return Err(WsError::Url(UrlError::TlsFeatureNotEnabled)),
            _ => return Err(WsError::Url(UrlError::UnsupportedUrlScheme)),
        };
        let host = uri.host().ok_or(WsError::Url(UrlError::NoHostName))?;
        // `[::1]` in a URI is `::1` to the resolver and to rustls.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(WsError::Url(UrlError::EmptyHostName));
        }
        Ok(Self {
            scheme,
            host: host.to_owned(),
            port: uri.port_u16().unwrap_or(default_port),
        })
    }

    /// Resolves and connects, trying each address in turn; `TCP_NODELAY`,
    /// as pings must not wait. A resolution failure is `Dns`; a refusal by
    /// the last address tried is `ConnectionRefused`; any other error `Io`.
    async fn open(&self) -> Result<(TcpStream, Option<SocketAddr>), Failed> {
        let io = |cause, e| Failed(cause, WsError::Io(e));
        let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| io(HandshakeFailure::Dns, e))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    tcp.set_nodelay(true)
                        .map_err(|e| io(HandshakeFailure::Io, e))?;
                    return Ok((tcp, Some(addr)));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                io(HandshakeFailure::ConnectionRefused, e)
            }
            Some(e) => io(HandshakeFailure::Io, e),
            None => io(
                HandshakeFailure::Dns,
                std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address"),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<Target, WsError> {
        Target::of(&url.into_client_request().unwrap())
    }

    #[test]
    fn default_ports_and_bracketless_hosts() {
        let t = target("ws://example.com/x").unwrap();
        assert_eq!(
            (t.scheme, t.host.as_str(), t.port),
            (Scheme::Ws, "example.com", 80)
        );
        let t = target("ws://[::1]:9001/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9001));
    }

    #[cfg(feature = "rustls")]
    #[test]
    fn wss_defaults_to_443() {
        let t = target("wss://example.com/x").unwrap();
        assert_eq!((t.scheme, t.port), (Scheme::Wss, 443));
        let t = target("wss://127.0.0.1:8443/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8443));
    }

    /// The default build: `wss://` fails before any socket is opened (the
    /// port below is never dialled), as a counted `Protocol` failure whose
    /// source says why.
    #[cfg(not(feature = "rustls"))]
    #[tokio::test]
    async fn wss_without_the_feature_is_a_protocol_failure_that_says_so() {
        use crate::Config;

        let supervisor = Supervisor::new(Config::default());
        let err = supervisor
            .connect("wss://127.0.0.1:9/")
            .await
            .expect_err("no TLS without the rustls feature");
        assert_eq!(err.handshake_failure(), Some(HandshakeFailure::Protocol));
        let source = std::error::Error::source(&err).expect("a source");
        assert!(
            matches!(
                source.downcast_ref::<WsError>(),
                Some(WsError::Url(UrlError::TlsFeatureNotEnabled))
            ),
            "{source:?}"
        );
        assert_eq!(supervisor.handshake_failures(HandshakeFailure::Protocol), 1);
        assert!(supervisor.is_empty());
    }

    #[test]
    fn other_schemes_are_refused() {
        assert!(matches!(
            target("http://example.com/"),
            Err(WsError::Url(UrlError::UnsupportedUrlScheme))
        ));
    }
}
