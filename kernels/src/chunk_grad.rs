//! Backward pass of the chunked (and attention) form: the gradients of queries, keys, values
//! and gates, row by row.
//!
//! With `y_i = N_i / L_i`, the caller passes `dN_i = dy_i / L_i` and `dL_i = −(dy_i·y_i) / L_i`
//! (`L_i` from [`launch_output`](crate::chunk_output::launch_output)'s `stats`). Every weight
//! `w_ij = s_ij^p e^{G_i − G_j}` (`s_ij = σq_i·k_j`, `j ≤ i` in the chunk) then gets
//! `dw_ij = dN_i·v_j + dL_i`, so that
//! - `∂v_j += Σ_i w_ij dN_i`, `∂s_ij = dw_ij p s_ij^{p−1} e^{G_i − G_j}`,
//! - the cumulative gate `G_i` gets `+Σ_j w_ij dw_ij` (as a query) and `G_j` gets
//!   `−Σ_i w_ij dw_ij` (as a key).
//!
//! Across chunks, query `i` reads `e^{G_i} φ_Q(σq_i)·S_u`, so
//! `∂φ_Q(σq_i) = e^{G_i}(S_u dN_i + z_u dL_i)`; key `j` of chunk `u` adds
//! `e^{A_u − G_j} φ_K(k_j)` to the state after the chunk, whose gradient `Λ_{u+1}` (from the
//! reverse scan, [`discumsum`](crate::discumsum) with `reverse`) gives
//! `∂φ_K(k_j) = e^{A_u − G_j}(Λ_{u+1} v_j + Λz_{u+1})` and `∂v_j += φ_K(k̃_j)ᵀ Λ_{u+1}`.
//! A feature's gradient reaches its two coordinates (`∂x_a += g_f x_b`, `∂x_b += g_f x_a`) in
//! shared memory, each coordinate owned by one unit of the row.
//!
//! [`launch_query_grads`] writes `∂q` and the query side of the gate gradient per query head;
//! [`launch_key_grads`] writes `∂k`, `∂v` and the key side per key/value head. Gate gradients are
//! per position on the cumulative gates; the caller sums the query heads of a group, subtracts
//! the key side and takes the reverse cumulative sum.

use cubecl::prelude::*;

use crate::Buffer;
use crate::chunk_grad_keys::chunk_grad_keys_kernel;
use crate::chunk_grad_queries::chunk_grad_queries_kernel;
use crate::config::GradTiles;

/// Scalar sizes of a backward launch.
#[derive(Debug, Clone, Copy)]
pub struct GradDims {
    /// `b`.
    pub batch: usize,
    /// `t` (unpadded).
    pub seq: usize,
    /// `hq`.
    pub q_heads: usize,
    /// `h`.
    pub kv_heads: usize,
    /// Chunk length `c` (the whole sequence for the attention form).
    pub chunk: usize,
    /// `n = ⌈t / c⌉`.
    pub n_chunks: usize,
    /// `D` (used only with a state).
    pub expanded_dim: usize,
    /// `σ`.
    pub scale: f32,
}

/// What both backward launches read: the inputs and the output rows' gradients.
pub struct GradInputs {
    /// `q [b, t, hq, d]`.
    pub q: Buffer,
    /// `k [b, t, h, d]`.
    pub k: Buffer,
    /// `v [b, t, h, e]`.
    pub v: Buffer,
    /// Cumulative log-gates inside each chunk, `f32 [b, h, n·c]`; `None`: no gating.
    pub gates: Option<Buffer>,
    /// `dN`, `f32 [b, t, hq, e]`.
    pub d_num: Buffer,
    /// `dL`, `f32 [b, t, hq]`.
    pub d_den: Buffer,
}

