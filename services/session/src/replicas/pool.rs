//! A tier's replica set: one lazily connected channel per replica, the requests in flight on
//! each, which are ejected, and a background task that re-resolves `dns:///` targets and runs
//! grpc.health.v1 checks.
//!
//! A replica is ejected when a call to it fails as unreachable (see `error::unreachable`) or its
//! health check answers anything but SERVING (a tier that is shutting down answers NOT_SERVING
//! before it stops), and re-admitted when a health check answers SERVING (or a last-resort call
//! to it succeeds). Ejected replicas are tried only after every healthy one (`pick`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock, Weak};
use std::time::Duration;

use blip2_proto::v1::llm_service_client::LlmServiceClient;
use blip2_proto::v1::vision_service_client::VisionServiceClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::pick::{self, Candidate};
use super::target::{self, Target};
use crate::error::{unreachable, SessionError};

/// Largest message taken from a tier (a soft prompt is 32 x hidden x 4 bytes at most).
const MAX_TIER_MESSAGE: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a health check may take; a healthy replica that is merely slow to answer stays in.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How a tier's replicas are found and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Discovery {
    /// How often `dns:///` targets are resolved again.
    pub(crate) refresh: Duration,
    /// How often every replica's grpc.health.v1 status is checked (ejected ones to re-admit
    /// them, healthy ones to eject those that stopped serving).
    pub(crate) probe: Duration,
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(10),
            probe: Duration::from_secs(2),
        }
    }
}

/// How the session tier connects to a tier's replicas.
pub(crate) struct Upstream<'a> {
    /// TLS towards `https://` and (when set) `dns:///` replicas.
    pub(crate) tls: Option<&'a ClientTlsConfig>,
    /// Whether `tls` names the domain to verify (`--upstream-domain`); otherwise a `dns:///`
    /// target's replicas verify the target's host name, not their IP address.
    pub(crate) domain_fixed: bool,
    pub(crate) discovery: Discovery,
}

/// One replica: an address with its channel.
pub(crate) struct Replica {
    address: String,
    /// Index of the target it came from.
    origin: usize,
    endpoint: Endpoint,
    /// Created on first use: `connect_lazy` spawns a task, so it needs the runtime.
    channel: OnceLock<Channel>,
    ejected: AtomicBool,
    outstanding: AtomicUsize,
}

impl Replica {
    fn new(address: String, origin: usize, tls: Option<&ClientTlsConfig>) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(address.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT);
        let endpoint =
            blip2_common::tls::client_endpoint(endpoint, tls).map_err(|e| e.to_string())?;
        Ok(Self {
            address,
            origin,
            endpoint,
            channel: OnceLock::new(),
            ejected: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
        })
    }

    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// Requests in flight on this replica now.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn channel(&self) -> Channel {
        self.channel
            .get_or_init(|| self.endpoint.connect_lazy())
            .clone()
    }

    pub(crate) fn vision_client(&self) -> VisionServiceClient<Channel> {
        VisionServiceClient::new(self.channel())
            .max_decoding_message_size(MAX_TIER_MESSAGE)
            .max_encoding_message_size(usize::MAX)
    }

    pub(crate) fn llm_client(&self) -> LlmServiceClient<Channel> {
        LlmServiceClient::new(self.channel())
            .max_decoding_message_size(MAX_TIER_MESSAGE)
            .max_encoding_message_size(usize::MAX)
    }

    /// Counts a request in flight until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A request in flight on a replica (for least-outstanding-requests picking).
