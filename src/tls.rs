//! TLS for `wss://` clients: rustls with the ring provider. See [`Connect::tls_config`](crate::Connect::tls_config).

use std::io;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The configuration of `wss://` connections that were given none: Mozilla's
/// roots (`webpki-roots`), the ring provider, TLS 1.2 and 1.3. Built once per
/// process and shared: a `ClientConfig` also holds the session-resumption
/// cache, so sharing it lets reconnects resume.
pub(crate) fn default_client_config() -> Arc<ClientConfig> {
    static DEFAULT: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| Arc::new(webpki_roots_config()))
        .clone()
}

fn webpki_roots_config() -> ClientConfig {
    let roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // `builder_with_provider`, never `ClientConfig::builder()`: the latter
    // needs a process-wide default provider, which this crate does not
    // install (that is the application's choice, and with two providers
    // compiled in it panics).
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        // Not input-dependent: ring's provider supports both default
        // versions, and a unit test below builds this exact configuration.
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The name the server's certificate must carry, sent as SNI: a DNS name,
/// or an IP address (checked against the certificate's IP SANs; rustls sends
/// no SNI for those). `host` comes without IPv6 brackets.
pub(crate) fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host)
        .map(|name| name.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// The client side of the TLS handshake over `tcp`.
///
/// A failure (an untrusted or mismatched certificate, a TLS alert from the
/// server, a reset) is an `io::Error`; for certificate and protocol problems
/// its [`get_ref`](io::Error::get_ref) is the `rustls::Error`.
pub(crate) async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> io::Result<TlsStream<TcpStream>> {
    TlsConnector::from(config).connect(name, tcp).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_builds_once_and_is_shared() {
        let a = default_client_config();
        let b = default_client_config();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!webpki_roots::TLS_SERVER_ROOTS.is_empty());
    }

    #[test]
    fn server_names_are_dns_names_or_ip_addresses() {
        assert!(matches!(
            server_name("example.com").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("::1").unwrap(),
            ServerName::IpAddress(_)
        ));
        let err = server_name("not a host").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
