//! Stage 1's loss function on the PyTorch fixture's batch: the hard negatives it samples and
//! the temperature clamp. (Its losses and gradients against PyTorch are tests/parity.rs, against
//! finite differences tests/gradcheck.rs.)

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

fn case() -> Case {
    let dir = root().join("tests/fixtures/training/stage1");
    let model_dir = dir.clone();
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
    for (text, row) in summary["captions"].as_array().unwrap().iter().zip(&ids) {
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
        bos_id: summary["bos_token_id"].as_u64().unwrap() as u32,
        pad_id: summary["pad_token_id"].as_u64().unwrap() as u32,
    }
}

fn params(dtype: DType) -> Params {
    let files = [root().join("tests/fixtures/training/stage1/model.safetensors")];
    let mut p = Params::load(&files, dtype, &Device::Cpu).unwrap();
    p.make_trainable(|name| !name.starts_with("vision_model."))
        .unwrap();
    p
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

#[test]
fn a_pair_with_the_same_text_is_never_a_negative() {
    let c = case();
    let p = params(DType::F32);
    // Pairs 0 and 1 share a caption (two images the same description fits).
    let mut ids = c.ids.clone();
    let mut attention = c.attention.clone();
    ids[1] = ids[0].clone();
    attention[1] = attention[0].clone();
    let batch = Batch {
        features: &c.features,
        ids: &ids,
        attention: &attention,
    };
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..20 {
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
            let same = |x: usize| x == b || (x < 2 && b < 2);
            assert!(!same(i) && !same(t), "pair {b}: negatives {i}, {t}");
        }
    }
}
