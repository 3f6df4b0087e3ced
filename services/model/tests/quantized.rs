//! Quality of the language model's weight formats (`LoadOptions::llm_weights`) against the f32
//! reference, on the fixture checkpoints and transformers' goldens.
//!
//! For each checkpoint and format: the raw logits of every greedy step, teacher-forced on the
//! reference ids (mean and max absolute error against transformers' f32 logits, and the same
//! relative to the largest reference logit), and greedy agreement (reference tokens reproduced
//! before the first divergence, over all cases). `cargo test -p blip2-model --test quantized --
//! --nocapture` prints the table.
//!
//! The bounds come from measurement with a margin; each can fail: f16/bf16 change the weights
//! by < 0.4%, int8 by < 0.4% of a group's range, int4 by < 3.4% of it.
//!
//! `decode_throughput` (ignored; run with `--release -- --ignored --nocapture`) times decode
//! at OPT-125m dims with random weights, as `blip2 bench` does, for every format.

use std::ops::ControlFlow;

use blip2_model::generation::{self, GenerationParams};
use blip2_model::linear::WeightFormat;
use blip2_model::model::{Blip2Model, LoadOptions};
use candle_core::{DType, IndexOp, Tensor};
use serde::Deserialize;

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
use common::{cases, fixtures, goldens};

const CHECKPOINTS: [&str; 4] = ["opt-a", "opt-b", "t5-a", "t5-b"];

#[derive(Deserialize)]
struct Greedy {
    max_new_tokens: usize,
    min_new_tokens: usize,
    token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    images: Vec<String>,
    prompt: String,
    greedy: Greedy,
    eos_token_id: u32,
}

/// Worst acceptable figures for a format, over all checkpoints.
struct Bounds {
    /// Max |logit error| / max |reference logit|, per checkpoint.
    max_relative: f32,
    /// Mean |logit error| / max |reference logit|, per checkpoint.
    mean_relative: f32,
    /// Share of reference greedy tokens reproduced before the first divergence, over all
    /// checkpoints' cases.
    min_agreement: f32,
}

fn bounds(format: WeightFormat) -> Bounds {
    // Measured worst cases (PR of issue 4): f16 1.6e-3 / 1.7e-4 / 100%, bf16 1.7e-2 / 1.6e-3 /
    // 100%, int8 4.7e-2 / 4.7e-3 / 89%, int4 0.48 / 6.5e-2 / 13%. The fixtures are random
    // models whose top-2 logit margins are small, so greedy agreement is a weak signal for int4.
    let (max_relative, mean_relative, min_agreement) = match format {
        WeightFormat::F32 => (1e-5, 1e-6, 1.0),
        WeightFormat::F16 => (4e-3, 4e-4, 0.95),
        WeightFormat::Bf16 => (3e-2, 3e-3, 0.9),
        WeightFormat::Int8 => (8e-2, 8e-3, 0.7),
        WeightFormat::Int4 => (0.8, 0.1, 0.03),
    };
    Bounds {
        max_relative,
        mean_relative,
        min_agreement,
    }
}

fn load(name: &str, format: WeightFormat) -> Blip2Model {
    let options = LoadOptions {
        llm_weights: Some(format),
        ..LoadOptions::default()
    };
    Blip2Model::load(&fixtures().join("models").join(name), &options)
        .unwrap_or_else(|e| panic!("loading {name} ({format}): {e}"))
}

fn abs_values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[derive(Default)]
struct Quality {
    max_error: f32,
    error_sum: f64,
    error_count: usize,
    max_reference: f32,
    agreed: usize,
    reference_tokens: usize,
}

impl Quality {
    fn mean_error(&self) -> f32 {
        (self.error_sum / self.error_count.max(1) as f64) as f32
    }
}

