//! Tests of greedy and sampled decoding, processors, stop sequences and detokenisation, on a
//! mock language model whose logits are a hash of the whole sequence (the same function as the
//! Python mock that produced the transformers goldens in `testdata/`).

use std::ops::ControlFlow;
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use super::logits::{apply_repetition_penalty, top_k_filter, top_p_filter};
use super::*;
use crate::llm::{LanguageModel, LayerKv, LmInfo, SeqCache, StepInput};

pub(super) const VOCAB: usize = 12;
pub(super) const EOS: u32 = 3;

fn seq_hash(ids: &[u32]) -> u32 {
    ids.iter()
        .fold(2166136261u32, |h, &t| (h ^ (t + 1)).wrapping_mul(16777619))
}

fn mix(h: u32, v: u32) -> u32 {
    let mut x = h ^ (v + 1).wrapping_mul(0x9E3779B1);
    x = x.wrapping_mul(0x85EBCA6B);
    x ^= x >> 13;
    x = x.wrapping_mul(0xC2B2AE35);
    x ^ (x >> 16)
}

/// The mock's next-token logits after `ids` (prompt and generated).
pub(super) fn mock_logits(ids: &[u32]) -> Vec<f32> {
    let h = seq_hash(ids);
    (0..VOCAB as u32)
        .map(|v| {
            let mut val = (mix(h, v) % 8191) as f64 / 1024.0 - 4.0;
            if v == EOS {
                val += 0.4;
            }
            val as f32
        })
        .collect()
}

/// A decoder-only mock: embeddings are `[id]`, the cache holds the token history.
pub(super) struct MockLm {
    info: LmInfo,
    device: Device,
    /// Number of sequences in each `forward_ragged` call.
    pub batches: Mutex<Vec<usize>>,
}

impl MockLm {
    pub(super) fn new() -> Self {
        MockLm {
            info: LmInfo {
                hidden_size: 1,
                vocab_size: VOCAB,
                max_positions: 256,
                bos_token_id: Some(0),
                eos_token_id: Some(EOS),
                pad_token_id: Some(1),
                decoder_start_token_id: None,
                is_encoder_decoder: false,
            },
            device: Device::Cpu,
            batches: Mutex::new(Vec::new()),
        }
    }

    fn history(cache: &SeqCache) -> crate::Result<Vec<u32>> {
        Ok(match &cache.self_kv[0] {
            Some(kv) => kv.k.to_vec1::<f32>()?.iter().map(|&x| x as u32).collect(),
            None => Vec::new(),
        })
    }

    fn extend(&self, cache: &mut SeqCache, ids: &[u32]) -> crate::Result<Vec<f32>> {
        let mut hist = Self::history(cache)?;
        hist.extend_from_slice(ids);
        let t = Tensor::from_vec(
            hist.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            hist.len(),
            &self.device,
        )?;
        cache.self_kv[0] = Some(LayerKv { k: t.clone(), v: t });
        cache.len = hist.len();
        Ok(mock_logits(&hist))
    }
}

impl LanguageModel for MockLm {
    fn info(&self) -> &LmInfo {
        &self.info
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn embed_tokens(&self, ids: &[u32]) -> crate::Result<Tensor> {
        let v: Vec<f32> = ids.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, (ids.len(), 1), &self.device)?)
    }
    fn new_cache(&self) -> SeqCache {
        SeqCache::new(1)
    }
    fn prefill(&self, prompt_embeds: &Tensor, cache: &mut SeqCache) -> crate::Result<Tensor> {
        let ids: Vec<u32> = prompt_embeds
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|&x| x as u32)
            .collect();
        let logits = self.extend(cache, &ids)?;
        Ok(Tensor::from_vec(logits, VOCAB, &self.device)?)
    }
    fn forward_ragged(
        &self,
        inputs: &[StepInput],
        caches: &mut [&mut SeqCache],
    ) -> crate::Result<Tensor> {
        self.batches
            .lock()
            .map_err(|_| crate::Error::InvalidInput("poisoned".into()))?
            .push(inputs.len());
        let mut all = Vec::new();
        for (input, cache) in inputs.iter().zip(caches.iter_mut()) {
            let StepInput::Tokens(ids) = input else {
                return Err(crate::Error::InvalidInput("mock takes tokens".into()));
            };
            all.extend(self.extend(cache, ids)?);
        }
        Ok(Tensor::from_vec(all, (inputs.len(), VOCAB), &self.device)?)
    }
}

