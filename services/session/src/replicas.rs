//! The replicas of the vision and LLM tiers and the calls that fail over between them.
//!
//! - `target`: what `--vision` / `--llm` name: a fixed `http(s)://` address, or `dns:///host:port`
//!   whose every address is a replica (a Kubernetes headless Service), re-resolved periodically.
//! - `pick`: the order a request tries them: least outstanding requests for the stateless
//!   vision tier; rendezvous hashing of the session id for the LLM tier, whose prefix caches then
//!   serve the session's growing prompt; ejected replicas last.
//! - `pool`: one lazily connected channel per replica, ejection on failure, re-admission by
//!   grpc.health.v1 checks, DNS re-resolution, in a background task.
//!
//! Here: the vision tier's Encode and the LLM tier's Info with fail-over (the LLM's Generate is
//! in `chat`): a replica unreachable before it answered anything is ejected and the next one
//! takes the request; one that is full (RESOURCE_EXHAUSTED) stays in and the next one takes it.

mod pick;
mod pool;
mod target;

use std::sync::Arc;

use blip2_proto::v1::vision_service_client::VisionServiceClient;
use blip2_proto::v1::{
    image_input, Dtype, EncodeRequest, ImageInput, LlmInfo, LlmInfoRequest, SoftPrompt,
};
use tonic::transport::Channel;

use crate::error::{unreachable, SessionError};

pub(crate) use pool::{Discovery, Replicas, Upstream};

/// Encodes `images` (sha256, file bytes) on the vision tier; returns their soft prompts in
/// order. A replica that is unreachable before it answered anything is skipped for the next.
pub(crate) async fn encode(
    vision: &Replicas,
    images: &[(String, Arc<Vec<u8>>)],
    dtype: Dtype,
) -> Result<Vec<SoftPrompt>, SessionError> {
    let request = EncodeRequest {
        images: images
            .iter()
            .map(|(_, data)| ImageInput {
                source: Some(image_input::Source::Data(data.as_ref().clone())),
            })
            .collect(),
        dtype: dtype as i32,
    };
    let (mut last, mut full) = (None, None);
    for replica in vision.balanced().await? {
        let _in_flight = replica.begin();
        match encode_on(replica.vision_client(), request.clone(), images.len()).await? {
            Attempt::Done(prompts) => {
                vision.succeeded(&replica);
                return collect(images, prompts);
            }
            Attempt::Unreachable(message) => {
                vision.eject(&replica, &message);
                last = Some((replica.address().to_string(), message));
            }
            Attempt::Busy(status) => full = Some(status),
        }
    }
    Err(exhausted(vision, full, last))
}

/// The outcome of trying one replica.
pub(crate) enum Attempt<T> {
    Done(T),
    /// UNAVAILABLE before anything was received: the next replica may take the request.
    Unreachable(String),
    /// RESOURCE_EXHAUSTED before anything was received: the replica is full, not failed (it
    /// stays in); the next replica may have room.
    Busy(tonic::Status),
}

/// Whether `status` is a replica refusing work for lack of room (its queue is full).
pub(crate) fn busy(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::ResourceExhausted
}

/// The error after every replica was tried: RESOURCE_EXHAUSTED when one was only full (the
/// client may retry later), else UNAVAILABLE naming the last unreachable replica.
pub(crate) fn exhausted(
    replicas: &Replicas,
    busy: Option<tonic::Status>,
    last: Option<(String, String)>,
) -> SessionError {
    match busy {
        Some(status) => SessionError::from_tier(replicas.tier(), &status),
        None => replicas.exhausted(last),
    }
}

