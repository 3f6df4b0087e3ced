//! Prompt assembly for one turn: the template, the history, the images' placeholders, and the
//! context budget that drops the oldest turns first.
//!
//! The prompt follows LAVIS' BLIP-2 OPT/T5 VQA prompts ("Question: {} Answer:"), extended to a
//! dialogue as the BLIP-2 paper's chat demo does: each earlier turn is rendered with `past_turn`,
//! the current one with `current_turn`, and every image enters at the turn it was attached to.
//!
//! # The separator rule
//! A prompt is a list of *pieces*: the system text (when not empty), then for each turn its
//! image placeholders followed by its text (when not empty). The separator goes before every
//! piece except the first one and except a piece that directly follows an image placeholder:
//! an image's soft prompt is followed directly by its turn's text, as in LAVIS and transformers
//! where the soft prompt is concatenated with the tokenised text. So a first turn with one image
//! is exactly `[image, "Question: {q} Answer:"]`, and a turn's text that precedes a later image
//! ends with the separator (`"... Answer: {a}. "`, then the image). Adjacent text pieces are
//! merged into one text segment.

use blip2_proto::v1::{prompt_segment, ImagePlaceholder, PromptSegment, PromptTemplate};

use crate::error::SessionError;

/// The image marker the LLM tier puts in place of each image placeholder.
pub const IMAGE_MARKER: &str = "<image>";

pub const DEFAULT_PAST_TURN: &str = "Question: {question} Answer: {answer}.";
pub const DEFAULT_CURRENT_TURN: &str = "Question: {question} Answer:";
pub const DEFAULT_SEPARATOR: &str = " ";

/// One finished turn as prompt assembly sees it: (question, answer, sha256 of the images
/// attached at that turn, in order).
pub type PastTurn = (String, String, Vec<String>);

/// The LAVIS-style default template.
pub fn default_template() -> PromptTemplate {
    PromptTemplate {
        system: String::new(),
        past_turn: DEFAULT_PAST_TURN.to_string(),
        current_turn: DEFAULT_CURRENT_TURN.to_string(),
        separator: DEFAULT_SEPARATOR.to_string(),
    }
}

/// `template` with its defaults filled in. proto3 cannot tell an unset string from an empty one,
/// so an empty `past_turn`, `current_turn` or `separator` takes its default (`system` may be
/// empty): `PromptTemplate::default()` is the LAVIS template.
pub fn with_defaults(template: &PromptTemplate) -> PromptTemplate {
    let or_default = |value: &str, default: &str| {
        if value.is_empty() {
            default.to_string()
        } else {
            value.to_string()
        }
    };
    PromptTemplate {
        system: template.system.clone(),
        past_turn: or_default(&template.past_turn, DEFAULT_PAST_TURN),
        current_turn: or_default(&template.current_turn, DEFAULT_CURRENT_TURN),
        separator: or_default(&template.separator, DEFAULT_SEPARATOR),
    }
}

/// Validates a client's template, its defaults filled in ([`with_defaults`]).
pub fn validate_template(template: Option<PromptTemplate>) -> Result<PromptTemplate, SessionError> {
    let Some(template) = template else {
        return Ok(default_template());
    };
    let template = with_defaults(&template);
    if !template.current_turn.contains("{question}") {
        return Err(SessionError::InvalidArgument(
            "`template.current_turn` must contain `{question}`".into(),
        ));
    }
    // Images enter the prompt only as placeholders, never as text a template could place.
    for (field, value) in [
        ("system", &template.system),
        ("past_turn", &template.past_turn),
        ("current_turn", &template.current_turn),
        ("separator", &template.separator),
    ] {
        if value.contains(IMAGE_MARKER) {
            return Err(SessionError::InvalidArgument(format!(
                "`template.{field}` must not contain `{IMAGE_MARKER}`: images are placed by the tier"
            )));
        }
    }
    Ok(template)
}

/// User (and model) text must not inject image markers: the LLM tier turns each `<image>` of the
/// prompt text into an image position, so a literal `<image>` in a question would shift every
/// soft prompt after it. It is escaped as `<image >`, which the tokenizer reads as plain text.
/// The replacement cannot create a new marker (the inserted space breaks any overlap), so one
/// pass suffices.
pub fn sanitize(text: &str) -> String {
    if text.contains(IMAGE_MARKER) {
        text.replace(IMAGE_MARKER, "<image >")
    } else {
        text.to_string()
    }
}

