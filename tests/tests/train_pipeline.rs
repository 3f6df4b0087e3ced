//! The demo checkpoint's training pipeline (`scripts/train-demo`) end to end at a tiny scale
//! (SCALE: a 40-image world, a few steps per stage): every stage hands the next a checkpoint
//! it loads, the results load as the tiers load them, a rerun does nothing twice, and a stage
//! stopped by a signal leaves a loadable checkpoint that `--resume` continues.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{blip2_binary, root};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blip2-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn train_demo(out: &Path) -> std::process::Output {
    Command::new(root().join("scripts/train-demo"))
        .arg(out)
        .env("BLIP2_BIN", blip2_binary())
        .env("SCALE", "0.005")
        .env("ABLATION", "1")
        .output()
        .expect("running scripts/train-demo")
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_pipeline_chains_every_stage_and_its_results_serve() {
    let out = scratch("demo");
    let run = train_demo(&out);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    for stage in ["vit", "opt", "stage1", "stage2", "stage2-no-stage1"] {
        let steps = lines(&out.join(stage).join("steps.jsonl"));
        let trained: Vec<&serde_json::Value> =
            steps.iter().filter(|s| s.get("loss").is_some()).collect();
        assert!(
            trained.len() >= 2,
            "{stage}: {} steps logged",
            trained.len()
        );
        assert!(
            trained
                .iter()
                .all(|s| s["loss"].as_f64().is_some_and(f64::is_finite)),
            "{stage}: a loss is not finite"
        );
    }
    // Stage 1 logs its three losses apart.
    let stage1 = lines(&out.join("stage1/steps.jsonl"));
    for part in ["itc", "itm", "itg"] {
        assert!(stage1[0]["parts"][part].as_f64().is_some(), "{part}");
    }
    // The chat checkpoint loads as the LLM and vision tiers load it and answers a question
    // about a world image; the stage-1 checkpoint is a retrieval checkpoint.
    let image = out.join("world/images/000000.png");
    let answer = Command::new(blip2_binary())
        .args(["generate", "--model"])
        .arg(out.join("stage2"))
        .arg("--image")
        .arg(&image)
        .args([
            "--prompt",
            "<image>Question: which color are they? Answer:",
            "--max-new-tokens",
            "3",
        ])
        .output()
        .unwrap();
    assert!(
        answer.status.success(),
        "{}",
        String::from_utf8_lossy(&answer.stderr)
    );
    let matched = Command::new(blip2_binary())
        .args(["match", "--json", "--model"])
        .arg(out.join("stage1"))
        .arg("--image")
        .arg(&image)
        .args(["--text", "one red circle on the left"])
        .output()
        .unwrap();
    assert!(
        matched.status.success(),
        "{}",
        String::from_utf8_lossy(&matched.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&matched.stdout).unwrap();
    let p = report["itm_probability"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{report}");

    // A rerun finds every stage done and changes nothing.
    let before = std::fs::read(out.join("stage2/model.safetensors")).unwrap();
    let rerun = train_demo(&out);
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    for stage in ["vit", "opt", "stage1", "stage2"] {
        assert!(
            stderr.contains(&format!("{stage}: done already")),
            "{stderr}"
        );
    }
    assert_eq!(
        before,
        std::fs::read(out.join("stage2/model.safetensors")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn sigint_stops_a_stage_with_a_checkpoint_that_resume_continues() {
    let dir = scratch("sigint");
    let blip2 = blip2_binary();
    let world = dir.join("world");
    let model = dir.join("init");
    let status = Command::new(&blip2)
        .args([
            "train",
            "world",
            "--image-size",
            "32",
            "--train-images",
            "40",
        ])
        .args(["--val-images", "4", "--test-images", "4", "--out"])
        .arg(&world)
        .output()
        .unwrap();
    assert!(status.status.success());
    let status = Command::new(&blip2)
        .args(["train", "init", "--image-size", "32", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(status.status.success());
    let out = dir.join("opt");
    let args = |extra: &[&str]| {
        let mut c = Command::new(&blip2);
        c.args(["train", "opt", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(world.join("text.txt"))
            .arg("--out")
            .arg(&out)
            .args([
                "--steps",
                "100000",
                "--batch-size",
                "4",
                "--save-every",
                "5",
            ])
            .args(["--no-progress", "--warmup-steps", "1"])
            .args(extra);
        c
    };
    let child = args(&[]).stderr(Stdio::piped()).spawn().unwrap();
    // Wait for the first checkpoint, then interrupt.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("checkpoints/latest").exists() {
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "an interrupted run exits non-zero"
    );
    assert!(stderr.contains("interrupted after step"), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    // The newest checkpoint is complete: it loads as a model.
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let checkpoint = out.join("checkpoints").join(latest.trim());
    blip2_model::model::Blip2Model::load(&checkpoint, &Default::default())
        .unwrap_or_else(|e| panic!("{}: {e}", checkpoint.display()));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("trainer_state/state.json")).unwrap(),
    )
    .unwrap();
    let stopped_at = state["step"].as_u64().unwrap();
    assert!(stopped_at >= 5, "{state}");

    // Resuming with a smaller total finishes right away from the stopped step.
    let total = stopped_at + 3;
    let mut resumed = args(&["--resume"]);
    resumed.arg(&out);
    let mut argv: Vec<String> = resumed
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let at = argv.iter().position(|a| a == "100000").unwrap();
    argv[at] = total.to_string();
    let output = Command::new(&blip2).args(&argv).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("step {total} (3 this run)")),
        "{stdout}"
    );
    blip2_model::model::Blip2Model::load(&out, &Default::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