/// Buffers of [`launch_query_grads`].
pub struct QueryGradArgs {
    /// The inputs.
    pub inputs: GradInputs,
    /// The states and key-sums entering each chunk, `f32 [b, h, n, D, e]` and `[b, h, n, D]`;
    /// `None`: the attention form.
    pub states: Option<(Buffer, Buffer)>,
    /// Output `∂q`, `f32 [b, t, hq, d]`.
    pub dq: Buffer,
    /// Output: the query side of `∂G_i`, `f32 [b, t, hq]`.
    pub dg: Buffer,
}

/// Buffers of [`launch_key_grads`].
pub struct KeyGradArgs {
    /// The inputs.
    pub inputs: GradInputs,
    /// The gradients of each chunk's contribution `(ΔS_u, Δz_u)`, i.e. of the state after it,
    /// `f32 [b, h, n, D, e]` and `[b, h, n, D]`; `None`: the attention form.
    pub lambda: Option<(Buffer, Buffer)>,
    /// Output `∂k`, `f32 [b, t, h, d]`.
    pub dk: Buffer,
    /// Output `∂v`, `f32 [b, t, h, e]`.
    pub dv: Buffer,
    /// Output: the key side of `∂G_j` (to subtract), `f32 [b, t, h]`.
    pub dg: Buffer,
}

/// Launches the query-side backward kernel.
///
/// # Safety
/// The buffers must have the sizes documented on [`QueryGradArgs`] for `dims`, `dtype` must be
/// the element type of `q`, `k` and `v`, and `tiles` must come from [`GradTiles::plan`] for this
/// client and head dims.
pub unsafe fn launch_query_grads<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: GradDims,
    mut tiles: GradTiles,
    args: QueryGradArgs,
) {
    let i = args.inputs;
    tiles.gated = i.gates.is_some();
    tiles.with_state = args.states.is_some();
    let dummy = Buffer::unused(client);
    let (states, sums) = args
        .states
        .unwrap_or_else(|| (dummy.clone(), dummy.clone()));
    let gates = i.gates.clone().unwrap_or_else(|| dummy.clone());
    let ratio = dims.q_heads / dims.kv_heads;
    let blocks = dims.chunk.div_ceil(tiles.block_rows as usize);
    let count = || {
        CubeCount::Static(
            (blocks * ratio) as u32,
            (dims.n_chunks * dims.kv_heads) as u32,
            dims.batch as u32,
        )
    };
    for_each_slice(tiles, dims, |tiles, first, len| {
        // SAFETY: the buffers hold what the caller promised.
        unsafe {
            chunk_grad_queries_kernel::launch_unchecked::<R>(
                client,
                count(),
                CubeDim::new_1d(tiles.threads),
                i.q.arg(),
                i.k.arg(),
                i.v.arg(),
                gates.arg(),
                i.d_num.arg(),
                i.d_den.arg(),
                states.arg(),
                sums.arg(),
                args.dq.arg(),
                args.dg.arg(),
                dims.seq as u32,
                dims.q_heads as u32,
                dims.kv_heads as u32,
                dims.chunk as u32,
                dims.n_chunks as u32,
                dims.expanded_dim as u32,
                dims.scale,
                first,
                len,
                tiles,
                dtype,
            )
        }
    });
}

/// Launches the key-side backward kernel.
///
/// # Safety
/// As [`launch_query_grads`], with the buffers of [`KeyGradArgs`].
pub unsafe fn launch_key_grads<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: GradDims,
    mut tiles: GradTiles,
    args: KeyGradArgs,
) {
    let i = args.inputs;
    tiles.gated = i.gates.is_some();
    tiles.with_state = args.lambda.is_some();
    let dummy = Buffer::unused(client);
    let (lambda, lambda_z) = args
        .lambda
        .unwrap_or_else(|| (dummy.clone(), dummy.clone()));
    let gates = i.gates.clone().unwrap_or_else(|| dummy.clone());
    let blocks = dims.chunk.div_ceil(tiles.block_rows as usize);
    let count = || {
        CubeCount::Static(
            blocks as u32,
            (dims.n_chunks * dims.kv_heads) as u32,
            dims.batch as u32,
        )
    };
    for_each_slice(tiles, dims, |tiles, first, len| {
        // SAFETY: the buffers hold what the caller promised.
        unsafe {
            chunk_grad_keys_kernel::launch_unchecked::<R>(
                client,
                count(),
                CubeDim::new_1d(tiles.threads),
                i.q.arg(),
                i.k.arg(),
                i.v.arg(),
                gates.arg(),
                i.d_num.arg(),
                i.d_den.arg(),
                lambda.arg(),
                lambda_z.arg(),
                args.dk.arg(),
                args.dv.arg(),
                args.dg.arg(),
                dims.seq as u32,
                dims.q_heads as u32,
                dims.kv_heads as u32,
                dims.chunk as u32,
                dims.n_chunks as u32,
                dims.expanded_dim as u32,
                dims.scale,
                first,
                len,
                tiles,
                dtype,
            )
        }
    });
}

