//! The first phase of a Generate call: `setup`, then one soft prompt per image placeholder, each
//! checked, into a [`ValidRequest`].

use std::sync::Arc;

use blip2_common::soft_prompt;
use blip2_model::generation::GenerationParams;
use blip2_model::llm::LanguageModel;
use blip2_model::model::Blip2Model;
use blip2_model::prompt::Prompt;
use blip2_proto::v1::generate_input::Kind;
use blip2_proto::v1::{GenerateInput, GenerateSetup, SoftPrompt};
use candle_core::{Device, Tensor};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::error::Error;
use crate::params;
use crate::prompt::{check_segments, PromptSpec};

/// A Generate request whose input is complete and checked.
pub(crate) struct ValidRequest {
    pub prompt: Prompt,
    /// Per image, in placeholder order: `[num_query_tokens, hidden]` in the wire dtype, on the CPU.
    pub soft_prompts: Vec<Tensor>,
    /// Per image: content hash of the soft prompt as received (dtype and bytes), the prefix
    /// cache's key for its positions.
    pub image_digests: Vec<[u8; 32]>,
    pub params: GenerationParams,
    pub logprobs: bool,
}

/// The language model of a tier's checkpoint.
pub(crate) fn language_model(model: &Blip2Model) -> Result<&Arc<dyn LanguageModel>, Error> {
    model.language_model().map_err(|_| Error::NoLanguageModel)
}

/// A `setup` whose segments and parameters are valid.
struct CheckedSetup {
    spec: PromptSpec,
    params: GenerationParams,
    logprobs: bool,
}

/// The checks of a `setup` that need no tokenisation: segments and parameters.
fn check_fields(
    setup: &GenerateSetup,
    model: &Blip2Model,
    max_new_tokens_limit: usize,
) -> Result<CheckedSetup, Error> {
    let has_image_token = model.prompt_tokenizer().image_token_id().is_some();
    let spec = check_segments(&setup.segments, has_image_token)?;
    let eos = &model.generation_defaults().eos_token_ids;
    let params = params::convert(setup.params.as_ref(), eos, max_new_tokens_limit)?;
    let logprobs = setup
        .params
        .as_ref()
        .and_then(|p| p.logprobs)
        .unwrap_or(false);
    Ok(CheckedSetup {
        spec,
        params,
        logprobs,
    })
}

/// The bound generate() applies, checked before the soft prompts travel.
fn check_positions(
    lm: &dyn LanguageModel,
    prompt: &Prompt,
    params: &GenerationParams,
) -> Result<(), Error> {
    let info = lm.info();
    if !info.is_encoder_decoder
        && prompt.num_positions + params.max_new_tokens - 1 > info.max_positions
    {
        return Err(Error::invalid(format!(
            "the prompt ({} positions) plus `max_new_tokens` ({}) exceeds the model's {} positions",
            prompt.num_positions, params.max_new_tokens, info.max_positions
        )));
    }
    Ok(())
}

/// Checks a `setup` as a Generate call does before it waits for soft prompts (segments,
/// parameters, the tokenised prompt against the context window) and returns the prompt's
/// positions. For tools and fuzzing; errors are the statuses a call would end with.
pub fn check_setup(
    setup: &GenerateSetup,
    model: &Blip2Model,
    max_new_tokens_limit: usize,
) -> Result<usize, Status> {
    let run = || -> Result<usize, Error> {
        let lm = language_model(model)?;
        let checked = check_fields(setup, model, max_new_tokens_limit)?;
        let prompt = model.build_prompt(&checked.spec.text, checked.spec.placeholders.len())?;
        check_positions(lm.as_ref(), &prompt, &checked.params)?;
        Ok(prompt.num_positions)
    };
    run().map_err(Status::from)
}

