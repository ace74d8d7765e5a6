//! # retention-kernels
//!
//! CubeCL kernels for power retention, written once and compiled for CUDA, ROCm/HIP and wgpu.
//! Generic over `cubecl::Runtime`; no Burn types here (the `retention` crate adapts them).
//!
//! Degree `p = 2`, exact feature layout (`D = d(d+1)/2`, see [`feature_pairs`]); inputs in
//! f32/f16/bf16 (chosen at launch), accumulation and states in `f32`:
//! - [`chunk_state`]: per-chunk `ΔS = φ_K(K̃)ᵀV`, `Δz`, with φ formed on chip;
//! - [`discumsum`]: the discounted scan of chunk states across chunks;
//! - [`chunk_output`]: query-state product + intra-chunk attention + normalisation, fused; with
//!   no state it is the attention form (any even `p`);
//! - [`decode`]: one recurrent step for a batch of sequences.
//!
//! The products run on the cores' FMA units with register tiles (every runtime, lavapipe
//! included); a tensor-core (`cmma`) path is not implemented yet.
#![warn(missing_docs)]
// In `#[cube]` bodies a comptime `if` must stay apart from the runtime condition inside it
// (merging them makes the whole condition runtime), and runtime integers have no `div_ceil`.
#![allow(clippy::collapsible_if, clippy::manual_div_ceil)]

pub mod chunk_output;
mod chunk_output_mma;
pub mod chunk_state;
mod chunk_state_mma;
pub mod config;
pub mod decode;
pub mod discumsum;
#[allow(missing_docs)] // `#[cube]` adds undocumented expansion items
pub mod feature_pairs;
#[allow(missing_docs)]
pub mod tile_load;

pub use config::{
    DecodeTiles, OutputTiles, StateTiles, Strategy, mma_supported, shared_memory_budget,
};
pub use cubecl;

use cubecl::prelude::{ArrayArg, Runtime};

/// A device buffer of `len` elements, for launches that pass one buffer to several kernels.
#[derive(Debug, Clone)]
pub struct Buffer {
    /// The memory.
    pub handle: cubecl::server::Handle,
    /// Number of elements.
    pub len: usize,
}

impl Buffer {
    /// The buffer as a kernel argument.
    ///
    /// # Safety
    /// `handle` must hold at least `len` elements of the kernel's element type.
    pub unsafe fn arg<R: Runtime>(&self) -> ArrayArg<R> {
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.len) }
    }
}