/// Feature blocks one launch walks at most: the state path is split over several launches
/// (each adding to the outputs of the one before) so that no cube runs for long; a single
/// cube walking all of Brumby's 8,256 features in 16-feature blocks ran past what Mesa's
/// lavapipe completes correctly.
const FEATURE_BLOCKS_PER_LAUNCH: usize = 256;

/// Calls `launch` once per slice of the state's feature blocks (once without a state), with
/// `tiles.intra` set for the first launch and `tiles.accumulate` for the others.
fn for_each_slice(
    mut tiles: GradTiles,
    dims: GradDims,
    mut launch: impl FnMut(GradTiles, u32, u32),
) {
    for (index, (first, len)) in feature_slices(&tiles, dims).into_iter().enumerate() {
        tiles.intra = index == 0;
        tiles.accumulate = index > 0;
        launch(tiles, first, len);
    }
}

/// `(first block, block count)` of each launch: one launch without a state.
fn feature_slices(tiles: &GradTiles, dims: GradDims) -> Vec<(u32, u32)> {
    if !tiles.with_state {
        return vec![(0, 0)];
    }
    let total = dims.expanded_dim.div_ceil(tiles.block_inner as usize);
    (0..total.div_ceil(FEATURE_BLOCKS_PER_LAUNCH).max(1))
        .map(|k| {
            let first = k * FEATURE_BLOCKS_PER_LAUNCH;
            (
                first as u32,
                FEATURE_BLOCKS_PER_LAUNCH.min(total - first) as u32,
            )
        })
        .collect()
}

/// `(s^p, p·s^{p−1})` for even `p`.
#[cube]
pub(crate) fn power_and_slope(s: f32, #[comptime] degree: u32) -> (f32, f32) {
    let s2 = s * s;
    let mut lower = 1.0f32; // s^{p−2}
    #[unroll]
    for _ in 1..comptime!(degree / 2) {
        lower *= s2;
    }
    (lower * s2, comptime!(degree as f32) * lower * s)
}

/// Adds the gradients `g[row, f]` of the products `x_a x_b` of a tile's features (pairs in
/// `fa`, `fb`) to `dx[row, ·]`: unit `lane` of the row owns the coordinates `≡ lane (mod
/// lanes)`, so every coordinate has one writer.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn scatter_pair_grads(
    g: &SharedMemory<f32>,
    fa: &SharedMemory<u32>,
    fb: &SharedMemory<u32>,
    x: &SharedMemory<f32>,
    dx: &mut SharedMemory<f32>,
    row: usize,
    lane: usize,
    #[comptime] lanes: usize,
    #[comptime] inner: usize,
    #[comptime] d: usize,
    #[comptime] ds: usize,
) {
    let owner = lane as u32;
    for fl in 0..inner {
        let grad = g[row * inner + fl];
        let a = fa[fl];
        let b = fb[fl];
        if a % comptime!(lanes as u32) == owner {
            dx[row * d + a as usize] += grad * x[row * ds + b as usize];
        }
        if b % comptime!(lanes as u32) == owner {
            dx[row * d + b as usize] += grad * x[row * ds + a as usize];
        }
    }
}
