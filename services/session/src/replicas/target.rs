//! Where a tier's replicas are: the `--vision` / `--llm` values.
//!
//! - `http://host:port` or `https://host:port`: one replica at that address.
//! - `dns:///host:port` (gRPC's name syntax; `dns:host:port` too): every address the name
//!   resolves to is a replica, re-resolved periodically, as a Kubernetes headless Service lists
//!   its ready pods. Each address gets its own connection, so requests spread over pods (one
//!   HTTP/2 connection to a ClusterIP would pin every request to one pod). The connections use
//!   TLS when upstream TLS is configured, verifying `host` (or `--upstream-domain`).

use std::net::SocketAddr;

/// One parsed `--vision` / `--llm` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A replica at a fixed URI.
    Static(String),
    /// Every address of `host` at `port`.
    Dns { host: String, port: u16 },
}

impl Target {
    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        let Some(rest) = value.strip_prefix("dns:") else {
            return Ok(Self::Static(value.to_string()));
        };
        let name = if let Some(rest) = rest.strip_prefix("//") {
            // dns://AUTHORITY/host:port names a DNS server: not supported, the system's is used.
            match rest.split_once('/') {
                Some(("", name)) => name,
                Some((authority, _)) => {
                    return Err(format!(
                        "a DNS server (`{authority}`) cannot be named; write dns:///host:port"
                    ))
                }
                None => return Err("write dns:///host:port".to_string()),
            }
        } else {
            rest
        };
        let (host, port) = name
            .rsplit_once(':')
            .ok_or_else(|| format!("`{name}` has no port; write dns:///host:port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(format!("`{host}` is not a host name"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| format!("`{port}` is not a port"))?;
        Ok(Self::Dns {
            host: host.to_string(),
            port,
        })
    }
}

/// The addresses `host` resolves to now (the system resolver, on the blocking pool), sorted
/// and without duplicates.
pub(crate) async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let mut addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving `{host}`: {e}"))?
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    if addresses.is_empty() {
        return Err(format!("`{host}` resolves to no address"));
    }
    Ok(addresses)
}

/// The URI of a resolved address (IPv6 in brackets).
pub(crate) fn uri(address: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{address}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_static_and_dns_targets() {
        assert_eq!(
            Target::parse("http://127.0.0.1:50051"),
            Ok(Target::Static("http://127.0.0.1:50051".into()))
        );
        let llm = Target::Dns {
            host: "llm.blip2.svc.cluster.local".into(),
            port: 50052,
        };
        assert_eq!(
            Target::parse("dns:///llm.blip2.svc.cluster.local:50052"),
            Ok(llm.clone())
        );
        assert_eq!(
            Target::parse("dns:llm.blip2.svc.cluster.local:50052"),
            Ok(llm)
        );
        assert_eq!(
            Target::parse("dns:///[::1]:7"),
            Ok(Target::Dns {
                host: "::1".into(),
                port: 7
            })
        );
        for bad in [
            "dns:///llm",
            "dns:///llm:0",
            "dns:///llm:http",
            "dns:///:50052",
            "dns://8.8.8.8/llm:50052",
            "dns://llm:50052",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn resolves_localhost() {
        let addresses = resolve("localhost", 50052).await.unwrap();
        assert!(
            addresses.contains(&"127.0.0.1:50052".parse().unwrap()),
            "{addresses:?}"
        );
        assert_eq!(
            uri("[::1]:7".parse().unwrap(), false),
            "http://[::1]:7".to_string()
        );
        assert_eq!(
            uri("10.0.0.1:7".parse().unwrap(), true),
            "https://10.0.0.1:7".to_string()
        );
        assert!(resolve("no-such-host.invalid", 1).await.is_err());
    }
}
