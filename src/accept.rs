//! The server handshake on a stream the application accepted. See [`Accept`].

use std::fmt;
use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, NoCallback, Request, Response,
};
use tokio_tungstenite::tungstenite::http::header::{
    CONTENT_LENGTH, HeaderName, HeaderValue, SEC_WEBSOCKET_PROTOCOL,
};
use tokio_tungstenite::tungstenite::http::{HeaderMap, Method, StatusCode, Uri, Version};
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

use crate::connection::{ConnInfo, Connection, Role};
use crate::driver::Probe;
use crate::error::{Error, HandshakeFailure};
use crate::handshake::{self, Refusal};
use crate::supervisor::Supervisor;
use crate::transport::ReadLayer;

/// Largest request head (request line and headers) accepted, in bytes:
/// browsers send well under 4 KiB; a larger head is refused with 431.
const MAX_HEAD: usize = 16 * 1024;
/// Most headers in one request head, as tungstenite allows.
const MAX_HEADERS: usize = 124;

/// A server handshake to refine, then await: see [`Supervisor::accept`].
///
/// Awaiting it yields the supervised [`Connection`].
///
/// Bad requests are answered, not just dropped: a plain HTTP request or a
/// wrong `Sec-WebSocket-Version` gets 426, a malformed upgrade 400, a
/// disallowed `Origin` 403, too many handshakes from one address 429, and
/// a full or stopping supervisor 503, each with a one-line text body
/// (`docs/close-reasons.md` has the table).
///
/// # Errors
/// A handshake error ([`Error::handshake_failure`]), with no hook call:
/// `Timeout` (not finished within the handshake timeout), `Refused` (the
/// request callback refused; its response was sent), `AtCapacity` or
/// `ShuttingDown` (503 sent), `PeerLimit` (429), `Origin` (403),
/// `NotWebSocket` or `UnsupportedVersion` (426), `Protocol` (400 or 431)
/// or `Io`.
///
/// # Cancel safety
/// Cancel safe: dropping it before completion drops the stream; no hook runs.
#[must_use = "futures do nothing unless awaited"]
pub struct Accept<'a, S, C> {
    supervisor: &'a Supervisor,
    stream: S,
    peer_addr: Option<SocketAddr>,
    callback: C,
    protocols: Vec<Box<str>>,
}

impl Supervisor {
    /// Performs the server side of the opening handshake on `stream` (TCP,
    /// TLS, Unix, an in-memory duplex…) within the handshake timeout, then
    /// supervises the connection.
    ///
    /// Returns an [`Accept`] to refine before awaiting it:
    /// [`peer_addr`](Accept::peer_addr) records the address,
    /// [`protocols`](Accept::protocols) offers subprotocols and
    /// [`on_request`](Accept::on_request) lets the application inspect the
    /// request (path, headers) and refuse it.
    ///
    /// # Errors
    /// See [`Accept`].
    pub fn accept<S>(&self, stream: S) -> Accept<'_, S, NoCallback>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Accept {
            supervisor: self,
            stream,
            peer_addr: None,
            callback: NoCallback,
            protocols: Vec::new(),
        }
    }

    /// Shorthand for [`accept`](Self::accept) on a TCP stream that records
    /// its peer address.
    ///
    /// # Errors
    /// As [`Accept`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Accept`].
    pub async fn accept_tcp(&self, tcp: TcpStream) -> Result<Connection, Error> {
        match tcp.peer_addr() {
            Ok(addr) => self.accept(tcp).peer_addr(addr).await,
            Err(_) => self.accept(tcp).await,
        }
    }
}

impl<'a, S, C> Accept<'a, S, C> {
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

    /// Lets `callback` inspect the upgrade request and accept it (returning
    /// the response, possibly with headers added) or refuse it (returning an
    /// error response, e.g. 401), which fails the handshake with
    /// [`HandshakeFailure::Refused`]. It runs only for a valid upgrade
    /// request, once the supervisor has admitted it.
    ///
    /// Any `FnOnce(&Request, Response) -> Result<Response, ErrorResponse>`
    /// is a callback.
    pub fn on_request<C2>(self, callback: C2) -> Accept<'a, S, C2>
    where
        C2: Callback + Unpin + Send,
    {
        Accept {
            supervisor: self.supervisor,
            stream: self.stream,
            peer_addr: self.peer_addr,
            callback,
            protocols: self.protocols,
        }
    }
}

