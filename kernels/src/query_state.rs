//! Query–state product of the chunked form on tensor cores: for every query row `i` of chunk
//! `u`, `num_i = φ_Q(q̃_i)ᵀ S_in[u]` and `den_i = φ_Q(q̃_i)·z_in[u]`, each times the row factor
//! `1/(σ|q_i|)²` (it cancels in the normalisation, and keeps the half-precision operands in
//! range) but without the row's gate factor `e^{G_i}`. The output kernel multiplies them by
//! `e^{G_i}` in f32, adds the intra-chunk part and divides.
//!
//! A cube owns 128 rows of the `r·c` rows of a chunk that read one key/value head's state
//! (the `r = hq/h` query heads of a GQA group folded into the row dimension, row
//! `ρ = position·r + head`, so one state block serves five Brumby heads at once) and all `e`
//! value columns. It walks the features 32 at a time (two 16-feature groups: one query
//! coordinate `x` times 16 consecutive coordinates, see [`feature_pairs`](crate::feature_pairs)):
//! the units build the f16 feature tile from the query tile in shared memory and stage the
//! f16 state block (`S/γ`, [`state_scale`], written by the scan) with 16-byte loads,
//! double-buffered so one barrier per step separates producing the next block from
//! multiplying the previous one (the block product of `block_mma`).

use cubecl::prelude::*;
use half::f16;

use crate::block_mma::{
    A_STRIDE, DEPTH, ROWS, SKIP_ROW, STAGE, UNITS, b_stride, cube_dim, multiply_step,
    store_accumulators, zero_accumulators,
};
use crate::chunk_output::OutputDims;
use crate::config::QueryStateTiles;
use crate::feature_pairs::feature_pair;
use crate::query_state_outer::query_state_outer_kernel;
use crate::tile_load::{fetch_rows, row_registers, rows_present, store_rows};

/// The factor `1/γ = 1/√D` of the half-precision states this kernel reads.
pub fn state_scale(expanded_dim: usize) -> f32 {
    1.0 / (expanded_dim as f32).sqrt()
}