fn measure(name: &str, format: WeightFormat) -> Quality {
    let model = load(name, format);
    let mut quality = Quality::default();
    for case in cases::<Case>(name) {
        let golden = goldens(name, &format!("{}.safetensors", case.name));
        let prompt = model.build_prompt(&case.prompt, case.images.len()).unwrap();
        let soft: Vec<Tensor> = (0..case.images.len())
            .map(|i| golden["soft_prompt"].i(i).unwrap())
            .collect();
        let embeds = model.prompt_embeds(&prompt, &soft).unwrap();

        let lm = model.language_model().unwrap();
        let mut cache = lm.new_cache();
        let reference_logits = &golden["greedy_logits"];
        let mut logits = lm.prefill(&embeds, &mut cache).unwrap();
        let steps = reference_logits.dim(0).unwrap();
        for step in 0..steps {
            let reference = reference_logits.i(step).unwrap();
            let errors = abs_values(&(logits.to_dtype(DType::F32).unwrap() - &reference).unwrap());
            for e in errors {
                quality.max_error = quality.max_error.max(e);
                quality.error_sum += e as f64;
                quality.error_count += 1;
            }
            for r in abs_values(&reference) {
                quality.max_reference = quality.max_reference.max(r);
            }
            if step + 1 < steps {
                let token = case.greedy.token_ids[step];
                logits = lm.step(&[token], &mut [&mut cache]).unwrap().i(0).unwrap();
            }
        }

        let params = GenerationParams {
            max_new_tokens: case.greedy.max_new_tokens,
            min_new_tokens: case.greedy.min_new_tokens,
            eos_token_ids: vec![case.eos_token_id],
            ..GenerationParams::default()
        };
        let mut ignore = |_: &generation::TokenEvent| ControlFlow::Continue(());
        let ours = generation::generate(
            lm.as_ref(),
            &embeds,
            &model.penalty_context(&prompt),
            &params,
            Some(model.prompt_tokenizer().tokenizer()),
            &mut ignore,
        )
        .unwrap()
        .token_ids;
        let reference = &case.greedy.token_ids;
        quality.agreed += ours
            .iter()
            .zip(reference)
            .take_while(|(a, b)| a == b)
            .count();
        quality.reference_tokens += reference.len();
    }
    quality
}

