//! # retention-kernels
//!
//! CubeCL kernels for power retention, written once and compiled for CUDA, ROCm/HIP and wgpu.
//! Generic over `cubecl::Runtime`; no Burn types here (the `retention` crate adapts them).
//!
//! Degree `p = 2` in the block feature layout (`D = d(d+β)/2`, see [`feature_pairs`]); inputs in
//! f32/f16/bf16 (chosen at launch), accumulation in `f32`:
//! - [`chunk_gates`]: the log-gates' cumulative sums inside chunks;
//! - [`chunk_state`]: per-chunk `ΔS = φ_K(K̃)ᵀV`, `Δz`, with φ formed on chip;
//! - [`discumsum`]: the discounted scan of chunk states across chunks;
//! - [`query_state`]: the query–state product `φ_Q(q̃)ᵀS_in` (tensor-core path);
//! - [`chunk_output`]: intra-chunk attention + normalisation (+ the query–state product on the
//!   FMA path); with no state it is the attention form (any even `p`);
//! - [`chunk_state_grad`], [`chunk_grad`]: the backward pass (the queries' gradient of the
//!   entering states, then the gradients of queries, keys, values and gates; the state
//!   gradients are scanned backwards by [`discumsum`]); on tensor cores
//!   [`chunk_grad_intra_mma`] (the intra-chunk pairs) and [`chunk_grad_state_mma`] (the state
//!   path); [`row_grads`] and [`gate_grads`] start and finish it (the rows' `dN`, `dL`; the
//!   log-gates' gradient from per-position terms);
//! - [`decode`]: recurrent steps for a batch of sequences (one token, or a window of recent
//!   tokens kept beside the state, read and absorbed separately).
//!
//! f16/bf16 inputs use tensor cores where the runtime has them; everything else (f32,
//! wgpu/lavapipe) runs FMA register tiles. On CUDA every tensor-core kernel runs on manually
//! managed `mma.sync` (`m16n8k16`, `ldmatrix`): the chunk-state and query-state products with
//! feature tiles built in registers, the backward's state path (for `d ≤ 64` as products of
//! outer products, see [`StateGradProducts`]), and the output kernel and the backward's
//! intra-chunk pairs flash-attention style, scores and pair weights in the accumulator
//! registers. HIP and Vulkan run the `cmma` (16×16×16) variants of the same kernels (HIP
//! untested). A [`Strategy`] forces a family: [`Strategy::Cmma`] runs the `cmma` variants on
//! CUDA too (how the CUDA selftest covers them), [`Strategy::Fma`] the register tiles.
#![warn(missing_docs)]
// In `#[cube]` bodies a comptime `if` must stay apart from the runtime condition inside it
// (merging them makes the whole condition runtime), and runtime integers have no `div_ceil`.
#![allow(clippy::collapsible_if, clippy::manual_div_ceil)]

mod block_mma;
pub mod chunk_gates;
pub mod chunk_grad;
mod chunk_grad_intra_manual;
pub mod chunk_grad_intra_mma;
mod chunk_grad_keys;
mod chunk_grad_queries;
mod chunk_grad_state_manual;
pub mod chunk_grad_state_mma;
mod chunk_grad_state_outer;
pub mod chunk_output;
mod chunk_output_manual;
mod chunk_output_mma;
pub mod chunk_state;
pub mod chunk_state_grad;
mod chunk_state_mma;
mod chunk_state_outer;
pub mod config;
pub mod decode;
pub mod discumsum;
#[allow(missing_docs)] // `#[cube]` adds undocumented expansion items
pub mod feature_pairs;
pub mod gate_grads;
mod mma_fragments;
pub mod query_rows_half;
pub mod query_state;
mod query_state_outer;
pub mod row_grads;
#[allow(missing_docs)]
pub mod tile_load;

pub use config::{
    ChunkedTiles, DecodeMode, DecodeTiles, GradTiles, IntraGradTiles, OutputTiles, QueryStateTiles,
    StateGradProducts, StateGradTiles, StateTiles, Strategy, mma_supported, shared_memory_budget,
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
    /// A one-element buffer for an argument the launch leaves unread (an absent option).
    pub fn unused<R: Runtime>(client: &cubecl::prelude::ComputeClient<R>) -> Self {
        Self {
            handle: client.empty(4),
            len: 1,
        }
    }

    /// The buffer as a kernel argument.
    ///
    /// # Safety
    /// `handle` must hold at least `len` elements of the kernel's element type.
    pub unsafe fn arg<R: Runtime>(&self) -> ArrayArg<R> {
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.len) }
    }
}