/// Builds the feature tile of step `step` (features `32·step..`, two 16-feature groups
/// `(x, m)`) into `sphi[offset..]`: `q'_x q'_{16m + r}` rounded to f16, `q'` the pre-scaled
/// query rows. Plane `p` writes rows `16p..16p + 16`; lane `(rq, fo)` rows `rq + 4j` and
/// features `fo + 8b` of each group, so every store and load of the plane touches 4 rows × 8
/// consecutive halves (conflict-free banks), and adds `φ·z/γ` to its row partials `dacc[j]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn build_features(
    sq: &SharedMemory<f16>,
    sphi: &mut SharedMemory<f16>,
    sums: &Array<f32>,
    zbase: usize,
    step: u32,
    groups: u32,
    inv_gamma: f32,
    dacc: &mut Array<f32>,
    offset: usize,
    #[comptime] ds: usize,
) {
    let rq = UNIT_POS_X as usize / 8;
    let fo = UNIT_POS_X as usize % 8;
    let row0 = UNIT_POS_Y as usize * 16 + rq;
    #[unroll]
    for gi in 0..2usize {
        let g = step * 2 + gi as u32;
        if g < groups {
            let pair = feature_pair(g * 16, 16u32);
            let x = (pair >> 16) as usize;
            let inner = (pair & 0xffff) as usize + fo;
            let zb = zbase + g as usize * 16 + fo;
            let z0 = sums[zb] * inv_gamma;
            let z1 = sums[zb + 8] * inv_gamma;
            #[unroll]
            for j in 0..4usize {
                let src = (row0 + 4 * j) * ds;
                // f16 × f16 rounds like the f32 product rounded to f16, in one instruction
                let a = sq[src + x];
                let p0 = a * sq[src + inner];
                let p1 = a * sq[src + inner + 8];
                dacc[j] += f32::cast_from(p0) * z0 + f32::cast_from(p1) * z1;
                let dst = offset + (row0 + 4 * j) * A_STRIDE + gi * 16 + fo;
                sphi[dst] = p0;
                sphi[dst + 8] = p1;
            }
        } else {
            #[unroll]
            for j in 0..4usize {
                let dst = offset + (row0 + 4 * j) * A_STRIDE + gi * 16 + fo;
                sphi[dst] = f16::cast_from(0.0f32);
                sphi[dst + 8] = f16::cast_from(0.0f32);
            }
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn query_state_kernel<F: Float>(
    q: &Array<Vector<F, Const<8>>>,
    states: &Array<Vector<f16, Const<8>>>,
    sums: &Array<f32>,
    num: &mut Array<f32>,
    den: &mut Array<f32>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    #[comptime] cfg: QueryStateTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let ds = comptime!(cfg.head_dim as usize + 8);
    let ss = comptime!(b_stride(cfg.value_dim as usize));
    let half_vecs = comptime!(cfg.head_dim as usize / 16);

    let ratio = q_heads / kv_heads;
    let row0 = CUBE_POS_X * ROWS as u32;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let state_base = (((bi * kv_heads + kvh) * n_chunks + u) * big_d) as usize;

    let mut sq = SharedMemory::<f16>::new(ROWS * ds);
    let mut row_index = SharedMemory::<u32>::new(ROWS);
    let mut sphi = SharedMemory::<f16>::new(2 * ROWS * A_STRIDE);
    let mut sst = SharedMemory::<f16>::new(2 * DEPTH * ss);
    let mut npart = SharedMemory::<f32>::new(UNITS);
    let mut stage = SharedMemory::<f32>::new(STAGE);

    // row ρ of the tile is position ρ / r of head kvh·r + ρ mod r: its `[b, t, hq]` index
    if UNIT_POS < ROWS as u32 {
        let rho = row0 + UNIT_POS;
        let pos = rho / ratio;
        let at = (bi * seq + chunk_start + pos) * q_heads + kvh * ratio + rho % ratio;
        row_index[UNIT_POS as usize] = select(pos < chunk && chunk_start + pos < seq, at, SKIP_ROW);
    }
    sync_cube();

    // units 2ρ, 2ρ + 1 hold the two halves of query row ρ; its squared norm sets the row
    // factor σ² · γ/(σ|q|)², and the tile keeps `q' = q·√factor` in f16, so the features
    // `q'_x q'_y` stay ≤ γ in magnitude
    let row = UNIT_POS as usize / 2;
    let half = UNIT_POS as usize % 2;
    let at = row_index[row];
    let mut qv = Array::<Vector<F, Const<8>>>::new(half_vecs);
    let mut norm2 = 0.0f32;
    #[unroll]
    for j in 0..half_vecs {
        let mut val = Vector::<F, Const<8>>::new(F::cast_from(0.0f32));
        if at != SKIP_ROW {
            val = q[at as usize * (d / 8) + half * half_vecs + j];
        }
        qv[j] = val;
        #[unroll]
        for i in 0..8usize {
            let x = f32::cast_from(val[i]);
            norm2 += x * x;
        }
    }
    npart[UNIT_POS as usize] = norm2;
    sync_cube();
    let gamma = f32::sqrt(f32::cast_from(big_d));
    let inv_gamma = 1.0 / gamma;
    let norm2 = npart[2 * row] + npart[2 * row + 1];
    // the gate factor e^{G_i} stays out of the f16 queries (it underflows there for strong
    // gates: e^{-20} is below f16's range): the output kernel applies it in f32
    let fac = select(norm2 > 0.0, gamma / norm2, 0.0f32);
    let root = f32::sqrt(fac);
    #[unroll]
    for j in 0..half_vecs {
        #[unroll]
        for i in 0..8usize {
            sq[row * ds + (half * half_vecs + j) * 8 + i] =
                f16::cast_from(f32::cast_from(qv[j][i]) * root);
        }
    }
    sync_cube();

    let groups = big_d / 16;
    let steps = (groups + 1) / 2;
    let mut regs = row_registers::<f16>(DEPTH, e, UNITS);
    let mut dacc = Array::<f32>::new(4usize);
    #[unroll]
    for j in 0..4usize {
        dacc[j] = 0.0;
    }
    let mut acc = zero_accumulators(e);

    // step s produces block s into buffer s mod 2 while the matrix units take block s − 1
    for step in 0..steps + 1 {
        let producing = step < steps;
        if producing {
            let first = step * DEPTH as u32;
            fetch_rows::<f16>(
                states,
                &mut regs,
                (state_base + first as usize) * (e / 8),
                e / 8,
                rows_present(first, big_d),
                DEPTH,
                e,
                UNITS,
            );
        }
        if step > 0 {
            let prev = ((step - 1) % 2) as usize;
            multiply_step(
                &mut acc,
                &sphi,
                prev * ROWS * A_STRIDE,
                &sst,
                prev * DEPTH * ss,
                e,
            );
        }
        if producing {
            let buf = (step % 2) as usize;
            build_features(
                &sq,
                &mut sphi,
                sums,
                state_base,
                step,
                groups,
                inv_gamma,
                &mut dacc,
                buf * ROWS * A_STRIDE,
                ds,
            );
            store_rows::<f16, f16>(&regs, &mut sst, buf * DEPTH * ss, DEPTH, e, ss, UNITS);
        }
        sync_cube();
    }

    // denominators: lanes `8·rq..8·rq + 8` hold partials of rows `rq + 4j`
    #[unroll]
    for j in 0..4usize {
        let mut total = dacc[j];
        total += plane_shuffle_xor(total, 1u32);
        total += plane_shuffle_xor(total, 2u32);
        total += plane_shuffle_xor(total, 4u32);
        let at = row_index[UNIT_POS_Y as usize * 16 + UNIT_POS_X as usize / 8 + 4 * j];
        if UNIT_POS_X % 8 == 0 && at != SKIP_ROW {
            den[at as usize] = total;
        }
    }
    store_accumulators(&acc, &mut stage, &row_index, num, 1.0, e);
}

/// Buffers of a query-state launch (flat, contiguous, row-major).
pub struct QueryStateArgs<R: Runtime> {
    /// `q [b, t, hq, d]`.
    pub q: ArrayArg<R>,
    /// States entering each chunk divided by `γ = √D`, `f16 [b, h, n, D, e]`.
    pub states: ArrayArg<R>,
    /// Key-sums entering each chunk, `f32 [b, h, n, D]`.
    pub sums: ArrayArg<R>,
    /// Output numerators `f32 [b, t, hq, e]` (times the row factor).
    pub num: ArrayArg<R>,
    /// Output denominators `f32 [b, t, hq]` (times the row factor).
    pub den: ArrayArg<R>,
}

/// Launches the query-state product with tiles from [`QueryStateTiles::plan`].
///
/// # Safety
/// The buffers must have the sizes documented on [`QueryStateArgs`] for `dims`, `dtype` must
/// be the element type of `q`, and `tiles` must come from [`QueryStateTiles::plan`] for this
/// client, dtype and head dims.
pub unsafe fn launch_query_state<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: OutputDims,
    tiles: QueryStateTiles,
    args: QueryStateArgs<R>,
) {
    let ratio = dims.q_heads / dims.kv_heads;
    let (launch, dim, rows) = if tiles.outer {
        (
            query_state_outer_kernel::launch_unchecked::<R> as QueryStateLaunch<R>,
            CubeDim::new_2d(32, tiles.planes),
            16 * tiles.planes as usize,
        )
    } else {
        (
            query_state_kernel::launch_unchecked::<R> as QueryStateLaunch<R>,
            cube_dim(),
            ROWS,
        )
    };
    let count = CubeCount::Static(
        (ratio * dims.chunk).div_ceil(rows) as u32,
        (dims.n_chunks * dims.kv_heads) as u32,
        dims.batch as u32,
    );
    unsafe {
        launch(
            client,
            count,
            dim,
            args.q,
            args.states,
            args.sums,
            args.num,
            args.den,
            dims.seq as u32,
            dims.q_heads as u32,
            dims.kv_heads as u32,
            dims.chunk as u32,
            dims.n_chunks as u32,
            dims.expanded_dim as u32,
            tiles,
            dtype,
        )
    }
}

/// The signature both query-state kernels' launch functions share.
type QueryStateLaunch<R> = unsafe fn(
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
    u32,
    QueryStateTiles,
    StorageType,
);
