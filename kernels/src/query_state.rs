//! Query–state product of the chunked form on tensor cores: for every query row `i` of chunk
//! `u`, `num_i = φ_Q(q̃_i)ᵀ S_in[u]` and `den_i = φ_Q(q̃_i)·z_in[u]`, each times the row factor
//! `c_i = 1/(σ|q_i|)²` (it cancels in the normalisation, and keeps the half-precision operands
//! in range). The output kernel adds the intra-chunk part and divides.
//!
//! A cube owns 128 rows of the `r·c` rows of a chunk that read one key/value head's state
//! (the `r = hq/h` query heads of a GQA group folded into the row dimension, row
//! `ρ = position·r + head`, so one state block serves five Brumby heads at once) and all `e`
//! value columns. It walks the features 32 at a time (two 16-feature groups: one query
//! coordinate `x` times 16 consecutive coordinates, see [`feature_pairs`](crate::feature_pairs)):
//! the units build the f16 feature tile from the query tile in shared memory and stage the
//! f16 state block (written as `S/γ` by the scan) with 16-byte loads, double-buffered so one
//! barrier per step separates producing the next block from multiplying the current one.
//! Plane `p` accumulates rows `32·(p mod 4)..` × columns `(e/2)·(p / 4)..` in `f32` fragments.

use cubecl::prelude::*;
use half::f16;

use crate::chunk_output::OutputDims;
use crate::config::QueryStateTiles;
use crate::feature_pairs::feature_pair;

pub(crate) const BQ: usize = 128;
/// Features per pipeline step: two groups of 16.
pub(crate) const BF: usize = 32;
/// Row stride of the feature tile (halves): 40 keeps 16-byte alignment and spreads banks.
pub(crate) const PS: usize = BF + 8;
pub(crate) const PLANES: u32 = 8;
pub(crate) const PLANE: u32 = 32;

/// Builds the feature tile of step `step` (features `32·step..`) into `sphi[buf]`: unit
/// `(row, group)` forms `c_row q_x · q[16m .. 16m+16]` for its row and group, rounds it to
/// f16 and adds `φ·z/γ` to its running denominator.
#[cube]
#[allow(clippy::too_many_arguments)]
fn build_features<F: Float>(
    sq: &SharedMemory<F>,
    sfac: &SharedMemory<f32>,
    sphi: &mut SharedMemory<f16>,
    sums: &Array<f32>,
    zbase: usize,
    step: u32,
    groups: u32,
    inv_gamma: f32,
    dsum: &mut f32,
    buf: usize,
    #[comptime] ds: usize,
) {
    let row = UNIT_POS as usize / 2;
    let kk = UNIT_POS as usize % 2;
    let g = step * 2 + kk as u32;
    let dst = buf * BQ * PS + row * PS + kk * 16;
    if g < groups {
        let pair = feature_pair(g * 16, 16u32);
        let x = (pair >> 16) as usize;
        let inner = (pair & 0xffff) as usize;
        let a = f32::cast_from(sq[row * ds + x]) * sfac[row];
        let zb = zbase + g as usize * 16;
        let mut acc = 0.0f32;
        #[unroll]
        for r in 0..16usize {
            let phi = f16::cast_from(a * f32::cast_from(sq[row * ds + inner + r]));
            acc += f32::cast_from(phi) * sums[zb + r];
            sphi[dst + r] = phi;
        }
        *dsum += acc * inv_gamma;
    } else {
        #[unroll]
        for r in 0..16usize {
            sphi[dst + r] = f16::cast_from(0.0f32);
        }
    }
}

/// Loads the state rows of step `step` (features `32·step..`) into registers.
#[cube]
fn fetch_state(
    states: &Array<Vector<f16, Const<8>>>,
    regs: &mut Array<Vector<f16, Const<8>>>,
    base: usize,
    step: u32,
    big_d: u32,
    #[comptime] e: usize,
    #[comptime] per_unit: usize,
) {
    let vecs_per_row = comptime!(e / 8);
    #[unroll]
    for i in 0..per_unit {
        let idx = UNIT_POS as usize + i * (PLANES * PLANE) as usize;
        let f = step as usize * BF + idx / vecs_per_row;
        let mut v = Vector::<f16, Const<8>>::new(f16::cast_from(0.0f32));
        if idx < BF * vecs_per_row && f < big_d as usize {
            v = states[(base + f) * vecs_per_row + idx % vecs_per_row];
        }
        regs[i] = v;
    }
}