/// Replaces `{question}` and `{answer}` in one left-to-right pass, so a question containing the
/// literal `{answer}` is not substituted again.
fn render(template: &str, question: &str, answer: &str) -> String {
    let mut out = String::with_capacity(template.len() + question.len() + answer.len());
    let mut rest = template;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("{question}") {
            out.push_str(question);
            rest = after;
        } else if let Some(after) = rest.strip_prefix("{answer}") {
            out.push_str(answer);
            rest = after;
        } else if let Some(c) = rest.chars().next() {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The text of an earlier turn. A turn without a question (an image alone: BLIP-2 captioning)
/// is its answer alone.
/// The answer goes in trimmed, as LAVIS strips generated text before it reuses it: OPT's
/// answers begin with a space (`Ġword`), which `Answer: {answer}` would double. Trimmed, the
/// answer re-tokenises to the ids that were generated, so the LLM tier's prefix cache covers
/// the previous turn's answer as well as its prompt.
fn past_turn_text(template: &PromptTemplate, question: &str, answer: &str) -> String {
    let (question, answer) = (sanitize(question), sanitize(answer.trim()));
    if question.is_empty() {
        answer
    } else {
        render(&template.past_turn, &question, &answer)
    }
}

/// The text of the current turn; empty without a question (the images alone, as BLIP-2's
/// captioning prompt), which then adds no text piece.
fn current_turn_text(template: &PromptTemplate, question: &str) -> String {
    let question = sanitize(question);
    if question.is_empty() {
        String::new()
    } else {
        render(&template.current_turn, &question, "")
    }
}

enum Piece {
    Text(String),
    Image(String),
}

/// The segments the tier sends to the LLM tier for a turn: the system text, the earlier turns
/// (`turns`, oldest first, each with the images attached at it) and the current turn
/// (`current`: question and the sha256 of its images), joined by the separator rule of this
/// module's documentation. Questions and answers are [`sanitize`]d; empty template fields take
/// their defaults ([`with_defaults`]).
pub fn build_segments(
    template: &PromptTemplate,
    turns: &[PastTurn],
    current: (&str, &[String]),
) -> Vec<PromptSegment> {
    let template = &with_defaults(template);
    let mut pieces = Vec::new();
    if !template.system.is_empty() {
        pieces.push(Piece::Text(template.system.clone()));
    }
    for (question, answer, images) in turns {
        pieces.extend(images.iter().cloned().map(Piece::Image));
        let text = past_turn_text(template, question, answer);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
    }
    let (question, images) = current;
    pieces.extend(images.iter().cloned().map(Piece::Image));
    let text = current_turn_text(template, question);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }

    let mut segments: Vec<PromptSegment> = Vec::new();
    let mut text = String::new();
    let mut after_image = false;
    for (index, piece) in pieces.into_iter().enumerate() {
        if index > 0 && !after_image {
            text.push_str(&template.separator);
        }
        match piece {
            Piece::Text(piece) => {
                text.push_str(&piece);
                after_image = false;
            }
            Piece::Image(image_sha256) => {
                if !text.is_empty() {
                    segments.push(text_segment(std::mem::take(&mut text)));
                }
                segments.push(PromptSegment {
                    kind: Some(prompt_segment::Kind::Image(ImagePlaceholder {
                        image_sha256,
                    })),
                });
                after_image = true;
            }
        }
    }
    if !text.is_empty() {
        segments.push(text_segment(text));
    }
    segments
}

fn text_segment(text: String) -> PromptSegment {
    PromptSegment {
        kind: Some(prompt_segment::Kind::Text(text)),
    }
}

/// The sha256 of each image placeholder of `segments`, in order.
pub fn placeholder_images(segments: &[PromptSegment]) -> Vec<&str> {
    segments
        .iter()
        .filter_map(|segment| match &segment.kind {
            Some(prompt_segment::Kind::Image(image)) => Some(image.image_sha256.as_str()),
            _ => None,
        })
        .collect()
}

/// How many positions a prompt may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptBudget {
    /// Positions for the text segments' tokens and the images' soft prompts together.
    pub max_tokens: usize,
    /// Positions one image's soft prompt takes.
    pub num_query_tokens: usize,
}