#[test]
fn weight_formats_stay_close_to_f32() {
    eprintln!(
        "{:<7} {:<5} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "model", "llm", "max |err|", "mean |err|", "max rel", "mean rel", "greedy"
    );
    let mut failures = Vec::new();
    for format in WeightFormat::ALL {
        let b = bounds(format);
        let (mut agreed, mut reference_tokens) = (0, 0);
        for name in CHECKPOINTS {
            let q = measure(name, format);
            let scale = q.max_reference.max(f32::MIN_POSITIVE);
            let (max_rel, mean_rel) = (q.max_error / scale, q.mean_error() / scale);
            eprintln!(
                "{name:<7} {:<5} {:>10.3e} {:>10.3e} {:>9.2e} {:>9.2e} {:>5}/{:<3}",
                format.as_str(),
                q.max_error,
                q.mean_error(),
                max_rel,
                mean_rel,
                q.agreed,
                q.reference_tokens
            );
            agreed += q.agreed;
            reference_tokens += q.reference_tokens;
            if max_rel > b.max_relative || mean_rel > b.mean_relative {
                failures.push(format!(
                    "{name} {format}: max rel {max_rel:.2e} (bound {:.0e}), mean rel {mean_rel:.2e} \
                     (bound {:.0e})",
                    b.max_relative, b.mean_relative,
                ));
            }
        }
        let agreement = agreed as f32 / reference_tokens.max(1) as f32;
        eprintln!(
            "{:<7} {:<5} greedy agreement {agreement:.2}",
            "all",
            format.as_str()
        );
        if agreement < b.min_agreement {
            failures.push(format!(
                "{format}: greedy agreement {agreement:.2} (bound {:.2})",
                b.min_agreement
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn packed_weights_report_their_format() {
    let model = load("opt-a", WeightFormat::Int8);
    let lm = model.language_model().unwrap();
    // The packed model still decodes (embedding width unchanged) and f32 activations flow.
    assert_eq!(
        lm.info().hidden_size,
        model.config().text_config.hidden_size()
    );
    let bf16: WeightFormat = "bf16".parse().unwrap();
    assert_eq!(bf16, WeightFormat::Bf16);
    assert!("int3".parse::<WeightFormat>().is_err());
}

mod throughput {
    use std::time::Instant;

    use blip2_model::config::{Blip2Config, TextConfig};
    use blip2_model::linear::WeightFormat;
    use blip2_model::llm::{LanguageModel, StepInput};
    use blip2_model::opt::Opt;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use blip2_model::checkpoint::RandomWeights;

    fn decode(lm: &Opt, batch: usize, tokens: usize) -> f64 {
        let prompt = Tensor::rand(-1f32, 1.0, (40, lm.info().hidden_size), &Device::Cpu).unwrap();
        let mut caches: Vec<_> = (0..batch).map(|_| lm.new_cache()).collect();
        for cache in caches.iter_mut() {
            lm.forward_ragged(&[StepInput::Embeds(prompt.clone())], &mut [cache])
                .unwrap();
        }
        let start = Instant::now();
        for step in 0..tokens {
            let ids = vec![(200 + step) as u32; batch];
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            lm.step(&ids, &mut refs).unwrap();
        }
        (batch * tokens) as f64 / start.elapsed().as_secs_f64()
    }

    #[test]
    #[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
    fn decode_throughput() {
        let json = serde_json::json!({
            "vision_config": {}, "qformer_config": {},
            "text_config": {"model_type": "opt", "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "ffn_dim": 3072, "vocab_size": 50272},
            "num_query_tokens": 32
        });
        let config = Blip2Config::from_json(&json.to_string(), "bench".as_ref()).unwrap();
        let TextConfig::Opt(cfg) = &config.text_config else {
            panic!("an OPT shape")
        };
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
        let formats: Vec<Option<WeightFormat>> = match std::env::var("FORMATS") {
            Ok(list) => list
                .split(',')
                .map(|f| (f != "default").then(|| f.parse().unwrap()))
                .collect(),
            Err(_) => std::iter::once(None)
                .chain(WeightFormat::ALL.into_iter().skip(1).map(Some))
                .collect(),
        };
        for format in formats {
            let lm = Opt::with_weights(cfg, vb.pp("language_model"), format).unwrap();
            decode(&lm, 1, 4);
            let b1 = decode(&lm, 1, 32);
            let b8 = decode(&lm, 8, 32);
            eprintln!(
                "OPT-125m dims, llm weights {:<7} decode {b1:6.1} tok/s (batch 1) {b8:6.1} tok/s (batch 8)",
                format.map_or("default", |f| f.as_str())
            );
        }
    }

    #[test]
    #[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
    fn projection_bandwidth() {
        use blip2_model::linear::Linear;
        use candle_core::Module;
        for (n, k) in [(768, 768), (3072, 768), (768, 3072), (50272, 768)] {
            let w = Tensor::rand(-0.05f32, 0.05, (n, k), &Device::Cpu).unwrap();
            for m in [1, 8, 16, 32] {
                let x = Tensor::rand(-1f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let reps = (200_000_000 / (n * k * 4)).max(3);
                let time = |f: &dyn Fn() -> Tensor| {
                    f();
                    let start = Instant::now();
                    for _ in 0..reps {
                        f();
                    }
                    start.elapsed().as_secs_f64() / reps as f64
                };
                let candle = time(&|| x.matmul(&w.t().unwrap()).unwrap());
                let mut line = format!(
                    "[{m:>2} x {k:>4}] x [{n:>5} x {k:>4}]ᵀ candle {:6.1} GB/s",
                    (n * k * 4) as f64 / candle / 1e9
                );
                for format in WeightFormat::ALL {
                    let linear = Linear::with_format(w.clone(), None, Some(format)).unwrap();
                    let t = time(&|| linear.forward(&x).unwrap());
                    line += &format!(
                        " {format} {:5.0} µs ({:4.1} GB/s f32-eq)",
                        t * 1e6,
                        (n * k * 4) as f64 / t / 1e9
                    );
                }
                eprintln!("{line}");
            }
        }
    }
}
