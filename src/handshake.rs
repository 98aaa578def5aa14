//! The server side of the opening handshake as pure functions: validate an
//! upgrade request, pick a subprotocol, and build the 101 response or the
//! HTTP refusal. Every server path (`accept`, hyper, axum) goes through
//! [`check`], so every path answers a bad request the same way.

use std::fmt;

use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::header::{
    CONNECTION, HeaderMap, HeaderName, HeaderValue, ORIGIN, SEC_WEBSOCKET_ACCEPT,
    SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use tokio_tungstenite::tungstenite::http::{Method, Response, StatusCode, Version};

use crate::config::Config;
use crate::error::HandshakeFailure;

/// A server's subprotocols, most preferred first, as stored by every way in.
pub(crate) fn protocol_list<I, T>(protocols: I) -> Vec<Box<str>>
where
    I: IntoIterator<Item = T>,
    T: Into<String>,
{
    protocols
        .into_iter()
        .map(|p| p.into().into_boxed_str())
        .collect()
}

/// A request that passed [`check`]: what the 101 response needs.
#[derive(Debug)]
pub(crate) struct Checked {
    /// `Sec-WebSocket-Accept` for the client's key.
    accept: String,
    /// The client's `Sec-WebSocket-Protocol` list, as sent.
    offered: Option<HeaderValue>,
}

impl Checked {
    /// The first of `ours` (in our order of preference) that the client
    /// offered, compared exactly, as RFC 6455 §4.2.2 asks.
    pub(crate) fn select_protocol(&self, ours: &[Box<str>]) -> Option<Box<str>> {
        let offered = self.offered.as_ref()?.to_str().ok()?;
        ours.iter()
            .find(|p| offered.split(',').any(|o| o.trim() == &***p))
            .cloned()
    }

    /// The 101 response, agreeing on `protocol`.
    pub(crate) fn response<B: Default>(&self, protocol: Option<&str>) -> Response<B> {
        let mut response = Response::new(B::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&self.accept).expect("base64 is a valid header value"),
        );
        if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(p).ok()) {
            headers.insert(SEC_WEBSOCKET_PROTOCOL, p);
        }
        response
    }
}

/// A refused opening handshake: the HTTP answer and the counted cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) cause: HandshakeFailure,
    pub(crate) status: StatusCode,
    /// A short sentence for the person reading the response body.
    pub(crate) body: &'static str,
}

impl Refusal {
    const fn new(cause: HandshakeFailure, status: StatusCode, body: &'static str) -> Self {
        Self {
            cause,
            status,
            body,
        }
    }

    /// The refusal for a cause decided outside [`check`] (capacity, shutdown,
    /// the per-IP cap, a request too large to parse).
    pub(crate) const fn of(cause: HandshakeFailure) -> Self {
        use HandshakeFailure as F;
        match cause {
            F::AtCapacity => Self::new(
                cause,
                StatusCode::SERVICE_UNAVAILABLE,
                "WebSocket server at capacity; try again later",
            ),
            F::ShuttingDown => Self::new(
                cause,
                StatusCode::SERVICE_UNAVAILABLE,
                "WebSocket server shutting down; try again later",
            ),
            F::PeerLimit => Self::new(
                cause,
                StatusCode::TOO_MANY_REQUESTS,
                "too many WebSocket handshakes in flight from your address",
            ),
            F::Origin => Self::new(
                cause,
                StatusCode::FORBIDDEN,
                "Origin not allowed for this WebSocket endpoint",
            ),
            F::NotWebSocket => Self::new(
                cause,
                StatusCode::UPGRADE_REQUIRED,
                "this endpoint speaks WebSocket only (expected Upgrade: websocket)",
            ),
            F::UnsupportedVersion => Self::new(
                cause,
                StatusCode::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version (expected 13)",
            ),
            F::Refused => Self::new(cause, StatusCode::FORBIDDEN, "handshake refused"),
            F::Timeout => Self::new(cause, StatusCode::REQUEST_TIMEOUT, "handshake timed out"),
            // The client-side causes never come up on a server; mapped for
            // completeness.
            F::Protocol | F::Io | F::Dns | F::ConnectionRefused | F::Tls | F::HttpStatus => {
                Self::new(
                    HandshakeFailure::Protocol,
                    StatusCode::BAD_REQUEST,
                    "invalid WebSocket upgrade request",
                )
            }
        }
    }

