//! The stable command forms `blip2 generate ... --json` and `blip2 encode ... --dump`, checked
//! against the transformers goldens of the committed fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn blip2() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blip2"))
}

fn case(model: &str, name: &str) -> serde_json::Value {
    let path = fixtures().join("goldens").join(model).join("cases.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    cases.into_iter().find(|c| c["name"] == name).unwrap()
}

fn generate_json(model: &str, case: &serde_json::Value, extra: &[&str]) -> serde_json::Value {
    let mut cmd = blip2();
    cmd.arg("generate")
        .arg("--model")
        .arg(fixtures().join("models").join(model));
    for image in case["images"].as_array().unwrap() {
        cmd.arg("--image")
            .arg(fixtures().join("images").join(image.as_str().unwrap()));
    }
    cmd.arg("--prompt").arg(case["prompt"].as_str().unwrap());
    cmd.args(extra).arg("--json");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "blip2 generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn generate_json_gives_the_reference_greedy_and_beam_ids() {
    for (model, name) in [
        ("opt-a", "two_images"),
        ("t5-b", "vqa"),
        ("opt-b", "caption"),
    ] {
        let case = case(model, name);
        let greedy = &case["greedy"];
        let out = generate_json(
            model,
            &case,
            &[
                "--max-new-tokens",
                &greedy["max_new_tokens"].to_string(),
                "--min-new-tokens",
                &greedy["min_new_tokens"].to_string(),
            ],
        );
        assert_eq!(
            out["token_ids"], greedy["token_ids"],
            "{model}/{name} greedy"
        );
        assert!(out["text"].is_string());
        let beam = &case["beam"];
        let out = generate_json(
            model,
            &case,
            &[
                "--num-beams",
                &beam["num_beams"].to_string(),
                "--max-new-tokens",
                &beam["max_new_tokens"].to_string(),
                "--min-new-tokens",
                &beam["min_new_tokens"].to_string(),
                "--length-penalty",
                &beam["length_penalty"].to_string(),
            ],
        );
        assert_eq!(out["token_ids"], beam["token_ids"], "{model}/{name} beam");
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let case = case("opt-a", "vqa");
    let args = [
        "--do-sample",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "7",
    ];
    let a = generate_json("opt-a", &case, &args);
    let b = generate_json("opt-a", &case, &args);
    assert_eq!(a["token_ids"], b["token_ids"]);
}

#[test]
fn encode_dumps_the_reference_tensors() {
    let dump =
        std::env::temp_dir().join(format!("blip2-encode-{}.safetensors", std::process::id()));
    let out = blip2()
        .arg("encode")
        .arg("--model")
        .arg(fixtures().join("models/opt-a"))
        .arg("--image")
        .arg(fixtures().join("images/wide.png"))
        .arg("--dump")
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = candle_core::safetensors::load(&dump, &candle_core::Device::Cpu).unwrap();
    let golden = candle_core::safetensors::load(
        fixtures().join("goldens/opt-a/caption.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for name in [
        "pixel_values",
        "image_embeds",
        "query_output",
        "soft_prompt",
    ] {
        let reference = golden[name].get(0).unwrap();
        assert_eq!(ours[name].dims(), reference.dims(), "{name}");
        let diff = (&ours[name] - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-4, "{name}: {diff}");
    }
    std::fs::remove_file(dump).ok();
}

#[test]
fn bad_input_is_a_clear_error_not_a_crash() {
    let empty = std::env::temp_dir().join(format!("blip2-empty-{}.png", std::process::id()));
    std::fs::write(&empty, b"").unwrap();
    let out = blip2()
        .args(["generate", "--image"])
        .arg(&empty)
        .arg("--model")
        .arg(fixtures().join("models/opt-a"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("image") && stderr.contains("0 bytes"),
        "{stderr}"
    );
    let out = blip2()
        .args(["generate", "--model", "/nonexistent-checkpoint", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-checkpoint"));
    std::fs::remove_file(empty).ok();
}

/// `blip2` with the Hugging Face environment aimed at a temporary HF_HOME and a closed local
/// port: no test ever reaches the real hub.
fn blip2_offline_hub(hf_home: &Path) -> Command {
    let mut cmd = blip2();
    cmd.env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("BLIP2_MODEL");
    cmd
}

#[test]
fn model_by_repo_id() {
    let hf_home = std::env::temp_dir().join(format!("blip2-cli-hf-home-{}", std::process::id()));
    std::fs::remove_dir_all(&hf_home).ok();
    std::fs::create_dir_all(&hf_home).unwrap();

    // Not in the cache, and the hub unreachable (or the feature off): one clear error line.
    let out = blip2_offline_hub(&hf_home)
        .args(["generate", "--model", "blip2-test/not-cached", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "hub") {
        assert!(
            stderr.contains("cannot download blip2-test/not-cached")
                && stderr.contains("no network?"),
            "{stderr}"
        );
    } else {
        assert!(
            stderr.contains(
                "blip2-test/not-cached is not a directory (download by repo id needs the `hub` feature)"
            ),
            "{stderr}"
        );
    }

    // In the HF cache (as huggingface_hub lays it out): found with no network at all.
    let commit = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
    let repo_dir = hf_home.join("hub").join("models--blip2-test--opt-a");
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models/opt-a")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), commit).unwrap();
    let out = blip2_offline_hub(&hf_home)
        .args(["generate", "--model", "blip2-test/opt-a", "--image"])
        .arg(fixtures().join("images/photo.jpg"))
        .args(["--max-new-tokens", "3", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "hub") {
        assert!(out.status.success(), "{stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(json.is_object(), "{json}");
    } else {
        assert!(stderr.contains("needs the `hub` feature"), "{stderr}");
    }
    std::fs::remove_dir_all(&hf_home).ok();
}
