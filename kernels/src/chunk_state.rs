//! Per-chunk state contributions: `ΔS_u = Σ_τ φ_K(k̃_τ) v_τᵀ`, `Δz_u = Σ_τ φ_K(k̃_τ)` with
//! every key discounted to the end of its chunk (`e^{A_u − ā_τ}`).
//!
//! One cube owns `block_f` features of one chunk and head; each unit keeps its share of the
//! `[block_f, e]` tile in `f32` registers. φ is formed on the fly from the key tile in shared
//! memory (`w_f k_a k_b`), never written to device memory.

use cubecl::prelude::*;

use crate::chunk_state_mma::chunk_state_mma_kernel;
use crate::chunk_state_outer::chunk_state_outer_kernel;
use crate::config::StateTiles;
use crate::feature_pairs::{feature_pair, pair_block, pair_weight};
use crate::tile_load::load_key_value_rows;

/// Scalar sizes of a chunk-state launch.
#[derive(Debug, Clone, Copy)]
pub struct StateDims {
    /// `b`.
    pub batch: usize,
    /// `t` (unpadded).
    pub seq: usize,
    /// `h`.
    pub kv_heads: usize,
    /// `c`.
    pub chunk: usize,
    /// `n = ⌈t / c⌉`.
    pub n_chunks: usize,
    /// `D` of the degree-2 layout ([`feature_pairs`](crate::feature_pairs)).
    pub expanded_dim: usize,
}

/// Buffers of a chunk-state launch.
pub struct StateArgs<R: Runtime> {
    /// `k [b, t, h, d]`.
    pub k: ArrayArg<R>,
    /// `v [b, t, h, e]`.
    pub v: ArrayArg<R>,
    /// Cumulative log-gates inside each chunk, `f32 [b, h, n·c]`; `None`: no gating.
    pub gates: Option<ArrayArg<R>>,
    /// Output `f32 [b, h, n, D, e]`.
    pub states: ArrayArg<R>,
    /// Output `f32 [b, h, n, D]`.
    pub sums: ArrayArg<R>,
}

/// Launches the chunk-state kernel with tiles from [`StateTiles::plan`] (its `mma` field picks
/// a tensor-core variant, `outer` the one on CUDA's manually managed `mma`).
///
/// # Safety
/// The buffers must have the sizes documented on [`StateArgs`], `dtype` must be the element
/// type of `k` and `v`, and `tiles` must come from [`StateTiles::plan`] for this client, dtype
/// and head dims.
pub unsafe fn launch_chunk_state<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: StateDims,
    mut tiles: StateTiles,
    args: StateArgs<R>,
) {
    tiles.gated = args.gates.is_some();
    let gates = args
        .gates
        .unwrap_or_else(|| unsafe { ArrayArg::from_raw_parts(client.empty(4), 1) });
    let count = CubeCount::Static(
        dims.expanded_dim.div_ceil(tiles.block_f as usize) as u32,
        (dims.n_chunks * dims.kv_heads) as u32,
        dims.batch as u32,
    );
    let (launch, cube_dim) = if tiles.outer {
        (
            chunk_state_outer_kernel::launch_unchecked::<R> as StateLaunch<R>,
            CubeDim::new_2d(32, crate::chunk_state_outer::PLANES),
        )
    } else if tiles.mma {
        (
            chunk_state_mma_kernel::launch_unchecked::<R> as StateLaunch<R>,
            CubeDim::new_2d(32, 8),
        )
    } else {
        (
            chunk_state_kernel::launch_unchecked::<R> as StateLaunch<R>,
            CubeDim::new_1d(tiles.threads),
        )
    };
    unsafe {
        launch(
            client,
            count,
            cube_dim,
            args.k,
            args.v,
            gates,
            args.states,
            args.sums,
            dims.seq as u32,
            dims.kv_heads as u32,
            dims.chunk as u32,
            dims.n_chunks as u32,
            dims.expanded_dim as u32,
            tiles,
            dtype,
        )
    }
}

