//! The training loop every stage runs: [`train`] drives an [`Objective`] with AdamW.
//!
//! - Data order: each optimiser step takes one effective batch of `batch_size * accumulate`
//!   examples. Epoch `e` is a permutation of the examples drawn from `(seed, e)`
//!   ([`epoch_batches`]) cut into `n / (batch_size * accumulate)` full effective batches (the
//!   rest of the permutation is dropped, as LAVIS' `drop_last`); step `s` is batch
//!   `s % per_epoch` of epoch `s / per_epoch`. So step `s` always sees the same examples,
//!   whatever ran before it: that is what makes `--resume` exact.
//! - Each step's random draws (ITM's negatives) come from a fresh rng seeded with
//!   [`step_seed`]`(seed, step)`: no rng state is carried from step to step.
//! - Gradient accumulation: the effective batch is cut into `accumulate` micro-batches of
//!   `batch_size`; each micro-batch's loss is scaled by `1 / accumulate` before `backward()`
//!   and the gradients are summed ([`GradAccumulator`]), so for a loss that is a mean over the
//!   batch, `accumulate = k` with `batch_size = b` takes the same step as `batch_size = k * b`.
//! - Then global-norm clipping ([`clip_grad_norm`]; `grad_clip <= 0`: none, the norm is still
//!   measured), one AdamW update with the learning rate of [`lr_at`], and
//!   [`Objective::after_update`].
//! - Logging: `OUT/steps.jsonl`, one line per step (`step`, `loss`, `parts`, `lr`,
//!   `grad_norm`, `examples_per_s`, `elapsed_s`) and one per evaluation (`step`, `val`); an
//!   indicatif progress bar on a terminal (step/total, each loss part averaged over the last
//!   [`SMOOTHING`] steps, learning rate, examples/s), otherwise a line on stderr every
//!   `log_every` steps.
//! - Checkpoints every `save_every` steps and at the end, each complete or absent, the newest
//!   `keep` kept; at the end the final model is also copied into `OUT` (see
//!   [`crate::checkpoint`]).
//! - Stopping: when [`Run::stop`] is set (by default the process-wide flag that
//!   [`request_stop`] sets, which is what a SIGINT/SIGTERM handler calls) or after
//!   `stop_after` steps, the current step is finished, a checkpoint written, and the report
//!   says `interrupted`; resuming from `OUT` continues exactly where it stopped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainerState, TRAINABLE, TRAINER_STATE};
use crate::error::{Error, Result};
use crate::nn::scalar;
use crate::objective::Objective;
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, GradAccumulator};

/// How many recent steps the progress bar's losses are averaged over (and `state.json` keeps).
pub const SMOOTHING: usize = 20;

/// The per-step log inside a run's output directory.
pub const STEPS_LOG: &str = "steps.jsonl";

/// A training run's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimiser steps in all (a resumed run continues up to this).
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation), at least 1.
    pub accumulate: usize,
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    /// The cosine decay's floor.
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// AdamW's decoupled weight decay (decay group only, [`crate::optim::decays`]).
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Global gradient-norm limit; 0 or less: no clipping (the norm is still logged).
    pub grad_clip: f64,
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Checkpoints kept (at least 1).
    pub keep: usize,
    /// Evaluate on the validation examples every this many steps and at the end (0: never).
    pub eval_every: usize,
    /// Without a progress bar, a line on stderr every this many steps (0: none).
    pub log_every: usize,
    /// Show a progress bar (when stderr is a terminal; otherwise `log_every` lines).
    pub progress: bool,
    /// Stop as if interrupted after this many steps of this run (a time-boxed run, tests).
    #[serde(default)]
    pub stop_after: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 32,
            accumulate: 1,
            lr: 1e-4,
            min_lr: 0.0,
            warmup_steps: 100,
            weight_decay: 0.05,
            betas: (0.9, 0.999),
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 0,
            save_every: 0,
            keep: 2,
            eval_every: 0,
            log_every: 10,
            progress: true,
            stop_after: None,
        }
    }
}

