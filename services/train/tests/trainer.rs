//! The training loop on a toy objective (linear regression): it learns and logs, a resumed run
//! ends bit-identical to an uninterrupted one, accumulation equals a bigger batch, a stop
//! request (what SIGINT/SIGTERM do) finishes the step and checkpoints, and checkpoints are
//! complete or absent.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blip2_train::checkpoint::{self, CHECKPOINTS, LATEST, STATE_JSON, TRAINABLE, TRAINER_STATE};
use blip2_train::error::{Error, Result};
use blip2_train::objective::{Losses, Objective};
use blip2_train::optim::STATE_FILE;
use blip2_train::trainer::{epoch_batches, train, Run, TrainConfig, TrainReport, STEPS_LOG};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;

#[derive(Clone)]
struct Example {
    x: [f64; 3],
    y: f64,
}

/// y = x · w + b with a mean squared error. With `noise`, a term drawn from the step's rng is
/// added to the targets, so that the rng's seeding is part of what resuming must reproduce.
struct Regression {
    w: Var,
    b: Var,
    noise: bool,
    /// The save call (1-based) that writes half a checkpoint and fails.
    fail_save_at: Option<usize>,
    saves: Cell<usize>,
    updates: Cell<usize>,
    /// Set after this many updates (a signal arriving during that step).
    stop_at: Option<(usize, &'static AtomicBool)>,
}

impl Regression {
    fn new() -> Self {
        let dev = Device::Cpu;
        Self {
            w: Var::from_tensor(&Tensor::zeros((1, 3), DType::F64, &dev).unwrap()).unwrap(),
            b: Var::from_tensor(&Tensor::zeros(1, DType::F64, &dev).unwrap()).unwrap(),
            noise: false,
            fail_save_at: None,
            saves: Cell::new(0),
            updates: Cell::new(0),
            stop_at: None,
        }
    }

    fn noisy() -> Self {
        Self {
            noise: true,
            ..Self::new()
        }
    }

    fn params(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        v.extend(self.b.as_tensor().to_vec1::<f64>().unwrap());
        v
    }
}

impl Objective for Regression {
    type Example = Example;

    fn trainable(&self) -> Vec<(String, Var)> {
        vec![
            ("linear.weight".into(), self.w.clone()),
            ("linear.bias".into(), self.b.clone()),
        ]
    }

    fn losses(&self, batch: &[Example], rng: &mut StdRng) -> Result<Losses> {
        let dev = Device::Cpu;
        let xs: Vec<f64> = batch.iter().flat_map(|e| e.x).collect();
        let x = Tensor::from_vec(xs, (batch.len(), 3), &dev)?;
        let jitter: f64 = if self.noise {
            rng.random::<f64>() * 0.01
        } else {
            0.0
        };
        let y = Tensor::from_vec(
            batch.iter().map(|e| e.y + jitter).collect::<Vec<f64>>(),
            batch.len(),
            &dev,
        )?;
        let pred = x
            .matmul(&self.w.as_tensor().t()?)?
            .squeeze(1)?
            .broadcast_add(self.b.as_tensor())?;
        let mse = (pred - y)?.sqr()?.mean_all()?;
        let value = mse.to_scalar::<f64>()?;
        Ok(Losses {
            total: mse,
            parts: vec![("mse".into(), value)],
        })
    }

