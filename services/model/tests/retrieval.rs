//! Parity with transformers' `Blip2ForImageTextRetrieval` (fp32, eager attention) on the small
//! random retrieval checkpoint `tests/fixtures/models/retrieval-a` (made by
//! `tools/fixtures/generate_retrieval.py`): token ids (truncation included), normalised image and
//! text embeddings, ITC scores, ITM logits and probabilities within 1e-5, for every pair of 3
//! images and 5 texts of different lengths in one padded batch.

use blip2_model::retrieval::{
    is_retrieval_checkpoint, itc_scores, RetrievalLoadOptions, RetrievalModel,
};
use candle_core::{IndexOp, Tensor};
use serde::Deserialize;

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
use common::{fixtures, goldens, max_abs_diff};

const TOLERANCE: f32 = 1e-5;
const NAME: &str = "retrieval-a";

#[derive(Deserialize)]
struct Text {
    text: String,
    input_ids: Vec<u32>,
    num_tokens: usize,
    truncated: bool,
}

#[derive(Deserialize)]
struct Cases {
    images: Vec<String>,
    texts: Vec<Text>,
    num_query_tokens: usize,
    image_text_hidden_size: usize,
    max_position_embeddings: usize,
    dec_token_id: u32,
}

fn cases() -> Cases {
    let path = fixtures().join("goldens").join(NAME).join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn load() -> RetrievalModel {
    RetrievalModel::load(
        &fixtures().join("models").join(NAME),
        &RetrievalLoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("loading {NAME}: {e}"))
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let diff = max_abs_diff(ours, reference);
    eprintln!("  {what}: max abs diff {diff:.3e}");
    assert!(
        diff <= TOLERANCE,
        "{what}: max abs diff {diff} > {TOLERANCE}"
    );
}

fn texts(cases: &Cases) -> Vec<&str> {
    cases.texts.iter().map(|t| t.text.as_str()).collect()
}

#[test]
fn tokenizer_matches_reference_with_truncation() {
    let model = load();
    let cases = cases();
    assert_eq!(model.tokenizer().max_len(), cases.max_position_embeddings);
    assert_eq!(
        model.tokenizer().token_to_id("[DEC]"),
        Some(cases.dec_token_id)
    );
    let tokenized = model.tokenize(&texts(&cases)).unwrap();
    for (ours, reference) in tokenized.iter().zip(&cases.texts) {
        assert_eq!(ours.ids, reference.input_ids, "{}", reference.text);
        assert_eq!(ours.num_tokens, reference.num_tokens, "{}", reference.text);
        assert_eq!(ours.truncated, reference.truncated, "{}", reference.text);
    }
    assert!(tokenized.iter().any(|t| t.truncated));
    let err = model.tokenize(&["a cat", "  "]).unwrap_err().to_string();
    assert!(err.contains("text 1") && err.contains("empty"), "{err}");
}

#[test]
fn embeddings_and_scores_match_reference() {
    let model = load();
    let cases = cases();
    let gold = goldens(NAME, "retrieval.safetensors");
    assert_eq!(model.num_query_tokens(), cases.num_query_tokens);
    assert_eq!(model.embed_dim(), cases.image_text_hidden_size);

    let image = model.embed_pixels(&gold["pixel_values"]).unwrap();
    assert_close("image_embeds", &image, &gold["image_embeds"]);

    let tokenized = model.tokenize(&texts(&cases)).unwrap();
    let text = model.embed_texts(&tokenized).unwrap();
    assert_close("text_embeds (padded batch)", &text, &gold["text_embeds"]);
    // Padding masks: each text alone gives its batched embedding.
    for (i, t) in tokenized.iter().enumerate() {
        let alone = model.embed_texts(std::slice::from_ref(t)).unwrap();
        assert_close(
            &format!("text_embeds[{i}] alone"),
            &alone.squeeze(0).unwrap(),
            &gold["text_embeds"].i(i).unwrap(),
        );
    }
    // Unit norm.
    let norms = text
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");

    let itc = itc_scores(&image, &text).unwrap();
    assert_close("itc_scores", &itc, &gold["itc_scores"]);

    // ITM: every (image, text) pair in one padded batch.
    let (nb, nt) = (cases.images.len(), tokenized.len());
    let features = model.vision_features(&gold["pixel_values"]).unwrap();
    let (_, t, w) = features.dims3().unwrap();
    let pairs = features
        .unsqueeze(1)
        .unwrap()
        .expand((nb, nt, t, w))
        .unwrap()
        .reshape((nb * nt, t, w))
        .unwrap();
    let pair_texts: Vec<_> = (0..nb).flat_map(|_| tokenized.iter().cloned()).collect();
    let logits = model.itm_logits(&pairs, &pair_texts).unwrap();
    assert_close(
        "itm_logits",
        &logits.reshape((nb, nt, 2)).unwrap(),
        &gold["itm_logits"],
    );
}

#[test]
fn match_scores_one_image_against_texts() {
    let model = load();
    let cases = cases();
    let gold = goldens(NAME, "retrieval.safetensors");
    let tokenized = model.tokenize(&texts(&cases)).unwrap();
    let probs = gold["itm_probs"].to_vec2::<f32>().unwrap();
    let itc = gold["itc_scores"].to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for (b, _) in cases.images.iter().enumerate() {
        let pixels = gold["pixel_values"].i(b).unwrap();
        let scores = model.match_pixels(&pixels, &tokenized).unwrap();
        for (n, s) in scores.iter().enumerate() {
            worst = worst
                .max((s.itm_probability - probs[b][n]).abs())
                .max((s.itc_score - itc[b][n]).abs());
        }
    }
    eprintln!("  match scores: max abs diff {worst:.3e}");
    assert!(worst <= TOLERANCE, "{worst}");
    // The scores tell images apart (the fixture is not degenerate).
    let spread = probs.iter().flatten().fold(0f32, |m, p| m.max(*p))
        - probs.iter().flatten().fold(1f32, |m, p| m.min(*p));
    assert!(spread > 0.5, "{spread}");
}

#[test]
fn image_files_embed_as_reference() {
    let model = load();
    let cases = cases();
    let gold = goldens(NAME, "retrieval.safetensors");
    let bytes: Vec<Vec<u8>> = cases
        .images
        .iter()
        .map(|f| std::fs::read(fixtures().join("images").join(f)).unwrap())
        .collect();
    let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
    let pixels = model.pixel_batch(&refs).unwrap();
    let pixel_diff = max_abs_diff(&pixels, &gold["pixel_values"]);
    eprintln!("  pixel_values from files: max abs diff {pixel_diff:.3e}");
    assert!(pixel_diff <= 1e-6, "{pixel_diff}");
    let image = model.embed_images(&refs).unwrap();
    assert_close("image_embeds from files", &image, &gold["image_embeds"]);
}

#[test]
fn checkpoint_kind_is_detected() {
    assert!(is_retrieval_checkpoint(&fixtures().join("models").join(NAME)).unwrap());
    assert!(!is_retrieval_checkpoint(&fixtures().join("models").join("opt-a")).unwrap());
    let err = RetrievalModel::load(
        &fixtures().join("models").join("opt-a"),
        &RetrievalLoadOptions::default(),
    )
    .err()
    .expect("a captioning checkpoint is not a retrieval checkpoint")
    .to_string();
    assert!(err.contains("itm_head"), "{err}");
}
