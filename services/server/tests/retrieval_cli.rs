//! The stable command forms `blip2 match ... --json` and `blip2 embed ... --json`, checked
//! against the transformers goldens of the retrieval fixture (tests/fixtures/goldens/retrieval-a).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, IndexOp, Tensor};

const TOLERANCE: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("models/retrieval-a")
}

fn cases() -> serde_json::Value {
    let path = fixtures().join("goldens/retrieval-a/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn goldens() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("goldens/retrieval-a/retrieval.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_blip2"))
        .args(args)
        .output()
        .unwrap()
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "blip2 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn image_path(cases: &serde_json::Value, i: usize) -> String {
    let name = cases["images"][i].as_str().unwrap();
    fixtures().join("images").join(name).display().to_string()
}

fn close(what: &str, ours: f64, reference: f32) {
    let diff = (ours - reference as f64).abs();
    assert!(
        diff <= TOLERANCE,
        "{what}: {ours} vs {reference} (diff {diff})"
    );
}

#[test]
fn match_json_gives_reference_itm_probability_and_itc_score() {
    let cases = cases();
    let gold = goldens();
    let probs = gold["itm_probs"].to_vec2::<f32>().unwrap();
    let itc = gold["itc_scores"].to_vec2::<f32>().unwrap();
    let model = model_dir().display().to_string();
    let texts: Vec<&str> = cases["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    for b in 0..cases["images"].as_array().unwrap().len() {
        let image = image_path(&cases, b);
        // One text: the stable form.
        let out = run_json(&[
            "match", "--model", &model, "--image", &image, "--text", texts[1], "--json",
        ]);
        close(
            "itm_probability",
            out["itm_probability"].as_f64().unwrap(),
            probs[b][1],
        );
        close("itc_score", out["itc_score"].as_f64().unwrap(), itc[b][1]);
        // All texts at once (padded batch): one result per text, in order.
        let mut args = vec!["match", "--model", &model, "--image", &image, "--json"];
        for t in &texts {
            args.extend(["--text", t]);
        }
        let out = run_json(&args);
        let results = out["results"].as_array().unwrap();
        assert_eq!(results.len(), texts.len());
        for (n, r) in results.iter().enumerate() {
            close(
                "itm_probability",
                r["itm_probability"].as_f64().unwrap(),
                probs[b][n],
            );
            close("itc_score", r["itc_score"].as_f64().unwrap(), itc[b][n]);
            assert_eq!(r["truncated"], cases["texts"][n]["truncated"]);
        }
    }
}

#[test]
fn embed_json_gives_reference_embeddings() {
    let cases = cases();
    let gold = goldens();
    let model = model_dir().display().to_string();
    let image = image_path(&cases, 0);
    let out = run_json(&["embed", "--model", &model, "--image", &image, "--json"]);
    let reference = gold["image_embeds"].i(0).unwrap().to_vec2::<f32>().unwrap();
    let rows = out["image_embeds"].as_array().unwrap();
    assert_eq!(
        out["shape"],
        serde_json::json!([reference.len(), reference[0].len()])
    );
    assert_eq!(rows.len(), reference.len());
    for (row, want) in rows.iter().zip(&reference) {
        for (v, w) in row.as_array().unwrap().iter().zip(want) {
            close("image_embeds", v.as_f64().unwrap(), *w);
        }
    }

    for (n, text) in cases["texts"].as_array().unwrap().iter().enumerate() {
        let t = text["text"].as_str().unwrap();
        let out = run_json(&["embed", "--model", &model, "--text", t, "--json"]);
        let want = gold["text_embeds"].i(n).unwrap().to_vec1::<f32>().unwrap();
        let got = out["text_embeds"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (v, w) in got.iter().zip(&want) {
            close("text_embeds", v.as_f64().unwrap(), *w);
        }
        assert_eq!(out["truncated"], text["truncated"]);
        assert_eq!(out["num_tokens"], text["num_tokens"]);
    }
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let model = model_dir().display().to_string();
    let cases = cases();
    let image = image_path(&cases, 0);
    let out = run(&[
        "match", "--model", &model, "--image", &image, "--text", " ", "--json",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty"), "{err}");

    let out = run(&["embed", "--model", &model, "--json"]);
    assert!(!out.status.success());

    // A captioning checkpoint has no retrieval heads.
    let opt = fixtures().join("models/opt-a").display().to_string();
    let out = run(&["embed", "--model", &opt, "--text", "a cat", "--json"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("itm_head"), "{err}");
}
