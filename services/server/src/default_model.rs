//! Where `--model` points: a checkpoint directory, a Hugging Face repo id (feature `hub`), or,
//! with no `--model`, the embedded default checkpoint: the shapes-world demo checkpoint committed
//! under `models/shapes-demo` (a 0.7 M-parameter BLIP-2 with OPT, trained from scratch by
//! `scripts/train-demo`, docs/training.md), compiled into the binary so that `blip2` works on a
//! fresh machine and answers questions about shapes-world images. It is written out to a cache
//! directory on first use.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The checkpoint directory for `--model`: none is the embedded default; an existing directory
/// is itself; `owner/name` that is no existing path is a Hugging Face repo id, found in the HF
/// cache or downloaded into it (feature `hub`). Anything else is left to the loader, which
/// names the file it misses.
pub fn resolve_model_dir(model: Option<&Path>) -> Result<PathBuf> {
    let Some(model) = model else {
        return path();
    };
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    match model.to_str() {
        Some(id) if blip2_model::repo_id::looks_like_repo_id(id) => from_hub(id),
        _ => Ok(model.to_path_buf()),
    }
}

#[cfg(feature = "hub")]
fn from_hub(repo_id: &str) -> Result<PathBuf> {
    blip2_model::hub::download(repo_id, None).with_context(|| {
        format!("--model {repo_id} is not a directory; fetching it as a Hugging Face repo id")
    })
}

#[cfg(not(feature = "hub"))]
fn from_hub(repo_id: &str) -> Result<PathBuf> {
    anyhow::bail!("{repo_id} is not a directory (download by repo id needs the `hub` feature)")
}

macro_rules! embedded {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/shapes-demo/", $name)) as &[u8])),*]
    };
}

const FILES: &[(&str, &[u8])] = embedded!(
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
);

/// A short content hash (FNV-1a) so a new build never reuses an older extraction.
fn fingerprint() -> u64 {
    let mut hash: u64 = 0xcbf29ce484222325;
    for (name, bytes) in FILES {
        for &b in name.as_bytes().iter().chain(bytes.iter()) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x100000001b3);
        }
    }
    hash
}

/// Writes the embedded checkpoint out (once) and returns its directory.
pub fn path() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("blip2-default-model-{:016x}", fingerprint()));
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    // Extract into a private directory, then rename, so concurrent starts never see half a model.
    let staging = base.join(format!(
        "blip2-default-model-{:016x}.{}.tmp",
        fingerprint(),
        std::process::id()
    ));
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    for (name, bytes) in FILES {
        std::fs::write(staging.join(name), bytes)
            .with_context(|| format!("writing {}", staging.join(name).display()))?;
    }
    std::fs::write(staging.join(".complete"), b"")?;
    if std::fs::rename(&staging, &dir).is_err() {
        // Another process won the race; its copy is identical.
        std::fs::remove_dir_all(&staging).ok();
    }
    Ok(dir)
}
