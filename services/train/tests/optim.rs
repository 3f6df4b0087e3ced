//! AdamW, clipping, accumulation and the schedule against straightforward re-computations of
//! PyTorch's formulas and against torch.optim.AdamW itself (tools/fixtures/generate_optim.py),
//! the optimiser state's round trip, and a small model that learns with them.

use std::path::Path;

use blip2_train::nn::{cross_entropy, scalar};
use blip2_train::optim::{
    clip_grad_norm, decays, lr_at, AdamW, AdamWConfig, GradAccumulator, STATE_FILE,
};
use candle_core::{DType, Device, Tensor, Var};

/// A GradStore whose gradient for each var is the given tensor: d/dp sum(p * g) = g.
fn grads_of(vars: &[(&Var, &Tensor)]) -> candle_core::backprop::GradStore {
    let mut total: Option<Tensor> = None;
    for (var, g) in vars {
        let term = (var.as_tensor() * *g).unwrap().sum_all().unwrap();
        total = Some(match total {
            Some(t) => (t + term).unwrap(),
            None => term,
        });
    }
    total.unwrap().backward().unwrap()
}

/// torch.optim.AdamW.step for one scalar parameter, written out.
fn reference(p: &mut f64, m: &mut f64, v: &mut f64, g: f64, t: i32, lr: f64, wd: f64) {
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    *p *= 1.0 - lr * wd;
    *m = b1 * *m + (1.0 - b1) * g;
    *v = b2 * *v + (1.0 - b2) * g * g;
    let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
    *p -= lr / (1.0 - b1.powi(t)) * *m / denom;
}

#[test]
fn adamw_steps_as_pytorch_with_no_decay_for_biases_and_norms() {
    let dev = Device::Cpu;
    let w0 = [[0.5f64, -1.0, 2.0], [0.0, 0.3, -0.7]];
    let b0 = [0.1f64, -0.2, 0.3];
    let w = Var::from_tensor(&Tensor::new(&w0, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&b0, &dev).unwrap()).unwrap();
    let ln = Var::from_tensor(&Tensor::new(&[[1.0f64, 1.0]], &dev).unwrap()).unwrap();
    let mut opt = AdamW::new(
        vec![
            ("layer.dense.weight".into(), w.clone()),
            ("layer.dense.bias".into(), b.clone()),
            ("layer.LayerNorm.weight".into(), ln.clone()),
        ],
        AdamWConfig {
            weight_decay: 0.05,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        opt.groups(),
        (
            vec!["layer.dense.weight"],
            vec!["layer.dense.bias", "layer.LayerNorm.weight"]
        )
    );
    let mut wr: Vec<(f64, f64, f64)> = w0.concat().iter().map(|&p| (p, 0.0, 0.0)).collect();
    let mut br: Vec<(f64, f64, f64)> = b0.iter().map(|&p| (p, 0.0, 0.0)).collect();
    for (t, lr) in [(1, 1e-2), (2, 5e-3), (3, 1e-2)] {
        let gw: Vec<f64> = (0..6).map(|i| ((i + t) as f64 * 0.7).sin()).collect();
        let gb: Vec<f64> = (0..3).map(|i| ((i * t) as f64 * 0.3).cos() - 0.5).collect();
        let gw_t = Tensor::from_vec(gw.clone(), (2, 3), &dev).unwrap();
        let gb_t = Tensor::from_vec(gb.clone(), 3, &dev).unwrap();
        // The LayerNorm weight gets no gradient this step: it must not move.
        let grads = grads_of(&[(&w, &gw_t), (&b, &gb_t)]);
        opt.step(&grads, lr).unwrap();
        for (s, g) in wr.iter_mut().zip(&gw) {
            reference(&mut s.0, &mut s.1, &mut s.2, *g, t, lr, 0.05);
        }
        for (s, g) in br.iter_mut().zip(&gb) {
            reference(&mut s.0, &mut s.1, &mut s.2, *g, t, lr, 0.0);
        }
        let got_w: Vec<f64> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let got_b: Vec<f64> = b.as_tensor().to_vec1().unwrap();
        for (g, e) in got_w.iter().zip(&wr).chain(got_b.iter().zip(&br)) {
            assert!((g - e.0).abs() < 1e-12, "step {t}: {g} vs {}", e.0);
        }
    }
    assert_eq!(opt.steps(), 3);
    let ln_now: Vec<Vec<f64>> = ln.as_tensor().to_vec2().unwrap();
    assert_eq!(ln_now, vec![vec![1.0, 1.0]]);
}

#[test]
fn clipping_scales_to_the_max_norm_and_reports_the_norm_before() {
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[0.0f64, 0.0], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[[0.0f64]], &dev).unwrap()).unwrap();
    let ga = Tensor::new(&[3.0f64, 0.0], &dev).unwrap();
    let gb = Tensor::new(&[[4.0f64]], &dev).unwrap();
    let mut grads = grads_of(&[(&a, &ga), (&b, &gb)]);
    let norm = clip_grad_norm(&mut grads, &[&a, &b], 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    let coef = 1.0 / (5.0 + 1e-6);
    let clipped: Vec<f64> = grads.get(a.as_tensor()).unwrap().to_vec1().unwrap();
    assert!((clipped[0] - 3.0 * coef).abs() < 1e-12);
    // Under the limit nothing changes.
    let mut grads = grads_of(&[(&a, &ga), (&b, &gb)]);
    assert!((clip_grad_norm(&mut grads, &[&a, &b], 10.0).unwrap() - 5.0).abs() < 1e-12);
    let kept: Vec<Vec<f64>> = grads.get(b.as_tensor()).unwrap().to_vec2().unwrap();
    assert_eq!(kept, vec![vec![4.0]]);
    // A diverged loss is refused rather than applied.
    let nan = Tensor::new(&[f64::NAN, 0.0], &dev).unwrap();
    let mut grads = grads_of(&[(&a, &nan)]);
    assert!(clip_grad_norm(&mut grads, &[&a], 1.0).is_err());
}

