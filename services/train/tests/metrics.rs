//! The caption and answer metrics on cases worked out by hand.

use blip2_train::metrics::{attribute_recall, cider_d, exact_match, recall_at_k};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn exact_match_ignores_case_spacing_and_trailing_punctuation() {
    assert!(exact_match(" Red. ", "red"));
    assert!(exact_match("two  red circles", "two red circles"));
    assert!(!exact_match("reddish", "red"));
    assert!(!exact_match("red circle", "red"));
}

#[test]
fn attribute_recall_counts_plurals() {
    let attrs = s(&["red", "circle", "two", "left"]);
    assert_eq!(attribute_recall("two red circles on the left", &attrs), 1.0);
    assert_eq!(attribute_recall("two blue circles at the top", &attrs), 0.5);
    assert_eq!(attribute_recall("", &attrs), 0.0);
}

#[test]
fn cider_d_matches_a_hand_computation() {
    // Two images, one reference each; every n-gram occurs in one reference set, so every idf is
    // ln 2 and cancels in the cosine.
    // Image A: "red square" vs "red circle": unigram cosine 1/2, no shared bigram, no 3/4-grams:
    // mean over n = 0.5 / 4, times 10 = 1.25.
    // Image B: identical two-word caption: unigram and bigram cosines 1: 2 / 4 * 10 = 5.
    let candidates = s(&["red square", "blue square"]);
    let references = vec![s(&["red circle"]), s(&["blue square"])];
    let score = cider_d(&candidates, &references);
    assert!((score - (1.25 + 5.0) / 2.0).abs() < 1e-12, "{score}");
    // A length difference of d words multiplies by exp(-d^2 / 72).
    let longer = cider_d(&s(&["red square x y"]), &[s(&["red square"])]);
    assert_eq!(longer, 0.0, "a single image: every idf is ln 1 = 0");
    let with_penalty = cider_d(
        &s(&["blue square", "red circle circle"]),
        &[s(&["blue square"]), s(&["red circle"])],
    );
    // Image B: unigram weights red ln2, circle 2 ln2 clipped to ln2 against the reference's ln2;
    // cosine = (ln2*ln2 + ln2*ln2) / (sqrt(5) ln2 * sqrt(2) ln2) = 2 / sqrt(10);
    // bigrams "red circle" ln2, "circle circle" ln2 vs "red circle": 1 / sqrt(2);
    // trigram "red circle circle" absent from the reference: 0. Length 3 vs 2.
    let b = (2.0 / 10f64.sqrt() + 1.0 / 2f64.sqrt()) / 4.0 * 10.0 * (-1.0f64 / 72.0).exp();
    assert!(
        (with_penalty - (5.0 + b) / 2.0).abs() < 1e-12,
        "{with_penalty}"
    );
}

#[test]
fn recall_at_k_ranks_the_diagonal() {
    let sim = vec![
        vec![0.9, 0.1, 0.2],
        vec![0.8, 0.5, 0.1],
        vec![0.3, 0.4, 0.2],
    ];
    assert!((recall_at_k(&sim, 1) - 1.0 / 3.0).abs() < 1e-12);
    assert!((recall_at_k(&sim, 2) - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(recall_at_k(&sim, 3), 1.0);
}