/// The launch signature both chunk-state variants share.
type StateLaunch<R> = unsafe fn(
    &ComputeClient<R>,
    CubeCount,
    CubeDim,
    ArrayArg<R>,
    ArrayArg<R>,
    ArrayArg<R>,
    ArrayArg<R>,
    ArrayArg<R>,
    u32,
    u32,
    u32,
    u32,
    u32,
    StateTiles,
    StorageType,
);

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn chunk_state_kernel<F: Float>(
    k: &Array<F>,
    v: &Array<F>,
    gates: &Array<f32>,
    states: &mut Array<f32>,
    sums: &mut Array<f32>,
    seq: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    #[comptime] cfg: StateTiles,
    #[define(F)] _dtype: StorageType,
) {
    let bk = comptime!(cfg.block_k as usize);
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let threads = comptime!(cfg.threads as usize);
    let lanes = comptime!(cfg.threads as usize / cfg.block_f as usize);
    let per_unit =
        comptime!((cfg.value_dim as usize).div_ceil(cfg.threads as usize / cfg.block_f as usize));
    let ds = comptime!(cfg.head_dim as usize + 1);

    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let row = UNIT_POS as usize / lanes;
    let lane = UNIT_POS as usize % lanes;
    let chunk_start = u * chunk;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;

    let f = CUBE_POS_X * cfg.block_f + row as u32;
    let mut a = 0u32;
    let mut b = 0u32;
    let mut weight = 0.0f32;
    if f < big_d {
        let pair = feature_pair(f, comptime!(pair_block(cfg.head_dim)));
        a = pair >> 16;
        b = pair & 0xffff;
        weight = pair_weight(a, b, comptime!(pair_block(cfg.head_dim)));
    }
    let mut chunk_total = 0.0f32;
    if comptime!(cfg.gated) {
        chunk_total = gates[gate_base + (chunk_start + chunk - 1) as usize];
    }

    let mut sk = SharedMemory::<f32>::new(bk * ds);
    let mut sv = SharedMemory::<f32>::new(bk * e);
    let mut discount = SharedMemory::<f32>::new(bk);

    let mut acc = Array::<f32>::new(per_unit);
    #[unroll]
    for c in 0..per_unit {
        acc[c] = 0.0;
    }
    let mut zsum = 0.0f32;

    let k_blocks = (chunk + cfg.block_k - 1) / cfg.block_k;
    for kb in 0..k_blocks {
        let k0 = kb * cfg.block_k;
        sync_cube();
        load_key_value_rows::<F, f32>(
            k,
            v,
            &mut sk,
            &mut sv,
            chunk_start,
            k0,
            chunk,
            seq,
            bi,
            kv_heads,
            kvh,
            bk,
            d,
            ds,
            e,
            threads,
        );
        if UNIT_POS < cfg.block_k {
            let pos = k0 + UNIT_POS;
            let mut dec = 1.0f32;
            if comptime!(cfg.gated) {
                if pos < chunk {
                    dec = f32::exp(chunk_total - gates[gate_base + (chunk_start + pos) as usize]);
                }
            }
            discount[UNIT_POS as usize] = dec;
        }
        sync_cube();
        for j in 0..bk {
            let phi = weight * discount[j] * sk[j * ds + a as usize] * sk[j * ds + b as usize];
            zsum += phi;
            #[unroll]
            for c in 0..per_unit {
                let col = lane + c * lanes;
                if col < e {
                    acc[c] += phi * sv[j * e + col];
                }
            }
        }
    }

    if f < big_d {
        let block = ((bi * kv_heads + kvh) * n_chunks + u) as usize * big_d as usize + f as usize;
        #[unroll]
        for c in 0..per_unit {
            let col = lane + c * lanes;
            if col < e {
                states[block * e + col] = acc[c];
            }
        }
        if lane == 0 {
            sums[block] = zsum;
        }
    }
}