async fn encode_on(
    mut client: VisionServiceClient<Channel>,
    request: EncodeRequest,
    count: usize,
) -> Result<Attempt<Vec<Option<SoftPrompt>>>, SessionError> {
    let request = blip2_common::telemetry::traced_request(request);
    let mut stream = match client.encode(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if unreachable(&status) => {
            return Ok(Attempt::Unreachable(status.message().to_string()))
        }
        Err(status) if busy(&status) => return Ok(Attempt::Busy(status)),
        Err(status) => return Err(SessionError::from_tier("vision", &status)),
    };
    let mut prompts: Vec<Option<SoftPrompt>> = vec![None; count];
    let mut received = 0usize;
    loop {
        match stream.message().await {
            Ok(Some(response)) => {
                let slot = prompts.get_mut(response.index as usize).ok_or_else(|| {
                    protocol(format!(
                        "soft prompt for image {} of a request of {count}",
                        response.index
                    ))
                })?;
                let prompt = response
                    .soft_prompt
                    .ok_or_else(|| protocol("a response without `soft_prompt`".into()))?;
                *slot = Some(prompt);
                received += 1;
            }
            Ok(None) => return Ok(Attempt::Done(prompts)),
            Err(status) if unreachable(&status) && received == 0 => {
                return Ok(Attempt::Unreachable(status.message().to_string()))
            }
            Err(status) if busy(&status) && received == 0 => return Ok(Attempt::Busy(status)),
            Err(status) => return Err(SessionError::from_tier("vision", &status)),
        }
    }
}

/// Checks that every image got its soft prompt, for the right content.
fn collect(
    images: &[(String, Arc<Vec<u8>>)],
    prompts: Vec<Option<SoftPrompt>>,
) -> Result<Vec<SoftPrompt>, SessionError> {
    images
        .iter()
        .zip(prompts)
        .enumerate()
        .map(|(index, ((sha256, _), prompt))| {
            let mut prompt = prompt.ok_or_else(|| {
                protocol(format!(
                    "the stream ended without the soft prompt of image {index}"
                ))
            })?;
            if prompt.image_sha256.is_empty() {
                prompt.image_sha256 = sha256.clone();
            } else if prompt.image_sha256 != *sha256 {
                return Err(protocol(format!(
                    "image {index} has sha256 {sha256}, its soft prompt says {}",
                    prompt.image_sha256
                )));
            }
            Ok(prompt)
        })
        .collect()
}

fn protocol(message: String) -> SessionError {
    SessionError::Protocol {
        tier: "vision",
        message,
    }
}

