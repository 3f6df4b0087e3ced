//! `blip2 train world` then `blip2 eval world` against running tiers (the random opt-a
//! checkpoint, so the figures are near zero: what is tested is that every question goes through
//! the session tier and is scored as the report says, and that bad input fails clearly).

mod common;

use std::path::Path;
use std::process::Command;

use blip2_train::metrics::exact_match;
use common::{blip2_binary, fixture, spawn};

fn blip2(args: &[&str]) -> std::process::Output {
    Command::new(blip2_binary())
        .args(args)
        .output()
        .expect("running blip2")
}

#[test]
fn eval_world_asks_every_question_through_the_session_tier() {
    let dir = std::env::temp_dir().join(format!("blip2-e2e-world-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let world = dir.to_str().unwrap();
    let out = blip2(&[
        "train",
        "world",
        "--out",
        world,
        "--image-size",
        "32",
        "--train-images",
        "2",
        "--val-images",
        "1",
        "--test-images",
        "3",
        "--seed",
        "5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("6 images"));
    for file in [
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "labels.jsonl",
        "text.txt",
        "world.json",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }

    let model = fixture("models/opt-a");
    let model = model.to_str().unwrap();
    let vision = spawn(&["vision", "--listen", "127.0.0.1:0", "--model", model]);
    let llm = spawn(&["llm", "--listen", "127.0.0.1:0", "--model", model]);
    let session = spawn(&[
        "session",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model,
        "--vision",
        &vision.addr,
        "--llm",
        &llm.addr,
    ]);
    let retrieval_model = fixture("models/retrieval-a");
    let retrieval = spawn(&[
        "retrieval",
        "--listen",
        "127.0.0.1:0",
        "--model",
        retrieval_model.to_str().unwrap(),
    ]);
    let report_path = dir.join("report.json");
    let out = blip2(&[
        "eval",
        "world",
        "--session",
        &session.addr,
        "--data",
        world,
        "--retrieval",
        &retrieval.addr,
        "--max-new-tokens",
        "4",
        "--json",
        report_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("VQA exact match"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    // Three test images, five questions each.
    assert_eq!(report["questions"], 15);
    for kind in ["color", "shape", "count", "position", "describe"] {
        assert_eq!(report["count_by_type"][kind], 3, "{kind}");
    }
    let answers = report["answers"].as_array().unwrap();
    assert_eq!(answers.len(), 15);
    let (mut correct, mut one_word) = (0, 0);
    for a in answers {
        let answer = a["answer"].as_str().unwrap();
        let expected = a["expected"].as_str().unwrap();
        assert_eq!(a["correct"], exact_match(answer, expected), "{a}");
        if a["kind"] != "describe" {
            one_word += 1;
            correct += usize::from(a["correct"] == true);
        }
    }
    let accuracy = report["vqa_accuracy"].as_f64().unwrap();
    assert!((accuracy - correct as f64 / one_word as f64).abs() < 1e-12);
    assert!(report["caption_cider"].as_f64().unwrap() >= 0.0);
    // Every caption of the split searched the retrieval tier's index of the split's images.
    assert_eq!(report["retrieval_queries"], 3);
    let r1 = report["retrieval_r_at_1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&r1));

    // Bad input: a missing world, and a session tier that is not there.
    let out = blip2(&[
        "eval",
        "world",
        "--session",
        &session.addr,
        "--data",
        "/nonexistent-world",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-world/test.jsonl"));
    drop(session);
    let out = blip2(&[
        "eval",
        "world",
        "--session",
        "http://127.0.0.1:1",
        "--data",
        world,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to the session tier"));
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}

/// The embedded default is the demo checkpoint trained by `scripts/train-demo`: served with no
/// `--model`, it answers questions about shapes-world images it never saw (another seed than
/// its training world) through the session tier, and its stage-1 companion
/// (`models/shapes-demo-retrieval`) finds images by their captions.
#[test]
fn the_embedded_default_sees_new_world_images() {
    let dir = std::env::temp_dir().join(format!("blip2-e2e-default-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let world = dir.to_str().unwrap();
    let out = blip2(&[
        "train",
        "world",
        "--out",
        world,
        "--train-images",
        "1",
        "--val-images",
        "1",
        "--test-images",
        "16",
        "--seed",
        "77",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vision = spawn(&["vision", "--listen", "127.0.0.1:0"]);
    let llm = spawn(&["llm", "--listen", "127.0.0.1:0"]);
    let session = spawn(&[
        "session",
        "--listen",
        "127.0.0.1:0",
        "--vision",
        &vision.addr,
        "--llm",
        &llm.addr,
    ]);
    let retrieval_model = common::root().join("models/shapes-demo-retrieval");
    let retrieval = spawn(&[
        "retrieval",
        "--listen",
        "127.0.0.1:0",
        "--model",
        retrieval_model.to_str().unwrap(),
    ]);
    let report_path = dir.join("report.json");
    let out = blip2(&[
        "eval",
        "world",
        "--session",
        &session.addr,
        "--data",
        world,
        "--retrieval",
        &retrieval.addr,
        "--json",
        report_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(report["questions"], 80);
    // 64 one-word questions; chance is 1/6 for colours and 1/4 for the rest.
    let accuracy = report["vqa_accuracy"].as_f64().unwrap();
    eprintln!(
        "embedded default on 16 new images: VQA {accuracy}, by type {}, caption attribute recall {}, R@1 {}",
        report["accuracy_by_type"], report["caption_attribute_recall"], report["retrieval_r_at_1"]
    );
    assert!(accuracy >= 0.8, "VQA accuracy {accuracy}: {report}");
    let recall = report["caption_attribute_recall"].as_f64().unwrap();
    assert!(recall >= 0.8, "caption attribute recall {recall}");
    // Text-to-image R@1 over 16 images: chance is about 1/16.
    let r1 = report["retrieval_r_at_1"].as_f64().unwrap();
    assert!(r1 >= 0.5, "R@1 {r1}");
    let _ = std::fs::remove_dir_all(&dir);
}