    /// A malformed request (400) with a specific body.
    const fn bad(body: &'static str) -> Self {
        Self::new(HandshakeFailure::Protocol, StatusCode::BAD_REQUEST, body)
    }

    /// The headers that go with the status: 426 says what to upgrade to.
    pub(crate) fn headers(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
        let upgrade = self.status == StatusCode::UPGRADE_REQUIRED;
        let upgrade_headers = [
            (UPGRADE, HeaderValue::from_static("websocket")),
            (CONNECTION, HeaderValue::from_static("Upgrade")),
            (SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13")),
        ];
        upgrade_headers.into_iter().filter(move |_| upgrade)
    }

    /// The refusal as a response with a plain-text body.
    pub(crate) fn response<B: From<String>>(&self) -> Response<B> {
        let mut response = Response::new(B::from(format!("{}\n", self.body)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        for (name, value) in self.headers() {
            headers.insert(name, value);
        }
        response
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.body, self.status)
    }
}

/// Validates an upgrade request (RFC 6455 §4.2.1), in this order:
///
/// | what is wrong | status | cause |
/// |---|---|---|
/// | method is not `GET` | 400 | `protocol` |
/// | HTTP version below 1.1 (or HTTP/2: RFC 8441 is not supported) | 400 | `protocol` |
/// | no `Upgrade: websocket` (a plain HTTP request) | 426 | `not_websocket` |
/// | no `Connection: upgrade` | 400 | `protocol` |
/// | `Sec-WebSocket-Version` missing or not 13 | 426 | `unsupported_version` |
/// | `Sec-WebSocket-Key` missing or not 16 bytes of base64 | 400 | `protocol` |
/// | `Origin` not in [`Config::allowed_origins`] | 403 | `origin` |
pub(crate) fn check(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    config: &Config,
) -> Result<Checked, Refusal> {
    if method != Method::GET {
        return Err(Refusal::bad("a WebSocket upgrade must be a GET request"));
    }
    if version != Version::HTTP_11 {
        return Err(Refusal::bad("a WebSocket upgrade needs HTTP/1.1"));
    }
    if !has_token(headers, &UPGRADE, "websocket") {
        return Err(Refusal::of(HandshakeFailure::NotWebSocket));
    }
    if !has_token(headers, &CONNECTION, "upgrade") {
        return Err(Refusal::bad("expected Connection: Upgrade"));
    }
    if headers
        .get(SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(Refusal::of(HandshakeFailure::UnsupportedVersion));
    }
    let key = match headers.get(SEC_WEBSOCKET_KEY) {
        Some(key) if is_key(key.as_bytes()) => key,
        _ => return Err(Refusal::bad("missing or malformed Sec-WebSocket-Key")),
    };
    if let Some(allowed) = config.allowed_origins() {
        if let Some(origin) = headers.get(ORIGIN) {
            let ok = origin
                .to_str()
                .is_ok_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o.trim())));
            if !ok {
                return Err(Refusal::of(HandshakeFailure::Origin));
            }
        }
    }
    Ok(Checked {
        accept: derive_accept_key(key.as_bytes()),
        offered: headers.get(SEC_WEBSOCKET_PROTOCOL).cloned(),
    })
}

