//! Helpers shared by the model crate's integration tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures` of the workspace.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The cases of a fixture checkpoint (`goldens/<name>/cases.json`), as each test reads them.
pub fn cases<T: serde::de::DeserializeOwned>(name: &str) -> Vec<T> {
    let path = fixtures().join("goldens").join(name).join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// The golden tensors of a fixture checkpoint (`goldens/<name>/<file>`, safetensors).
pub fn goldens(name: &str, file: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("goldens").join(name).join(file);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Largest absolute difference of two tensors of the same shape, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    max_abs(&(a - b).unwrap())
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