#[test]
fn the_schedule_warms_up_linearly_then_decays_along_a_cosine() {
    let lr = |s| lr_at(s, 110, 10, 1e-3, 1e-5);
    assert!((lr(0) - 1e-4).abs() < 1e-15);
    assert!((lr(9) - 1e-3).abs() < 1e-15);
    assert!((lr(10) - 1e-3).abs() < 1e-15);
    // Half-way through the decay: the mean of peak and floor.
    assert!((lr(60) - (1e-3 + 1e-5) / 2.0).abs() < 1e-15);
    assert!((lr(110) - 1e-5).abs() < 1e-15);
    assert!(lr(200) >= 1e-5, "past the end it stays at the floor");
    assert!((lr_at(0, 5, 0, 1.0, 0.0) - 1.0).abs() < 1e-15, "no warm-up");
}

#[test]
fn a_softmax_classifier_learns_with_adamw_and_the_schedule() {
    // Four points, four classes, a linear map: learnable to near-zero loss.
    let dev = Device::Cpu;
    let x = Tensor::new(
        &[
            [1.0f32, 0.0, 0.5],
            [0.0, 1.0, 0.5],
            [-1.0, 0.0, 0.5],
            [0.0, -1.0, 0.5],
        ],
        &dev,
    )
    .unwrap();
    let labels = [0i64, 1, 2, 3];
    let w =
        Var::from_tensor(&Tensor::zeros((4, 3), candle_core::DType::F32, &dev).unwrap()).unwrap();
    let mut opt = AdamW::new(
        vec![("head.weight".into(), w.clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    let loss_of = |w: &Var| {
        let logits = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
        cross_entropy(&logits, &labels, 0.0).unwrap()
    };
    let first = scalar(&loss_of(&w)).unwrap();
    assert!((first - 4f64.ln()).abs() < 1e-6, "uniform at zero weights");
    let steps = 200;
    for step in 0..steps {
        let loss = loss_of(&w);
        let mut grads = loss.backward().unwrap();
        clip_grad_norm(&mut grads, &[&w], 1.0).unwrap();
        opt.step(&grads, lr_at(step, steps, 20, 0.1, 0.0)).unwrap();
    }
    let last = scalar(&loss_of(&w)).unwrap();
    assert!(last < first / 10.0, "loss {first} -> {last}");
}

/// The flattened values of a tensor of any rank, as f64.
fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn a_quadratic_descends_as_the_hand_written_formulas_say() {
    // loss = sum_i a_i / 2 (p_i - c_i)^2 over four parameters of the four kinds the decay rule
    // tells apart; gradients by autograd, clipped, then AdamW with the schedule's rates. The
    // reference below redoes every step per scalar: g = a (p - c), the global norm, the clip
    // coefficient, AdamW.
    let dev = Device::Cpu;
    let init: [(&str, Vec<f64>, Vec<usize>); 4] = [
        (
            "proj.weight",
            vec![0.5, -1.5, 2.0, 0.25, 3.0, -0.5],
            vec![2, 3],
        ),
        ("proj.bias", vec![1.0, -2.0], vec![2]),
        ("ln.layer_norm.weight", vec![0.9, 1.1], vec![1, 2]),
        ("temp", vec![0.07], vec![]),
    ];
    let a = [1.0, 3.0, 0.5, 10.0];
    let c = [0.3, -0.4, 1.0, 0.05];
    let vars: Vec<(String, Var)> = init
        .iter()
        .map(|(name, v, shape)| {
            let t = Tensor::from_vec(v.clone(), shape.clone(), &dev).unwrap();
            (name.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let wd = 0.1;
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            weight_decay: wd,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    // A 2-d norm weight, a bias and a 0-d temperature do not decay; only the matrix does.
    assert_eq!(
        opt.groups(),
        (
            vec!["proj.weight"],
            vec!["proj.bias", "ln.layer_norm.weight", "temp"]
        )
    );
    let decay: Vec<bool> = vars.iter().map(|(n, v)| decays(n, v)).collect();
    assert_eq!(decay, vec![true, false, false, false]);

    // Reference state per scalar: (p, m, v), with the parameter index of each.
    let mut reference_state: Vec<(usize, f64, f64, f64)> = init
        .iter()
        .enumerate()
        .flat_map(|(i, (_, v, _))| v.iter().map(move |&p| (i, p, 0.0, 0.0)))
        .collect();
    let (steps, warmup, peak, max_norm) = (8, 3, 0.5, 4.0);
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let mut clipped_steps = 0;
    for step in 0..steps {
        let lr = lr_at(step, steps, warmup, peak, 0.01);
        let mut loss: Option<Tensor> = None;
        for (i, (_, var)) in vars.iter().enumerate() {
            let term = ((var.as_tensor() - c[i]).unwrap().sqr().unwrap() * (a[i] / 2.0))
                .unwrap()
                .sum_all()
                .unwrap();
            loss = Some(match loss {
                Some(l) => (l + term).unwrap(),
                None => term,
            });
        }
        let mut grads = loss.unwrap().backward().unwrap();
        let refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
        let norm = clip_grad_norm(&mut grads, &refs, max_norm).unwrap();
        opt.step(&grads, lr).unwrap();

        let g: Vec<f64> = reference_state
            .iter()
            .map(|&(i, p, _, _)| a[i] * (p - c[i]))
            .collect();
        let want_norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - want_norm).abs() < 1e-12, "step {step}: norm {norm}");
        let coef = (max_norm / (want_norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            clipped_steps += 1;
        }
        let t = step as i32 + 1;
        for ((i, p, m, v), g) in reference_state.iter_mut().zip(&g) {
            let g = g * coef;
            if decay[*i] {
                *p *= 1.0 - lr * wd;
            }
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            *p -= lr / (1.0 - b1.powi(t)) * *m / denom;
        }
        let got: Vec<f64> = vars.iter().flat_map(|(_, v)| values(v)).collect();
        for (got, want) in got.iter().zip(&reference_state) {
            assert!(
                (got - want.1).abs() < 1e-12,
                "step {step}: {got} vs {}",
                want.1
            );
        }
    }
    assert!(
        clipped_steps > 0 && clipped_steps < steps,
        "clipping engaged on some steps only ({clipped_steps})"
    );
    // The 0-d temperature stayed 0-d, and moved.
    assert_eq!(vars[3].1.dims(), &[] as &[usize]);
    assert_ne!(values(&vars[3].1)[0], 0.07);
}

/// The regression of tools/fixtures/generate_optim.py: `(x @ weight.T + bias) * ln.weight *
/// temp`, mean squared error against `y`.
fn regression_loss(vars: &[Var], x: &Tensor, y: &Tensor) -> Tensor {
    let pred = x
        .matmul(&vars[0].as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(vars[1].as_tensor())
        .unwrap()
        .broadcast_mul(vars[2].as_tensor())
        .unwrap()
        .broadcast_mul(vars[3].as_tensor())
        .unwrap();
    (pred - y).unwrap().sqr().unwrap().mean_all().unwrap()
}

fn flat(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(flat).collect(),
        serde_json::Value::Number(n) => vec![n.as_f64().unwrap()],
        other => panic!("not a number: {other}"),
    }
}

fn shape(v: &serde_json::Value) -> Vec<usize> {
    match v {
        serde_json::Value::Array(items) => {
            let mut dims = vec![items.len()];
            if let Some(first) = items.first() {
                dims.extend(shape(first));
            }
            dims
        }
        _ => Vec::new(),
    }
}

/// Replays a torch.optim.AdamW golden: accumulation over micro-batches, clipping, two groups.
fn replay_torch_golden(file: &str, dtype: DType, tol: f64) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/training/optim")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dev = Device::Cpu;
    let tensor = |v: &serde_json::Value| {
        Tensor::from_vec(flat(v), shape(v), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let names = ["weight", "bias", "ln.weight", "temp"];
    let vars: Vec<Var> = names
        .iter()
        .map(|n| Var::from_tensor(&tensor(&golden["initial"][n])).unwrap())
        .collect();
    let mut opt = AdamW::new(
        names
            .iter()
            .map(|n| n.to_string())
            .zip(vars.clone())
            .collect(),
        AdamWConfig {
            beta1: golden["beta1"].as_f64().unwrap(),
            beta2: golden["beta2"].as_f64().unwrap(),
            eps: golden["eps"].as_f64().unwrap(),
            weight_decay: golden["weight_decay"].as_f64().unwrap(),
        },
    )
    .unwrap();
    // The fixture's two groups are the ones the decay rule makes.
    let (decay, no_decay) = opt.groups();
    assert_eq!(serde_json::json!(decay), golden["decay"]);
    assert_eq!(serde_json::json!(no_decay), golden["no_decay"]);

    let (x, y) = (tensor(&golden["x"]), tensor(&golden["y"]));
    let k = golden["accumulate"].as_u64().unwrap() as usize;
    let micro = x.dim(0).unwrap() / k;
    let max_norm = golden["max_norm"].as_f64().unwrap();
    let refs: Vec<&Var> = vars.iter().collect();
    for (n, step) in golden["steps"].as_array().unwrap().iter().enumerate() {
        let mut acc = GradAccumulator::new(vars.clone());
        for (j, want) in flat(&step["micro_losses"]).iter().enumerate() {
            let xs = x.narrow(0, j * micro, micro).unwrap();
            let ys = y.narrow(0, j * micro, micro).unwrap();
            let loss = regression_loss(&vars, &xs, &ys);
            let got = scalar(&loss).unwrap();
            assert!(
                (got - want).abs() < tol,
                "step {n} micro {j}: loss {got} vs {want}"
            );
            acc.add((loss / k as f64).unwrap().backward().unwrap())
                .unwrap();
        }
        assert_eq!(acc.added(), k);
        let mut grads = acc.take().unwrap();
        let norm = clip_grad_norm(&mut grads, &refs, max_norm).unwrap();
        let want_norm = step["grad_norm"].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() < tol * want_norm.max(1.0),
            "step {n}: norm {norm} vs {want_norm}"
        );
        opt.step(&grads, step["lr"].as_f64().unwrap()).unwrap();
        for (name, var) in names.iter().zip(&vars) {
            let want = flat(&step["after"][name]);
            for (got, want) in values(var).iter().zip(&want) {
                assert!(
                    (got - want).abs() < tol,
                    "{file} step {n}: {name} {got} vs torch {want}"
                );
            }
        }
    }
}

#[test]
fn adamw_with_accumulation_and_clipping_equals_torch_in_f64() {
    replay_torch_golden("adamw-f64.json", DType::F64, 1e-12);
}

#[test]
fn adamw_with_accumulation_and_clipping_equals_torch_in_f32() {
    replay_torch_golden("adamw-f32.json", DType::F32, 2e-6);
}

/// Two f32 parameters (a matrix and a bias) and their optimiser.
fn two_param_model() -> (Var, Var, AdamW) {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0.1f32, -0.2], &dev).unwrap()).unwrap();
    let opt = AdamW::new(
        vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    (w, b, opt)
}

#[test]
fn the_optimiser_state_round_trips_and_continues_bit_identically() {
    let dev = Device::Cpu;
    let grad = |t: usize| {
        (
            Tensor::new(
                &[[(t as f32).sin(), 0.3], [-0.7, (t as f32 * 0.5).cos()]],
                &dev,
            )
            .unwrap(),
            Tensor::new(&[0.2f32 * t as f32, -0.1], &dev).unwrap(),
        )
    };
    let (w1, b1, mut a) = two_param_model();
    for t in 1..=3 {
        let (gw, gb) = grad(t);
        a.step(&grads_of(&[(&w1, &gw), (&b1, &gb)]), 1e-2).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("blip2-optim-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    a.save_state(&dir).unwrap();
    // One file: both moments of each parameter and the step.
    let saved = candle_core::safetensors::load(dir.join(STATE_FILE), &dev).unwrap();
    let mut keys: Vec<&str> = saved.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "exp_avg.l.bias",
            "exp_avg.l.weight",
            "exp_avg_sq.l.bias",
            "exp_avg_sq.l.weight",
            "step"
        ]
    );

    let (w2, b2, mut b) = two_param_model();
    w2.set(w1.as_tensor()).unwrap();
    b2.set(b1.as_tensor()).unwrap();
    b.load_state(&dir).unwrap();
    assert_eq!(b.steps(), 3);
    for t in 4..=6 {
        let (gw, gb) = grad(t);
        a.step(&grads_of(&[(&w1, &gw), (&b1, &gb)]), 1e-2).unwrap();
        b.step(&grads_of(&[(&w2, &gw), (&b2, &gb)]), 1e-2).unwrap();
    }
    assert_eq!(values(&w1), values(&w2), "bit-identical after the reload");
    assert_eq!(values(&b1), values(&b2));

    // The state of another model is refused: other shapes, or parameters it lacks or has.
    let other = Var::from_tensor(&Tensor::zeros((3, 3), DType::F32, &dev).unwrap()).unwrap();
    let mut wrong = AdamW::new(vec![("l.weight".into(), other)], AdamWConfig::default()).unwrap();
    assert!(wrong.load_state(&dir).is_err());
    assert_eq!(wrong.steps(), 0, "a refused state changes nothing");
    let (w3, _, _) = two_param_model();
    let mut fewer = AdamW::new(vec![("l.weight".into(), w3)], AdamWConfig::default()).unwrap();
    assert!(
        fewer.load_state(&dir).is_err(),
        "l.bias's moments are extra"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn accumulated_gradients_are_the_sum_over_micro_batches() {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0], &dev).unwrap()).unwrap();
    let unused = Var::from_tensor(&Tensor::new(&[0.0f64], &dev).unwrap()).unwrap();
    let mut acc = GradAccumulator::new(vec![w.clone(), unused.clone()]);
    assert!(acc.take().is_none());
    let g1 = Tensor::new(&[0.5f64, -1.0], &dev).unwrap();
    let g2 = Tensor::new(&[0.25f64, 3.0], &dev).unwrap();
    acc.add(grads_of(&[(&w, &g1)])).unwrap();
    acc.add(grads_of(&[(&w, &g2)])).unwrap();
    let store = acc.take().unwrap();
    let sum: Vec<f64> = store.get(w.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(sum, vec![0.75, 2.0]);
    assert!(store.get(unused.as_tensor()).is_none());
    assert!(acc.take().is_none(), "empty again after take");
}
