//! Stage 1's losses and gradients against PyTorch (tools/fixtures/generate_training.py:
//! transformers' modules, the losses as LAVIS computes them), and against finite differences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blip2_model::config::Blip2Config;
use blip2_model::retrieval::{RetrievalLoadOptions, RetrievalModel};
use blip2_train::nn::scalar;
use blip2_train::qformer::Params;
use blip2_train::stage1::{self, Batch, Negatives, Weights};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Case {
    config: Blip2Config,
    features: Tensor,
    ids: Vec<Vec<u32>>,
    attention: Vec<Vec<u32>>,
    image_for_text: Vec<usize>,
    text_for_image: Vec<usize>,
    goldens: HashMap<String, Tensor>,
    bos_id: u32,
    pad_id: u32,
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

fn indices(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

fn case() -> Case {
    let model_dir = root().join("tests/fixtures/models/retrieval-a");
    let dir = root().join("tests/fixtures/training/stage1");
    let batch =
        candle_core::safetensors::load(dir.join("batch.safetensors"), &Device::Cpu).unwrap();
    // The frozen image encoder is blip2-model's inference path (its parity with transformers is
    // tested in services/model).
    let model = RetrievalModel::load(&model_dir, &RetrievalLoadOptions::default()).unwrap();
    let features = model.vision_features(&batch["pixel_values"]).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("batch.json")).unwrap()).unwrap();
    // The checkpoint's tokenizer gives the ids the reference used.
    let ids = rows(&batch["input_ids"]);
    for (text, row) in summary["texts"].as_array().unwrap().iter().zip(&ids) {
        let tokens = model.tokenize(&[text.as_str().unwrap()]).unwrap();
        assert_eq!(
            tokens[0].ids,
            row.iter()
                .copied()
                .filter(|&id| id != 0)
                .collect::<Vec<_>>()
        );
    }
    Case {
        config: Blip2Config::from_file(&model_dir.join("config.json")).unwrap(),
        features,
        ids,
        attention: rows(&batch["attention_mask"]),
        image_for_text: indices(&batch["image_for_text"]),
        text_for_image: indices(&batch["text_for_image"]),
        goldens: candle_core::safetensors::load(dir.join("goldens.safetensors"), &Device::Cpu)
            .unwrap(),
        bos_id: summary["bos_id"].as_u64().unwrap() as u32,
        pad_id: summary["pad_id"].as_u64().unwrap() as u32,
    }
}

fn params(dtype: DType) -> Params {
    let files = [
        root().join("tests/fixtures/models/retrieval-a/model.safetensors"),
        root().join("tests/fixtures/training/stage1/extra.safetensors"),
    ];
    let mut p = Params::load(&files, dtype, &Device::Cpu).unwrap();
    p.make_trainable(|name| !name.starts_with("vision_model."))
        .unwrap();
    p
}

fn run(p: &Params, c: &Case, features: &Tensor) -> stage1::Losses {
    let batch = Batch {
        features,
        ids: &c.ids,
        attention: &c.attention,
    };
    stage1::losses::<StdRng>(
        p,
        &c.config.qformer_config,
        &batch,
        Negatives::Given {
            image_for_text: &c.image_for_text,
            text_for_image: &c.text_for_image,
        },
        c.bos_id,
        c.pad_id,
        Weights::default(),
    )
    .unwrap()
}

