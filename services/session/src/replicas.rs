//! The replicas of the vision and LLM tiers: lazily connected channels, the order in which a
//! request tries them (round robin for the stateless vision tier; affinity by session for the
//! LLM tier, whose prefix caches then serve the session's growing prompt), and the vision
//! tier's Encode with fail-over.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blip2_proto::v1::llm_service_client::LlmServiceClient;
use blip2_proto::v1::vision_service_client::VisionServiceClient;
use blip2_proto::v1::{
    image_input, Dtype, EncodeRequest, ImageInput, LlmInfo, LlmInfoRequest, SoftPrompt,
};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::error::{unreachable, SessionError};

/// Largest message taken from a tier (a soft prompt is 32 x hidden x 4 bytes at most).
const MAX_TIER_MESSAGE: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Replica {
    address: String,
    endpoint: Endpoint,
    /// Created on first use: `connect_lazy` spawns a task, so it needs the runtime.
    channel: OnceLock<Channel>,
}

/// The replicas of one tier.
pub(crate) struct Replicas {
    tier: &'static str,
    replicas: Vec<Replica>,
    next: AtomicUsize,
}

impl Replicas {
    /// `tls`: how to reach replicas at `https://` addresses (plain `http://` ones ignore it).
    pub(crate) fn new(
        tier: &'static str,
        addresses: &[String],
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, SessionError> {
        if addresses.is_empty() {
            return Err(SessionError::Config(format!(
                "no {tier} tier address was given"
            )));
        }
        let replicas = addresses
            .iter()
            .map(|address| {
                let config_error = |e: &dyn std::fmt::Display| {
                    SessionError::Config(format!("{tier} tier address `{address}`: {e}"))
                };
                let endpoint = Endpoint::from_shared(address.clone())
                    .map_err(|e| config_error(&e))?
                    .connect_timeout(CONNECT_TIMEOUT);
                let https = address.starts_with("https://");
                if https && tls.is_none() {
                    return Err(config_error(
                        &"an https:// address needs TLS settings (a CA to trust)",
                    ));
                }
                let endpoint = blip2_common::tls::client_endpoint(endpoint, tls.filter(|_| https))
                    .map_err(|e| config_error(&e))?;
                Ok(Replica {
                    address: address.clone(),
                    endpoint,
                    channel: OnceLock::new(),
                })
            })
            .collect::<Result<Vec<_>, SessionError>>()?;
        Ok(Self {
            tier,
            replicas,
            next: AtomicUsize::new(0),
        })
    }

    pub(crate) fn tier(&self) -> &'static str {
        self.tier
    }

    pub(crate) fn address(&self, index: usize) -> &str {
        self.replicas
            .get(index)
            .map_or("", |replica| replica.address.as_str())
    }

    fn channel(&self, index: usize) -> Option<Channel> {
        let replica = self.replicas.get(index)?;
        Some(
            replica
                .channel
                .get_or_init(|| replica.endpoint.connect_lazy())
                .clone(),
        )
    }

    pub(crate) fn vision_client(&self, index: usize) -> Option<VisionServiceClient<Channel>> {
        self.channel(index).map(|channel| {
            VisionServiceClient::new(channel)
                .max_decoding_message_size(MAX_TIER_MESSAGE)
                .max_encoding_message_size(usize::MAX)
        })
    }

    pub(crate) fn llm_client(&self, index: usize) -> Option<LlmServiceClient<Channel>> {
        self.channel(index).map(|channel| {
            LlmServiceClient::new(channel)
                .max_decoding_message_size(MAX_TIER_MESSAGE)
                .max_encoding_message_size(usize::MAX)
        })
    }

    /// Every replica once, starting at the next one in round robin.
    pub(crate) fn round_robin(&self) -> Vec<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        self.order_from(start)
    }

    /// Every replica once, starting at the one `key` (a session id) sticks to.
    pub(crate) fn affinity(&self, key: &str) -> Vec<usize> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        self.order_from(hasher.finish() as usize)
    }

    fn order_from(&self, start: usize) -> Vec<usize> {
        let n = self.replicas.len();
        (0..n).map(|i| (start.wrapping_add(i)) % n).collect()
    }

    /// The error after every replica was tried: the last replica's, naming its address.
    pub(crate) fn exhausted(&self, last: Option<(usize, String)>) -> SessionError {
        let message = match last {
            Some((index, message)) => format!(
                "no replica answered (last: {}: {message})",
                self.address(index)
            ),
            None => "no replica answered".to_string(),
        };
        SessionError::Unavailable {
            tier: self.tier,
            message,
        }
    }
}

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
    let mut last = None;
    for index in vision.round_robin() {
        let Some(client) = vision.vision_client(index) else {
            continue;
        };
        match encode_on(client, request.clone(), images.len()).await? {
            Attempt::Done(prompts) => return collect(images, prompts),
            Attempt::Unreachable(message) => last = Some((index, message)),
        }
    }
    Err(vision.exhausted(last))
}

/// The outcome of trying one replica.
pub(crate) enum Attempt<T> {
    Done(T),
    /// UNAVAILABLE before anything was received: the next replica may take the request.
    Unreachable(String),
}

async fn encode_on(
    mut client: VisionServiceClient<Channel>,
    request: EncodeRequest,
    count: usize,
) -> Result<Attempt<Vec<Option<SoftPrompt>>>, SessionError> {
    let mut stream = match client.encode(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if unreachable(&status) => {
            return Ok(Attempt::Unreachable(status.message().to_string()))
        }
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
    for index in llm.affinity(session_id) {
        let Some(mut client) = llm.llm_client(index) else {
            continue;
        };
        match client.info(LlmInfoRequest {}).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if unreachable(&status) => {
                last = Some((index, status.message().to_string()));
            }
            Err(status) => return Err(SessionError::from_tier(llm.tier(), &status)),
        }
    }
    Err(llm.exhausted(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_visit_every_replica_once() {
        let addresses: Vec<String> = (0..3)
            .map(|i| format!("http://127.0.0.1:{}", 1 + i))
            .collect();
        let replicas = Replicas::new("LLM", &addresses, None).unwrap();
        let first = replicas.round_robin();
        let second = replicas.round_robin();
        assert_ne!(first[0], second[0]);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
        assert_eq!(replicas.affinity("abc"), replicas.affinity("abc"));
    }

    #[test]
    fn refuses_bad_addresses() {
        assert!(Replicas::new("vision", &[], None).is_err());
        assert!(Replicas::new("vision", &["not a uri".to_string()], None).is_err());
        assert!(Replicas::new("vision", &["https://vision:50051".to_string()], None).is_err());
    }
}
