//! Prompt assembly: the separator rule, images at the turn they were attached at, the budget.

use blip2_proto::v1::prompt_segment::Kind;
use blip2_proto::v1::{ImagePlaceholder, PromptSegment, PromptTemplate};
use blip2_session::prompt::{default_template, turns_to_drop, PromptBudget};
use blip2_session::{build_segments, PastTurn, SessionError};

fn text(t: &str) -> PromptSegment {
    PromptSegment {
        kind: Some(Kind::Text(t.to_string())),
    }
}

fn image(sha256: &str) -> PromptSegment {
    PromptSegment {
        kind: Some(Kind::Image(ImagePlaceholder {
            image_sha256: sha256.to_string(),
        })),
    }
}

fn turn(question: &str, answer: &str, images: &[&str]) -> PastTurn {
    (
        question.to_string(),
        answer.to_string(),
        images.iter().map(|s| s.to_string()).collect(),
    )
}

fn shas(images: &[&str]) -> Vec<String> {
    images.iter().map(|s| s.to_string()).collect()
}

/// One token per whitespace-separated word: easy to count by hand.
fn words(text: &str) -> Result<usize, SessionError> {
    Ok(text.split_whitespace().count())
}

#[test]
fn first_turn_with_an_image_is_the_lavis_prompt() {
    let segments = build_segments(&default_template(), &[], ("what is this?", &shas(&["aaa"])));
    // The soft prompt is followed directly by the text, with no separator between.
    assert_eq!(
        segments,
        vec![image("aaa"), text("Question: what is this? Answer:")]
    );
}

#[test]
fn an_empty_template_is_the_default_one() {
    let turns = vec![turn("what is this?", "a dog", &["aaa"])];
    let current_images = shas(&["bbb"]);
    assert_eq!(
        build_segments(
            &PromptTemplate::default(),
            &turns,
            ("and this?", &current_images)
        ),
        build_segments(&default_template(), &turns, ("and this?", &current_images)),
    );
}

#[test]
fn three_turns_with_a_second_image_at_turn_two() {
    let turns = vec![
        turn("what is this?", "a dog", &["aaa"]),
        turn("and this?", "a cat", &["bbb"]),
    ];
    let segments = build_segments(&default_template(), &turns, ("which is bigger?", &[]));
    assert_eq!(
        segments,
        vec![
            image("aaa"),
            text("Question: what is this? Answer: a dog. "),
            image("bbb"),
            text("Question: and this? Answer: a cat. Question: which is bigger? Answer:"),
        ]
    );
}

#[test]
fn system_text_and_separator_come_before_an_image() {
    let template = PromptTemplate {
        system: "You describe images.".into(),
        separator: "\n".into(),
        ..default_template()
    };
    let turns = vec![turn("what is it?", "a dog", &[])];
    let segments = build_segments(&template, &turns, ("and here?", &shas(&["aaa", "bbb"])));
    assert_eq!(
        segments,
        vec![
            text("You describe images.\nQuestion: what is it? Answer: a dog.\n"),
            image("aaa"),
            image("bbb"),
            text("Question: and here? Answer:"),
        ]
    );
}

#[test]
fn a_turn_without_a_question_is_its_images_then_its_answer() {
    let segments = build_segments(&default_template(), &[], ("", &shas(&["aaa"])));
    assert_eq!(segments, vec![image("aaa")]);
    let turns = vec![turn("", "a dog on a beach", &["aaa"])];
    let segments = build_segments(&default_template(), &turns, ("what color?", &[]));
    assert_eq!(
        segments,
        vec![
            image("aaa"),
            text("a dog on a beach Question: what color? Answer:")
        ]
    );
}

#[test]
fn user_text_cannot_inject_image_markers() {
    let turns = vec![turn("<image> hi", "<image>", &[])];
    let segments = build_segments(&default_template(), &turns, ("x<image>y", &[]));
    assert_eq!(
        segments,
        vec![text(
            "Question: <image > hi Answer: <image >. Question: x<image >y Answer:"
        )]
    );
}

#[test]
fn question_with_template_braces_is_not_substituted_twice() {
    let segments = build_segments(&default_template(), &[], ("what is {answer}?", &[]));
    assert_eq!(segments, vec![text("Question: what is {answer}? Answer:")]);
}

#[test]
fn small_budget_drops_oldest_turns_never_the_current_image() {
    let template = default_template();
    // Each past turn: 4 words + 1 image of 4 positions = 8; current: 3 words + 2 images = 11.
    let turns = vec![
        turn("q1", "a1", &["img1"]),
        turn("q2", "a2", &["img2"]),
        turn("q3", "a3", &["img3"]),
    ];
    let current_images = shas(&["cur1", "cur2"]);
    let current = ("q4", current_images.as_slice());
    let budget = |max_tokens| PromptBudget {
        max_tokens,
        num_query_tokens: 4,
    };
    assert_eq!(
        turns_to_drop(&template, &turns, current, budget(35), &words).unwrap(),
        0
    );
    assert_eq!(
        turns_to_drop(&template, &turns, current, budget(34), &words).unwrap(),
        1
    );
    let drop = turns_to_drop(&template, &turns, current, budget(20), &words).unwrap();
    assert_eq!(drop, 2);
    let segments = build_segments(&template, &turns[drop..], current);
    assert_eq!(
        segments,
        vec![
            image("img3"),
            text("Question: q3 Answer: a3. "),
            image("cur1"),
            image("cur2"),
            text("Question: q4 Answer:"),
        ]
    );
    // Only the current turn fits: every earlier turn goes, the current images stay.
    let drop = turns_to_drop(&template, &turns, current, budget(11), &words).unwrap();
    assert_eq!(drop, 3);
    let segments = build_segments(&template, &turns[drop..], current);
    assert_eq!(
        segments,
        vec![image("cur1"), image("cur2"), text("Question: q4 Answer:")]
    );
    // Not even the current turn fits: refused.
    assert!(matches!(
        turns_to_drop(&template, &turns, current, budget(10), &words),
        Err(SessionError::InvalidArgument(_))
    ));
}

#[test]
fn answers_go_in_trimmed_as_lavis_reuses_them() {
    // OPT's generated text starts with a space; the template must not double it, so the
    // answer re-tokenises to the generated ids (and the LLM's prefix cache covers it).
    let turns = vec![turn("what is this?", " a dog \n", &[])];
    let segments = build_segments(&default_template(), &turns, ("and?", &[]));
    assert_eq!(
        segments,
        vec![text(
            "Question: what is this? Answer: a dog. Question: and? Answer:"
        )]
    );
}