    fn after_update(&self) -> Result<()> {
        let n = self.updates.get() + 1;
        self.updates.set(n);
        if let Some((at, flag)) = self.stop_at {
            if n == at {
                flag.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let n = self.saves.get() + 1;
        self.saves.set(n);
        std::fs::write(dir.join("config.json"), "{}").map_err(|e| Error::io(dir, e))?;
        if self.fail_save_at == Some(n) {
            // Half a checkpoint, then the failure.
            return Err(Error::Invalid("disk full".into()));
        }
        let tensors: HashMap<String, Tensor> = self
            .trainable()
            .into_iter()
            .map(|(n, v)| (n, v.as_detached_tensor()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        Ok(())
    }
}

/// 24 points of y = 2 x0 - x1 + 0.5 x2 + 1.
fn examples() -> Vec<Example> {
    (0..24)
        .map(|i| {
            let t = i as f64;
            let x = [(t * 0.7).sin(), (t * 0.3).cos(), (t * 0.11) - 1.0];
            Example {
                x,
                y: 2.0 * x[0] - x[1] + 0.5 * x[2] + 1.0,
            }
        })
        .collect()
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 4,
        accumulate: 1,
        lr: 0.05,
        min_lr: 0.001,
        warmup_steps: 3,
        weight_decay: 0.01,
        grad_clip: 1.0,
        seed: 7,
        save_every: 0,
        keep: 2,
        log_every: 0,
        progress: false,
        ..TrainConfig::default()
    }
}

/// An empty scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blip2-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A fresh run into `out`, with its own stop flag (tests run in parallel: the process-wide
/// flag of `request_stop` would stop them all).
fn fresh(model: &Regression, cfg: &TrainConfig, out: &Path) -> Result<TrainReport> {
    let stop = AtomicBool::new(false);
    train(
        model,
        &examples(),
        cfg,
        &Run {
            stop: &stop,
            ..Run::new(out)
        },
    )
}

fn resumed(model: &Regression, cfg: &TrainConfig, out: &Path, from: &Path) -> Result<TrainReport> {
    let stop = AtomicBool::new(false);
    train(
        model,
        &examples(),
        cfg,
        &Run {
            resume: Some(from),
            stop: &stop,
            ..Run::new(out)
        },
    )
}

fn mse(model: &Regression, data: &[Example]) -> f64 {
    let mut rng = rand::SeedableRng::seed_from_u64(0);
    model.losses(data, &mut rng).unwrap().parts[0].1
}

/// `(step, loss)` of every step line of a run's log.
fn logged_losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join(STEPS_LOG))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn the_loss_decreases_and_the_run_is_logged_and_published() {
    let data = examples();
    let model = Regression::new();
    let before = mse(&model, &data);
    let out = scratch("learns");
    let cfg = TrainConfig {
        eval_every: 50,
        ..config(150)
    };
    let stop = AtomicBool::new(false);
    let report = train(
        &model,
        &data,
        &cfg,
        &Run {
            val: Some(&data[..8]),
            stop: &stop,
            ..Run::new(&out)
        },
    )
    .unwrap();
    let after = mse(&model, &data);
    assert!(after < before / 20.0, "mse {before} -> {after}");
    assert_eq!(report.steps, 150);
    assert_eq!(report.steps_this_run, 150);
    assert!(!report.interrupted);
    assert_eq!(model.updates.get(), 150, "after_update once per step");
    assert_eq!(report.losses[0].0, "loss");
    assert_eq!(report.losses[1].0, "mse");
    let val = report.val_losses.unwrap();
    assert!(
        (val[1].1 - mse(&model, &data[..8])).abs() < 1e-12,
        "{val:?}"
    );
    // One line per step plus one per evaluation, with the logged fields.
    let log = std::fs::read_to_string(out.join(STEPS_LOG)).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 153);
    let first = &lines[0];
    assert_eq!(first["step"], 1);
    for field in ["loss", "lr", "grad_norm", "examples_per_s", "elapsed_s"] {
        assert!(first[field].is_number(), "{field} in {first}");
    }
    assert!(first["parts"]["mse"].is_number());
    assert_eq!(lines.iter().filter(|l| l.get("val").is_some()).count(), 3);
    // The warm-up's first learning rate: lr * 1 / warmup.
    assert!((first["lr"].as_f64().unwrap() - 0.05 / 3.0).abs() < 1e-15);
    // The final model is OUT's, without the trainer state; the checkpoint has it.
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join(TRAINER_STATE).exists());
    let last = checkpoint::step_dir(&out, 150);
    assert_eq!(report.checkpoint.as_deref(), Some(last.as_path()));
    assert!(complete(&last));
    // 24 examples in effective batches of 4: 6 steps an epoch; the next step starts epoch 25.
    let state = checkpoint::read_state(&last).unwrap();
    assert_eq!(
        (state.step, state.epoch, state.position, state.examples),
        (150, 25, 0, 24)
    );
    assert_eq!(state.recent_losses.len(), 20);
    assert_eq!(state.config["batch_size"], 4);

