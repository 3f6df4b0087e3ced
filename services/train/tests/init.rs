//! `init::init`: a new checkpoint for the shapes world that the server loads, seeded, with
//! transformers' initialisation.

use std::path::PathBuf;

use blip2_model::model::{Blip2Model, LoadOptions};
use blip2_train::init::{init, InitOptions, QFORMER_TOKENIZER_DIR};
use blip2_train::world;
use candle_core::{DType, Device};

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blip2-init-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn small() -> InitOptions {
    InitOptions {
        image_size: 32,
        vision_hidden: 32,
        vision_layers: 1,
        vision_intermediate: 64,
        qformer_hidden: 32,
        qformer_layers: 2,
        qformer_intermediate: 64,
        num_query_tokens: 4,
        llm_hidden: 32,
        llm_layers: 1,
        llm_ffn: 64,
        ..InitOptions::default()
    }
}

#[test]
fn a_new_checkpoint_loads_in_the_server_with_the_worlds_tokenizers() {
    let dir = tempdir("load");
    let summary = init(&dir, &small()).unwrap();
    let model = Blip2Model::load(&dir, &LoadOptions::default()).unwrap();
    let config = model.config();
    assert_eq!(config.num_query_tokens, 4);
    assert_eq!(config.vision_config.image_size, 32);
    assert_eq!(
        config.image_token_index,
        Some(summary.opt_tokenizer.image_token_id)
    );
    // Every world word is one token of the LLM's tokenizer, and the prompt template's too.
    let tokenizer = model.prompt_tokenizer().tokenizer();
    for word in world::tokenizer_words() {
        let ids = tokenizer.encode(format!(" {word}"), false).unwrap();
        assert_eq!(ids.get_ids().len(), 1, "` {word}`");
    }
    // A question about a world image runs end to end (random answers, but the right shapes).
    let image = image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10]));
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let encoding = model.encode_images(&[png.as_slice()]).unwrap();
    assert_eq!(encoding.soft_prompt.dims(), &[1, 4, 32]);
    let prompt = model
        .build_prompt("<image>Question: which color are they? Answer:", 1)
        .unwrap();
    assert_eq!(prompt.num_positions, prompt.input_ids.len());
    // The Q-Former's tokenizer for stage 1 has [DEC].
    let qformer =
        tokenizers::Tokenizer::from_file(dir.join(QFORMER_TOKENIZER_DIR).join("tokenizer.json"))
            .unwrap();
    assert_eq!(
        qformer.token_to_id("[DEC]"),
        Some(summary.qformer_tokenizer.dec_token_id)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tensors_are_initialised_as_transformers_does_and_seeded() {
    let a = tempdir("seed-a");
    let b = tempdir("seed-b");
    let c = tempdir("seed-c");
    init(&a, &small()).unwrap();
    init(&b, &small()).unwrap();
    init(&c, &InitOptions { seed: 1, ..small() }).unwrap();
    let read = |dir: &PathBuf| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(read(&a), read(&b), "the same seed writes the same bytes");
    assert_ne!(read(&a), read(&c), "another seed other values");

    let tensors =
        candle_core::safetensors::load(a.join("model.safetensors"), &Device::Cpu).unwrap();
    let stats = |name: &str| {
        let t = tensors[name]
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap();
        let v: Vec<f64> = t.to_vec1().unwrap();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        (mean, var.sqrt(), v)
    };
    // LayerNorm weights one, biases zero (the fused vision qkv bias included).
    for name in [
        "vision_model.post_layernorm.weight",
        "qformer.layernorm.weight",
        "language_model.model.decoder.final_layer_norm.weight",
        "qformer.encoder.layer.0.output_query.LayerNorm.weight",
    ] {
        assert!(stats(name).2.iter().all(|&x| x == 1.0), "{name}");
    }
    for name in [
        "vision_model.encoder.layers.0.self_attn.qkv.bias",
        "language_projection.bias",
        "language_model.model.decoder.layers.0.fc1.bias",
    ] {
        assert!(stats(name).2.iter().all(|&x| x == 0.0), "{name}");
    }
    // Matrices and embeddings: normal(0, 0.02).
    for name in [
        "language_model.model.decoder.embed_tokens.weight",
        "qformer.encoder.layer.0.crossattention.attention.key.weight",
        "query_tokens",
    ] {
        let (mean, std, _) = stats(name);
        assert!(mean.abs() < 0.004, "{name}: mean {mean}");
        assert!((std - 0.02).abs() < 0.004, "{name}: std {std}");
    }
    assert!(
        !tensors.contains_key("language_model.lm_head.weight"),
        "lm_head is tied to the embeddings, as in the released checkpoints"
    );
    for dir in [a, b, c] {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn impossible_dimensions_are_refused() {
    let dir = tempdir("bad");
    let err = init(
        &dir,
        &InitOptions {
            image_size: 30,
            ..small()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("multiple of the patch size"),
        "{err}"
    );
    let err = init(
        &dir,
        &InitOptions {
            llm_heads: 5,
            ..small()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("LLM hidden size 32"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sincos_positions_say_where_each_patch_is() {
    use blip2_train::pretrain::sincos_positions;
    let grid = 4;
    let width = 16;
    let t = sincos_positions(grid, width).unwrap();
    assert_eq!(t.dims(), &[1, grid * grid + 1, width]);
    let rows: Vec<Vec<f32>> = t.squeeze(0).unwrap().to_vec2().unwrap();
    assert!(
        rows[0].iter().all(|&x| x == 0.0),
        "the class token has none"
    );
    assert!(rows.iter().flatten().all(|x| (-1.0..=1.0).contains(x)));
    // Patch (row, col) = index 1 + row * grid + col: the first quarter is sin(col * omega_k)
    // (omega_0 = 1), the third quarter sin(row * omega_k).
    let at = |row: usize, col: usize| &rows[1 + row * grid + col];
    assert!((at(2, 3)[0] - 3f32.sin()).abs() < 1e-6);
    assert!((at(2, 3)[width / 2] - 2f32.sin()).abs() < 1e-6);
    assert!((at(2, 3)[width / 4] - 3f32.cos()).abs() < 1e-6);
    // Every patch has its own embedding.
    for a in 1..rows.len() {
        for b in a + 1..rows.len() {
            assert_ne!(rows[a], rows[b], "patches {a} and {b}");
        }
    }
    assert!(sincos_positions(4, 6).is_err());
}
