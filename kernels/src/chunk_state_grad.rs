//! The gradient each chunk's queries send to the state entering it (backward pass):
//! `dS_u = Σ_i e^{G_i} φ_Q(σq_i) dN_iᵀ`, `dz_u = Σ_i e^{G_i} φ_Q(σq_i) dL_i` over the chunk's
//! rows of every query head of the group, where `dN_i = ∂/∂N_i` and `dL_i = ∂/∂L_i` are the
//! gradients of row `i`'s numerator and normaliser (`y_i = N_i / L_i`).
//!
//! The transpose of the query–state product, laid out as [`chunk_state`](crate::chunk_state):
//! one cube owns `block_f` features of one chunk and key/value head, each unit keeps its share
//! of the `[block_f, e]` tile in `f32` registers, φ is formed on the fly from the query tile.

use cubecl::prelude::*;

use crate::chunk_state_mma::query_state_grad_mma_kernel;
use crate::chunk_state_outer::query_state_grad_outer_kernel;
use crate::config::StateTiles;
use crate::feature_pairs::{feature_pair, pair_block};
use crate::tile_load::{load_gates, load_token_rows};

/// Scalar sizes of a state-gradient launch.
#[derive(Debug, Clone, Copy)]
pub struct StateGradDims {
    /// `b`.
    pub batch: usize,
    /// `t` (unpadded).
    pub seq: usize,
    /// `hq`.
    pub q_heads: usize,
    /// `h`.
    pub kv_heads: usize,
    /// `c`.
    pub chunk: usize,
    /// `n = ⌈t / c⌉`.
    pub n_chunks: usize,
    /// `D` of the degree-2 layout.
    pub expanded_dim: usize,
    /// `σ`.
    pub scale: f32,
}

/// Buffers of a state-gradient launch.
pub struct StateGradArgs<R: Runtime> {
    /// `q [b, t, hq, d]`.
    pub q: ArrayArg<R>,
    /// `∂/∂N`, `f32 [b, t, hq, e]`.
    pub d_num: ArrayArg<R>,
    /// `∂/∂L`, `f32 [b, t, hq]`.
    pub d_den: ArrayArg<R>,
    /// Cumulative log-gates inside each chunk, `f32 [b, h, n·c]`; `None`: no gating.
    pub gates: Option<ArrayArg<R>>,
    /// Output `f32 [b, h, n, D, e]`.
    pub states: ArrayArg<R>,
    /// Output `f32 [b, h, n, D]`.
    pub sums: ArrayArg<R>,
}

