//! Untrusted `CreateSessionRequest` messages (protobuf bytes: a template and a history of turns)
//! through the session tier's request validation and prompt assembly: the template check, the
//! segments of every turn and the context budget. Never a panic; an accepted template renders
//! prompts whose only image positions are the placeholders the tier placed (a client's text can
//! never add or shift one), in order, and the budget's choice fits.
#![no_main]

use blip2_proto::v1::{prompt_segment, CreateSessionRequest};
use blip2_session::prompt::{
    build_segments, placeholder_images, prompt_positions, turns_to_drop, validate_template,
    PastTurn, PromptBudget,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const IMAGE_MARKER: &str = "<image>";

/// The estimate the tier uses without a tokenizer: about four bytes a token.
fn count(text: &str) -> Result<usize, blip2_session::SessionError> {
    Ok(text.len().div_ceil(4))
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(request) = CreateSessionRequest::decode(bytes) else {
        return;
    };
    let template = match validate_template(request.template) {
        Ok(template) => template,
        Err(error) => {
            assert!(
                matches!(error, blip2_session::SessionError::InvalidArgument(_)),
                "{error:?}"
            );
            return;
        }
    };
    assert!(template.current_turn.contains("{question}"));

    // The history's turns as the tier keeps them (image ids for the images), the last one as
    // the turn being asked.
    let mut next_image = 0usize;
    let mut turns: Vec<PastTurn> = request
        .history
        .into_iter()
        .map(|turn| {
            let images = turn
                .images
                .iter()
                .map(|_| {
                    next_image += 1;
                    format!("{next_image:064x}")
                })
                .collect();
            (turn.question, turn.answer, images)
        })
        .collect();
    let Some((question, _, current_images)) = turns.pop() else {
        return;
    };
    let current = (question.as_str(), current_images.as_slice());

    let segments = build_segments(&template, &turns, current);
    let expected: Vec<&str> = turns
        .iter()
        .flat_map(|(_, _, images)| images.iter().map(String::as_str))
        .chain(current_images.iter().map(String::as_str))
        .collect();
    assert_eq!(placeholder_images(&segments), expected);
    for segment in &segments {
        if let Some(prompt_segment::Kind::Text(text)) = &segment.kind {
            assert!(!text.contains(IMAGE_MARKER), "an image marker in text: {text:?}");
        }
    }

    let budget = PromptBudget {
        max_tokens: 256,
        num_query_tokens: 8,
    };
    if let Ok(drop) = turns_to_drop(&template, &turns, current, budget, &count) {
        assert!(drop <= turns.len());
        let kept = build_segments(&template, &turns[drop..], current);
        let positions = prompt_positions(&kept, budget.num_query_tokens, &count);
        assert!(positions.is_ok_and(|p| p <= budget.max_tokens));
    }
});
