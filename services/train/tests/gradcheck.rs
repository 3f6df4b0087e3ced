//! Stage-1 and stage-2 objectives on the random fixtures: the losses back-propagate into
//! exactly the trained tensors, autograd equals central finite differences, and the saved
//! checkpoints load in `blip2-model`.

use std::path::{Path, PathBuf};

use blip2_model::model::{Blip2Model, LoadOptions};
use blip2_model::retrieval::{RetrievalLoadOptions, RetrievalModel};
use blip2_train::data::Pair;
use blip2_train::nn::scalar;
use blip2_train::objective::Objective;
use blip2_train::stage1::{Stage1, Stage1Options};
use blip2_train::stage2::{Stage2, Stage2Options};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn pairs(size: usize, texts: &[(&str, Option<&str>)]) -> Vec<Pair> {
    texts
        .iter()
        .enumerate()
        .map(|(i, (text, prompt))| {
            let n = 3 * size * size;
            let values: Vec<f32> = (0..n)
                .map(|j| (((j * (7 + i * 13)) % 97) as f32 / 48.0) - 1.0)
                .collect();
            Pair {
                pixels: Tensor::from_vec(values, (3, size, size), &Device::Cpu).unwrap(),
                image_index: i,
                image: PathBuf::from(format!("{i}.png")),
                text: text.to_string(),
                prompt: prompt.map(str::to_string),
                extra: Default::default(),
            }
        })
        .collect()
}

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blip2-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Central differences of `loss` along entry `index` of `var` against `analytic`.
fn check_entry(
    var: &Var,
    index: usize,
    analytic: f64,
    loss: &dyn Fn() -> f64,
    what: &str,
) -> anyhow::Result<()> {
    let original = var.as_detached_tensor().copy()?;
    let shape = original.dims().to_vec();
    let values = original.flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-6;
    let at = |delta: f64| -> anyhow::Result<f64> {
        let mut v = values.clone();
        v[index] += delta;
        var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?)?;
        Ok(loss())
    };
    let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
    var.set(&original)?;
    let tol = 1e-6 + 1e-5 * analytic.abs().max(numeric.abs());
    assert!(
        (numeric - analytic).abs() < tol,
        "{what}[{index}]: autograd {analytic}, finite differences {numeric}"
    );
    Ok(())
}

fn grad_entry(grads: &candle_core::backprop::GradStore, var: &Var, i: usize) -> f64 {
    let g = grads.get(var.as_tensor()).expect("a gradient");
    g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[i]
}

#[test]
fn stage1_trains_the_right_tensors_matches_finite_differences_and_saves() -> anyhow::Result<()> {
    let dir = fixture("retrieval-a");
    let stage = Stage1::new(
        &dir,
        &Stage1Options {
            dtype: DType::F64,
            ..Default::default()
        },
    )?;
    let batch = pairs(
        32,
        &[
            ("a red circle", None),
            ("two blue squares at the top", None),
            ("four shapes", None),
        ],
    );
    let trainable = stage.trainable();
    assert!(trainable
        .iter()
        .all(|(n, _)| !n.starts_with("vision_model.")));
    assert!(trainable.iter().any(|(n, _)| n == "temp"));
    assert!(trainable.iter().any(|(n, _)| n.starts_with("itg_head.")));

    let negatives = ([1usize, 2, 0], [2usize, 0, 1]);
    let given = || {
        stage
            .losses_with::<StdRng>(
                &batch,
                blip2_train::stage1::Negatives::Given {
                    image_for_text: &negatives.0,
                    text_for_image: &negatives.1,
                },
            )
            .and_then(|l| scalar(&l.total))
            .expect("stage-1 loss")
    };
    let out = stage.losses_with::<StdRng>(
        &batch,
        blip2_train::stage1::Negatives::Given {
            image_for_text: &negatives.0,
            text_for_image: &negatives.1,
        },
    )?;
    let grads = out.total.backward()?;
    for (name, var) in &trainable {
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "no gradient for {name}"
        );
    }
    for (name, index) in [
        ("temp", 0),
        ("query_tokens", 5),
        ("itm_head.weight", 3),
        ("itg_head.transform.dense.weight", 7),
        ("embeddings.word_embeddings.weight", 48 * 5 + 2),
        (
            "qformer.encoder.layer.0.crossattention.attention.key.weight",
            11,
        ),
    ] {
        let var = stage.params().var(name).expect("trainable");
        check_entry(var, index, grad_entry(&grads, var, index), &given, name)?;
    }

    // Sampled negatives, the temperature clamp, and a checkpoint the retrieval tier loads.
    let mut rng = StdRng::seed_from_u64(1);
    let losses = stage.losses(&batch, &mut rng)?;
    assert!(scalar(&losses.total)?.is_finite());
    assert_eq!(losses.parts.len(), 3);
    let temp = stage.params().var("temp").expect("temp");
    temp.set(&Tensor::new(0.9f64, &Device::Cpu)?)?;
    stage.after_update()?;
    assert!((scalar(temp.as_tensor())? - 0.5).abs() < 1e-7);
    let out_dir = tmp_dir("stage1-save");
    stage.save(&out_dir)?;
    let model = RetrievalModel::load(&out_dir, &RetrievalLoadOptions::default())?;
    assert_eq!(model.num_query_tokens(), 8);
    let reloaded = Stage1::new(&out_dir, &Stage1Options::default())?;
    assert!((scalar(reloaded.params().get("temp")?)? - 0.5).abs() < 1e-7);
    std::fs::remove_dir_all(&out_dir)?;
    Ok(())
}