pub(crate) struct InFlight(Arc<Replica>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Source {
    /// A fixed replica.
    Static(Arc<Replica>),
    /// A name whose addresses are the replicas, with the TLS settings for them.
    Dns {
        host: String,
        port: u16,
        tls: Option<ClientTlsConfig>,
    },
}

/// The replicas of one tier.
pub(crate) struct Replicas {
    shared: Arc<Shared>,
}

struct Shared {
    tier: &'static str,
    /// The service name asked about in health checks.
    health_service: &'static str,
    sources: Vec<Source>,
    discovery: Discovery,
    /// The replicas now; replaced whole when DNS answers change.
    members: RwLock<Arc<Vec<Arc<Replica>>>>,
    /// Set once `dns:///` targets were resolved to at least one replica.
    resolved: tokio::sync::OnceCell<()>,
    /// Rotation for least-outstanding ties.
    next: AtomicUsize,
    /// Set once the background task runs.
    background: OnceLock<()>,
}

impl Replicas {
    /// Checks the targets; resolves and connects nothing yet (that happens on first use, so the
    /// tiers may start in any order).
    pub(crate) fn new(
        tier: &'static str,
        health_service: &'static str,
        targets: &[String],
        upstream: &Upstream<'_>,
    ) -> Result<Self, SessionError> {
        if targets.is_empty() {
            return Err(SessionError::Config(format!(
                "no {tier} tier address was given"
            )));
        }
        let mut sources = Vec::with_capacity(targets.len());
        for (origin, value) in targets.iter().enumerate() {
            let config_error = |e: &dyn std::fmt::Display| {
                SessionError::Config(format!("{tier} tier address `{value}`: {e}"))
            };
            let source = match Target::parse(value).map_err(|e| config_error(&e))? {
                Target::Static(address) => {
                    let https = address.starts_with("https://");
                    if https && upstream.tls.is_none() {
                        return Err(config_error(
                            &"an https:// address needs TLS settings (a CA to trust)",
                        ));
                    }
                    let tls = upstream.tls.filter(|_| https);
                    let replica =
                        Replica::new(address, origin, tls).map_err(|e| config_error(&e))?;
                    Source::Static(Arc::new(replica))
                }
                Target::Dns { host, port } => {
                    let tls = upstream.tls.map(|tls| {
                        if upstream.domain_fixed {
                            tls.clone()
                        } else {
                            tls.clone().domain_name(host.clone())
                        }
                    });
                    // The endpoint must build for the resolved addresses: try one now.
                    let probe = target::uri(([127, 0, 0, 1], port).into(), tls.is_some());
                    Replica::new(probe, origin, tls.as_ref()).map_err(|e| config_error(&e))?;
                    Source::Dns { host, port, tls }
                }
            };
            sources.push(source);
        }
        for discovery_interval in [upstream.discovery.refresh, upstream.discovery.probe] {
            if discovery_interval.is_zero() {
                return Err(SessionError::Config(
                    "replica refresh and probe intervals must be positive".into(),
                ));
            }
        }
        let members: Vec<Arc<Replica>> = sources
            .iter()
            .filter_map(|source| match source {
                Source::Static(replica) => Some(replica.clone()),
                Source::Dns { .. } => None,
            })
            .collect();
        Ok(Self {
            shared: Arc::new(Shared {
                tier,
                health_service,
                sources,
                discovery: upstream.discovery,
                members: RwLock::new(Arc::new(members)),
                resolved: tokio::sync::OnceCell::new(),
                next: AtomicUsize::new(0),
                background: OnceLock::new(),
            }),
        })
    }

    pub(crate) fn tier(&self) -> &'static str {
        self.shared.tier
    }

    /// Every replica once, in the order a stateless request tries them: least outstanding
    /// requests first, ejected replicas last.
    pub(crate) async fn balanced(&self) -> Result<Vec<Arc<Replica>>, SessionError> {
        let members = self.members().await?;
        let start = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let order = pick::least_outstanding(&candidates(&members), start);
        Ok(order.into_iter().map(|i| members[i].clone()).collect())
    }

    /// Every replica once, starting at the one `key` (a session id) sticks to: rendezvous
    /// hashing over the healthy replicas, ejected replicas last.
    pub(crate) async fn affinity(&self, key: &str) -> Result<Vec<Arc<Replica>>, SessionError> {
        let members = self.members().await?;
        let order = pick::rendezvous(&candidates(&members), key);
        Ok(order.into_iter().map(|i| members[i].clone()).collect())
    }

    /// The replicas now (resolving `dns:///` targets the first time), with the background
    /// task started.
    async fn members(&self) -> Result<Arc<Vec<Arc<Replica>>>, SessionError> {
        self.start_background();
        let shared = &self.shared;
        if shared.has_dns() {
            shared
                .resolved
                .get_or_try_init(|| async {
                    let error = shared.refresh().await;
                    if shared.snapshot().is_empty() {
                        return Err(SessionError::Unavailable {
                            tier: shared.tier,
                            message: format!("no replica: {}", error.unwrap_or_default()),
                        });
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(shared.snapshot())
    }

    /// A replica failed as unreachable: it is tried after the healthy ones until its health
    /// check passes.
    pub(crate) fn eject(&self, replica: &Replica, reason: &str) {
        self.shared.eject(replica, reason);
    }

    /// A call to `replica` succeeded: it is healthy (a last-resort call to an ejected replica
    /// re-admits it at once).
    pub(crate) fn succeeded(&self, replica: &Replica) {
        self.shared.readmit(replica, "a call succeeded");
    }

    /// The error after every replica was tried: the last replica's, naming its address.
    pub(crate) fn exhausted(&self, last: Option<(String, String)>) -> SessionError {
        let message = match last {
            Some((address, message)) => {
                format!("no replica answered (last: {address}: {message})")
            }
            None => "no replica answered".to_string(),
        };
        SessionError::Unavailable {
            tier: self.shared.tier,
            message,
        }
    }

    fn start_background(&self) {
        self.shared.background.get_or_init(|| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(maintain(Arc::downgrade(&self.shared)));
            }
        });
    }

    /// Runs one health check round now (tests).
    #[cfg(test)]
    pub(crate) async fn probe_now(&self) {
        self.shared.probe_all().await;
    }

    /// Resolves `dns:///` targets now (tests).
    #[cfg(test)]
    pub(crate) async fn refresh_now(&self) -> Option<String> {
        self.shared.refresh().await
    }

    /// The replicas now, without resolving (tests).
    #[cfg(test)]
    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Replica>>> {
        self.shared.snapshot()
    }
}

fn candidates(members: &[Arc<Replica>]) -> Vec<Candidate<'_>> {
    members
        .iter()
        .map(|replica| Candidate {
            key: &replica.address,
            outstanding: replica.outstanding(),
            ejected: replica.is_ejected(),
        })
        .collect()
}

impl Shared {
    fn has_dns(&self) -> bool {
        self.sources
            .iter()
            .any(|source| matches!(source, Source::Dns { .. }))
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Replica>>> {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn eject(&self, replica: &Replica, reason: &str) {
        if !replica.ejected.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                tier = self.tier,
                replica = %replica.address,
                reason,
                "replica ejected"
            );
        }
    }

    fn readmit(&self, replica: &Replica, reason: &str) {
        if replica.ejected.swap(false, Ordering::Relaxed) {
            tracing::info!(
                tier = self.tier,
                replica = %replica.address,
                reason,
                "replica re-admitted"
            );
        }
    }

    /// Resolves every `dns:///` target and replaces the member list: addresses still there
    /// keep their replica (channel, health, requests in flight), new ones join healthy (a
    /// headless Service lists only ready pods), gone ones leave. A target that fails to
    /// resolve keeps its previous replicas. Returns the first resolution error.
    async fn refresh(&self) -> Option<String> {
        let mut resolved: Vec<(usize, Result<Vec<std::net::SocketAddr>, String>)> = Vec::new();
        for (origin, source) in self.sources.iter().enumerate() {
            if let Source::Dns { host, port, .. } = source {
                resolved.push((origin, target::resolve(host, *port).await));
            }
        }
        let mut members = self.members.write().unwrap_or_else(PoisonError::into_inner);
        let previous = members.clone();
        let mut next: Vec<Arc<Replica>> = Vec::with_capacity(previous.len());
        for (origin, source) in self.sources.iter().enumerate() {
            match source {
                Source::Static(replica) => next.push(replica.clone()),
                Source::Dns { host, tls, .. } => {
                    if let Some((_, result)) = resolved.iter().find(|(o, _)| *o == origin) {
                        let known: Vec<&Arc<Replica>> =
                            previous.iter().filter(|r| r.origin == origin).collect();
                        next.extend(self.dns_members(origin, host, tls.as_ref(), result, &known));
                    }
                }
            }
        }
        *members = Arc::new(next);
        resolved.into_iter().find_map(|(_, result)| result.err())
    }

    /// The replicas of one `dns:///` target after a resolution: `known` ones whose address is
    /// still there, new ones for new addresses; all of `known` when resolution failed.
    fn dns_members(
        &self,
        origin: usize,
        host: &str,
        tls: Option<&ClientTlsConfig>,
        resolved: &Result<Vec<std::net::SocketAddr>, String>,
        known: &[&Arc<Replica>],
    ) -> Vec<Arc<Replica>> {
        let tier = self.tier;
        let addresses = match resolved {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::warn!(tier, name = %host, %error, "DNS resolution failed; keeping the known replicas");
                return known.iter().map(|&r| r.clone()).collect();
            }
        };
        let mut members = Vec::with_capacity(addresses.len());
        for address in addresses {
            let uri = target::uri(*address, tls.is_some());
            if let Some(&kept) = known.iter().find(|r| r.address == uri) {
                members.push(kept.clone());
                continue;
            }
            match Replica::new(uri.clone(), origin, tls) {
                Ok(replica) => {
                    tracing::info!(tier, replica = %uri, name = %host, "replica joined");
                    members.push(Arc::new(replica));
                }
                Err(error) => tracing::warn!(tier, replica = %uri, %error, "replica refused"),
            }
        }
        for gone in known
            .iter()
            .filter(|r| !members.iter().any(|m| Arc::ptr_eq(m, r)))
        {
            tracing::info!(tier, replica = %gone.address, name = %host, "replica left");
        }
        members
    }

    /// Checks every replica's health at once.
    async fn probe_all(&self) {
        let members = self.snapshot();
        let mut checks = tokio::task::JoinSet::new();
        for (index, replica) in members.iter().enumerate() {
            let channel = replica.channel();
            let service = self.health_service.to_string();
            checks.spawn(async move { (index, check(channel, service).await) });
        }
        while let Some(result) = checks.join_next().await {
            let Ok((index, health)) = result else {
                continue;
            };
            let Some(replica) = members.get(index) else {
                continue;
            };
            match health {
                Health::Serving => self.readmit(replica, "health check SERVING"),
                Health::Failing(reason) => self.eject(replica, &reason),
                Health::Unknown => {}
            }
        }
    }
}

