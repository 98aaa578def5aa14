//! An axum 0.8 extractor for supervised WebSocket upgrades. See [`WebSocketUpgrade`].

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use crate::connection::Connection;
use crate::hyper::{HttpUpgrade, UpgradeRejection};
use crate::supervisor::Supervisor;

/// Extractor for a supervised WebSocket upgrade, shaped like axum's own
/// `WebSocketUpgrade`: the handler validates the request first (its path,
/// query, headers and state are all there, as other extractors), then
/// returns [`on_upgrade`](Self::on_upgrade)'s response; the callback gets a
/// supervised [`Connection`].
///
/// The [`Supervisor`] comes from the router's state (`Supervisor:
/// FromRef<S>`: the state is the supervisor, or a struct with a
/// `#[derive(FromRef)]`/hand-written `FromRef` field). The peer's address
/// comes from `ConnectInfo<SocketAddr>` when the app is served with
/// `into_make_service_with_connect_info::<SocketAddr>()`.
///
/// An invalid upgrade request is rejected by the extractor
/// ([`UpgradeRejection`]: 400, 403 or 426, counted by cause), before the
/// handler runs. Admission (the connection limit, the per-IP handshake cap,
/// shutdown: 503 or 429) is decided by `on_upgrade`.
///
/// # Examples
///
/// ```
/// use axum::extract::Path;
/// use axum::response::Response;
/// use axum::{Router, routing::get};
/// use ws_supervisor::axum::WebSocketUpgrade;
/// use ws_supervisor::{Config, Supervisor};
///
/// async fn chat(Path(room): Path<String>, ws: WebSocketUpgrade) -> Response {
///     ws.protocols(["chat.v1"]).on_upgrade(move |mut conn| async move {
///         while let Some(message) = conn.recv().await {
///             println!("{room}: {message:?}");
///         }
///     })
/// }
///
/// let supervisor = Supervisor::new(Config::default());
/// let app: Router = Router::new()
///     .route("/chat/{room}", get(chat))
///     .with_state(supervisor);
/// # drop(app);
/// ```
pub struct WebSocketUpgrade {
    upgrade: HttpUpgrade,
}

impl<S> FromRequestParts<S> for WebSocketUpgrade
where
    Supervisor: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = UpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let supervisor = Supervisor::from_ref(state);
        let mut upgrade = supervisor.upgrade_parts(parts);
        if let Some(ConnectInfo(addr)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            upgrade = upgrade.peer_addr(*addr);
        }
        if !upgrade.is_valid() {
            // Counts the refusal and returns it.
            return Err(upgrade
                .respond::<()>()
                .expect_err("an invalid upgrade is refused"));
        }
        Ok(Self { upgrade })
    }
}

impl WebSocketUpgrade {
    /// The subprotocols this server speaks, most preferred first: the first
    /// one the client also offered is agreed (see [`Connection::protocol`]).
    pub fn protocols<I, T>(self, protocols: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self {
            upgrade: self.upgrade.protocols(protocols),
        }
    }

    /// Records the peer's address, when it does not come from `ConnectInfo`.
    pub fn peer_addr(self, addr: SocketAddr) -> Self {
        Self {
            upgrade: self.upgrade.peer_addr(addr),
        }
    }

    /// Admits the connection and returns the 101 response; once the upgrade
    /// completes, `callback` runs with the supervised [`Connection`] in a
    /// task the supervisor tracks ([`Supervisor::shutdown`] waits for it: it
    /// should return once [`Connection::recv`] yields `None`). At capacity,
    /// over the per-IP cap or while shutting down, returns the refusal (503
    /// or 429) instead, counted by cause, and `callback` never runs.
    pub fn on_upgrade<F, Fut>(self, callback: F) -> Response
    where
        F: FnOnce(Connection) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.upgrade.on_upgrade(callback)
    }
}

impl fmt::Debug for WebSocketUpgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketUpgrade")
            .field("upgrade", &self.upgrade)
            .finish()
    }
}

impl IntoResponse for UpgradeRejection {
    fn into_response(self) -> Response {
        UpgradeRejection::into_response(self)
    }
}