#[test]
fn stage1_from_a_generation_checkpoint_initialises_the_retrieval_parts() -> anyhow::Result<()> {
    let options = Stage1Options {
        tokenizer: Some(fixture("retrieval-a").join("tokenizer.json")),
        ..Default::default()
    };
    let stage = Stage1::new(&fixture("opt-a"), &options)?;
    let batch = pairs(32, &[("a red circle", None), ("four shapes", None)]);
    let losses = stage.losses(&batch, &mut StdRng::seed_from_u64(3))?;
    assert!(scalar(&losses.total)?.is_finite());
    assert!(stage.params().contains("itm_head.weight"));
    assert!(stage
        .params()
        .contains("qformer.encoder.layer.1.intermediate.dense.weight"));
    let out_dir = tmp_dir("stage1-from-opt");
    stage.save(&out_dir)?;
    RetrievalModel::load(&out_dir, &RetrievalLoadOptions::default())?;
    std::fs::remove_dir_all(&out_dir)?;
    Ok(())
}

#[test]
fn stage2_trains_the_qformer_only_matches_finite_differences_and_saves() -> anyhow::Result<()> {
    let dir = fixture("opt-a");
    let stage = Stage2::new(
        &dir,
        &Stage2Options {
            dtype: DType::F64,
            ..Default::default()
        },
    )?;
    let batch = pairs(
        32,
        &[
            ("three red circles on the left", None),
            ("red", Some("Question: what color are the shapes? Answer:")),
        ],
    );
    let names: Vec<String> = stage.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n == "query_tokens"));
    assert!(names.iter().any(|n| n == "language_projection.weight"));
    assert!(names.iter().all(|n| n.starts_with("qformer.")
        || n == "query_tokens"
        || n.starts_with("language_projection.")));

    let loss = stage.loss(&batch)?;
    let value = scalar(&loss)?;
    assert!(value.is_finite() && value > 0.0, "loss {value}");
    let grads = loss.backward()?;
    let f = || scalar(&stage.loss(&batch).expect("loss")).expect("scalar");
    for (name, index) in [
        ("language_projection.weight", 9),
        ("language_projection.bias", 3),
        ("query_tokens", 17),
        (
            "qformer.encoder.layer.0.crossattention.attention.value.weight",
            21,
        ),
        ("qformer.layernorm.weight", 4),
    ] {
        let var = stage.params().var(name).expect("trainable");
        check_entry(var, index, grad_entry(&grads, var, index), &f, name)?;
    }

    // A stage-1 checkpoint's Q-Former carries over; the saved model loads and encodes as ours.
    let out_dir = tmp_dir("stage2-save");
    stage.save(&out_dir)?;
    let model = Blip2Model::load(&out_dir, &LoadOptions::default())?;
    let px = Tensor::stack(&[&batch[0].pixels, &batch[1].pixels], 0)?;
    let theirs = model.encode_pixels(&px)?.soft_prompt.to_dtype(DType::F64)?;
    let features = blip2_train::vit::Vit::new(
        stage.params(),
        &stage.config().vision_config,
        "vision_model",
    )
    .forward(&px.to_dtype(DType::F64)?)?;
    let ours = stage.soft_prompts(&features)?;
    let d = scalar(&(ours - theirs)?.abs()?.flatten_all()?.max(0)?)?;
    // f32 inference against this f64 run (tests/forward.rs compares f32 with f32 at 1e-4).
    assert!(d < 1e-3, "soft prompts differ by {d}");
    let again = Stage2::new(
        &dir,
        &Stage2Options {
            qformer_from: Some(out_dir.clone()),
            dtype: DType::F64,
        },
    )?;
    assert!((scalar(&again.loss(&batch)?)? - value).abs() < 1e-5);
    std::fs::remove_dir_all(&out_dir)?;
    Ok(())
}

