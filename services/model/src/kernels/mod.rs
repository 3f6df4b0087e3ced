//! Hand-written CPU kernels behind the model's hot paths.
//!
//! - [`attention`]: decode attention reading the KV cache in place.
//! - [`gemm`]: packed f32 GEMM for the encoder side (many rows).
//! - [`gemv`]: skinny matmuls for decode (a few rows), f32 or packed weights.
//! - [`quant`]: the weight-only formats (f16, bf16, int8, int4) the decode kernel reads.
//! - `pool`: the low-latency fork-join helper the decode kernel splits its work on.

pub mod attention;
pub mod gemm;
pub mod gemv;
mod pool;
pub mod quant;