/// Launches the kernel with FMA tiles from [`StateTiles::plan`] (`Strategy::Fma`).
///
/// # Safety
/// The buffers must have the sizes documented on [`StateGradArgs`], `dtype` must be the element
/// type of `q`, and `tiles` must come from [`StateTiles::plan`] for this client and head dims
/// with `mma == false`.
pub unsafe fn launch_chunk_state_grad<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: StateGradDims,
    mut tiles: StateTiles,
    args: StateGradArgs<R>,
) {
    tiles.gated = args.gates.is_some();
    tiles.mma = false;
    let gates = args
        .gates
        .unwrap_or_else(|| unsafe { ArrayArg::from_raw_parts(client.empty(4), 1) });
    let count = CubeCount::Static(
        dims.expanded_dim.div_ceil(tiles.block_f as usize) as u32,
        (dims.n_chunks * dims.kv_heads) as u32,
        dims.batch as u32,
    );
    unsafe {
        chunk_state_grad_kernel::launch_unchecked::<R>(
            client,
            count,
            CubeDim::new_1d(tiles.threads),
            args.q,
            args.d_num,
            args.d_den,
            gates,
            args.states,
            args.sums,
            dims.seq as u32,
            dims.q_heads as u32,
            dims.kv_heads as u32,
            dims.chunk as u32,
            dims.n_chunks as u32,
            dims.expanded_dim as u32,
            dims.scale,
            tiles,
            dtype,
        )
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn chunk_state_grad_kernel<F: Float>(
    q: &Array<F>,
    d_num: &Array<f32>,
    d_den: &Array<f32>,
    gates: &Array<f32>,
    states: &mut Array<f32>,
    sums: &mut Array<f32>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    scale: f32,
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
    let ratio = q_heads / kv_heads;
    let row = UNIT_POS as usize / lanes;
    let lane = UNIT_POS as usize % lanes;
    let chunk_start = u * chunk;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;

    let f = CUBE_POS_X * cfg.block_f + row as u32;
    let mut a = 0u32;
    let mut b = 0u32;
    if f < big_d {
        let pair = feature_pair(f, comptime!(pair_block(cfg.head_dim)));
        a = pair >> 16;
        b = pair & 0xffff;
    }

    let mut sx = SharedMemory::<f32>::new(bk * ds);
    let mut sn = SharedMemory::<f32>::new(bk * e);
    let mut discount = SharedMemory::<f32>::new(bk);
    let mut sl = SharedMemory::<f32>::new(bk);

    let mut acc = Array::<f32>::new(per_unit);
    #[unroll]
    for c in 0..per_unit {
        acc[c] = 0.0;
    }
    let mut zsum = 0.0f32;

    let blocks = (chunk + cfg.block_k - 1) / cfg.block_k;
    for rr in 0..ratio {
        let head = kvh * ratio + rr;
        for kb in 0..blocks {
            let k0 = kb * cfg.block_k;
            sync_cube();
            load_token_rows::<F, f32>(
                q,
                &mut sx,
                chunk_start,
                k0,
                chunk,
                seq,
                bi,
                q_heads,
                head,
                scale,
                bk,
                d,
                ds,
                threads,
            );
            load_token_rows::<f32, f32>(
                d_num,
                &mut sn,
                chunk_start,
                k0,
                chunk,
                seq,
                bi,
                q_heads,
                head,
                1.0,
                bk,
                e,
                e,
                threads,
            );
            load_gates(
                gates,
                &mut discount,
                gate_base,
                chunk_start,
                k0,
                chunk,
                cfg.block_k,
            );
            sync_cube();
            if UNIT_POS < cfg.block_k {
                let pos = k0 + UNIT_POS;
                let tok = chunk_start + pos;
                let mut dec = 0.0f32;
                let mut dl = 0.0f32;
                if pos < chunk && tok < seq {
                    dec = 1.0;
                    if comptime!(cfg.gated) {
                        dec = f32::exp(discount[UNIT_POS as usize]);
                    }
                    dl = d_den[((bi * seq + tok) * q_heads + head) as usize];
                }
                discount[UNIT_POS as usize] = dec;
                sl[UNIT_POS as usize] = dl;
            }
            sync_cube();
            for j in 0..bk {
                let phi = discount[j] * sx[j * ds + a as usize] * sx[j * ds + b as usize];
                zsum += phi * sl[j];
                #[unroll]
                for c in 0..per_unit {
                    let col = lane + c * lanes;
                    if col < e {
                        acc[c] += phi * sn[j * e + col];
                    }
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

/// Buffers of [`launch_chunk_state_grad_mma`].
pub struct StateGradMmaArgs<R: Runtime> {
    /// `σq [b, t, hq, d]`, f16.
    pub q: ArrayArg<R>,
    /// `dN/β [b, t, hq, e]`, f16 (`β` from `scales`).
    pub d_num: ArrayArg<R>,
    /// `∂/∂L`, `f32 [b, t, hq]`.
    pub d_den: ArrayArg<R>,
    /// `β` per `(b, h)`, `f32 [b, h]`.
    pub scales: ArrayArg<R>,
    /// Cumulative log-gates inside each chunk, `f32 [b, h, n·c]`; `None`: no gating.
    pub gates: Option<ArrayArg<R>>,
    /// Output `f32 [b, h, n, D, e]`.
    pub states: ArrayArg<R>,
    /// Output `f32 [b, h, n, D]`.
    pub sums: ArrayArg<R>,
}

/// Launches the tensor-core variant (f16 operands, f32 accumulation; `tiles.outer` picks the one on
/// CUDA's manually managed `mma`; see
/// [`StateGradMmaArgs`] for what the caller prepares).
///
/// # Safety
/// The buffers must have the sizes documented on [`StateGradMmaArgs`], and `tiles` must come
/// from [`StateTiles::plan`] for f16 on this client with `mma == true`.
pub unsafe fn launch_chunk_state_grad_mma<R: Runtime>(
    client: &ComputeClient<R>,
    dims: StateGradDims,
    mut tiles: StateTiles,
    args: StateGradMmaArgs<R>,
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
    let f16 = half::f16::as_type_native_unchecked().storage_type();
    let (launch, planes) = if tiles.outer {
        (
            query_state_grad_outer_kernel::launch_unchecked::<R> as StateGradMmaLaunch<R>,
            crate::chunk_state_outer::PLANES,
        )
    } else {
        (
            query_state_grad_mma_kernel::launch_unchecked::<R> as StateGradMmaLaunch<R>,
            8,
        )
    };
    unsafe {
        launch(
            client,
            count,
            CubeDim::new_2d(32, planes),
            args.q,
            args.d_num,
            gates,
            args.d_den,
            args.scales,
            args.states,
            args.sums,
            dims.seq as u32,
            dims.q_heads as u32,
            dims.kv_heads as u32,
            dims.chunk as u32,
            dims.n_chunks as u32,
            dims.expanded_dim as u32,
            tiles,
            f16,
        )
    }
}

/// The signature both tensor-core kernels' launch functions share.
type StateGradMmaLaunch<R> = unsafe fn(
    &ComputeClient<R>,
    CubeCount,
    CubeDim,
    ArrayArg<R>,
    ArrayArg<R>,
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
    u32,
    StateTiles,
    StorageType,
);
