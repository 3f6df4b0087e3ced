//! A missing or inconsistent checkpoint is an error that names the file and the tensor; half
//! precision loads and stays close to f32.

use std::path::{Path, PathBuf};

use blip2_model::checkpoint::WeightDtype;
use blip2_model::model::{Blip2Model, LoadOptions};
use candle_core::Device;

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
use common::{fixtures, max_abs, max_abs_diff};

fn fixture_model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// A writable copy of a fixture checkpoint.
fn copy_of(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blip2-bad-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture_model(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    match Blip2Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let dir = copy_of("opt-a", "missing");
    let file = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let name = "qformer.encoder.layer.1.output_query.dense.weight";
    assert!(tensors.remove(name).is_some());
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains(name) && err.contains("model.safetensors"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    let dir = copy_of("opt-b", "shape");
    edit_config(&dir, |c| {
        c["vision_config"]["intermediate_size"] = 100.into()
    });
    let err = load_error(&dir);
    assert!(
        err.contains("mlp.fc1.weight") && err.contains("shape"),
        "{err}"
    );
    assert!(err.contains("model-0000"), "names the shard: {err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn unknown_model_type_and_missing_files_are_named() {
    let dir = copy_of("t5-a", "type");
    edit_config(&dir, |c| c["text_config"]["model_type"] = "llama".into());
    let err = load_error(&dir);
    assert!(
        err.contains("llama") && err.contains("config.json"),
        "{err}"
    );
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("config.json"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn tokenizer_without_the_image_token_is_refused() {
    let dir = copy_of("opt-a", "tokenizer");
    edit_config(&dir, |c| c["image_token_index"] = 7.into());
    let err = load_error(&dir);
    assert!(
        err.contains("tokenizer.json") && err.contains("image_token_index"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn half_precision_loads_and_stays_close_to_f32() {
    let dir = fixture_model("opt-a");
    let image = std::fs::read(fixtures().join("images/wide.png")).unwrap();
    let f32_model = Blip2Model::load(&dir, &LoadOptions::default()).unwrap();
    let reference = f32_model
        .encode_images(&[image.as_slice()])
        .unwrap()
        .soft_prompt;
    // bf16 is refused on CPU (candle has no CPU bf16 matmul), with a message saying so.
    let bf16 = LoadOptions {
        dtype: WeightDtype::Bf16,
        ..LoadOptions::default()
    };
    match Blip2Model::load(&dir, &bf16) {
        Ok(_) => panic!("bf16 on CPU must be refused at load"),
        Err(e) => assert!(e.to_string().contains("bf16"), "{e}"),
    }
    {
        let (dtype, tolerance) = (WeightDtype::F16, 0.05f32);
        let options = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        let model = Blip2Model::load(&dir, &options).unwrap();
        let encoding = model.encode_images(&[image.as_slice()]).unwrap();
        assert_eq!(encoding.soft_prompt.dtype(), dtype.dtype());
        assert_eq!(
            encoding.query_output.dtype(),
            candle_core::DType::F32,
            "Q-Former stays f32"
        );
        let soft = encoding
            .soft_prompt
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let diff = max_abs_diff(&soft, &reference);
        let scale = max_abs(&reference);
        eprintln!("{dtype:?}: soft prompt max abs diff {diff} (values up to {scale})");
        assert!(diff <= tolerance * scale.max(1.0), "{dtype:?}: {diff}");
        // And the language model generates in that dtype.
        let prompt = model.build_prompt("", 1).unwrap();
        let soft = encoding.soft_prompt.get(0).unwrap();
        let embeds = model.prompt_embeds(&prompt, &[soft]).unwrap();
        let mut cache = model.language_model().unwrap().new_cache();
        let logits = model
            .language_model()
            .unwrap()
            .prefill(&embeds, &mut cache)
            .unwrap();
        assert_eq!(logits.dtype(), candle_core::DType::F32);
        let values: Vec<f32> = logits.to_vec1().unwrap();
        assert!(values.iter().all(|v| v.is_finite()));
    }
}