/// What one health check found.
#[derive(Debug, PartialEq, Eq)]
enum Health {
    Serving,
    Failing(String),
    /// No answer in time, or an error that says nothing about the replica.
    Unknown,
}

async fn check(channel: Channel, service: String) -> Health {
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest { service };
    match tokio::time::timeout(PROBE_TIMEOUT, client.check(request)).await {
        Err(_) => Health::Unknown,
        Ok(Ok(response)) => match response.into_inner().status() {
            ServingStatus::Serving => Health::Serving,
            status => Health::Failing(format!("health check {}", status.as_str_name())),
        },
        // A server without grpc.health.v1 that answers is up.
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => Health::Serving,
        Ok(Err(status)) if unreachable(&status) => {
            Health::Failing(format!("health check: {}", status.message()))
        }
        Ok(Err(_)) => Health::Unknown,
    }
}

/// The background task: re-resolves `dns:///` targets every `refresh`, checks health every
/// `probe`, until the tier is dropped.
async fn maintain(shared: Weak<Shared>) {
    let Some(discovery) = shared.upgrade().map(|s| s.discovery) else {
        return;
    };
    let mut refresh = tokio::time::interval(discovery.refresh);
    let mut probe = tokio::time::interval(discovery.probe);
    for interval in [&mut refresh, &mut probe] {
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    // Both fire at once first; the first use resolves on its own.
    refresh.tick().await;
    probe.tick().await;
    loop {
        let refreshing = tokio::select! {
            _ = refresh.tick() => true,
            _ = probe.tick() => false,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if refreshing {
            if shared.has_dns() {
                shared.refresh().await;
            }
        } else {
            shared.probe_all().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_changes_keep_known_replicas_and_drop_gone_ones() {
        let upstream = Upstream {
            tls: None,
            domain_fixed: false,
            discovery: Discovery::default(),
        };
        let targets = ["dns:///llm:50052".to_string()];
        let pool = Replicas::new("LLM", "blip2.v1.LlmService", &targets, &upstream).unwrap();
        let shared = &pool.shared;
        let address = |last: u8| std::net::SocketAddr::from(([10, 0, 0, last], 50052));
        let uris = |members: &[Arc<Replica>]| -> Vec<String> {
            members.iter().map(|r| r.address().to_string()).collect()
        };

        let first = shared.dns_members(0, "llm", None, &Ok(vec![address(1), address(2)]), &[]);
        assert_eq!(
            uris(&first),
            ["http://10.0.0.1:50052", "http://10.0.0.2:50052"]
        );
        first[1].ejected.store(true, Ordering::Relaxed);

        // Pod 1 left, pod 3 joined: pod 2 keeps its replica (channel, health state).
        let known: Vec<&Arc<Replica>> = first.iter().collect();
        let second = shared.dns_members(0, "llm", None, &Ok(vec![address(2), address(3)]), &known);
        assert_eq!(
            uris(&second),
            ["http://10.0.0.2:50052", "http://10.0.0.3:50052"]
        );
        assert!(Arc::ptr_eq(&second[0], &first[1]));
        assert!(second[0].is_ejected() && !second[1].is_ejected());

        // DNS failing keeps what was known.
        let known: Vec<&Arc<Replica>> = second.iter().collect();
        let failed = shared.dns_members(0, "llm", None, &Err("timeout".into()), &known);
        assert_eq!(failed.len(), 2);
        assert!(failed.iter().zip(&second).all(|(a, b)| Arc::ptr_eq(a, b)));
    }
}