impl<'a, S, C> IntoFuture for Accept<'a, S, C>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Callback + Unpin + Send + 'a,
{
    type Output = Result<Connection, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<S, C> Accept<'_, S, C>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Callback + Unpin + Send,
{
    async fn run(self) -> Result<Connection, Error> {
        let Self {
            supervisor,
            mut stream,
            peer_addr,
            callback,
            protocols,
        } = self;
        let inner = supervisor.state();
        let config = supervisor.config();
        let deadline = Instant::now() + config.handshake_timeout();
        // Held from the first byte, so slow handshakes count against the cap.
        let peer_guard = inner.enter_handshake(peer_addr);

        let (request, tail) = match timeout_at(deadline, read_head(&mut stream)).await {
            Err(_) => return Err(inner.fail_handshake(HandshakeFailure::Timeout, None)),
            Ok(Err(Head::Io(e))) => {
                return Err(inner.fail_handshake(HandshakeFailure::Io, Some(e.into())));
            }
            Ok(Err(Head::Malformed(status))) => {
                let refusal = Refusal::of(HandshakeFailure::Protocol);
                let refusal = Refusal { status, ..refusal };
                return Err(refuse(&mut stream, deadline, supervisor, refusal).await);
            }
            Ok(Ok(head)) => head,
        };
        let checked = match handshake::check(
            request.method(),
            request.version(),
            request.headers(),
            config,
        ) {
            Ok(checked) => checked,
            Err(refusal) => return Err(refuse(&mut stream, deadline, supervisor, refusal).await),
        };
        let admitted = peer_guard.and_then(|guard| Ok((guard, supervisor.reserve()?)));
        let (_peer_guard, slot) = match admitted {
            Ok(admitted) => admitted,
            Err(cause) => {
                let refusal = Refusal::of(cause);
                return Err(refuse(&mut stream, deadline, supervisor, refusal).await);
            }
        };
        let protocol = checked.select_protocol(&protocols);
        let response: Response = checked.response(protocol.as_deref());
        let response = match callback.on_request(&request, response) {
            Ok(response) => response,
            Err(refusal) => {
                // The application's own answer, e.g. 401.
                let error = inner.fail_handshake(HandshakeFailure::Refused, None);
                let _ = timeout_at(deadline, write_refusal(&mut stream, &refusal)).await;
                return Err(error);
            }
        };
        let head = encode_head(response.status(), response.headers(), 0);
        match timeout_at(deadline, write_all(&mut stream, &head)).await {
            Err(_) => return Err(inner.fail_handshake(HandshakeFailure::Timeout, None)),
            Ok(Err(e)) => return Err(inner.fail_handshake(HandshakeFailure::Io, Some(e.into()))),
            Ok(Ok(())) => {}
        }
        // The callback may have set the subprotocol itself.
        let protocol = response
            .headers()
            .get(SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .map(Box::from);
        let io = ReadLayer::with_prefix(stream, config.read_buffer_size(), tail);
        let ws =
            WebSocketStream::from_raw_socket(io, WsRole::Server, Some(config.websocket_config()))
                .await;
        let info = ConnInfo {
            role: Role::Server,
            path: Some(request.uri().path().into()),
            protocol,
        };
        supervisor.register(ws, peer_addr, slot, info, Probe::read_layer())
    }
}

impl<S, C> fmt::Debug for Accept<'_, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accept")
            .field("peer_addr", &self.peer_addr)
            .field("protocols", &self.protocols)
            .finish_non_exhaustive()
    }
}

/// Answers `refusal` (best effort, within the handshake deadline), counts
/// it and returns the error.
async fn refuse<S>(stream: &mut S, deadline: Instant, sup: &Supervisor, refusal: Refusal) -> Error
where
    S: AsyncWrite + Unpin,
{
    // Counted before answering, so a client that has read the answer sees
    // the count.
    let error = sup.state().fail_handshake(refusal.cause, None);
    let response: ErrorResponse = refusal.response();
    let _ = timeout_at(deadline, write_refusal(stream, &response)).await;
    error
}

