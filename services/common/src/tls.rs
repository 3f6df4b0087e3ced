//! TLS for every tier (rustls through tonic) and mutual TLS between tiers, from PEM files.
//!
//! A server with a certificate and key serves TLS only; given a client CA as well, it also
//! requires every client to present a certificate signed by that CA (mutual TLS). A client (the
//! session tier calling the vision and LLM tiers) trusts a given CA for the servers' certificates
//! and, for mutual TLS, presents its own certificate. Connections keep HTTP/2 keepalive pings so
//! that a peer that went silent (a dead node, a cut network) is noticed within
//! [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`], not at the next TCP timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// How often an idle HTTP/2 connection is pinged.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM block (expected `-----BEGIN ...`)")]
    NotPem { what: &'static str, path: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(#[from] tonic::transport::Error),
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// A server's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA (PEM) whose certificates clients must present: mutual TLS. `None`: any client.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Reads the files (so that a typo fails at start, not at the first handshake).
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity = Identity::from_pem(
            read_pem("certificate", &self.cert)?,
            read_pem("private key", &self.key)?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem("client CA", ca)?));
        }
        Ok(config)
    }
}

/// How a client connects to the tiers below it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA (PEM) that signed the servers' certificates. `None` with no identity: plain HTTP/2
    /// (or the system's roots for `https://` addresses is not offered: tiers use a private CA).
    pub ca: Option<PathBuf>,
    /// Certificate and key (PEM) presented to servers that require mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name to verify in the servers' certificates instead of the address's host.
    pub domain: Option<String>,
}

impl ClientTls {
    /// Whether any TLS is configured.
    pub fn is_enabled(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    /// The rustls client configuration, or `None` for plain connections.
    pub fn load(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        if !self.is_enabled() {
            return Ok(None);
        }
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(Certificate::from_pem(read_pem("CA", ca)?));
        }
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(
                read_pem("client certificate", cert)?,
                read_pem("client private key", key)?,
            ));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(Some(config))
    }
}

/// A server builder with TLS (when given) and keepalive pings.
pub fn server_builder(tls: Option<ServerTlsConfig>) -> Result<Server, tonic::transport::Error> {
    let builder = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL));
    Ok(match tls {
        Some(config) => builder.tls_config(config)?,
        None => builder,
    })
}

/// A client endpoint with TLS (when given) and keepalive pings, also while idle.
pub fn client_endpoint(
    endpoint: Endpoint,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, TlsError> {
    let endpoint = endpoint
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL));
    Ok(match tls {
        Some(config) => endpoint.tls_config(config.clone())?,
        None => endpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_non_pem_files_are_named() {
        let dir = std::env::temp_dir().join(format!("blip2-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("cert.der");
        std::fs::write(&not_pem, [0x30, 0x82, 0x01]).unwrap();
        let tls = ServerTls {
            cert: dir.join("missing.pem"),
            key: not_pem.clone(),
            client_ca: None,
        };
        let message = tls.load().unwrap_err().to_string();
        assert!(
            message.contains("certificate") && message.contains("missing.pem"),
            "{message}"
        );
        let tls = ServerTls {
            cert: not_pem.clone(),
            ..tls
        };
        let message = tls.load().unwrap_err().to_string();
        assert!(message.contains("no PEM block"), "{message}");
        assert_eq!(ClientTls::default().load().unwrap().map(|_| ()), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
