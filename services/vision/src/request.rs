//! `EncodeRequest` parsed into a validated type before any work is admitted.

use crate::error::Error;
use crate::VisionConfig;
use blip2_common::soft_prompt::candle_dtype;
use blip2_proto::v1::{image_input::Source, Dtype as WireDType, EncodeRequest};
use candle_core::DType;

/// One image of a validated request.
pub enum ValidImage {
    /// Encoded image bytes, within the size limit.
    Bytes(Vec<u8>),
    /// Lowercase sha256 of an image expected in the cache.
    Cached(String),
}

// By hand, so that image bytes never reach a log line.
impl std::fmt::Debug for ValidImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValidImage::Bytes(data) => write!(f, "Bytes({} bytes)", data.len()),
            ValidImage::Cached(sha256) => write!(f, "Cached({sha256})"),
        }
    }
}

/// An `EncodeRequest` that passed every check that needs no decoding.
#[derive(Debug)]
pub struct ValidEncodeRequest {
    pub images: Vec<ValidImage>,
    /// Element type of the returned soft prompts.
    pub dtype: DType,
}

impl ValidEncodeRequest {
    /// Checks counts, sizes, hashes and the dtype; `default_dtype` stands in for an unspecified
    /// one.
    pub fn parse(
        request: EncodeRequest,
        config: &VisionConfig,
        default_dtype: DType,
    ) -> Result<Self, Error> {
        let dtype = match WireDType::try_from(request.dtype) {
            Ok(wire) => candle_dtype(wire).unwrap_or(default_dtype),
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "`dtype` {} is not a known Dtype",
                    request.dtype
                )))
            }
        };
        if request.images.is_empty() {
            return Err(Error::InvalidArgument(
                "`images` is empty: send at least one image".into(),
            ));
        }
        if request.images.len() > config.max_images_per_request {
            return Err(Error::InvalidArgument(format!(
                "`images` has {} images; this replica accepts at most {} per request",
                request.images.len(),
                config.max_images_per_request
            )));
        }
        let images = request
            .images
            .into_iter()
            .enumerate()
            .map(|(index, image)| match image.source {
                Some(Source::Data(data)) if data.is_empty() => Err(Error::InvalidArgument(
                    format!("`images[{index}].data` is empty"),
                )),
                Some(Source::Data(data)) if data.len() > config.max_image_bytes => {
                    Err(Error::InvalidArgument(format!(
                        "`images[{index}].data` is {} bytes; the limit is {} bytes",
                        data.len(),
                        config.max_image_bytes
                    )))
                }
                Some(Source::Data(data)) => Ok(ValidImage::Bytes(data)),
                Some(Source::Sha256(sha256)) => {
                    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                        Ok(ValidImage::Cached(sha256.to_ascii_lowercase()))
                    } else {
                        Err(Error::InvalidArgument(format!(
                            "`images[{index}].sha256` must be 64 hex digits"
                        )))
                    }
                }
                None => Err(Error::InvalidArgument(format!(
                    "`images[{index}]` has neither `data` nor `sha256`"
                ))),
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self { images, dtype })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blip2_proto::v1::ImageInput;

    fn data(bytes: &[u8]) -> ImageInput {
        ImageInput {
            source: Some(Source::Data(bytes.to_vec())),
        }
    }

    fn sha(hex: &str) -> ImageInput {
        ImageInput {
            source: Some(Source::Sha256(hex.to_string())),
        }
    }

    fn config() -> VisionConfig {
        VisionConfig {
            max_images_per_request: 2,
            max_image_bytes: 4,
            ..VisionConfig::default()
        }
    }

    fn parse(images: Vec<ImageInput>, dtype: i32) -> Result<ValidEncodeRequest, Error> {
        let request = EncodeRequest { images, dtype };
        ValidEncodeRequest::parse(request, &config(), DType::F32)
    }

    fn refusal(images: Vec<ImageInput>, dtype: i32) -> String {
        match parse(images, dtype) {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn accepts_bytes_and_hashes_with_the_default_dtype() {
        let upper = "AB".repeat(32);
        let valid = parse(vec![data(b"png"), sha(&upper)], 0).unwrap();
        assert_eq!(valid.dtype, DType::F32);
        assert!(matches!(&valid.images[0], ValidImage::Bytes(b) if b == b"png"));
        assert!(matches!(&valid.images[1], ValidImage::Cached(s) if *s == "ab".repeat(32)));
        let f16 = parse(vec![data(b"png")], WireDType::F16 as i32).unwrap();
        assert_eq!(f16.dtype, DType::F16);
    }

    #[test]
    fn refuses_what_breaks_a_limit() {
        assert!(refusal(vec![], 0).contains("`images` is empty"));
        let many = refusal(vec![data(b"a"), data(b"b"), data(b"c")], 0);
        assert!(many.contains("at most 2"), "{many}");
        let big = refusal(vec![data(b"a"), data(b"large")], 0);
        assert!(big.contains("`images[1].data` is 5 bytes"), "{big}");
        assert!(refusal(vec![data(b"")], 0).contains("is empty"));
        assert!(refusal(vec![sha("abc")], 0).contains("64 hex digits"));
        let none = refusal(vec![ImageInput { source: None }], 0);
        assert!(none.contains("neither"), "{none}");
        assert!(refusal(vec![data(b"a")], 99).contains("`dtype` 99"));
    }

    #[test]
    fn debug_never_shows_image_bytes() {
        let text = format!("{:?}", ValidImage::Bytes(b"secret".to_vec()));
        assert_eq!(text, "Bytes(6 bytes)");
    }
}
