//! Comptime tile configurations and their selection from the device's limits.

use cubecl::ir::{ElemType, FloatKind, StorageType, features::MmaConfig};
use cubecl::prelude::*;

/// How a kernel computes its matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// Tensor cores (`cmma`) where the runtime has them for the input dtype and the shapes fit,
    /// else register tiles on the FMA units.
    #[default]
    Auto,
    /// Register tiles on the FMA units (every runtime; the only path for f32 inputs).
    Fma,
    /// Tensor cores; falls back to [`Strategy::Fma`] where unsupported.
    Mma,
}

/// Whether `client` runs 16×16×16 `cmma` with `dtype` operands and an `f32` accumulator.
pub fn mma_supported<R: Runtime>(client: &ComputeClient<R>, dtype: StorageType) -> bool {
    let half = matches!(
        dtype,
        StorageType::Scalar(ElemType::Float(FloatKind::F16 | FloatKind::BF16))
    );
    half && client.features().matmul.cmma.contains(&MmaConfig {
        a_type: dtype,
        b_type: dtype,
        cd_type: f32::as_type_native_unchecked().storage_type(),
        m: 16,
        n: 16,
        k: 16,
    })
}

/// Shared memory a kernel may plan for: the device's limit, capped at the 48 KiB every
/// CUDA/HIP/Vulkan device gives without an opt-in.
pub fn shared_memory_budget(max_shared_bytes: usize) -> usize {
    max_shared_bytes.min(48 * 1024)
}

/// Tiles of the output kernel (query-state product + intra-chunk attention + normalisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutputTiles {
    /// Query rows per cube.
    pub block_q: u32,
    /// Keys (and features) per inner block.
    pub block_k: u32,
    /// Units per cube; `threads / block_q` units share a row.
    pub threads: u32,
    /// `d`.
    pub head_dim: u32,
    /// `e`.
    pub value_dim: u32,
    /// `p`.
    pub degree: u32,
    /// Whether log-gates are given.
    pub gated: bool,
    /// Whether the chunk's incoming state is read (chunked form) or not (attention form).
    pub with_state: bool,
}

impl OutputTiles {
    /// The largest tiles whose shared memory fits `budget` bytes.
    pub fn select(
        head_dim: usize,
        value_dim: usize,
        degree: usize,
        gated: bool,
        with_state: bool,
        budget: usize,
    ) -> Self {
        let threads = 256;
        let (block_q, block_k) = [(64, 64), (64, 32), (32, 32), (32, 16), (16, 16), (16, 8)]
            .into_iter()
            .find(|&(bq, bk)| Self::shared_bytes(bq, bk, head_dim, value_dim) <= budget)
            .unwrap_or((16, 8));
        Self {
            block_q: block_q as u32,
            block_k: block_k as u32,
            threads,
            head_dim: head_dim as u32,
            value_dim: value_dim as u32,
            degree: degree as u32,
            gated,
            with_state,
        }
    }

    fn shared_bytes(bq: usize, bk: usize, d: usize, e: usize) -> usize {
        4 * (bq * (d + 1) + bk * (d + 1) + bk * e + bq * bk + 3 * bk + bq)
    }
}

/// Tiles of the chunk-state kernel (`ΔS = φ_K(K̃)ᵀ V`, `Δz = Σ φ_K(k̃)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateTiles {
    /// Features per cube.
    pub block_f: u32,
    /// Tokens per inner block.
    pub block_k: u32,
    /// Units per cube; `threads / block_f` units share a feature row.
    pub threads: u32,
    /// `d`.
    pub head_dim: u32,
    /// `e`.
    pub value_dim: u32,
    /// Whether log-gates are given.
    pub gated: bool,
}

impl StateTiles {
    /// The largest tiles whose shared memory fits `budget` bytes.
    pub fn select(head_dim: usize, value_dim: usize, gated: bool, budget: usize) -> Self {
        let block_k = [64usize, 32, 16, 8]
            .into_iter()
            .find(|&bk| 4 * (bk * (head_dim + 1) + bk * value_dim + bk) <= budget)
            .unwrap_or(8);
        Self {
            block_f: 64,
            block_k: block_k as u32,
            threads: 256,
            head_dim: head_dim as u32,
            value_dim: value_dim as u32,
            gated,
        }
    }
}

/// Tiles of the decode-step kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeTiles {
    /// Value columns per cube (units along x).
    pub block_e: u32,
    /// Feature-row groups per cube (units along y).
    pub rows: u32,
    /// `d`.
    pub head_dim: u32,
    /// `e`.
    pub value_dim: u32,
    /// Query heads per key/value head.
    pub ratio: u32,
    /// `p`.
    pub degree: u32,
    /// Whether log-gates are given.
    pub gated: bool,
}
