//! The differentiable primitives against direct computations, their gradients against the
//! closed form and finite differences.

use blip2_train::nn::{cross_entropy, l2_normalize, layer_norm, scalar, IGNORE_INDEX};
use candle_core::{DType, Device, Tensor, Var};

fn logits() -> Vec<Vec<f64>> {
    vec![
        vec![1.5, -0.3, 0.2, 2.0],
        vec![-1.0, 0.5, 0.5, 0.0],
        vec![0.1, 0.2, 0.3, 0.4],
    ]
}

fn log_softmax_row(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::MIN, f64::max);
    let lse = row.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|x| x - lse).collect()
}

#[test]
fn cross_entropy_is_torchs_with_smoothing_and_ignored_rows() {
    let rows = logits();
    let labels = [3i64, IGNORE_INDEX, 1];
    let eps = 0.1;
    let flat: Vec<f64> = rows.concat();
    let var = Var::from_tensor(&Tensor::from_vec(flat, (3, 4), &Device::Cpu).unwrap()).unwrap();
    let loss = cross_entropy(var.as_tensor(), &labels, eps).unwrap();
    // torch: (1 - eps) * nll + eps * mean_c(-logp), averaged over the two kept rows.
    let mut expected = 0.0;
    let mut grad_expected = vec![vec![0.0; 4]; 3];
    for (r, &label) in labels.iter().enumerate() {
        if label == IGNORE_INDEX {
            continue;
        }
        let logp = log_softmax_row(&rows[r]);
        let y = label as usize;
        expected += -(1.0 - eps) * logp[y] - eps / 4.0 * logp.iter().sum::<f64>();
        for c in 0..4 {
            let target = eps / 4.0 + if c == y { 1.0 - eps } else { 0.0 };
            grad_expected[r][c] = (logp[c].exp() - target) / 2.0;
        }
    }
    expected /= 2.0;
    assert!((scalar(&loss).unwrap() - expected).abs() < 1e-12);
    let grads = loss.backward().unwrap();
    let grad: Vec<Vec<f64>> = grads.get(var.as_tensor()).unwrap().to_vec2().unwrap();
    for (g, e) in grad.iter().flatten().zip(grad_expected.iter().flatten()) {
        assert!((g - e).abs() < 1e-12, "{g} vs {e}");
    }
    // f32 logits give the same value to f32 precision.
    let f32_logits = var.as_tensor().to_dtype(DType::F32).unwrap();
    let loss32 = cross_entropy(&f32_logits, &labels, eps).unwrap();
    assert!((scalar(&loss32).unwrap() - expected).abs() < 1e-6);
}

#[test]
fn cross_entropy_refuses_labels_outside_the_classes() {
    let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let err = cross_entropy(&t, &[0, 3], 0.0).unwrap_err().to_string();
    assert!(err.contains("label 3 of row 1"), "{err}");
    assert!(cross_entropy(&t, &[0], 0.0).is_err());
    assert!(cross_entropy(&t, &[0, 1], 1.5).is_err());
}

/// sum(layer_norm(x) * r) in f64, for finite differences.
fn ln_objective(x: &[f64], w: &Tensor, b: &Tensor, r: &Tensor) -> f64 {
    let x = Tensor::from_vec(x.to_vec(), (2, 5), &Device::Cpu).unwrap();
    let y = layer_norm(&x, w, b, 1e-5).unwrap();
    scalar(&(y * r).unwrap().sum_all().unwrap()).unwrap()
}

#[test]
fn layer_norm_matches_the_formula_and_its_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let x: Vec<f64> = (0..10)
        .map(|i| ((i * 7 % 10) as f64 - 4.0) * 0.37)
        .collect();
    let w = Tensor::new(&[1.0f64, 0.5, -2.0, 1.5, 0.25], &dev).unwrap();
    let b = Tensor::new(&[0.1f64, 0.0, -0.3, 0.2, 1.0], &dev).unwrap();
    let r = Tensor::from_vec(
        (0..10).map(|i| (i as f64 * 0.3).sin()).collect::<Vec<_>>(),
        (2, 5),
        &dev,
    )
    .unwrap();
    let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), (2, 5), &dev).unwrap()).unwrap();
    let y = layer_norm(xv.as_tensor(), &w, &b, 1e-5).unwrap();
    // Forward against the formula.
    let ys: Vec<Vec<f64>> = y.to_vec2().unwrap();
    let (wv, bv): (Vec<f64>, Vec<f64>) = (w.to_vec1().unwrap(), b.to_vec1().unwrap());
    for (row, out) in x.chunks(5).zip(&ys) {
        let mean = row.iter().sum::<f64>() / 5.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 5.0;
        for i in 0..5 {
            let e = (row[i] - mean) / (var + 1e-5).sqrt() * wv[i] + bv[i];
            assert!((out[i] - e).abs() < 1e-12);
        }
    }
    // Backward against central differences.
    let objective = (y * &r).unwrap().sum_all().unwrap();
    let grads = objective.backward().unwrap();
    let g: Vec<f64> = grads
        .get(xv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let h = 1e-6;
    for i in 0..10 {
        let (mut plus, mut minus) = (x.clone(), x.clone());
        plus[i] += h;
        minus[i] -= h;
        let numeric =
            (ln_objective(&plus, &w, &b, &r) - ln_objective(&minus, &w, &b, &r)) / (2.0 * h);
        assert!(
            (g[i] - numeric).abs() < 1e-6,
            "x[{i}]: {} vs {numeric}",
            g[i]
        );
    }
}

#[test]
fn l2_normalize_gives_unit_rows_and_leaves_zero_rows_at_zero() {
    let t = Tensor::new(&[[3.0f32, 4.0], [0.0, 0.0]], &Device::Cpu).unwrap();
    let n: Vec<Vec<f32>> = l2_normalize(&t).unwrap().to_vec2().unwrap();
    assert_eq!(n, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
}