pub(super) fn run(
    model: &MockLm,
    prompt: &[u32],
    params: &GenerationParams,
    tokenizer: Option<&Tokenizer>,
    events: &mut Vec<TokenEvent>,
) -> GenerationOutput {
    let embeds = model.embed_tokens(prompt).unwrap();
    let mut on_token = |e: &TokenEvent| {
        events.push(e.clone());
        ControlFlow::Continue(())
    };
    generate(model, &embeds, prompt, params, tokenizer, &mut on_token).unwrap()
}

/// A word-level tokenizer over the mock's 12 ids whose decoder concatenates the tokens.
pub(super) fn mock_tokenizer() -> Tokenizer {
    let json = r#"{"version":"1.0","truncation":null,"padding":null,
      "added_tokens":[
        {"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
        {"id":1,"content":"<pad>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
        {"id":3,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
      "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":{"type":"Fuse"},
      "model":{"type":"WordLevel","unk_token":"<s>","vocab":{"<s>":0,"<pad>":1,"ab":2,"</s>":3,"c":4,
        "d ":5,"é":6,"x":7,"yz":8," ":9,"q":10,"w":11}}}"#;
    json.parse().unwrap()
}

fn greedy_params(max_new_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        ..GenerationParams::default()
    }
}

#[test]
fn greedy_matches_transformers_goldens() {
    /// prompt, max_new_tokens, min_new_tokens, repetition_penalty, expected ids.
    type Case = (Vec<u32>, usize, usize, f64, Vec<u32>);
    let cases: Vec<Case> =
        serde_json::from_str(include_str!("testdata/greedy_cases.json")).unwrap();
    let model = MockLm::new();
    for (prompt, max_new, min_new, rep, expected) in cases {
        let params = GenerationParams {
            min_new_tokens: min_new,
            repetition_penalty: rep,
            ..greedy_params(max_new)
        };
        let mut events = Vec::new();
        let out = run(&model, &prompt, &params, None, &mut events);
        assert_eq!(
            out.token_ids, expected,
            "{prompt:?} min {min_new} rep {rep}"
        );
        let reason = if expected.last() == Some(&EOS) {
            FinishReason::Eos
        } else {
            FinishReason::Length
        };
        assert_eq!(out.finish_reason, reason);
        assert_eq!(out.prompt_tokens, prompt.len());
        let ids: Vec<u32> = events.iter().map(|e| e.id).collect();
        assert_eq!(ids, expected);
        // One prefill, then one single-sequence step per token but the last.
        let batches = std::mem::take(&mut *model.batches.lock().unwrap());
        assert_eq!(batches, vec![1; expected.len() - 1]);
    }
}

#[test]
fn greedy_is_argmax_and_logprob_is_log_softmax() {
    let model = MockLm::new();
    let prompt = [0u32, 5, 7];
    let mut events = Vec::new();
    let out = run(&model, &prompt, &greedy_params(5), None, &mut events);
    let mut seq = prompt.to_vec();
    for (e, &id) in events.iter().zip(&out.token_ids) {
        let logits = mock_logits(&seq);
        let best = (0..VOCAB)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        assert_eq!(id as usize, best);
        let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((e.logprob as f64 - (logits[best] as f64 - lse)).abs() < 1e-5);
        seq.push(id);
    }
    assert_eq!(out.finish_reason, FinishReason::Eos);
    assert_eq!(out.token_ids, vec![11, 10, 3]);
}

#[test]
fn min_new_tokens_suppresses_eos() {
    let model = MockLm::new();
    let params = GenerationParams {
        min_new_tokens: 6,
        ..greedy_params(10)
    };
    let out = run(&model, &[0, 5, 7], &params, None, &mut Vec::new());
    assert!(out.token_ids.len() >= 6);
    assert!(!out.token_ids[..5].contains(&EOS), "{:?}", out.token_ids);
}

#[test]
fn repetition_penalty_matches_transformers() {
    // RepetitionPenaltyLogitsProcessor(1.3) on input_ids [[0, 1, 3, 1]] and (0.7) on [[1, 2, 4]].
    let scores = [0.5f32, -1.5, 2.0, 0.0, -3.0];
    let mut s = scores;
    apply_repetition_penalty(&mut s, &[0, 1, 3], 1.3);
    assert_eq!(s, [0.384_615_4, -1.949_999_9, 2.0, 0.0, -3.0]);
    let mut s = scores;
    apply_repetition_penalty(&mut s, &[1, 2, 4], 0.7);
    assert_eq!(s, [0.5, -1.05, 2.857_143, 0.0, -2.1]);
    // Through the processor: prompt ids and generated ids, each penalised once.
    let params = GenerationParams {
        repetition_penalty: 1.3,
        ..GenerationParams::default()
    };
    let mut p = LogitsProcessor::new(&params, &[0, 1], &[EOS]).unwrap();
    let mut s = scores;
    p.process(&mut s, &[3, 1, 1]);
    assert_eq!(s, [0.384_615_4, -1.949_999_9, 2.0, 0.0, -3.0]);
}

fn warped(scores: &[f32], f: impl FnOnce(&mut [f32])) -> Vec<Option<f32>> {
    let mut s = scores.to_vec();
    f(&mut s);
    s.into_iter().map(|x| x.is_finite().then_some(x)).collect()
}

#[test]
fn warpers_match_transformers() {
    let a = [1.0f32, 2.5, -0.5, 2.5, 0.25, 3.0, -2.0, 1.5];
    let (mut order, mut probs) = (Vec::new(), Vec::new());
    let n = None;
    let keep = |idx: &[usize]| -> Vec<Option<f32>> {
        (0..a.len())
            .map(|i| idx.contains(&i).then_some(a[i]))
            .collect()
    };
    // TopKLogitsWarper: ties with the k-th value are kept.
    assert_eq!(warped(&a, |s| top_k_filter(s, 3)), keep(&[1, 3, 5]));
    assert_eq!(warped(&a, |s| top_k_filter(s, 2)), keep(&[1, 3, 5]));
    assert_eq!(
        warped(&a, |s| top_k_filter(s, 20)),
        keep(&[0, 1, 2, 3, 4, 5, 6, 7])
    );
    // TopPLogitsWarper: cutoff is (1 - top_p) in f64, cast to f32.
    let mut top_p = |p: f64| {
        warped(&a, |s| {
            top_p_filter(s, (1.0 - p) as f32, &mut order, &mut probs)
        })
    };
    assert_eq!(top_p(0.9), keep(&[1, 3, 5, 7]));
    assert_eq!(top_p(0.5), keep(&[3, 5]));
    assert_eq!(top_p(0.01), keep(&[5]));
    assert_eq!(top_p(0.95), keep(&[0, 1, 3, 5, 7]));
    // Temperature 0.7, top-k 4, top-p as one sampling processor, vs the warper chain.
    let c = [-1.0f32, 0.3, 0.3, 0.3, -2.0, 1.1];
    for (p, expected) in [
        (0.3, vec![n, n, n, n, n, Some(2.2)]),
        (0.6, vec![n, n, n, n, n, Some(2.2)]),
        (0.8, vec![n, n, Some(0.6), Some(0.6), n, Some(2.2)]),
    ] {
        let params = GenerationParams {
            do_sample: true,
            temperature: 0.5,
            top_k: 4,
            top_p: p,
            seed: Some(1),
            ..GenerationParams::default()
        };
        let mut proc = LogitsProcessor::new(&params, &[], &[EOS]).unwrap();
        assert_eq!(warped(&c, |s| proc.process(s, &[])), expected, "top_p {p}");
    }
    let params = GenerationParams {
        do_sample: true,
        temperature: 0.7,
        top_k: 0,
        ..GenerationParams::default()
    };
    let mut proc = LogitsProcessor::new(&params, &[], &[]).unwrap();
    let mut s = a;
    proc.process(&mut s, &[]);
    assert_eq!(
        s,
        [
            1.428_571_5,
            3.571_428_5,
            -0.714_285_73,
            3.571_428_5,
            0.357_142_87,
            4.285_714,
            -2.857_143,
            2.142_857
        ]
    );
}

fn sampling(seed: u64) -> GenerationParams {
    GenerationParams {
        do_sample: true,
        temperature: 1.5,
        top_k: 0,
        seed: Some(seed),
        eos_token_ids: vec![99],
        ..greedy_params(30)
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let model = MockLm::new();
    let a = run(&model, &[0, 2], &sampling(7), None, &mut Vec::new());
    let b = run(&model, &[0, 2], &sampling(7), None, &mut Vec::new());
    let c = run(&model, &[0, 2], &sampling(8), None, &mut Vec::new());
    assert_eq!(a.token_ids.len(), 30);
    assert_eq!(a, b);
    assert_ne!(a.token_ids, c.token_ids);
    // top_k = 1 leaves one token: sampling equals greedy.
    let params = GenerationParams {
        top_k: 1,
        eos_token_ids: vec![EOS],
        ..sampling(3)
    };
    let sampled = run(&model, &[0, 5, 7], &params, None, &mut Vec::new());
    let greedy = run(
        &model,
        &[0, 5, 7],
        &greedy_params(30),
        None,
        &mut Vec::new(),
    );
    assert_eq!(sampled.token_ids, greedy.token_ids);
    // Temperature 0 is greedy even with do_sample.
    let params = GenerationParams {
        temperature: 0.0,
        eos_token_ids: vec![EOS],
        ..sampling(3)
    };
    let t0 = run(&model, &[0, 5, 7], &params, None, &mut Vec::new());
    assert_eq!(t0.token_ids, greedy.token_ids);
}

#[test]
fn sampling_follows_the_distribution() {
    let params = GenerationParams {
        do_sample: true,
        top_k: 0,
        seed: Some(42),
        ..GenerationParams::default()
    };
    let mut p = LogitsProcessor::new(&params, &[], &[]).unwrap();
    let scores = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
    let mut counts = [0usize; 3];
    for _ in 0..4000 {
        counts[p.select(&scores).unwrap().id as usize] += 1;
    }
    assert_eq!(counts[2], 0);
    assert!(
        (counts[1] as f64 / 4000.0 - 0.75).abs() < 0.03,
        "{counts:?}"
    );
}

#[test]
fn stop_sequence_cuts_text_and_holds_it_back() {
    let model = MockLm::new();
    let tok = mock_tokenizer();
    let mut params = greedy_params(40);
    params.eos_token_ids = vec![99];
    let full = run(&model, &[0, 2], &params, Some(&tok), &mut Vec::new());
    assert_eq!(full.text, tok.decode(&full.token_ids, true).unwrap());
    // A stop sequence spanning tokens, starting after some text.
    let start = full.text.char_indices().nth(4).unwrap().0;
    let stop: String = full.text[start..].chars().take(3).collect();
    let cut = full.text.find(&stop).unwrap();
    params.stop = vec!["never-there".into(), stop.clone()];
    let mut events = Vec::new();
    let out = run(&model, &[0, 2], &params, Some(&tok), &mut events);
    assert_eq!(out.finish_reason, FinishReason::StopSequence);
    assert_eq!(out.text, full.text[..cut]);
    let streamed: String = events.iter().map(|e| e.text_piece.as_str()).collect();
    assert_eq!(streamed, out.text, "stop {stop:?}");
    let ids: Vec<u32> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, out.token_ids);
    assert!(tok.decode(&out.token_ids, true).unwrap().contains(&stop));
    assert!(!tok
        .decode(&out.token_ids[..out.token_ids.len() - 1], true)
        .unwrap()
        .contains(&stop));
}

#[test]
fn streamed_text_equals_decode_and_eos_adds_no_text() {
    let model = MockLm::new();
    let tok = mock_tokenizer();
    let params = GenerationParams {
        stop: vec!["zzz".into()],
        skip_special_tokens: false,
        ..greedy_params(12)
    };
    let mut events = Vec::new();
    let out = run(&model, &[0, 11, 6, 8, 2], &params, Some(&tok), &mut events);
    assert_eq!(out.finish_reason, FinishReason::Eos);
    assert_eq!(events.last().unwrap().text_piece, "");
    let n = out.token_ids.len() - 1;
    assert_eq!(out.text, tok.decode(&out.token_ids[..n], false).unwrap());
    let streamed: String = events.iter().map(|e| e.text_piece.as_str()).collect();
    assert_eq!(streamed, out.text);
}

#[test]
fn cancellation_stops_after_the_token() {
    let model = MockLm::new();
    let embeds = model.embed_tokens(&[0, 2]).unwrap();
    let mut params = sampling(5);
    params.max_new_tokens = 20;
    let mut seen = 0;
    let mut on_token = |_: &TokenEvent| {
        seen += 1;
        if seen == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let out = generate(&model, &embeds, &[0, 2], &params, None, &mut on_token).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(out.token_ids.len(), 3);
}

#[test]
fn validation_names_the_field() {
    let bad = [
        GenerationParams {
            top_p: 0.0,
            ..GenerationParams::default()
        },
        GenerationParams {
            top_p: 1.5,
            ..GenerationParams::default()
        },
        GenerationParams {
            temperature: -1.0,
            ..GenerationParams::default()
        },
        GenerationParams {
            repetition_penalty: 0.0,
            ..GenerationParams::default()
        },
        GenerationParams {
            num_beams: 0,
            ..GenerationParams::default()
        },
        GenerationParams {
            num_beams: 17,
            ..GenerationParams::default()
        },
        GenerationParams {
            max_new_tokens: 0,
            ..GenerationParams::default()
        },
        GenerationParams {
            min_new_tokens: 30,
            ..GenerationParams::default()
        },
        GenerationParams {
            stop: vec![String::new()],
            ..GenerationParams::default()
        },
        GenerationParams {
            stop: vec!["x".repeat(257)],
            ..GenerationParams::default()
        },
        GenerationParams {
            stop: vec!["x".into(); 9],
            ..GenerationParams::default()
        },
        GenerationParams {
            do_sample: true,
            num_beams: 2,
            ..GenerationParams::default()
        },
    ];
    let fields = [
        "`top_p`",
        "`top_p`",
        "`temperature`",
        "`repetition_penalty`",
        "`num_beams`",
        "`num_beams`",
        "`max_new_tokens`",
        "`min_new_tokens`",
        "`stop`",
        "`stop`",
        "`stop`",
        "beam sampling",
    ];
    for (p, field) in bad.iter().zip(fields) {
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
    GenerationParams::default().validate().unwrap();
    // serde: defaults, early_stopping as bool or "never", unknown fields refused.
    let p: GenerationParams =
        serde_json::from_str(r#"{"num_beams": 3, "early_stopping": "never", "stop": ["\n"]}"#)
            .unwrap();
    assert_eq!(p.early_stopping, EarlyStopping::Never);
    assert_eq!((p.max_new_tokens, p.top_k, p.num_beams), (20, 50, 3));
    let p: GenerationParams = serde_json::from_str(r#"{"early_stopping": true}"#).unwrap();
    assert_eq!(p.early_stopping, EarlyStopping::True);
    assert!(serde_json::from_str::<GenerationParams>(r#"{"early_stopping": "x"}"#).is_err());
    assert!(serde_json::from_str::<GenerationParams>(r#"{"topp": 0.5}"#).is_err());
    // A stop sequence without a tokenizer cannot be matched.
    let model = MockLm::new();
    let embeds = model.embed_tokens(&[0]).unwrap();
    let params = GenerationParams {
        stop: vec!["a".into()],
        ..GenerationParams::default()
    };
    let err = generate(&model, &embeds, &[], &params, None, &mut |_| {
        ControlFlow::Continue(())
    });
    assert!(err.unwrap_err().to_string().contains("`stop`"));
}