/// Whether any `name` header holds `token` in its comma-separated list
/// (case-insensitive, as RFC 7230 tokens are).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Whether `key` is the base64 of 16 bytes: 22 symbols then `==`.
fn is_key(key: &[u8]) -> bool {
    let key = key.trim_ascii();
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.com"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        h.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_static(KEY));
        h
    }

    fn run(
        method: Method,
        version: Version,
        h: &HeaderMap,
        c: &Config,
    ) -> Result<Checked, Refusal> {
        check(&method, version, h, c)
    }

    fn refused(h: &HeaderMap) -> (HandshakeFailure, u16) {
        let r = run(Method::GET, Version::HTTP_11, h, &Config::default()).unwrap_err();
        (r.cause, r.status.as_u16())
    }

    #[test]
    fn a_valid_request_gets_the_rfc_accept_key() {
        let ok = run(
            Method::GET,
            Version::HTTP_11,
            &request(),
            &Config::default(),
        )
        .unwrap();
        // The example of RFC 6455 §1.3.
        assert_eq!(ok.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let response: Response<()> = ok.response(None);
        assert_eq!(response.status(), 101);
        assert_eq!(
            response.headers()[SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(!response.headers().contains_key(SEC_WEBSOCKET_PROTOCOL));
    }

    #[test]
    fn each_bad_request_row_gets_its_status_and_cause() {
        use HandshakeFailure as F;
        let c = Config::default();
        let post = run(Method::POST, Version::HTTP_11, &request(), &c).unwrap_err();
        assert_eq!((post.cause, post.status.as_u16()), (F::Protocol, 400));
        let old = run(Method::GET, Version::HTTP_10, &request(), &c).unwrap_err();
        assert_eq!((old.cause, old.status.as_u16()), (F::Protocol, 400));
        let h2 = run(Method::CONNECT, Version::HTTP_2, &request(), &c).unwrap_err();
        assert_eq!((h2.cause, h2.status.as_u16()), (F::Protocol, 400));

        let mut h = request();
        h.remove(UPGRADE);
        assert_eq!(refused(&h), (F::NotWebSocket, 426));
        let mut h = request();
        h.insert(UPGRADE, HeaderValue::from_static("h2c"));
        assert_eq!(refused(&h), (F::NotWebSocket, 426));
        let mut h = request();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        assert_eq!(refused(&h), (F::Protocol, 400));
        let mut h = request();
        h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert_eq!(refused(&h), (F::UnsupportedVersion, 426));
        let mut h = request();
        h.remove(SEC_WEBSOCKET_VERSION);
        assert_eq!(refused(&h), (F::UnsupportedVersion, 426));
        let mut h = request();
        h.remove(SEC_WEBSOCKET_KEY);
        assert_eq!(refused(&h), (F::Protocol, 400));
        for bad in [
            "short==",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25j*Q==",
        ] {
            let mut h = request();
            h.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_static(bad));
            assert_eq!(refused(&h), (F::Protocol, 400), "{bad}");
        }
    }

    #[test]
    fn tokens_are_case_insensitive_and_listed() {
        let mut h = request();
        h.insert(UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(CONNECTION, HeaderValue::from_static("UPGRADE"));
        assert!(run(Method::GET, Version::HTTP_11, &h, &Config::default()).is_ok());
    }

    #[test]
    fn a_426_says_what_to_upgrade_to() {
        let r = Refusal::of(HandshakeFailure::UnsupportedVersion);
        let response: Response<String> = r.response();
        assert_eq!(response.status(), 426);
        assert_eq!(response.headers()[SEC_WEBSOCKET_VERSION], "13");
        assert_eq!(response.headers()[UPGRADE], "websocket");
        assert!(response.body().contains("expected 13"));
        let r = Refusal::of(HandshakeFailure::AtCapacity);
        assert_eq!(r.headers().count(), 0);
        assert_eq!(r.status, 503);
    }

    #[test]
    fn origins_are_checked_only_when_configured_and_present() {
        let c = Config::builder()
            .allowed_origins(["https://chat.example.com"])
            .build()
            .unwrap();
        let get = |h: &HeaderMap| run(Method::GET, Version::HTTP_11, h, &c);
        // No Origin: not a browser, allowed.
        assert!(get(&request()).is_ok());
        let mut h = request();
        h.insert(ORIGIN, HeaderValue::from_static("https://CHAT.example.com"));
        assert!(get(&h).is_ok());
        h.insert(ORIGIN, HeaderValue::from_static("https://evil.example"));
        let r = get(&h).unwrap_err();
        assert_eq!(
            (r.cause, r.status.as_u16()),
            (HandshakeFailure::Origin, 403)
        );
        // Off by default.
        assert!(run(Method::GET, Version::HTTP_11, &h, &Config::default()).is_ok());
    }

    #[test]
    fn the_first_of_our_protocols_that_the_client_offered_wins() {
        let mut h = request();
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v1.chat, v2.chat"),
        );
        let ok = run(Method::GET, Version::HTTP_11, &h, &Config::default()).unwrap();
        let ours: Vec<Box<str>> = vec!["v2.chat".into(), "v1.chat".into()];
        assert_eq!(ok.select_protocol(&ours).as_deref(), Some("v2.chat"));
        assert_eq!(ok.select_protocol(&["mqtt".into()]), None);
        assert_eq!(ok.select_protocol(&[]), None);
        let response: Response<()> = ok.response(Some("v2.chat"));
        assert_eq!(response.headers()[SEC_WEBSOCKET_PROTOCOL], "v2.chat");
    }
}
