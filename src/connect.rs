//! The client side: supervised connections to `ws://` and `wss://` URLs. See [`Connect`].

use std::fmt;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::UrlError;
use tokio_tungstenite::tungstenite::handshake::client::Request;

use crate::config::Config;
use crate::connection::{ConnInfo, Connection, Role};
use crate::error::{Error, HandshakeFailure};
use crate::supervisor::{Slot, Supervisor};
use crate::transport::Transport;

impl Supervisor {
    /// Opens a supervised client connection to a `ws://` URL (or a full
    /// request, for custom headers). The TCP connect and the HTTP upgrade
    /// happen within the handshake timeout; the heartbeat is the same as on
    /// the server side.
    ///
    /// Returns a [`Connect`] to await. `wss://` is not supported yet: it
    /// fails with [`HandshakeFailure::Protocol`].
    ///
    /// The port defaults to 80.
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
        }
    }
}

// ===== impl Connect =====

/// A client handshake to await: see [`Supervisor::connect`].
///
/// Awaiting it yields the supervised [`Connection`].
///
/// # Errors
/// A handshake error ([`Error::handshake_failure`]), with no hook call:
///
/// * `Timeout`: the TCP connect and HTTP upgrade together took longer than
///   the handshake timeout.
/// * `Io`: the host could not be resolved or connected to.
/// * `Protocol`: not a `ws://` or `wss://` URL, `wss://` (the source is
///   [`UrlError::TlsFeatureNotEnabled`](crate::tungstenite::error::UrlError::TlsFeatureNotEnabled)),
///   or the server refused the upgrade or spoke invalid HTTP.
/// * `AtCapacity` or `ShuttingDown`: nothing was sent.
///
/// # Cancel safety
/// Cancel safe: dropping it before completion drops the socket and releases
/// its connection slot; no hook runs.
#[must_use = "futures do nothing unless awaited"]
pub struct Connect<'a> {
    supervisor: &'a Supervisor,
    /// The request, or why the argument could not make one (reported as a
    /// `Protocol` failure when awaited, like every other handshake error).
    request: Result<Request, WsError>,
}

impl<'a> IntoFuture for Connect<'a> {
    type Output = Result<Connection, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let supervisor = self.supervisor;
            let inner = &supervisor.inner;
            let slot = supervisor
                .reserve()
                .map_err(|cause| inner.fail_handshake(cause, None))?;
            let (request, target) = match self.request.and_then(|r| Ok((Target::of(&r)?, r))) {
                Ok((target, request)) => (request, target),
                Err(e) => return Err(inner.fail_handshake(failure(&e), Some(e))),
            };
            let config = &inner.config;
            match target.scheme {
                Scheme::Ws => {
                    let handshake = async {
                        let (tcp, peer_addr) = target.open().await?;
                        upgrade(config, request, tcp, peer_addr).await
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
        d.finish_non_exhaustive()
    }
}

/// What an opening handshake produced, before it is supervised.
type Upgraded<S> = (WebSocketStream<S>, Option<SocketAddr>, ConnInfo);

/// Runs `handshake` within the handshake timeout, then supervises the
/// connection it opened in `slot`.
async fn establish<S>(
    supervisor: &Supervisor,
    slot: Slot,
    handshake: impl Future<Output = Result<Upgraded<S>, WsError>>,
) -> Result<Connection, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let inner = &supervisor.inner;
    match tokio::time::timeout(inner.config.handshake_timeout(), handshake).await {
        Err(_) => Err(inner.fail_handshake(HandshakeFailure::Timeout, None)),
        Ok(Err(e)) => Err(inner.fail_handshake(failure(&e), Some(e))),
        Ok(Ok((ws, peer_addr, info))) => supervisor.register(ws, peer_addr, slot, info),
    }
}

/// The HTTP upgrade over `io` (TCP or TLS), under the same lean read layer
/// and WebSocket settings as every other way in.
async fn upgrade<S>(
    config: &Config,
    request: Request,
    io: S,
    peer_addr: Option<SocketAddr>,
) -> Result<Upgraded<Transport<S>>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stream = Transport::new(io, config.read_buffer_size());
    let path = request.uri().path().into();
    let (ws, response) = tokio_tungstenite::client_async_with_config(
        request,
        stream,
        Some(config.websocket_config()),
    )
    .await?;
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

/// The handshake failure a client-side error is counted as.
fn failure(e: &WsError) -> HandshakeFailure {
    match e {
        // Connect refused, resolution failed, TLS failed (see `Connect`).
        WsError::Io(_) => HandshakeFailure::Io,
        _ => HandshakeFailure::Protocol,
    }
}

// ===== impl Target =====

/// Where a request goes.
#[derive(Debug)]
struct Target {
    scheme: Scheme,
    /// Without IPv6 brackets: `::1`, not `[::1]`.
    host: String,
    port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Ws,
}

impl Target {
    fn of(request: &Request) -> Result<Self, WsError> {
        let uri = request.uri();
        let (scheme, default_port) = match uri.scheme_str() {
            Some("ws") => (Scheme::Ws, 80),
            Some("wss") => return Err(WsError::Url(UrlError::TlsFeatureNotEnabled)),
            _ => return Err(WsError::Url(UrlError::UnsupportedUrlScheme)),
        };
        let host = uri.host().ok_or(WsError::Url(UrlError::NoHostName))?;
        // `[::1]` in a URI is `::1` to the resolver.
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

    /// Resolves and connects; `TCP_NODELAY`, as pings must not wait.
    async fn open(&self) -> std::io::Result<(TcpStream, Option<SocketAddr>)> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let peer_addr = tcp.peer_addr().ok();
        Ok((tcp, peer_addr))
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

    /// `wss://` fails before any socket is opened (the port below is never
    /// dialled), as a counted `Protocol` failure whose source says why.
    #[tokio::test]
    async fn wss_without_the_feature_is_a_protocol_failure_that_says_so() {
        use crate::Config;

        let supervisor = Supervisor::new(Config::default());
        let err = supervisor
            .connect("wss://127.0.0.1:9/")
            .await
            .expect_err("no TLS yet");
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
