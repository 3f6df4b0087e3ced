//! `blip2.v1.GenerationParams` -> validated [`GenerationParams`].

use blip2_model::generation::GenerationParams;
use blip2_proto::v1;

use crate::error::Error;

/// Proto params -> [`GenerationParams`], validated.
///
/// Unset fields keep [`GenerationParams::default()`] (transformers' defaults), except an unset
/// `max_new_tokens`, which is also capped at `max_new_tokens_limit`. A `temperature` > 0 turns
/// sampling on; 0 means greedy. EOS ids are the checkpoint's (`eos`). Errors are
/// INVALID_ARGUMENT and name the field in backticks.
pub fn generation_params(
    params: Option<&v1::GenerationParams>,
    eos: &[u32],
    max_new_tokens_limit: usize,
) -> Result<GenerationParams, tonic::Status> {
    convert(params, eos, max_new_tokens_limit).map_err(tonic::Status::from)
}

pub(crate) fn convert(
    params: Option<&v1::GenerationParams>,
    eos: &[u32],
    max_new_tokens_limit: usize,
) -> Result<GenerationParams, Error> {
    let defaults = GenerationParams::default();
    let wire = params.cloned().unwrap_or_default();
    let max_new_tokens = match wire.max_new_tokens {
        Some(n) => n as usize,
        None => defaults.max_new_tokens.min(max_new_tokens_limit),
    };
    if max_new_tokens == 0 || max_new_tokens > max_new_tokens_limit {
        return Err(Error::invalid(format!(
            "`max_new_tokens` must be in [1, {max_new_tokens_limit}], got {max_new_tokens}"
        )));
    }
    let temperature = wire.temperature.map(f64::from);
    let do_sample = temperature.is_some_and(|t| t > 0.0);
    let num_beams = wire.num_beams.map_or(defaults.num_beams, |n| n as usize);
    // GenerationParams::validate would blame `do_sample`, which this API does not have.
    if do_sample && num_beams > 1 {
        return Err(Error::invalid(
            "`temperature` > 0 (sampling) cannot be combined with `num_beams` > 1: \
             leave `temperature` unset or 0 for beam search",
        ));
    }
    let params = GenerationParams {
        max_new_tokens,
        min_new_tokens: wire
            .min_new_tokens
            .map_or(defaults.min_new_tokens, |n| n as usize),
        do_sample,
        temperature: temperature.unwrap_or(defaults.temperature),
        top_k: wire.top_k.map_or(defaults.top_k, |k| k as usize),
        top_p: wire.top_p.map_or(defaults.top_p, f64::from),
        repetition_penalty: wire
            .repetition_penalty
            .map_or(defaults.repetition_penalty, f64::from),
        num_beams,
        length_penalty: wire
            .length_penalty
            .map_or(defaults.length_penalty, f64::from),
        seed: wire.seed,
        stop: wire.stop,
        eos_token_ids: eos.to_vec(),
        ..defaults
    };
    params.validate().map_err(|e| match e {
        blip2_model::Error::InvalidInput(message) => Error::InvalidArgument(message),
        other => Error::Model(other),
    })?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> v1::GenerationParams {
        v1::GenerationParams::default()
    }

    #[test]
    fn unset_fields_keep_the_defaults() {
        let params = generation_params(None, &[2], 512).unwrap();
        assert_eq!(
            params,
            GenerationParams {
                eos_token_ids: vec![2],
                ..GenerationParams::default()
            }
        );
        let capped = generation_params(Some(&wire()), &[], 8).unwrap();
        assert_eq!(capped.max_new_tokens, 8);
    }

    #[test]
    fn temperature_turns_sampling_on() {
        let greedy = v1::GenerationParams {
            temperature: Some(0.0),
            ..wire()
        };
        assert!(
            !generation_params(Some(&greedy), &[], 512)
                .unwrap()
                .do_sample
        );
        let sampled = v1::GenerationParams {
            temperature: Some(0.5),
            top_p: Some(0.9),
            top_k: Some(0),
            seed: Some(7),
            ..wire()
        };
        let params = generation_params(Some(&sampled), &[], 512).unwrap();
        assert!(params.do_sample);
        assert_eq!(params.temperature, 0.5);
        assert_eq!(params.top_p, f64::from(0.9f32));
        assert_eq!(params.top_k, 0);
        assert_eq!(params.seed, Some(7));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                v1::GenerationParams {
                    top_p: Some(0.0),
                    ..wire()
                },
                "`top_p`",
            ),
            (
                v1::GenerationParams {
                    max_new_tokens: Some(513),
                    ..wire()
                },
                "`max_new_tokens`",
            ),
            (
                v1::GenerationParams {
                    max_new_tokens: Some(0),
                    ..wire()
                },
                "`max_new_tokens`",
            ),
            (
                v1::GenerationParams {
                    temperature: Some(-1.0),
                    ..wire()
                },
                "`temperature`",
            ),
            (
                v1::GenerationParams {
                    temperature: Some(0.7),
                    num_beams: Some(3),
                    ..wire()
                },
                "`temperature`",
            ),
            (
                v1::GenerationParams {
                    num_beams: Some(0),
                    ..wire()
                },
                "`num_beams`",
            ),
            (
                v1::GenerationParams {
                    stop: vec![String::new()],
                    ..wire()
                },
                "`stop`",
            ),
        ];
        for (params, field) in cases {
            let status = generation_params(Some(&params), &[], 512).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{params:?}");
            assert!(status.message().contains(field), "{}", status.message());
        }
    }
}