/// The LLM tier's facts, from the first replica (in the session's affinity order) that answers.
pub(crate) async fn llm_info(llm: &Replicas, session_id: &str) -> Result<LlmInfo, SessionError> {
    let mut last = None;
    for replica in llm.affinity(session_id).await? {
        match replica.llm_client().info(LlmInfoRequest {}).await {
            Ok(response) => {
                llm.succeeded(&replica);
                return Ok(response.into_inner());
            }
            Err(status) if unreachable(&status) => {
                llm.eject(&replica, status.message());
                last = Some((replica.address().to_string(), status.message().to_string()));
            }
            Err(status) => return Err(SessionError::from_tier(llm.tier(), &status)),
        }
    }
    Err(llm.exhausted(last))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tonic_health::server::HealthReporter;
    use tonic_health::ServingStatus;

    use super::*;

    const SERVICE: &str = "blip2.v1.LlmService";

    fn upstream() -> Upstream<'static> {
        Upstream {
            tls: None,
            domain_fixed: false,
            discovery: Discovery {
                refresh: Duration::from_secs(3600),
                probe: Duration::from_secs(3600),
            },
        }
    }

    fn replicas(targets: &[String]) -> Replicas {
        Replicas::new("LLM", SERVICE, targets, &upstream()).unwrap()
    }

    /// A grpc.health.v1 server on loopback; its reporter sets what it answers.
    async fn health_server() -> (String, HealthReporter) {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(SERVICE, ServingStatus::NotServing)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{address}"), reporter)
    }

    /// An address nothing listens on.
    async fn dead_address() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{address}")
    }

    /// A vision replica that answers every image with a soft prompt, or is always full.
    struct FakeVision {
        full: bool,
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[tonic::async_trait]
    impl blip2_proto::v1::vision_service_server::VisionService for FakeVision {
        type EncodeStream = tokio_stream::Iter<
            std::vec::IntoIter<Result<blip2_proto::v1::EncodeResponse, tonic::Status>>,
        >;

        async fn encode(
            &self,
            request: tonic::Request<EncodeRequest>,
        ) -> Result<tonic::Response<Self::EncodeStream>, tonic::Status> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.full {
                return Err(tonic::Status::resource_exhausted("4 images are running"));
            }
            let responses = (0..request.into_inner().images.len())
                .map(|index| {
                    Ok(blip2_proto::v1::EncodeResponse {
                        index: index as u32,
                        soft_prompt: Some(SoftPrompt::default()),
                        cached: false,
                    })
                })
                .collect::<Vec<_>>();
            Ok(tonic::Response::new(tokio_stream::iter(responses)))
        }

        async fn info(
            &self,
            _request: tonic::Request<blip2_proto::v1::VisionInfoRequest>,
        ) -> Result<tonic::Response<blip2_proto::v1::VisionInfo>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
    }

    async fn fake_vision(full: bool) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let service =
            blip2_proto::v1::vision_service_server::VisionServiceServer::new(FakeVision {
                full,
                calls: calls.clone(),
            });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{address}"), calls)
    }

    #[tokio::test]
    async fn a_full_replica_passes_the_request_on_and_stays_in() {
        let (full, full_calls) = fake_vision(true).await;
        let (free, free_calls) = fake_vision(false).await;
        let pool = Replicas::new(
            "vision",
            "blip2.v1.VisionService",
            &[full.clone(), free],
            &upstream(),
        )
        .unwrap();
        let images = vec![("sha".to_string(), Arc::new(vec![1u8, 2, 3]))];
        for _ in 0..4 {
            let prompts = encode(&pool, &images, Dtype::F32).await.unwrap();
            assert_eq!(prompts[0].image_sha256, "sha");
        }
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(free_calls.load(Relaxed), 4);
        assert!(
            full_calls.load(Relaxed) >= 1,
            "the rotation starts at it too"
        );
        assert!(pool.snapshot().iter().all(|replica| !replica.is_ejected()));

        // Every replica full: the client hears RESOURCE_EXHAUSTED (retry later), not UNAVAILABLE.
        let only_full =
            Replicas::new("vision", "blip2.v1.VisionService", &[full], &upstream()).unwrap();
        let error = encode(&only_full, &images, Dtype::F32).await.unwrap_err();
        assert_eq!(
            tonic::Status::from(error).code(),
            tonic::Code::ResourceExhausted
        );
    }

    fn addresses(order: &[Arc<pool::Replica>]) -> Vec<&str> {
        order.iter().map(|replica| replica.address()).collect()
    }

    #[test]
    fn refuses_bad_addresses() {
        let new = |targets: &[&str]| {
            let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
            Replicas::new("vision", SERVICE, &targets, &upstream())
        };
        assert!(new(&[]).is_err());
        assert!(new(&["not a uri"]).is_err());
        assert!(new(&["https://vision:50051"]).is_err());
        let error = new(&["dns:///vision"]).err().unwrap().to_string();
        assert!(
            error.contains("dns:///vision") && error.contains("port"),
            "{error}"
        );
        assert!(new(&["http://vision:50051", "dns:///vision:50051"]).is_ok());
        let zero = Upstream {
            discovery: Discovery {
                refresh: Duration::ZERO,
                probe: Duration::from_secs(1),
            },
            ..upstream()
        };
        let targets = ["http://vision:50051".to_string()];
        assert!(Replicas::new("vision", SERVICE, &targets, &zero).is_err());
    }

    #[tokio::test]
    async fn balanced_prefers_the_replica_with_fewer_requests_in_flight() {
        let targets: Vec<String> = (1..=3).map(|i| format!("http://127.0.0.1:{i}")).collect();
        let pool = replicas(&targets);
        let first = pool.balanced().await.unwrap();
        let second = pool.balanced().await.unwrap();
        assert_eq!(first.len(), 3);
        assert_ne!(first[0].address(), second[0].address(), "idle ties rotate");
        // Two requests in flight on one replica, one on another: the idle one is first and the
        // busiest last, whatever the rotation.
        let busy = first[0].clone();
        let _a = busy.begin();
        let _b = busy.begin();
        let _c = first[1].begin();
        for _ in 0..3 {
            let order = pool.balanced().await.unwrap();
            assert_eq!(order[0].address(), first[2].address());
            assert_eq!(order[2].address(), busy.address());
        }
        drop((_a, _b, _c));
        assert_eq!(busy.outstanding(), 0);
    }

    #[tokio::test]
    async fn affinity_is_stable_and_skips_ejected_replicas() {
        let targets: Vec<String> = (1..=3).map(|i| format!("http://127.0.0.1:{i}")).collect();
        let pool = replicas(&targets);
        let order = pool.affinity("session-a").await.unwrap();
        assert_eq!(
            addresses(&order),
            addresses(&pool.affinity("session-a").await.unwrap())
        );
        pool.eject(&order[0], "test");
        let after = pool.affinity("session-a").await.unwrap();
        // The session's next-highest replica takes it; the ejected one is the last resort.
        assert_eq!(after[0].address(), order[1].address());
        assert_eq!(after[2].address(), order[0].address());
        pool.succeeded(&order[0]);
        assert_eq!(
            addresses(&pool.affinity("session-a").await.unwrap()),
            addresses(&order)
        );
    }

    #[tokio::test]
    async fn health_checks_eject_and_readmit() {
        let (live, reporter) = health_server().await;
        let dead = dead_address().await;
        let pool = replicas(&[live.clone(), dead.clone()]);
        let is_ejected = |address: &str| {
            pool.snapshot()
                .iter()
                .find(|replica| replica.address() == address)
                .map(|replica| replica.is_ejected())
                .unwrap()
        };
        assert!(!is_ejected(&live) && !is_ejected(&dead));
        // NOT_SERVING and a refused connection both eject.
        pool.probe_now().await;
        assert!(is_ejected(&live) && is_ejected(&dead));
        reporter
            .set_service_status(SERVICE, ServingStatus::Serving)
            .await;
        pool.probe_now().await;
        assert!(!is_ejected(&live), "SERVING re-admits");
        assert!(is_ejected(&dead), "still refused");
        for session in ["a", "b", "c", "d"] {
            assert_eq!(pool.affinity(session).await.unwrap()[0].address(), live);
        }
        // The replica stops serving (a tier shutting down): ejected before any request fails.
        reporter
            .set_service_status(SERVICE, ServingStatus::NotServing)
            .await;
        pool.probe_now().await;
        assert!(is_ejected(&live));
    }

    #[tokio::test]
    async fn background_task_readmits_a_replica_that_comes_back() {
        let (live, reporter) = health_server().await;
        reporter
            .set_service_status(SERVICE, ServingStatus::Serving)
            .await;
        let fast = Upstream {
            discovery: Discovery {
                refresh: Duration::from_secs(3600),
                probe: Duration::from_millis(50),
            },
            ..upstream()
        };
        let pool = Replicas::new("LLM", SERVICE, std::slice::from_ref(&live), &fast).unwrap();
        let replica = pool.balanced().await.unwrap()[0].clone();
        pool.eject(&replica, "test");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while replica.is_ejected() {
            assert!(tokio::time::Instant::now() < deadline, "never re-admitted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn dns_targets_are_one_replica_per_address() {
        let (live, _reporter) = health_server().await;
        let port = live.rsplit(':').next().unwrap();
        let pool = replicas(&[
            format!("dns:///localhost:{port}"),
            "http://127.0.0.1:1".to_string(),
        ]);
        assert_eq!(
            pool.snapshot().len(),
            1,
            "nothing resolved before first use"
        );
        let order = pool.balanced().await.unwrap();
        let resolved = format!("http://127.0.0.1:{port}");
        assert!(
            addresses(&order).contains(&resolved.as_str()),
            "{:?}",
            addresses(&order)
        );
        assert!(addresses(&order).contains(&"http://127.0.0.1:1"));
        // Resolving again keeps the same replica (its channel, health and counters).
        let before = pool.snapshot();
        assert_eq!(pool.refresh_now().await, None);
        let after = pool.snapshot();
        assert_eq!(addresses(&before), addresses(&after));
        for (a, b) in before.iter().zip(after.iter()) {
            assert!(Arc::ptr_eq(a, b));
        }

        // A name that does not resolve: UNAVAILABLE naming it, and it keeps being retried.
        let unresolved = replicas(&["dns:///no-such-host.invalid:50052".to_string()]);
        let error = unresolved.balanced().await.err().unwrap();
        assert!(
            matches!(&error, SessionError::Unavailable { tier: "LLM", .. })
                && error.to_string().contains("no-such-host.invalid"),
            "{error}"
        );
        assert!(unresolved.balanced().await.is_err());
    }
}
