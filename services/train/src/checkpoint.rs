//! Checkpoint directories of a training run, each complete or absent.
//!
//! A run writes into its output directory `OUT`:
//!
//! - `OUT/checkpoints/step-N/`: the model as the objective saves it (config, tokenizer and
//!   weight files: a checkpoint directory that the next stage or `blip2 serve` loads), plus
//!   `trainer_state/` with what `--resume` needs to continue bit-identically: the trainable
//!   parameters exactly as they are in memory ([`TRAINABLE`]), the optimiser's moments and
//!   update count ([`crate::optim::STATE_FILE`]) and [`STATE_JSON`] ([`TrainerState`]: step,
//!   seed, epoch and position in it, the run's configuration, the recent losses). Each is
//!   written into `OUT/checkpoints/.tmp-step-N`, its files synced, and renamed to `step-N` when
//!   complete; only the newest `--keep` are kept.
//! - `OUT/checkpoints/latest`: the name of the newest complete checkpoint (`step-N`), replaced
//!   by writing a temporary file and renaming it over.
//! - `OUT/` itself: at the end of the run the final checkpoint's model files (not its trainer
//!   state) are copied into `OUT`, so that `OUT` is the trained model's checkpoint directory
//!   (`--model OUT` for the next stage). Each file is renamed into place whole.
//!
//! A process killed at any point leaves at most `.tmp-*` entries behind, which the next run
//! removes ([`clean_tmp`]); every `step-N` directory is complete.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The intermediate checkpoints' directory inside a run's output directory.
pub const CHECKPOINTS: &str = "checkpoints";
/// The file naming the newest complete checkpoint, inside [`CHECKPOINTS`].
pub const LATEST: &str = "latest";
/// A checkpoint's subdirectory with the trainer's state.
pub const TRAINER_STATE: &str = "trainer_state";
/// The trainer's state file inside [`TRAINER_STATE`].
pub const STATE_JSON: &str = "state.json";
/// The trainable parameters inside [`TRAINER_STATE`], by name, as they are in memory.
pub const TRAINABLE: &str = "trainable.safetensors";

/// `trainer_state/state.json`: where a run stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimiser steps taken.
    pub step: usize,
    /// The run's seed (the data order and each step's random draws derive from it).
    pub seed: u64,
    /// The epoch the next step belongs to (0-based).
    pub epoch: usize,
    /// The next step's batch within that epoch (0-based).
    pub position: usize,
    /// The number of training examples (the data order depends on it).
    pub examples: usize,
    /// The run's configuration ([`crate::trainer::TrainConfig`] as JSON).
    pub config: serde_json::Value,
    /// The losses of the last steps (oldest first), each as its named parts (`loss` first).
    pub recent_losses: Vec<Vec<(String, f64)>>,
}

/// The directory of the checkpoint after `step` steps: `OUT/checkpoints/step-N`.
pub fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(CHECKPOINTS).join(format!("step-{step}"))
}

/// Writes `bytes` to `path` through a synced temporary sibling renamed over it.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Invalid(format!("{}: not a file name", path.display())))?;
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_parent(path)
}

/// Creates the directory `dir` complete or not at all: `write` fills `.tmp-<name>` next to
/// it, whose files are then synced and which is renamed to `dir` (an existing `dir` is
/// replaced). When `write` fails the temporary directory is removed and `dir` is left as it
/// was.
pub fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Invalid(format!("{}: not a directory name", dir.display())))?;
    let tmp = dir.with_file_name(format!(".tmp-{name}"));
    remove_dir_if_exists(&tmp)?;
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = write(&tmp).and_then(|()| sync_tree(&tmp)) {
        // The failure is what the caller needs to hear; a leftover .tmp is cleaned next run.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    remove_dir_if_exists(dir)?;
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    sync_parent(dir)
}

/// Flushes every file under `dir` to disk (so that a rename never publishes a directory whose
/// data is still only in the page cache).
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Syncs a directory's entries (best effort: not every platform opens directories).
fn sync_dir(dir: &Path) -> Result<()> {
    if let Ok(f) = File::open(dir) {
        // Some filesystems refuse fsync on a directory; the rename itself has happened.
        let _ = f.sync_all();
    }
    Ok(())
}

fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Writes the checkpoint after `step` steps (see the module docs): `write` fills the
/// directory, then `OUT/checkpoints/latest` names it and all but the newest `keep` (at least
/// one) are removed. Returns the checkpoint's directory.
pub fn save_step(
    out: &Path,
    step: usize,
    keep: usize,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = step_dir(out, step);
    let parent = out.join(CHECKPOINTS);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    write_dir_atomic(&dir, write)?;
    write_file_atomic(&parent.join(LATEST), format!("step-{step}\n").as_bytes())?;
    prune(out, keep.max(1))?;
    Ok(dir)
}

/// The complete checkpoints in `OUT/checkpoints`, by step, oldest first.
pub fn list(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let parent = out.join(CHECKPOINTS);
    let entries = match std::fs::read_dir(&parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&parent, e)),
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            entry.path().is_dir().then(|| (step, entry.path()))
        })
        .collect();
    found.sort_by_key(|(step, _)| *step);
    Ok(found)
}

/// Removes all but the newest `keep` checkpoints.
pub fn prune(out: &Path, keep: usize) -> Result<()> {
    let found = list(out)?;
    let excess = found.len().saturating_sub(keep);
    for (_, dir) in found.into_iter().take(excess) {
        remove_dir_if_exists(&dir)?;
    }
    Ok(())
}

/// Removes the checkpoints after step `step` (those of a continuation that a resume from
/// `step` abandons; left alone, the pruning by step number would keep them over the new ones).
pub fn remove_after(out: &Path, step: usize) -> Result<()> {
    for (s, dir) in list(out)? {
        if s > step {
            remove_dir_if_exists(&dir)?;
        }
    }
    Ok(())
}

/// Removes what an interrupted write left in `OUT` and `OUT/checkpoints` (`.tmp-*`).
pub fn clean_tmp(out: &Path) -> Result<()> {
    for parent in [out.to_path_buf(), out.join(CHECKPOINTS)] {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let path = entry.path();
                if path.is_dir() {
                    remove_dir_if_exists(&path)?;
                } else {
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
        }
    }
    Ok(())
}

/// The checkpoint `--resume PATH` means: `PATH` itself when it has a `trainer_state/`, else
/// the one `PATH/checkpoints/latest` names (a run's output directory).
pub fn resolve_resume(path: &Path) -> Result<PathBuf> {
    if path.join(TRAINER_STATE).is_dir() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(CHECKPOINTS).join(LATEST);
    match std::fs::read_to_string(&latest) {
        Ok(name) => {
            let dir = path.join(CHECKPOINTS).join(name.trim());
            if dir.join(TRAINER_STATE).is_dir() {
                Ok(dir)
            } else {
                Err(Error::Invalid(format!(
                    "{} names {}, which has no {TRAINER_STATE}/",
                    latest.display(),
                    dir.display()
                )))
            }
        }
        Err(_) => Err(Error::Invalid(format!(
            "{}: neither a checkpoint with {TRAINER_STATE}/ nor a run directory with {CHECKPOINTS}/{LATEST}",
            path.display()
        ))),
    }
}

/// Reads a checkpoint's `trainer_state/state.json`.
pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let path = checkpoint.join(TRAINER_STATE).join(STATE_JSON);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

/// Writes `state` as `dir/state.json` (`dir` being a checkpoint's `trainer_state/`).
pub fn write_state(dir: &Path, state: &TrainerState) -> Result<()> {
    let path = dir.join(STATE_JSON);
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// Copies a checkpoint's model files (everything but `trainer_state/`) into `out`: first all
/// into `out/.tmp-final` (synced), then each renamed into `out`, replacing what is there.
pub fn publish(checkpoint: &Path, out: &Path) -> Result<()> {
    let staging = out.join(".tmp-final");
    remove_dir_if_exists(&staging)?;
    copy_dir(checkpoint, &staging, true)?;
    sync_tree(&staging)?;
    let entries = std::fs::read_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&staging, e))?;
        let target = out.join(entry.file_name());
        if entry.path().is_dir() {
            remove_dir_if_exists(&target)?;
        }
        std::fs::rename(entry.path(), &target).map_err(|e| Error::io(&target, e))?;
    }
    sync_dir(out)?;
    remove_dir_if_exists(&staging)
}

fn copy_dir(from: &Path, to: &Path, skip_state: bool) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    let entries = std::fs::read_dir(from).map_err(|e| Error::io(from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let path = entry.path();
        if skip_state && entry.file_name() == TRAINER_STATE {
            continue;
        }
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_dir(&path, &target, false)?;
        } else {
            std::fs::copy(&path, &target).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}