/// Positions `segments` take: each text segment counted by `count_tokens` (without special
/// tokens; the caller leaves room for them in the budget), `num_query_tokens` per image.
pub fn prompt_positions(
    segments: &[PromptSegment],
    num_query_tokens: usize,
    count_tokens: &dyn Fn(&str) -> Result<usize, SessionError>,
) -> Result<usize, SessionError> {
    let mut total = 0usize;
    for segment in segments {
        total = total.saturating_add(match &segment.kind {
            Some(prompt_segment::Kind::Text(text)) => count_tokens(text)?,
            Some(prompt_segment::Kind::Image(_)) => num_query_tokens,
            None => 0,
        });
    }
    Ok(total)
}

/// How many of the oldest turns to drop so the prompt fits the budget: the smallest `k` such that
/// the prompt of `turns[k..]` plus the current turn fits. A dropped turn takes its text and its
/// images with it; the current turn (its images included) is never dropped: when it alone does
/// not fit, the turn is refused with INVALID_ARGUMENT.
///
/// Dropping a turn never makes a prompt longer, so `k` is found by binary search (each probe
/// tokenises one candidate prompt).
pub fn turns_to_drop(
    template: &PromptTemplate,
    turns: &[PastTurn],
    current: (&str, &[String]),
    budget: PromptBudget,
    count_tokens: &dyn Fn(&str) -> Result<usize, SessionError>,
) -> Result<usize, SessionError> {
    let cost = |drop: usize| -> Result<usize, SessionError> {
        let segments = build_segments(template, &turns[drop..], current);
        prompt_positions(&segments, budget.num_query_tokens, count_tokens)
    };
    let alone = cost(turns.len())?;
    if alone > budget.max_tokens {
        return Err(SessionError::InvalidArgument(format!(
            "the turn takes {alone} prompt positions ({} image(s) of {} positions each), more \
             than the context budget of {} positions",
            current.1.len(),
            budget.num_query_tokens,
            budget.max_tokens
        )));
    }
    // Invariant: dropping `high` turns fits; dropping fewer than `low` does not.
    let (mut low, mut high) = (0, turns.len());
    while low < high {
        let middle = low + (high - low) / 2;
        if cost(middle)? <= budget.max_tokens {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    Ok(high)
}

/// Counts text tokens: with the checkpoint's tokenizer, or estimated without one.
pub enum TokenCounter {
    Tokenizer {
        tokenizer: Box<blip2_model::prompt::PromptTokenizer>,
        /// Tokens the tokenizer adds to any text (BOS and the like), counted once per prompt.
        special_tokens: usize,
    },
    /// About 3 bytes per token, rounded up: BPE tokenizers average 4 bytes per token on English
    /// text, so this over-counts, which only drops history a little early.
    Estimate,
}

impl TokenCounter {
    pub fn from_tokenizer(
        tokenizer: blip2_model::prompt::PromptTokenizer,
    ) -> Result<Self, SessionError> {
        let special_tokens = tokenizer.encode("")?.len();
        Ok(Self::Tokenizer {
            tokenizer: Box::new(tokenizer),
            special_tokens,
        })
    }

    /// Tokens of `text` without the special tokens.
    pub fn count(&self, text: &str) -> Result<usize, SessionError> {
        match self {
            Self::Tokenizer {
                tokenizer,
                special_tokens,
            } => Ok(tokenizer
                .encode(text)?
                .len()
                .saturating_sub(*special_tokens)),
            Self::Estimate => Ok(text.len().div_ceil(3)),
        }
    }

    /// Special tokens added once per prompt (the estimate reserves one, for a BOS).
    pub fn special_tokens(&self) -> usize {
        match self {
            Self::Tokenizer { special_tokens, .. } => *special_tokens,
            Self::Estimate => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_substitutes_once() {
        assert_eq!(
            render("Q: {question} A: {answer}.", "why {answer}?", "no"),
            "Q: why {answer}? A: no."
        );
    }

    #[test]
    fn sanitize_escapes_markers() {
        assert_eq!(sanitize("a <image> b"), "a <image > b");
        assert!(!sanitize("<<image>image>>").contains(IMAGE_MARKER));
    }

    #[test]
    fn template_defaults_and_validation() {
        let t = validate_template(Some(PromptTemplate::default())).unwrap();
        assert_eq!(t, default_template());
        let bad = PromptTemplate {
            current_turn: "Answer:".into(),
            ..default_template()
        };
        assert!(matches!(
            validate_template(Some(bad)),
            Err(SessionError::InvalidArgument(_))
        ));
        let marker = PromptTemplate {
            system: "<image>".into(),
            ..default_template()
        };
        assert!(validate_template(Some(marker)).is_err());
    }
}
