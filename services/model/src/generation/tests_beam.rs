//! Beam search against transformers 5.24's `generate(num_beams=...)` on the same mock model
//! (testdata/beam_cases.json, produced by a Python script running the real `_beam_search` on a
//! GPT-2 subclass whose forward returns the mock logits).

use std::ops::ControlFlow;

use super::tests::{mock_tokenizer, run, MockLm, EOS};
use super::*;
use crate::llm::LanguageModel;

#[derive(serde::Deserialize)]
struct Case(
    Vec<u32>,      // prompt ids
    usize,         // max_new_tokens
    usize,         // min_new_tokens
    f64,           // repetition_penalty
    f64,           // length_penalty
    EarlyStopping, // early_stopping
    usize,         // num_beams
    Vec<u32>,      // eos_token_id (empty: none)
    Vec<u32>,      // expected generated ids
);

fn beam_params(c: &Case) -> GenerationParams {
    GenerationParams {
        max_new_tokens: c.1,
        min_new_tokens: c.2,
        repetition_penalty: c.3,
        length_penalty: c.4,
        early_stopping: c.5,
        num_beams: c.6,
        eos_token_ids: c.7.clone(),
        ..GenerationParams::default()
    }
}

#[test]
fn beam_search_matches_transformers_goldens() {
    let cases: Vec<Case> = serde_json::from_str(include_str!("testdata/beam_cases.json")).unwrap();
    assert_eq!(cases.len(), 496);
    let model = MockLm::new();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let params = beam_params(c);
        // No EOS id at all (`beams_to_keep` counts EOS ids: with none, K = 2 * num_beams).
        let no_eos = c.7.is_empty();
        let out = if no_eos {
            run_without_eos(&model, &c.0, &params)
        } else {
            run(&model, &c.0, &params, None, &mut Vec::new())
        };
        if out.token_ids != c.8 {
            failures.push(format!(
                "case {i}: got {:?}, expected {:?}",
                out.token_ids, c.8
            ));
        }
        let ends_with_eos = !no_eos && c.7.contains(out.token_ids.last().unwrap());
        let reason = if ends_with_eos {
            FinishReason::Eos
        } else {
            FinishReason::Length
        };
        assert_eq!(out.finish_reason, reason, "case {i}");
        // Every step runs all beams in one ragged call.
        let batches = std::mem::take(&mut *model.batches.lock().unwrap());
        assert!(batches.iter().all(|&n| n == c.6), "case {i}: {batches:?}");
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The mock model with no EOS id at all (the model's `eos_token_id` is `None`).
fn run_without_eos(model: &MockLm, prompt: &[u32], params: &GenerationParams) -> GenerationOutput {
    struct NoEos<'a>(&'a MockLm, crate::llm::LmInfo);
    impl LanguageModel for NoEos<'_> {
        fn info(&self) -> &crate::llm::LmInfo {
            &self.1
        }
        fn device(&self) -> &candle_core::Device {
            self.0.device()
        }
        fn embed_tokens(&self, ids: &[u32]) -> crate::Result<candle_core::Tensor> {
            self.0.embed_tokens(ids)
        }
        fn new_cache(&self) -> crate::llm::SeqCache {
            self.0.new_cache()
        }
        fn prefill(
            &self,
            e: &candle_core::Tensor,
            c: &mut crate::llm::SeqCache,
        ) -> crate::Result<candle_core::Tensor> {
            self.0.prefill(e, c)
        }
        fn forward_ragged(
            &self,
            i: &[crate::llm::StepInput],
            c: &mut [&mut crate::llm::SeqCache],
        ) -> crate::Result<candle_core::Tensor> {
            self.0.forward_ragged(i, c)
        }
    }
    let mut info = model.info().clone();
    info.eos_token_id = None;
    let m = NoEos(model, info);
    let embeds = model.embed_tokens(prompt).unwrap();
    generate(&m, &embeds, prompt, params, None, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
}

#[test]
fn beam_search_streams_the_best_sequence_at_the_end() {
    let model = MockLm::new();
    let tok = mock_tokenizer();
    let params = GenerationParams {
        num_beams: 3,
        max_new_tokens: 12,
        length_penalty: 2.0,
        ..GenerationParams::default()
    };
    let mut events = Vec::new();
    let out = run(&model, &[0, 5, 7], &params, Some(&tok), &mut events);
    let ids: Vec<u32> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, out.token_ids);
    let streamed: String = events.iter().map(|e| e.text_piece.as_str()).collect();
    assert_eq!(streamed, out.text);
    let n = out.token_ids.len() - usize::from(out.token_ids.last() == Some(&EOS));
    assert_eq!(out.text, tok.decode(&out.token_ids[..n], true).unwrap());
    assert!(events
        .iter()
        .all(|e| e.logprob <= 0.0 && e.logprob.is_finite()));
}

#[test]
fn beam_search_stop_sequence_finishes_hypotheses() {
    let model = MockLm::new();
    let tok = mock_tokenizer();
    let mut params = GenerationParams {
        num_beams: 3,
        max_new_tokens: 16,
        eos_token_ids: vec![u32::MAX],
        ..GenerationParams::default()
    };
    let full = run(&model, &[0, 2], &params, Some(&tok), &mut Vec::new());
    assert_eq!(full.finish_reason, FinishReason::Length);
    let stop: String = full.text.chars().skip(2).take(2).collect();
    params.stop = vec![stop.clone()];
    let out = run(&model, &[0, 2], &params, Some(&tok), &mut Vec::new());
    assert_eq!(
        out.finish_reason,
        FinishReason::StopSequence,
        "{stop:?} in {:?}",
        full.text
    );
    assert!(!out.text.contains(&stop));
    assert!(tok.decode(&out.token_ids, true).unwrap().contains(&stop));
}

#[test]
fn beam_search_step_by_step() {
    // Direct use of the block: the first step sees the prompt's logits on every beam and only
    // beam 0's continuations (the others start at -1e9).
    let params = GenerationParams {
        num_beams: 2,
        max_new_tokens: 3,
        ..GenerationParams::default()
    };
    let mut search = BeamSearch::new(&params, &[], &[EOS]).unwrap();
    let row = [0.0f32, 2.0, 1.0, -1.0];
    let mut logits = [row, row].concat();
    let step = search
        .step(&mut logits, 4, &mut |_| false)
        .unwrap()
        .unwrap();
    assert_eq!(step.parents, vec![0, 0]);
    assert_eq!(step.tokens, vec![1, 2]);
    assert!(!search.is_done());
    assert_eq!(search.running()[0].tokens, vec![1]);
}
