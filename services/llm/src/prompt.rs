//! Prompt segments -> the prompt text the tier tokenises, and the image placeholders in order.

use blip2_model::prompt::IMAGE_MARKER;
use blip2_proto::v1::prompt_segment::Kind;
use blip2_proto::v1::PromptSegment;

use crate::error::Error;

/// The prompt text the tier tokenises for a list of segments: text segments concatenated as
/// they are, each image placeholder replaced by the `<image>` marker. Public so the session tier
/// and tests reproduce the exact prompt.
///
/// (For a checkpoint without an image token, a legacy conversion, every placeholder must come
/// before the text and the tier tokenises the text segments alone: the soft prompts are
/// prepended, as the reference does for such checkpoints.)
pub fn prompt_text(segments: &[PromptSegment]) -> String {
    let mut text = String::new();
    for segment in segments {
        match &segment.kind {
            Some(Kind::Text(t)) => text.push_str(t),
            Some(Kind::Image(_)) => text.push_str(IMAGE_MARKER),
            None => {}
        }
    }
    text
}

/// A setup's segments, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PromptSpec {
    /// What to tokenise.
    pub text: String,
    /// Per image placeholder, in order: the sha256 its soft prompt must carry (empty: any).
    pub placeholders: Vec<String>,
}

/// Checks the segments of a setup. `has_image_token`: whether the checkpoint marks images with
/// an `<image>` token (else images can only precede the text).
pub(crate) fn check_segments(
    segments: &[PromptSegment],
    has_image_token: bool,
) -> Result<PromptSpec, Error> {
    if segments.is_empty() {
        return Err(Error::invalid(
            "`setup.segments` is empty: give at least one text segment or image placeholder",
        ));
    }
    let mut placeholders = Vec::new();
    let mut has_text = false;
    for (i, segment) in segments.iter().enumerate() {
        match &segment.kind {
            Some(Kind::Text(text)) => {
                if text.contains(IMAGE_MARKER) {
                    return Err(Error::invalid(format!(
                        "text segments must not contain `{IMAGE_MARKER}`; use an image \
                         placeholder (`setup.segments`[{i}])"
                    )));
                }
                has_text |= !text.is_empty();
            }
            Some(Kind::Image(image)) => {
                if !has_image_token && has_text {
                    return Err(Error::invalid(format!(
                        "this checkpoint has no `{IMAGE_MARKER}` token and places images before \
                         the prompt: `setup.segments`[{i}] is an image placeholder after text"
                    )));
                }
                placeholders.push(image.image_sha256.clone());
            }
            None => {
                return Err(Error::invalid(format!(
                    "`setup.segments`[{i}] is neither text nor an image placeholder"
                )))
            }
        }
    }
    if placeholders.is_empty() && !has_text {
        return Err(Error::invalid(
            "the prompt is empty: every text segment is empty and there is no image placeholder",
        ));
    }
    let text = if has_image_token {
        prompt_text(segments)
    } else {
        segments
            .iter()
            .filter_map(|s| match &s.kind {
                Some(Kind::Text(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    };
    Ok(PromptSpec { text, placeholders })
}

#[cfg(test)]
mod tests {
    use blip2_proto::v1::ImagePlaceholder;

    use super::*;

    fn text(t: &str) -> PromptSegment {
        PromptSegment {
            kind: Some(Kind::Text(t.to_string())),
        }
    }

    fn image(sha: &str) -> PromptSegment {
        PromptSegment {
            kind: Some(Kind::Image(ImagePlaceholder {
                image_sha256: sha.to_string(),
            })),
        }
    }

    #[test]
    fn placeholders_become_markers() {
        let segments = [image("a"), text("Question: what is "), image(""), text("?")];
        assert_eq!(prompt_text(&segments), "<image>Question: what is <image>?");
        let spec = check_segments(&segments, true).unwrap();
        assert_eq!(spec.text, "<image>Question: what is <image>?");
        assert_eq!(spec.placeholders, vec!["a".to_string(), String::new()]);
    }

    #[test]
    fn refuses_bad_segments() {
        let cases: [&[PromptSegment]; 4] = [
            &[],
            &[text("")],
            &[text("a <image> b")],
            &[PromptSegment { kind: None }],
        ];
        for segments in cases {
            assert!(
                matches!(
                    check_segments(segments, true),
                    Err(Error::InvalidArgument(_))
                ),
                "{segments:?}"
            );
        }
        let error = check_segments(&[text("<image>")], true).unwrap_err();
        assert!(error.to_string().contains("use an image placeholder"));
    }

    #[test]
    fn legacy_checkpoints_take_images_first() {
        let spec = check_segments(&[image("a"), text("a photo of")], false).unwrap();
        assert_eq!(spec.text, "a photo of");
        assert_eq!(spec.placeholders.len(), 1);
        assert!(check_segments(&[text("a photo of"), image("a")], false).is_err());
        // An image alone is a captioning prompt.
        assert!(check_segments(&[image("")], true).is_ok());
    }
}
