//! AdamW, clipping and the schedule against straightforward re-computations of PyTorch's
//! formulas, and a small model that learns with them.

use blip2_train::nn::{cross_entropy, scalar};
use blip2_train::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig};
use candle_core::{Device, Tensor, Var};

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