#[test]
fn losses_and_gradients_equal_pytorchs() {
    let c = case();
    let p = params(DType::F32);
    let losses = run(&p, &c, &c.features);
    for (name, got) in [
        ("itc", &losses.itc),
        ("itm", &losses.itm),
        ("itg", &losses.itg),
        ("total", &losses.total),
    ] {
        let want = scalar(&c.goldens[&format!("loss.{name}")]).unwrap();
        let got = scalar(got).unwrap();
        assert!((got - want).abs() < 1e-4, "loss.{name}: {got} vs {want}");
    }
    let grads = losses.total.backward().unwrap();
    let mut checked = 0;
    let mut worst = (0f64, String::new());
    for (name, var) in p.trainable() {
        let want = &c.goldens[&format!("grad.{name}")];
        let got = grads
            .get(var.as_tensor())
            .cloned()
            .unwrap_or_else(|| var.as_tensor().zeros_like().unwrap());
        let diff = scalar(&(got - want).unwrap().abs().unwrap().max_all().unwrap()).unwrap();
        if diff > worst.0 {
            worst = (diff, name.clone());
        }
        checked += 1;
    }
    assert!(
        worst.0 < 1e-4,
        "largest gradient difference {} in {}",
        worst.0,
        worst.1
    );
    // Every trainable tensor of the reference was compared.
    let golden_grads = c.goldens.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, golden_grads);
    eprintln!("largest gradient difference: {:e} ({})", worst.0, worst.1);
}

#[test]
fn gradients_equal_finite_differences_in_f64() {
    let c = case();
    let p = params(DType::F64);
    let features = c.features.to_dtype(DType::F64).unwrap();
    let loss = run(&p, &c, &features).total;
    let grads = loss.backward().unwrap();
    let vars: HashMap<String, candle_core::Var> = p.trainable().into_iter().collect();
    let probes = [
        ("temp", 0usize),
        ("query_tokens", 5),
        ("itm_head.weight", 3),
        ("text_projection.weight", 17),
        ("vision_projection.bias", 2),
        ("itg_head.bias", 11),
        ("itg_head.transform.dense.weight", 40),
        ("embeddings.word_embeddings.weight", 2 * 48 + 7),
        (
            "qformer.encoder.layer.0.crossattention.attention.key.weight",
            100,
        ),
        ("qformer.encoder.layer.1.output_query.LayerNorm.weight", 4),
        ("qformer.encoder.layer.2.attention.attention.query.bias", 9),
    ];
    let h = 1e-5;
    for (name, flat_index) in probes {
        let var = &vars[name];
        let original = var.as_detached_tensor().copy().unwrap();
        let shape = original.shape().clone();
        let values: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
        let at = |delta: f64| {
            let mut v = values.clone();
            v[flat_index] += delta;
            var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            let l = scalar(&run(&p, &c, &features).total).unwrap();
            var.set(&original).unwrap();
            l
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let a = analytic[flat_index];
        assert!(
            (a - numeric).abs() <= 1e-5 * (1.0 + numeric.abs()),
            "{name}[{flat_index}]: autograd {a} vs finite differences {numeric}"
        );
    }
}

#[test]
fn sampled_negatives_are_never_the_pair_itself() {
    let c = case();
    let p = params(DType::F32);
    let batch = Batch {
        features: &c.features,
        ids: &c.ids,
        attention: &c.attention,
    };
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..5 {
        let losses = stage1::losses(
            &p,
            &c.config.qformer_config,
            &batch,
            Negatives::Sample(&mut rng),
            c.bos_id,
            c.pad_id,
            Weights::default(),
        )
        .unwrap();
        for (b, (&i, &t)) in losses
            .image_for_text
            .iter()
            .zip(&losses.text_for_image)
            .enumerate()
        {
            assert!(i != b && t != b && i < 4 && t < 4);
        }
        assert!(scalar(&losses.total).unwrap().is_finite());
    }
}

#[test]
fn the_temperature_is_clamped_as_lavis_does() {
    let p = params(DType::F32);
    let (_, temp) = p
        .trainable()
        .into_iter()
        .find(|(n, _)| n == "temp")
        .unwrap();
    for (set, want) in [(0.9f32, 0.5f32), (0.0001, 0.001), (0.07, 0.07)] {
        temp.set(&Tensor::new(set, &Device::Cpu).unwrap()).unwrap();
        stage1::clamp_temp(&p).unwrap();
        assert_eq!(temp.as_tensor().to_scalar::<f32>().unwrap(), want);
    }
}