    // A fresh run into a directory that holds a run is refused (its checkpoints would mix).
    let again = fresh(&Regression::new(), &cfg, &out);
    assert!(
        again.unwrap_err().to_string().contains("--resume"),
        "the refusal says how to continue"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    let cfg = TrainConfig {
        save_every: 4,
        ..config(17)
    };
    let whole = Regression::noisy();
    let out_a = scratch("resume-a");
    fresh(&whole, &cfg, &out_a).unwrap();

    // Stopped after 7 steps (past a saved checkpoint and mid-epoch), resumed in a fresh model.
    let out_b = scratch("resume-b");
    let first = Regression::noisy();
    let stopped = fresh(
        &first,
        &TrainConfig {
            stop_after: Some(7),
            ..cfg.clone()
        },
        &out_b,
    )
    .unwrap();
    assert!(stopped.interrupted);
    assert_eq!(stopped.steps, 7);
    assert_eq!(
        std::fs::read_to_string(out_b.join(CHECKPOINTS).join(LATEST))
            .unwrap()
            .trim(),
        "step-7"
    );
    let state = checkpoint::read_state(&checkpoint::step_dir(&out_b, 7)).unwrap();
    assert_eq!((state.epoch, state.position), (1, 1), "6 steps an epoch");
    assert!(
        !out_b.join("model.safetensors").exists(),
        "an interrupted run publishes no final model"
    );
    let second = Regression::noisy();
    let report = resumed(&second, &cfg, &out_b, &out_b).unwrap();
    assert_eq!(report.steps, 17);
    assert_eq!(report.steps_this_run, 10);
    assert!(!report.interrupted);
    assert_eq!(whole.params(), second.params(), "bit-identical parameters");
    // The log has each step once, with the uninterrupted run's numbers.
    assert_eq!(logged_losses(&out_a), logged_losses(&out_b));

    // Resuming B from a checkpoint elsewhere (A's step 16, copied out) abandons B's own later
    // checkpoint (17) and ends equal again.
    let third = Regression::noisy();
    let older = scratch("resume-older");
    copy_tree(&checkpoint::step_dir(&out_a, 16), &older);
    let report = resumed(&third, &cfg, &out_b, &older).unwrap();
    assert_eq!(report.steps_this_run, 1);
    assert_eq!(
        checkpoint::list(&out_b).unwrap().last().map(|(s, _)| *s),
        Some(17)
    );
    assert_eq!(whole.params(), third.params());

    // Another seed or another training set would see other data: refused.
    let other = Regression::new();
    let err = resumed(
        &other,
        &TrainConfig {
            seed: 8,
            steps: 20,
            ..cfg.clone()
        },
        &scratch("resume-c"),
        &out_b,
    );
    assert!(err.unwrap_err().to_string().contains("--seed"));
    let stop = AtomicBool::new(false);
    let err = train(
        &other,
        &examples()[..20],
        &TrainConfig {
            steps: 20,
            ..cfg.clone()
        },
        &Run {
            resume: Some(&out_b),
            stop: &stop,
            ..Run::new(&scratch("resume-d"))
        },
    );
    assert!(err.unwrap_err().to_string().contains("24 examples"));
    for dir in [
        out_a,
        out_b,
        older,
        scratch("resume-c"),
        scratch("resume-d"),
    ] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_stop_request_finishes_the_step_checkpoints_and_resumes_exactly() {
    // The flag is raised during the 5th step, as a signal handler would: the step completes,
    // a checkpoint of step 5 is written, the run reports the interruption.
    static STOP: AtomicBool = AtomicBool::new(false);
    let cfg = config(12);
    let model = Regression {
        stop_at: Some((5, &STOP)),
        ..Regression::noisy()
    };
    let out = scratch("signal");
    let report = train(
        &model,
        &examples(),
        &cfg,
        &Run {
            stop: &STOP,
            ..Run::new(&out)
        },
    )
    .unwrap();
    assert!(report.interrupted);
    assert_eq!(report.steps, 5);
    assert_eq!(model.updates.get(), 5);
    let dir = checkpoint::step_dir(&out, 5);
    assert_eq!(report.checkpoint.as_deref(), Some(dir.as_path()));
    assert!(complete(&dir));

    // A run whose flag is already set takes no step and writes nothing.
    let idle = Regression::new();
    let out_idle = scratch("signal-idle");
    let report = train(
        &idle,
        &examples(),
        &cfg,
        &Run {
            stop: &STOP,
            ..Run::new(&out_idle)
        },
    )
    .unwrap();
    assert!(report.interrupted);
    assert_eq!((report.steps, report.checkpoint), (0, None));
    assert!(checkpoint::list(&out_idle).unwrap().is_empty());

    // Resumed, it ends where an uninterrupted run does.
    let rest = Regression::noisy();
    resumed(&rest, &cfg, &out, &out).unwrap();
    let whole = Regression::noisy();
    let out_whole = scratch("signal-whole");
    fresh(&whole, &cfg, &out_whole).unwrap();
    assert_eq!(rest.params(), whole.params());
    for dir in [out, out_idle, out_whole] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn accumulating_k_micro_batches_equals_one_batch_k_times_bigger() {
    let big = Regression::new();
    let out_big = scratch("accum-big");
    let cfg_big = TrainConfig {
        batch_size: 6,
        accumulate: 1,
        ..config(9)
    };
    fresh(&big, &cfg_big, &out_big).unwrap();

    let small = Regression::new();
    let out_small = scratch("accum-small");
    let cfg_small = TrainConfig {
        batch_size: 2,
        accumulate: 3,
        ..config(9)
    };
    fresh(&small, &cfg_small, &out_small).unwrap();
    for (a, b) in big.params().iter().zip(small.params()) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    // The same examples per step, so the same mean losses in the log.
    for ((sa, la), (sb, lb)) in logged_losses(&out_big)
        .iter()
        .zip(logged_losses(&out_small))
    {
        assert_eq!(*sa, sb);
        assert!((la - lb).abs() < 1e-12, "step {sa}: {la} vs {lb}");
    }
    // And different from taking only micro-batches of 2.
    let alone = Regression::new();
    let out_alone = scratch("accum-alone");
    fresh(
        &alone,
        &TrainConfig {
            batch_size: 2,
            ..config(9)
        },
        &out_alone,
    )
    .unwrap();
    assert_ne!(alone.params(), big.params());
    for dir in [out_big, out_small, out_alone] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

fn complete(dir: &Path) -> bool {
    let ts = dir.join(TRAINER_STATE);
    dir.join("model.safetensors").is_file()
        && dir.join("config.json").is_file()
        && ts.join(STATE_JSON).is_file()
        && ts.join(TRAINABLE).is_file()
        && ts.join(STATE_FILE).is_file()
}

#[test]
fn checkpoints_are_complete_or_absent_and_only_the_last_are_kept() {
    // A save that fails half-way through the second checkpoint.
    let model = Regression {
        fail_save_at: Some(2),
        ..Regression::new()
    };
    let out = scratch("atomic");
    let cfg = TrainConfig {
        save_every: 3,
        ..config(9)
    };
    assert!(fresh(&model, &cfg, &out).is_err());
    let found = checkpoint::list(&out).unwrap();
    assert_eq!(
        found.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![3],
        "step 6 is absent, not half-written"
    );
    assert!(complete(&found[0].1));
    assert_eq!(
        std::fs::read_to_string(out.join(CHECKPOINTS).join(LATEST))
            .unwrap()
            .trim(),
        "step-3"
    );
    let leftovers: Vec<String> = std::fs::read_dir(out.join(CHECKPOINTS))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let state = checkpoint::read_state(&found[0].1).unwrap();
    assert_eq!((state.step, state.seed), (3, 7));
    assert_eq!(state.recent_losses.len(), 3);
    // The failed run resumes from its last complete checkpoint.
    let again = Regression::new();
    let report = resumed(&again, &cfg, &out, &out).unwrap();
    assert_eq!((report.steps, report.steps_this_run), (9, 6));
    std::fs::remove_dir_all(&out).unwrap();

    // Every step saved, two kept; what a killed process left half-written is cleaned up.
    let model = Regression::new();
    let out = scratch("keep");
    std::fs::create_dir_all(out.join(CHECKPOINTS).join(".tmp-step-99")).unwrap();
    std::fs::write(out.join(".tmp-model.safetensors"), b"half").unwrap();
    let cfg = TrainConfig {
        save_every: 1,
        keep: 2,
        ..config(6)
    };
    fresh(&model, &cfg, &out).unwrap();
    let found = checkpoint::list(&out).unwrap();
    assert_eq!(
        found.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert!(found.iter().all(|(_, d)| complete(d)));
    assert!(!out.join(CHECKPOINTS).join(".tmp-step-99").exists());
    assert!(!out.join(".tmp-model.safetensors").exists());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn the_data_order_is_a_seeded_permutation_per_epoch() {
    let a = epoch_batches(10, 3, 1, 0);
    assert_eq!(a.len(), 3, "the remainder is dropped");
    assert!(a.iter().all(|b| b.len() == 3));
    let mut seen: Vec<usize> = a.concat();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 9, "no index twice in an epoch");
    assert_eq!(a, epoch_batches(10, 3, 1, 0), "deterministic");
    assert_ne!(
        a,
        epoch_batches(10, 3, 1, 1),
        "another epoch, another order"
    );
    assert_ne!(a, epoch_batches(10, 3, 2, 0), "another seed, another order");
}

#[test]
fn too_few_examples_for_one_step_is_an_error() {
    let model = Regression::new();
    let cfg = TrainConfig {
        batch_size: 10,
        accumulate: 3,
        ..config(2)
    };
    let out = scratch("few");
    assert!(fresh(&model, &cfg, &out).is_err());
    let _ = std::fs::remove_dir_all(&out);
}