/// Writes the fetched state rows into `sst[buf]` (row stride `e + 8`).
#[cube]
fn store_state(
    regs: &Array<Vector<f16, Const<8>>>,
    sst: &mut SharedMemory<f16>,
    buf: usize,
    #[comptime] e: usize,
    #[comptime] per_unit: usize,
) {
    let vecs_per_row = comptime!(e / 8);
    let ss = comptime!(e + 8);
    #[unroll]
    for i in 0..per_unit {
        let idx = UNIT_POS as usize + i * (PLANES * PLANE) as usize;
        if idx < BF * vecs_per_row {
            let dst = buf * BF * ss + (idx / vecs_per_row) * ss + (idx % vecs_per_row) * 8;
            let v = regs[i];
            #[unroll]
            for j in 0..8usize {
                sst[dst + j] = v[j];
            }
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn query_state_kernel<F: Float>(
    q: &Array<F>,
    gates: &Array<f32>,
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
    scale: f32,
    #[comptime] cfg: QueryStateTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let ds = comptime!(cfg.head_dim as usize + 8);
    let ss = comptime!(cfg.value_dim as usize + 8);
    let col_tiles = comptime!(cfg.value_dim as usize / 32);
    let threads = comptime!((PLANES * PLANE) as usize);
    let per_unit = comptime!((BF * cfg.value_dim as usize / 8).div_ceil(256));

    let ratio = q_heads / kv_heads;
    let rows_total = ratio * chunk;
    let row0 = CUBE_POS_X * BQ as u32;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let state_base = (((bi * kv_heads + kvh) * n_chunks + u) * big_d) as usize;
    let plane = UNIT_POS_Y as usize;
    let rg = plane % 4;
    let cg = plane / 4;

    let mut sq = SharedMemory::<F>::new(BQ * ds);
    let mut sfac = SharedMemory::<f32>::new(BQ);
    let mut sphi = SharedMemory::<f16>::new(2 * BQ * PS);
    let mut sst = SharedMemory::<f16>::new(2 * BF * ss);
    let mut dpart = SharedMemory::<f32>::new(threads);
    let mut stage = SharedMemory::<f32>::new(threads * 8);

    // the query rows of this tile: row ρ is position ρ / r, head kvh·r + ρ mod r
    let mut idx = UNIT_POS as usize;
    while idx < BQ * d {
        let row = idx / d;
        let rho = row0 + row as u32;
        let pos = rho / ratio;
        let tok = chunk_start + pos;
        let mut val = F::cast_from(0.0f32);
        if rho < rows_total && tok < seq {
            let head = kvh * ratio + rho % ratio;
            val = q[((bi * seq + tok) * q_heads + head) as usize * d + idx % d];
        }
        sq[row * ds + idx % d] = val;
        idx += threads;
    }
    sync_cube();

    // row factor: σ² e^{ā} · γ/(σ|q|)², the f16 features are then ≤ γ e^{ā} in magnitude
    let gamma = f32::sqrt(f32::cast_from(big_d));
    let inv_gamma = 1.0 / gamma;
    if UNIT_POS < BQ as u32 {
        let row = UNIT_POS as usize;
        let mut norm2 = 0.0f32;
        for x in 0..d {
            let qx = f32::cast_from(sq[row * ds + x]);
            norm2 += qx * qx;
        }
        norm2 *= scale * scale;
        let mut fac = scale * scale;
        if norm2 > 0.0 {
            fac *= gamma / norm2;
        }
        if comptime!(cfg.gated) {
            let pos = (row0 + UNIT_POS) / ratio;
            if pos < chunk {
                fac *= f32::exp(gates[gate_base + (chunk_start + pos) as usize]);
            }
        }
        sfac[row] = fac;
    }

    let groups = big_d / 16;
    let steps = (groups + 1) / 2;
    let mut regs = Array::<Vector<f16, Const<8>>>::new(per_unit);
    let mut dsum = 0.0f32;

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..2 * col_tiles {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }

    fetch_state(states, &mut regs, state_base, 0, big_d, e, per_unit);
    sync_cube();
    build_features::<F>(
        &sq, &sfac, &mut sphi, sums, state_base, 0, groups, inv_gamma, &mut dsum, 0, ds,
    );
    store_state(&regs, &mut sst, 0, e, per_unit);
    sync_cube();

    for step in 0..steps {
        let cur = (step % 2) as usize;
        let nxt = 1 - cur;
        let more = step + 1 < steps;
        if more {
            fetch_state(states, &mut regs, state_base, step + 1, big_d, e, per_unit);
        }
        #[unroll]
        for ks in 0..2usize {
            let a0 = cmma::Matrix::<f16>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &sphi.slice(cur * BQ * PS + rg * 32 * PS + ks * 16, 2 * BQ * PS),
                PS as u32,
            );
            let a1 = cmma::Matrix::<f16>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &sphi.slice(cur * BQ * PS + (rg * 32 + 16) * PS + ks * 16, 2 * BQ * PS),
                PS as u32,
            );
            #[unroll]
            for ct in 0..col_tiles {
                let b = cmma::Matrix::<f16>::from_slice(
                    cmma::MatrixIdent::B,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::RowMajor,
                    &sst.slice(
                        cur * BF * ss + ks * 16 * ss + cg * (e / 2) + ct * 16,
                        2 * BF * ss,
                    ),
                    ss as u32,
                );
                let c0 = acc.index(ct);
                cmma::execute::<f16, f16, f32, f32>(&a0, &b, c0, c0);
                let c1 = acc.index(col_tiles + ct);
                cmma::execute::<f16, f16, f32, f32>(&a1, &b, c1, c1);
            }
        }
        if more {
            build_features::<F>(
                &sq,
                &sfac,
                &mut sphi,
                sums,
                state_base,
                step + 1,
                groups,
                inv_gamma,
                &mut dsum,
                nxt,
                ds,
            );
            store_state(&regs, &mut sst, nxt, e, per_unit);
        }
        sync_cube();
    }

    // denominators: the two units of a row
    dpart[UNIT_POS as usize] = dsum;
    sync_cube();
    if UNIT_POS < BQ as u32 {
        let rho = row0 + UNIT_POS;
        let pos = rho / ratio;
        let tok = chunk_start + pos;
        if rho < rows_total && tok < seq {
            let head = kvh * ratio + rho % ratio;
            let at = ((bi * seq + tok) * q_heads + head) as usize;
            den[at] = dpart[2 * UNIT_POS as usize] + dpart[2 * UNIT_POS as usize + 1];
        }
    }

    // numerators: each fragment through this plane's 16×16 staging tile
    let lane = UNIT_POS_X as usize;
    let st = plane * 256;
    #[unroll]
    for half_rows in 0..2usize {
        #[unroll]
        for ct in 0..col_tiles {
            cmma::store(
                &mut stage.slice_mut(st, st + 256),
                acc.index(half_rows * col_tiles + ct),
                16u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_plane();
            #[unroll]
            for m in 0..8usize {
                let i = lane + 32 * m;
                let row = rg * 32 + half_rows * 16 + i / 16;
                let rho = row0 + row as u32;
                let pos = rho / ratio;
                let tok = chunk_start + pos;
                if rho < rows_total && tok < seq {
                    let head = kvh * ratio + rho % ratio;
                    let at = ((bi * seq + tok) * q_heads + head) as usize * e;
                    num[at + cg * (e / 2) + ct * 16 + i % 16] = stage[st + i];
                }
            }
            sync_plane();
        }
    }
}

/// Buffers of a query-state launch (flat, contiguous, row-major).
pub struct QueryStateArgs<R: Runtime> {
    /// `q [b, t, hq, d]`.
    pub q: ArrayArg<R>,
    /// Cumulative log-gates inside each chunk, `f32 [b, h, n·c]`; `None`: no gating.
    pub gates: Option<ArrayArg<R>>,
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
    mut tiles: QueryStateTiles,
    args: QueryStateArgs<R>,
) {
    tiles.gated = args.gates.is_some();
    let dummy = || unsafe { ArrayArg::from_raw_parts(client.empty(4), 1) };
    let ratio = dims.q_heads / dims.kv_heads;
    let count = CubeCount::Static(
        (ratio * dims.chunk).div_ceil(BQ) as u32,
        (dims.n_chunks * dims.kv_heads) as u32,
        dims.batch as u32,
    );
    unsafe {
        query_state_kernel::launch_unchecked::<R>(
            client,
            count,
            CubeDim::new_2d(PLANE, PLANES),
            args.q,
            args.gates.unwrap_or_else(dummy),
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
            dims.scale,
            tiles,
            dtype,
        )
    }
}