/// Where a run writes and what it starts from, beside its [`TrainConfig`].
pub struct Run<'a, E> {
    /// The run's output directory (created if missing).
    pub out: &'a Path,
    /// Continue from a checkpoint directory, or from a run's output directory (its
    /// `checkpoints/latest`): the trainable parameters, the optimiser and the step are restored
    /// from it first. The seed, batch size, accumulation and number of examples must be those
    /// of the resumed run; a different `steps` changes the schedule from there on.
    pub resume: Option<&'a Path>,
    /// Held-out examples for the validation losses (`eval_every`).
    pub val: Option<&'a [E]>,
    /// Checked after every step: once set, the run checkpoints and stops.
    pub stop: &'a AtomicBool,
}

impl<'a, E> Run<'a, E> {
    /// A fresh run into `out`, stopped by [`request_stop`].
    pub fn new(out: &'a Path) -> Self {
        Self {
            out,
            resume: None,
            val: None,
            stop: &STOP,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Optimiser steps taken in all (including those before a resume).
    pub steps: usize,
    /// Steps taken by this run.
    pub steps_this_run: usize,
    /// The last step's losses: `loss` (the total) and the objective's parts.
    pub losses: Vec<(String, f64)>,
    /// The same averaged over the last [`SMOOTHING`] steps.
    pub smoothed: Vec<(String, f64)>,
    /// The last evaluation's mean losses, if any ran.
    pub val_losses: Option<Vec<(String, f64)>>,
    pub seconds: f64,
    pub examples_per_second: f64,
    /// The newest checkpoint (`OUT/checkpoints/step-N`), if any.
    pub checkpoint: Option<PathBuf>,
    /// Stopped early (signal, [`Run::stop`] or `stop_after`): `OUT/checkpoints` holds the
    /// checkpoint but `OUT` not the final model; resuming from `OUT` continues.
    pub interrupted: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks the running [`train`] to stop after its current step (what SIGINT/SIGTERM handlers
/// call; only an atomic store, so safe in any context).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// The seed of step `step`'s rng (distinct from the data order's per-epoch streams).
pub fn step_seed(seed: u64, step: usize) -> u64 {
    mix(mix(seed ^ 0x5354_4550) ^ step as u64)
}

/// Epoch `epoch`'s effective batches: a permutation of `0..n` drawn from `(seed, epoch)`, cut
/// into `n / effective` batches of `effective` indices (the remainder dropped).
pub fn epoch_batches(n: usize, effective: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(mix(mix(seed) ^ epoch as u64)));
    order
        .chunks_exact(effective.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// SplitMix64's finaliser: nearby inputs give unrelated seeds.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Trains `objective` on `examples` (see the module docs) as `run` says.
pub fn train<O: Objective>(
    objective: &O,
    examples: &[O::Example],
    cfg: &TrainConfig,
    run: &Run<'_, O::Example>,
) -> Result<TrainReport>
where
    O::Example: Clone,
{
    let out = run.out;
    let accumulate = cfg.accumulate.max(1);
    let effective = cfg.batch_size * accumulate;
    if cfg.steps == 0 || cfg.batch_size == 0 {
        return Err(Error::Invalid(
            "training needs --steps >= 1 and --batch-size >= 1".into(),
        ));
    }
    if examples.len() < effective {
        return Err(Error::Invalid(format!(
            "{} training examples: fewer than one step's {effective} (batch size {} x accumulate {accumulate})",
            examples.len(),
            cfg.batch_size,
        )));
    }
    let vars = objective.trainable();
    if vars.is_empty() {
        return Err(Error::Invalid(
            "the objective has no trainable parameters".into(),
        ));
    }
    let mut optimizer = AdamW::new(
        vars.clone(),
        AdamWConfig {
            beta1: cfg.betas.0,
            beta2: cfg.betas.1,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let var_list: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let var_refs: Vec<&Var> = var_list.iter().collect();

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    checkpoint::clean_tmp(out)?;
    let mut start = 0usize;
    let mut recent: VecDeque<Vec<(String, f64)>> = VecDeque::new();
    let mut last_checkpoint = None;
    if let Some(path) = run.resume {
        let dir = checkpoint::resolve_resume(path)?;
        let state = checkpoint::read_state(&dir)?;
        check_resumable(&state, cfg, examples.len(), &dir)?;
        restore_trainable(&vars, &dir.join(TRAINER_STATE).join(TRAINABLE))?;
        optimizer.load_state(&dir.join(TRAINER_STATE))?;
        if optimizer.steps() != state.step {
            return Err(Error::Invalid(format!(
                "{}: the optimiser took {} steps, the trainer {}",
                dir.display(),
                optimizer.steps(),
                state.step
            )));
        }
        start = state.step;
        recent = state.recent_losses.into_iter().collect();
        // The resumed checkpoint may live in another run's directory: only this run's own
        // later checkpoints are an abandoned continuation.
        checkpoint::remove_after(out, start)?;
        last_checkpoint = Some(dir);
    } else if let Some((step, dir)) = checkpoint::list(out)?.pop() {
        return Err(Error::Invalid(format!(
            "{} already holds a run's checkpoints (the newest {}, step {step}): continue it with --resume {}, or write to another --out",
            out.display(),
            dir.display(),
            out.display()
        )));
    }
    let mut log = open_log(&out.join(STEPS_LOG), start, run.resume.is_some())?;

    let bar = cfg.progress && std::io::stderr().is_terminal();
    let progress = if bar {
        let bar = ProgressBar::new(cfg.steps as u64);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta}] {msg}")
        {
            bar.set_style(style);
        }
        bar.set_position(start as u64);
        bar
    } else {
        ProgressBar::hidden()
    };

    let started = Instant::now();
    let per_epoch = examples.len() / effective;
    let mut order: Option<(usize, Vec<Vec<usize>>)> = None;
    let mut step = start;
    let mut done_this_run = 0usize;
    let mut last_losses: Vec<(String, f64)> = Vec::new();
    let mut val_losses = None;
    let mut interrupted = false;
    let stopping =
        |done: usize| run.stop.load(Ordering::SeqCst) || cfg.stop_after.is_some_and(|n| done >= n);
    if step < cfg.steps && stopping(0) {
        // Stopped before anything changed: nothing to checkpoint.
        interrupted = true;
    }
    while step < cfg.steps && !interrupted {
        let step_started = Instant::now();
        let (epoch, position) = (step / per_epoch, step % per_epoch);
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((
                epoch,
                epoch_batches(examples.len(), effective, cfg.seed, epoch),
            ));
        }
        let indices: &[usize] = match &order {
            Some((_, batches)) => &batches[position],
            None => &[],
        };
        let mut rng = StdRng::seed_from_u64(step_seed(cfg.seed, step));
        let mut accumulator = GradAccumulator::new(var_list.clone());
        let mut sums: Vec<(String, f64)> = vec![("loss".to_string(), 0.0)];
        let scale = 1.0 / accumulate as f64;
        for micro in indices.chunks(cfg.batch_size) {
            let batch: Vec<O::Example> = micro.iter().map(|&i| examples[i].clone()).collect();
            let losses = objective.losses(&batch, &mut rng)?;
            let total = scalar(&losses.total)?;
            if !total.is_finite() {
                return Err(Error::Invalid(format!(
                    "step {}: the loss is {total} ({})",
                    step + 1,
                    format_losses(&losses.parts)
                )));
            }
            add_parts(&mut sums, total, &losses.parts, scale);
            let grads = if accumulate == 1 {
                losses.total.backward()?
            } else {
                (&losses.total * scale)?.backward()?
            };
            accumulator.add(grads)?;
        }
        let mut grads = accumulator
            .take()
            .ok_or_else(|| Error::Invalid("a step without a batch".into()))?;
        let max_norm = if cfg.grad_clip > 0.0 {
            cfg.grad_clip
        } else {
            f64::INFINITY
        };
        let grad_norm = clip_grad_norm(&mut grads, &var_refs, max_norm)?;
        let lr = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr);
        optimizer.step(&grads, lr)?;
        drop(grads);
        objective.after_update()?;
        step += 1;
        done_this_run += 1;

        let step_seconds = step_started.elapsed().as_secs_f64().max(1e-9);
        let rate = (done_this_run * effective) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let parts: BTreeMap<&str, f64> =
            sums.iter().skip(1).map(|(k, v)| (k.as_str(), *v)).collect();
        write_log(
            &mut log,
            &serde_json::json!({
                "step": step,
                "loss": sums[0].1,
                "parts": parts,
                "lr": lr,
                "grad_norm": grad_norm,
                "examples_per_s": effective as f64 / step_seconds,
                "elapsed_s": started.elapsed().as_secs_f64(),
            }),
            out,
        )?;
        recent.push_back(sums.clone());
        while recent.len() > SMOOTHING {
            recent.pop_front();
        }
        last_losses = sums;
        let message = format!(
            "{}  lr {lr:.2e}  {rate:.1} ex/s",
            format_losses(&smooth(&recent))
        );
        progress.set_position(step as u64);
        progress.set_message(message.clone());
        if !bar && cfg.log_every > 0 && (step.is_multiple_of(cfg.log_every) || step == cfg.steps) {
            eprintln!("step {step}/{}  {message}", cfg.steps);
        }

        if let Some(val) = run.val.filter(|v| !v.is_empty()) {
            if cfg.eval_every > 0 && (step.is_multiple_of(cfg.eval_every) || step == cfg.steps) {
                let means = evaluate(objective, val, cfg.batch_size, cfg.seed)?;
                let map: BTreeMap<&str, f64> =
                    means.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                write_log(
                    &mut log,
                    &serde_json::json!({ "step": step, "val": map }),
                    out,
                )?;
                let line = format!("step {step}: validation {}", format_losses(&means));
                if bar {
                    progress.println(line);
                } else {
                    eprintln!("{line}");
                }
                val_losses = Some(means);
            }
        }

        let stop = stopping(done_this_run);
        let periodic = cfg.save_every > 0 && step.is_multiple_of(cfg.save_every);
        if periodic || step == cfg.steps || stop {
            let state = TrainerState {
                step,
                seed: cfg.seed,
                epoch: step / per_epoch,
                position: step % per_epoch,
                examples: examples.len(),
                config: serde_json::to_value(cfg)
                    .map_err(|e| Error::Invalid(format!("the run's configuration: {e}")))?,
                recent_losses: recent.iter().cloned().collect(),
            };
            let dir = checkpoint::save_step(out, step, cfg.keep, |dir| {
                objective.save(dir)?;
                let ts = dir.join(TRAINER_STATE);
                std::fs::create_dir_all(&ts).map_err(|e| Error::io(&ts, e))?;
                save_trainable(&vars, &ts.join(TRAINABLE))?;
                optimizer.save_state(&ts)?;
                checkpoint::write_state(&ts, &state)
            })?;
            last_checkpoint = Some(dir);
        }
        if stop && step < cfg.steps {
            interrupted = true;
        }
    }
    progress.finish_and_clear();
    if !interrupted {
        if let Some(dir) = &last_checkpoint {
            checkpoint::publish(dir, out)?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainReport {
        steps: step,
        steps_this_run: done_this_run,
        losses: last_losses,
        smoothed: smooth(&recent),
        val_losses,
        seconds,
        examples_per_second: (done_this_run * effective) as f64 / seconds.max(1e-9),
        checkpoint: last_checkpoint,
        interrupted,
    })
}

/// Adds `weight * (total, parts)` into `sums` (`loss` first, then the parts by name).
fn add_parts(sums: &mut Vec<(String, f64)>, total: f64, parts: &[(String, f64)], weight: f64) {
    sums[0].1 += weight * total;
    for (name, value) in parts {
        match sums.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 += weight * value,
            None => sums.push((name.clone(), weight * value)),
        }
    }
}

/// The mean of each named loss over `recent`, in the order of the newest entry.
fn smooth(recent: &VecDeque<Vec<(String, f64)>>) -> Vec<(String, f64)> {
    let Some(newest) = recent.back() else {
        return Vec::new();
    };
    newest
        .iter()
        .map(|(name, _)| {
            let values: Vec<f64> = recent
                .iter()
                .filter_map(|entry| entry.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
                .collect();
            (
                name.clone(),
                values.iter().sum::<f64>() / values.len().max(1) as f64,
            )
        })
        .collect()
}

/// `name value` pairs on one line.
pub fn format_losses(losses: &[(String, f64)]) -> String {
    losses
        .iter()
        .map(|(name, value)| format!("{name} {value:.4}"))
        .collect::<Vec<_>>()
        .join("  ")
}

/// The mean losses over `val` in consecutive batches of `batch_size` (the last one shorter),
/// each batch weighted by its size, the draws from a fixed rng so that evaluations are
/// comparable across steps.
fn evaluate<O: Objective>(
    objective: &O,
    val: &[O::Example],
    batch_size: usize,
    seed: u64,
) -> Result<Vec<(String, f64)>>
where
    O::Example: Clone,
{
    let mut rng = StdRng::seed_from_u64(mix(seed ^ 0x0056_414C));
    let mut sums: Vec<(String, f64)> = vec![("loss".to_string(), 0.0)];
    for batch in val.chunks(batch_size.max(1)) {
        let losses = objective.losses(batch, &mut rng)?;
        add_parts(
            &mut sums,
            scalar(&losses.total)?,
            &losses.parts,
            batch.len() as f64,
        );
    }
    for (_, v) in &mut sums {
        *v /= val.len().max(1) as f64;
    }
    Ok(sums)
}

/// Refuses to resume a run whose data order would differ.
fn check_resumable(
    state: &TrainerState,
    cfg: &TrainConfig,
    examples: usize,
    dir: &Path,
) -> Result<()> {
    let saved: TrainConfig = serde_json::from_value(state.config.clone()).map_err(|e| {
        Error::Invalid(format!(
            "{}: the run's configuration: {e}",
            dir.join(TRAINER_STATE).display()
        ))
    })?;
    let differs = |what: &str, was: String, now: String| {
        Err(Error::Invalid(format!(
            "cannot resume {}: it was trained with {what} {was}, this run has {now} (the data order would differ)",
            dir.display()
        )))
    };
    if saved.seed != cfg.seed {
        return differs("--seed", saved.seed.to_string(), cfg.seed.to_string());
    }
    if saved.batch_size != cfg.batch_size {
        return differs(
            "--batch-size",
            saved.batch_size.to_string(),
            cfg.batch_size.to_string(),
        );
    }
    if saved.accumulate.max(1) != cfg.accumulate.max(1) {
        return differs(
            "--accumulate",
            saved.accumulate.to_string(),
            cfg.accumulate.to_string(),
        );
    }
    if state.examples != examples {
        return differs(
            "a training set of",
            format!("{} examples", state.examples),
            examples.to_string(),
        );
    }
    Ok(())
}

fn save_trainable(vars: &[(String, Var)], path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
        .collect();
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

/// Sets every trainable variable from `path`, after checking all of them are there with
/// their shapes and dtypes.
fn restore_trainable(vars: &[(String, Var)], path: &Path) -> Result<()> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    let mut values = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let t = tensors
            .remove(name)
            .ok_or_else(|| Error::Invalid(format!("{}: no `{name}`", path.display())))?;
        if t.dims() != var.dims() || t.dtype() != var.dtype() {
            return Err(Error::Invalid(format!(
                "{}: `{name}` is {:?} {:?}, the model's {:?} {:?}",
                path.display(),
                t.dtype(),
                t.dims(),
                var.dtype(),
                var.dims()
            )));
        }
        values.push(t.to_device(var.device())?);
    }
    for ((_, var), value) in vars.iter().zip(values) {
        var.set(&value)?;
    }
    Ok(())
}

/// Opens `steps.jsonl`: a fresh run starts it empty; a resumed run keeps the lines up to its
/// step (those after it belong to the abandoned continuation).
fn open_log(path: &Path, start: usize, resumed: bool) -> Result<std::fs::File> {
    let kept = if resumed {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        text.lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s as usize <= start)
            })
            .map(|line| format!("{line}\n"))
            .collect::<String>()
    } else {
        String::new()
    };
    std::fs::write(path, kept).map_err(|e| Error::io(path, e))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

fn write_log(log: &mut std::fs::File, value: &serde_json::Value, out: &Path) -> Result<()> {
    writeln!(log, "{value}").map_err(|e| Error::io(out.join(STEPS_LOG), e))
}
