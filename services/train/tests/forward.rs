//! The differentiable vision encoder, Q-Former and OPT equal `blip2-model`'s inference on the
//! random fixtures (within 1e-4).

use std::path::{Path, PathBuf};

use blip2_model::config::{Blip2Config, TextConfig};
use blip2_model::model::{Blip2Model, LoadOptions};
use blip2_train::nn::ParamStore;
use blip2_train::opt::Opt;
use blip2_train::qformer::QFormer;
use blip2_train::vit::Vit;
use candle_core::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn pixels(cfg: &Blip2Config, batch: usize) -> Tensor {
    let s = cfg.vision_config.image_size;
    let n = batch * 3 * s * s;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    Tensor::from_vec(values, (batch, 3, s, s), &Device::Cpu).unwrap()
}

#[test]
fn vision_qformer_and_projection_equal_inference() -> anyhow::Result<()> {
    let dir = fixture("opt-a");
    let cfg = Blip2Config::from_file(&dir.join("config.json"))?;
    let model = Blip2Model::load(&dir, &LoadOptions::default())?;
    let params = ParamStore::load_dir(&dir, &Device::Cpu)?;
    let px = pixels(&cfg, 2);
    let reference = model.encode_pixels(&px)?;

    let features = Vit::new(&params, &cfg.vision_config, "vision_model").forward(&px)?;
    assert_eq!(features.dims(), reference.image_embeds.dims());
    let d = max_diff(&features, &reference.image_embeds.to_dtype(DType::F32)?);
    assert!(d < 1e-4, "vision differs by {d}");

    let qf = QFormer::new(&params, &cfg.qformer_config)?;
    let out = qf.run(&qf.queries(2)?, None, qf.num_queries, Some(&features))?;
    let d = max_diff(&out, &reference.query_output.to_dtype(DType::F32)?);
    assert!(d < 1e-4, "Q-Former differs by {d}");

    let soft = blip2_train::nn::linear(
        &out,
        params.get("language_projection.weight")?,
        Some(params.get("language_projection.bias")?),
    )?;
    let d = max_diff(&soft, &reference.soft_prompt.to_dtype(DType::F32)?);
    assert!(d < 1e-4, "soft prompt differs by {d}");
    Ok(())
}

#[test]
fn opt_logits_equal_inference_prefill() -> anyhow::Result<()> {
    let dir = fixture("opt-a");
    let cfg = Blip2Config::from_file(&dir.join("config.json"))?;
    let TextConfig::Opt(opt_cfg) = &cfg.text_config else {
        anyhow::bail!("opt-a has an OPT text config");
    };
    let model = Blip2Model::load(&dir, &LoadOptions::default())?;
    let lm = model.language_model()?;
    let params = ParamStore::load_dir(&dir, &Device::Cpu)?;
    let opt = Opt::new(&params, opt_cfg, "language_model");
    let ids: Vec<u32> = vec![2, 10, 57, 300, 4, 99, 7];
    let embeds = lm.embed_tokens(&ids)?.to_dtype(DType::F32)?;
    let mut cache = lm.new_cache();
    let reference = lm.prefill(&embeds, &mut cache)?.to_dtype(DType::F32)?;

    // Batch of two: the sequence, and a shorter one right-padded (its padding must not
    // change the first row, and its own real positions must match a run without padding).
    let short: Vec<u32> = ids[..4].to_vec();
    let mut padded = short.clone();
    padded.extend([1, 1, 1]);
    let batch = opt.embed(&[ids.clone(), padded])?;
    let mask = vec![vec![1u32; 7], vec![1, 1, 1, 1, 0, 0, 0]];
    let logits = opt.forward(&batch, &mask)?;
    let first = logits.get(0)?;
    // The inference prefill returns the last position's logits or all positions.
    let ours = if reference.dims().len() == 1 || reference.dim(0)? == 1 {
        first.get(6)?.reshape(reference.dims())?
    } else {
        first
    };
    let d = max_diff(&ours, &reference);
    assert!(d < 1e-4, "OPT logits differ by {d}");

    let alone = opt.forward(&opt.embed(&[short])?, &[vec![1; 4]])?;
    let d = max_diff(&logits.get(1)?.narrow(0, 0, 4)?, &alone.get(0)?);
    assert!(d < 1e-4, "right padding changed the real positions by {d}");
    Ok(())
}

#[test]
fn qformer_text_mode_equals_retrieval_text_embeddings() -> anyhow::Result<()> {
    use blip2_model::retrieval::{RetrievalLoadOptions, RetrievalModel};
    let dir = fixture("retrieval-a");
    let cfg = Blip2Config::from_file(&dir.join("config.json"))?;
    let model = RetrievalModel::load(&dir, &RetrievalLoadOptions::default())?;
    let params = ParamStore::load_dir(&dir, &Device::Cpu)?;
    let texts = model.tokenize(&["a red circle", "two blue squares on the left"])?;
    let reference = model.embed_texts(&texts)?.to_dtype(DType::F32)?;

    let len = texts.iter().map(|t| t.ids.len()).max().unwrap_or(0);
    let pad = |v: &[u32], fill: u32| {
        let mut v = v.to_vec();
        v.resize(len, fill);
        v
    };
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| pad(&t.ids, 0)).collect();
    let attention: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| pad(&vec![1; t.ids.len()], 0))
        .collect();
    let qf = QFormer::new(&params, &cfg.qformer_config)?;
    let mask = blip2_train::qformer::padding_mask(&attention, DType::F32, &Device::Cpu)?;
    let out = qf.run(&qf.embed_text(&ids)?, Some(&mask), 0, None)?;
    let cls = out.narrow(1, 0, 1)?.squeeze(1)?;
    let proj = blip2_train::nn::linear(
        &cls,
        params.get("text_projection.weight")?,
        Some(params.get("text_projection.bias")?),
    )?;
    let ours = blip2_train::nn::l2_normalize(&proj)?;
    let d = max_diff(&ours, &reference);
    assert!(d < 1e-4, "text embeddings differ by {d}");

    // ITM logits: queries + text together against vision features.
    let px = pixels(&cfg, 2);
    let features = Vit::new(&params, &cfg.vision_config, "vision_model").forward(&px)?;
    let reference_features = model.vision_features(&px)?.to_dtype(DType::F32)?;
    let d = max_diff(&features, &reference_features);
    assert!(d < 1e-4, "vision features differ by {d}");
    let reference_itm = model
        .itm_logits(&reference_features, &texts)?
        .to_dtype(DType::F32)?;
    let nq = qf.num_queries;
    let keys: Vec<Vec<u32>> = attention
        .iter()
        .map(|a| {
            let mut k = vec![1u32; nq];
            k.extend(a);
            k
        })
        .collect();
    let mask = blip2_train::qformer::padding_mask(&keys, DType::F32, &Device::Cpu)?;
    let embeds = Tensor::cat(&[&qf.queries(2)?, &qf.embed_text(&ids)?], 1)?;
    let out = qf.run(&embeds, Some(&mask), nq, Some(&features))?;
    let itm = blip2_train::nn::linear(
        &out.narrow(1, 0, nq)?,
        params.get("itm_head.weight")?,
        Some(params.get("itm_head.bias")?),
    )?
    .mean(1)?;
    let d = max_diff(&itm, &reference_itm);
    assert!(d < 1e-4, "ITM logits differ by {d}");
    Ok(())
}
