//! `hub::download` through the environment it reads (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE),
//! offline: the hub is a closed local port. One test function, so that setting the variables
//! races with nothing else in this test binary.
#![cfg(feature = "hub")]

use std::path::Path;
use std::time::{Duration, Instant};

use blip2_model::hub;
use blip2_model::Error;

const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

#[test]
fn download_reads_the_hf_environment() {
    let home = std::env::temp_dir().join(format!("blip2-hub-env-{}", std::process::id()));
    std::fs::remove_dir_all(&home).ok();
    std::fs::create_dir_all(&home).unwrap();
    for name in [
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
    ] {
        std::env::remove_var(name);
    }
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");

    // Nothing cached, nothing listening: a Hub error naming the repo, at once.
    let start = Instant::now();
    let error = hub::download("Salesforce/blip2-opt-2.7b", None).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(20));
    eprintln!("{error}");
    match &error {
        Error::Hub { repo, message } => {
            assert_eq!(repo, "Salesforce/blip2-opt-2.7b");
            assert!(message.contains("config.json"), "{message}");
        }
        other => panic!("expected Error::Hub, got {other:?}"),
    }
    assert!(error
        .to_string()
        .starts_with("cannot download Salesforce/blip2-opt-2.7b: "));

    // The same checkpoint in the cache under $HF_HOME/hub: resolved with no network.
    let repo_dir = home.join("hub").join("models--Salesforce--blip2-opt-2.7b");
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::write(snapshot.join(name), b"{}").unwrap();
    }
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), COMMIT).unwrap();
    assert_eq!(
        hub::download("Salesforce/blip2-opt-2.7b", None).unwrap(),
        snapshot
    );

    // HF_HUB_OFFLINE=1: the cache only.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(
        hub::download("Salesforce/blip2-opt-2.7b", None).unwrap(),
        snapshot
    );
    let error = hub::download("Salesforce/blip2-flan-t5-xl", None).unwrap_err();
    eprintln!("{error}");
    assert!(error.to_string().contains("HF_HUB_OFFLINE"), "{error}");

    assert!(!Path::new("Salesforce/blip2-opt-2.7b").exists());
    assert!(hub::looks_like_repo_id("Salesforce/blip2-opt-2.7b"));
    std::fs::remove_dir_all(&home).ok();
}
