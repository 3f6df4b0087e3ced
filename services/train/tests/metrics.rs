//! The caption and answer metrics on cases worked out by hand.

use blip2_train::metrics::{
    accuracy_by_type, attribute_recall, cider_d, exact_match, gold_by_equal_text, recall_at_k,
    recall_at_k_gold, Accuracy,
};

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
fn accuracy_is_counted_per_question_type() {
    let results = [
        ("color", "Red.", "red"),
        ("color", "blue", "red"),
        ("count", "two", "two"),
        (
            "describe",
            "two red circles on the left",
            "two red circles on the left",
        ),
    ];
    let by_type = accuracy_by_type(results);
    assert_eq!(
        by_type.keys().collect::<Vec<_>>(),
        ["color", "count", "describe"]
    );
    assert_eq!(
        by_type["color"],
        Accuracy {
            correct: 1,
            total: 2
        }
    );
    assert_eq!(by_type["color"].rate(), 0.5);
    assert_eq!(by_type["count"].rate(), 1.0);
    assert_eq!(Accuracy::default().rate(), 0.0);
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
fn cider_d_weighs_shared_ngrams_by_their_document_frequency() {
    // Three images, one reference each: "red" and "square" occur in two reference sets
    // (idf a = ln 3 - ln 2), every other n-gram in one (idf b = ln 3) or none (also ln 3).
    let candidates = s(&["red square", "red square", "blue circle"]);
    let references = vec![s(&["red circle"]), s(&["red square"]), s(&["blue square"])];
    let (a, b) = (1.5f64.ln(), 3f64.ln());
    // A: unigrams red (a), square (a) against red (a), circle (b): cosine
    // a^2 / (sqrt(2) a * sqrt(a^2 + b^2)); no shared bigram.
    let image_a = a / (2f64.sqrt() * (a * a + b * b).sqrt()) / 4.0 * 10.0;
    // B: identical: unigram and bigram cosines 1.
    let image_b = 2.0 / 4.0 * 10.0;
    // C: blue (b), circle (b) against blue (b), square (a).
    let image_c = b / (2f64.sqrt() * (a * a + b * b).sqrt()) / 4.0 * 10.0;
    let score = cider_d(&candidates, &references);
    let expected = (image_a + image_b + image_c) / 3.0;
    assert!((score - expected).abs() < 1e-12, "{score} vs {expected}");
    // Several references: the mean over them.
    let two = cider_d(
        &s(&["red square", "blue square"]),
        &[
            s(&["red square", "red circle"]),
            s(&["blue square", "blue square"]),
        ],
    );
    assert!(two > 0.0 && two < 5.0, "{two}");
    assert_eq!(cider_d(&[], &[]), 0.0);
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

#[test]
fn recall_at_k_counts_ties_and_nan_as_misses() {
    let flat = vec![vec![0.5f32; 3]; 3];
    assert_eq!(recall_at_k(&flat, 1), 0.0);
    assert_eq!(recall_at_k(&flat, 2), 0.0);
    assert_eq!(recall_at_k(&flat, 3), 1.0);
    let nan = vec![vec![f32::NAN, 0.1], vec![0.1, 0.9]];
    assert_eq!(recall_at_k(&nan, 1), 0.5);
    assert_eq!(recall_at_k(&[], 1), 0.0);
}

#[test]
fn recall_at_k_accepts_every_item_with_the_same_text() {
    // Images 0 and 2 share a caption: a caption query finding either of them is a hit.
    let texts = s(&["two red circles", "one blue square", "Two red circles."]);
    let gold = gold_by_equal_text(&texts);
    assert_eq!(gold, vec![vec![0, 2], vec![1], vec![0, 2]]);
    let sim = vec![
        vec![0.2, 0.1, 0.9],
        vec![0.3, 0.8, 0.1],
        vec![0.1, 0.7, 0.6],
    ];
    // Strictly on the diagonal query 0 ranks 2nd; any same-caption image ranks 1st.
    assert!((recall_at_k(&sim, 1) - 1.0 / 3.0).abs() < 1e-12);
    assert!((recall_at_k_gold(&sim, &gold, 1) - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(recall_at_k_gold(&sim, &gold, 2), 1.0);
    // A query without a correct item is a miss.
    assert_eq!(
        recall_at_k_gold(&sim, &[vec![], vec![1], vec![9]], 3),
        1.0 / 3.0
    );
}