/// Reads and checks `setup` and the soft prompts from `inbound` (no timeout: the caller's).
pub(crate) async fn receive<S>(
    inbound: &mut S,
    model: &Arc<Blip2Model>,
    max_new_tokens_limit: usize,
) -> Result<ValidRequest, Error>
where
    S: Stream<Item = Result<GenerateInput, Status>> + Unpin,
{
    let lm = language_model(model)?;
    let setup = match inbound.next().await {
        None => return Err(Error::invalid("the input stream ended before `setup`")),
        Some(Err(status)) => return Err(Error::Transport(status)),
        Some(Ok(GenerateInput { kind })) => match kind {
            Some(Kind::Setup(setup)) => setup,
            Some(Kind::SoftPrompt(_)) => {
                return Err(Error::invalid(
                    "the first message must be `setup`, got a `soft_prompt`",
                ))
            }
            None => {
                return Err(Error::invalid(
                    "the first message must be `setup`, got an empty message",
                ))
            }
        },
    };
    let checked = check_fields(&setup, model, max_new_tokens_limit)?;
    let prompt = {
        let model = model.clone();
        let text = checked.spec.text.clone();
        let num_images = checked.spec.placeholders.len();
        tokio::task::spawn_blocking(move || model.build_prompt(&text, num_images))
            .await
            .map_err(|e| Error::Worker(e.to_string()))??
    };
    check_positions(lm.as_ref(), &prompt, &checked.params)?;
    let CheckedSetup {
        spec,
        params,
        logprobs,
    } = checked;
    let num_images = spec.placeholders.len();

    let expected_shape = [
        model.config().num_query_tokens,
        model.config().text_config.hidden_size(),
    ];
    let mut soft_prompts = Vec::with_capacity(num_images);
    let mut image_digests = Vec::with_capacity(num_images);
    for (index, expected_sha256) in spec.placeholders.iter().enumerate() {
        let soft_prompt = match inbound.next().await {
            None => {
                return Err(Error::invalid(format!(
                    "the input stream ended after {index} of {num_images} soft prompt(s)"
                )))
            }
            Some(Err(status)) => return Err(Error::Transport(status)),
            Some(Ok(GenerateInput { kind })) => match kind {
                Some(Kind::SoftPrompt(soft_prompt)) => soft_prompt,
                Some(Kind::Setup(_)) => {
                    return Err(Error::invalid(format!(
                        "`setup` may be sent only once, first; expected soft prompt {index} of \
                         {num_images}"
                    )))
                }
                None => {
                    return Err(Error::invalid(format!(
                        "expected soft prompt {index} of {num_images}, got an empty message"
                    )))
                }
            },
        };
        let tensor = check_soft_prompt(
            &soft_prompt,
            index,
            expected_sha256,
            model.fingerprint(),
            expected_shape,
        )?;
        image_digests.push(crate::prefix::soft_prompt_digest(
            tensor.dtype().as_str(),
            &soft_prompt.data,
        ));
        soft_prompts.push(tensor);
    }
    Ok(ValidRequest {
        prompt,
        soft_prompts,
        image_digests,
        params,
        logprobs,
    })
}

/// Checks one soft prompt against its placeholder and this checkpoint, and decodes it.
fn check_soft_prompt(
    soft_prompt: &SoftPrompt,
    index: usize,
    expected_sha256: &str,
    fingerprint: &str,
    expected_shape: [usize; 2],
) -> Result<Tensor, Error> {
    if soft_prompt.checkpoint_fingerprint != fingerprint {
        let got = if soft_prompt.checkpoint_fingerprint.is_empty() {
            "(none given)".to_string()
        } else {
            soft_prompt.checkpoint_fingerprint.clone()
        };
        return Err(Error::CheckpointMismatch {
            got,
            serves: fingerprint.to_string(),
        });
    }
    if !expected_sha256.is_empty() && soft_prompt.image_sha256 != expected_sha256 {
        return Err(Error::invalid(format!(
            "soft prompt {index} is for image {:?}, but image placeholder {index} expects \
             {expected_sha256:?}",
            soft_prompt.image_sha256
        )));
    }
    // Decoded on the CPU: prompt assembly moves it to the model's device with the embeddings.
    soft_prompt::decode(soft_prompt, expected_shape, &Device::Cpu)
        .map_err(|source| Error::SoftPrompt { index, source })
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    fn wire(shape: (usize, usize), sha: &str, fingerprint: &str) -> SoftPrompt {
        let tensor = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        soft_prompt::encode_2d(&tensor, DType::F16, sha, fingerprint).unwrap()
    }

    #[test]
    fn checks_fingerprint_hash_and_shape() {
        let ok = check_soft_prompt(&wire((2, 3), "h", "fp"), 0, "h", "fp", [2, 3]).unwrap();
        assert_eq!(ok.dims(), &[2, 3]);
        assert_eq!(ok.dtype(), DType::F16);
        // A placeholder without a hash accepts any image.
        assert!(check_soft_prompt(&wire((2, 3), "h", "fp"), 0, "", "fp", [2, 3]).is_ok());

        let status = Status::from(
            check_soft_prompt(&wire((2, 3), "h", "other"), 0, "h", "fp", [2, 3]).unwrap_err(),
        );
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "soft prompt was made by checkpoint other, this LLM tier serves fp"
        );
        let status = Status::from(
            check_soft_prompt(&wire((2, 3), "x", "fp"), 1, "h", "fp", [2, 3]).unwrap_err(),
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let status = Status::from(
            check_soft_prompt(&wire((3, 2), "h", "fp"), 0, "h", "fp", [2, 3]).unwrap_err(),
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("shape"), "{}", status.message());
    }
}