/// Plain gradient descent on an objective's variables; returns the losses before and after.
fn descend<O: Objective>(objective: &O, batch: &[O::Example], steps: usize, lr: f64) -> (f64, f64) {
    let mut rng = StdRng::seed_from_u64(0);
    let first = scalar(&objective.losses(batch, &mut rng).unwrap().total).unwrap();
    for _ in 0..steps {
        let loss = objective.losses(batch, &mut rng).unwrap().total;
        let grads = loss.backward().unwrap();
        for (_, var) in objective.trainable() {
            if let Some(g) = grads.get(var.as_tensor()) {
                let next = (var.as_tensor() - (g * lr).unwrap()).unwrap();
                var.set(&next.detach()).unwrap();
            }
        }
        objective.after_update().unwrap();
    }
    let last = scalar(&objective.losses(batch, &mut rng).unwrap().total).unwrap();
    (first, last)
}

#[test]
fn vit_pretraining_learns_its_labels_and_saves_without_heads() -> anyhow::Result<()> {
    use blip2_train::pretrain::VitPretrain;
    let objective = VitPretrain::new(&fixture("opt-a"), &[3, 2], 7)?;
    let batch: Vec<(Tensor, Vec<usize>)> = pairs(32, &[("", None), ("", None), ("", None)])
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p.pixels, vec![i % 3, i % 2]))
        .collect();
    let (first, last) = descend(&objective, &batch, 15, 0.5);
    assert!(last < first * 0.8, "loss {first} -> {last}");
    let out_dir = tmp_dir("vit-pretrain");
    objective.save(&out_dir)?;
    let saved = blip2_train::nn::ParamStore::load_dir(&out_dir, &Device::Cpu)?;
    assert!(saved.names().iter().all(|n| !n.starts_with("head.")));
    Blip2Model::load(&out_dir, &LoadOptions::default())?;
    std::fs::remove_dir_all(&out_dir)?;
    Ok(())
}

#[test]
fn opt_pretraining_trains_only_the_language_model() -> anyhow::Result<()> {
    use blip2_train::pretrain::OptPretrain;
    let objective = OptPretrain::new(&fixture("opt-a"), 32)?;
    assert!(objective
        .trainable()
        .iter()
        .all(|(n, _)| n.starts_with("language_model.")));
    let lines = vec!["three red circles".to_string(), "a blue square".to_string()];
    let (first, last) = descend(&objective, &lines, 10, 0.5);
    assert!(last < first * 0.8, "loss {first} -> {last}");
    let out_dir = tmp_dir("opt-pretrain");
    objective.save(&out_dir)?;
    Blip2Model::load(&out_dir, &LoadOptions::default())?;
    std::fs::remove_dir_all(&out_dir)?;
    Ok(())
}