/// Writes a refusal (ours, or the application's `ErrorResponse`): status,
/// headers, body, then ends the stream.
async fn write_refusal<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: &ErrorResponse,
) -> io::Result<()> {
    let body = response.body().as_deref().unwrap_or("");
    let mut bytes = encode_head(response.status(), response.headers(), body.len());
    bytes.extend_from_slice(body.as_bytes());
    write_all(stream, &bytes).await?;
    stream.shutdown().await
}

async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// An HTTP/1.1 response head. `Content-Length` and `Connection: close` are
/// added to every response that is not a 101.
fn encode_head(status: StatusCode, headers: &HeaderMap, body_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut put = |name: &HeaderName, value: &[u8]| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in headers {
        if status != StatusCode::SWITCHING_PROTOCOLS && name == CONTENT_LENGTH {
            continue;
        }
        put(name, value.as_bytes());
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        put(&CONTENT_LENGTH, body_len.to_string().as_bytes());
        put(&HeaderName::from_static("connection"), b"close");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Why a request head could not be read.
enum Head {
    /// The transport failed or ended first.
    Io(io::Error),
    /// Not HTTP, or too large: answer with this status.
    Malformed(StatusCode),
}

impl From<io::Error> for Head {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Reads one HTTP request head; returns it with the bytes that followed it
/// in the same reads (a client may send frames right behind its request).
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Request, Vec<u8>), Head> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let scanned = buf.len().saturating_sub(3);
        if buf.len() >= MAX_HEAD {
            return Err(Head::Malformed(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        buf.reserve(1024.min(MAX_HEAD - buf.len()));
        let room = (MAX_HEAD - buf.len()) as u64;
        let n = (&mut *stream).take(room).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(Head::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        // Parse only once the blank line is in: a client dribbling bytes
        // costs one scan of the new bytes per read, not a parse.
        if let Some(end) = find_blank_line(&buf[scanned..]) {
            let end = scanned + end;
            let request = parse_head(&buf[..end])?;
            return Ok((request, buf.split_off(end)));
        }
    }
}

/// The offset just past the first `\r\n\r\n` in `bytes`.
fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

fn parse_head(head: &[u8]) -> Result<Request, Head> {
    let bad = || Head::Malformed(StatusCode::BAD_REQUEST);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Head::Malformed(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        Ok(httparse::Status::Partial) | Err(_) => return Err(bad()),
    }
    let method =
        Method::from_bytes(parsed.method.ok_or_else(bad)?.as_bytes()).map_err(|_| bad())?;
    let uri: Uri = parsed.path.ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    let map = request.headers_mut();
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad())?;
        map.append(name, value);
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::http::header::CONTENT_TYPE;

    #[test]
    fn a_head_is_parsed_and_the_bytes_behind_it_are_kept() {
        let bytes = b"GET /chat?x=1 HTTP/1.1\r\nHost: a\r\nX-Two: 1\r\nX-Two: 2\r\n\r\n\x81\x00";
        let end = find_blank_line(bytes).unwrap();
        assert_eq!(&bytes[end..], b"\x81\x00");
        let request = parse_head(&bytes[..end]).ok().unwrap();
        assert_eq!(request.uri().path(), "/chat");
        assert_eq!(request.uri().query(), Some("x=1"));
        assert_eq!(request.headers().get_all("x-two").iter().count(), 2);
        assert_eq!(request.version(), Version::HTTP_11);
    }

    #[test]
    fn garbage_is_a_400() {
        for head in [
            &b"HELLO THERE\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert!(matches!(
                parse_head(head),
                Err(Head::Malformed(StatusCode::BAD_REQUEST))
            ));
        }
    }

    #[test]
    fn error_heads_carry_length_and_close() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let head = String::from_utf8(encode_head(StatusCode::UPGRADE_REQUIRED, &h, 12)).unwrap();
        assert!(
            head.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{head}"
        );
        assert!(head.contains("content-length: 12\r\n"));
        assert!(head.contains("connection: close\r\n"));
        assert!(head.ends_with("\r\n\r\n"));
        let head = String::from_utf8(encode_head(StatusCode::SWITCHING_PROTOCOLS, &h, 0)).unwrap();
        assert!(!head.contains("content-length"));
    }
}
