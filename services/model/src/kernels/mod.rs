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

/// A raw output pointer shared by the pool threads of one kernel call, each of which writes
/// only its own disjoint part of the output (the kernels' SAFETY comments say which part).
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32);
// SAFETY: only used to hand disjoint parts of one output to pool threads.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub(crate) fn new(ptr: *mut f32) -> Self {
        Self(ptr)
    }

    /// A method (not `.0`) so closures capture the whole `Sync` wrapper, not the raw field.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}
