//! The state path of the backward row passes on tensor cores (f16 operands, f32 accumulation),
//! for half-precision inputs; the FMA row kernels ([`chunk_grad`](crate::chunk_grad)) then add
//! only the intra-chunk part.
//!
//! A row `i` (a query of chunk `u`, or a key of chunk `u`) reads a state block `M` (`S_u`, or the
//! gradient `Λ_{u+1}` of the state after the chunk) and its key-sum part `m` (`z_u`, `Λz_{u+1}`):
//! `∂φ(x_i)_f = c_f δ_i (M_f·w_i + m_f ω_i)` with
//! - queries: `x = σq`, `w = dN`, `ω = dL`, `δ = e^{G_i}`, `c = 1`;
//! - keys: `x = k`, `w = v`, `ω = 1`, `δ = e^{A_u − G_j}`, `c` the key-side pair weight (2 for a
//!   pair met once, 1 inside the diagonal block).
//!
//! The feature gradient reaches the coordinates (`∂x_a += g x_b`, `∂x_b += g x_a`), and the
//! gate gets `Σ_f ∂φ_f φ_f`. For keys the same state block also gives `∂v_j += δ_j φ_K(k_j)ᵀ Λ`.
//!
//! A cube of `planes` planes owns `16·planes` rows (the query heads of a GQA group folded into
//! the row dimension, as in [`query_state`](crate::query_state)) and walks the features 32 at a
//! time (two 16-feature groups `(x, 16m..16m + 16)`, see
//! [`feature_pairs`](crate::feature_pairs)), the f16 state block double-buffered in shared
//! memory. Each plane multiplies its 16 rows of `w/α` (f16, `α` the row's largest magnitude,
//! kept in registers as `e/16` fragments) by the block's transpose, stages the `16 × 32` product
//! in shared memory (column-major, so the 32 lanes' reads hit 32 banks) and scatters it: lane
//! `(ρ, h)` takes the 8 features `2r + h` of each group. Inner-coordinate gradients accumulate
//! in registers while the block `m` lasts; every coordinate has one owning lane
//! (`c mod 2 = h`), so no two lanes ever write the same shared word and the scatter needs no
//! barrier.

use cubecl::prelude::*;
use half::f16;

use crate::Buffer;
use crate::block_mma::{A_STRIDE, PLANE, SKIP_ROW};
use crate::chunk_grad::GradDims;
use crate::chunk_grad_state_manual::chunk_grad_state_manual_kernel;
use crate::chunk_grad_state_outer::chunk_grad_state_outer_kernel;
use crate::config::{StateGradProducts, StateGradTiles};
use crate::tile_load::{fetch_rows, row_registers, rows_present, store_rows};

/// Features per step (two 16-feature groups).
const FEATS: usize = 32;
/// Row stride of a plane's staged `16 × 32` product (floats).
const STAGE_STRIDE: usize = FEATS;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_grad_state_mma_kernel<X: Float, W: Float>(
    x: &Array<X>,
    w: &Array<W>,
    omega: &Array<f32>,
    gates: &Array<f32>,
    states: &Array<Vector<f16, Const<8>>>,
    sums: &Array<f32>,
    dx: &mut Array<f32>,
    dg: &mut Array<f32>,
    dv: &mut Array<f32>,
    seq: u32,
    heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    x_scale: f32,
    out_scale: f32,
    #[comptime] cfg: StateGradTiles,
    #[define(X, W)] _dtypes: [StorageType; 2],
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let planes = comptime!(cfg.planes as usize);
    let rows = comptime!(16 * cfg.planes as usize);
    let units = comptime!(32 * cfg.planes as usize);
    let xs = comptime!(cfg.head_dim as usize + 2);
    let ws = comptime!(cfg.value_dim as usize + 8);
    let ss = comptime!(cfg.value_dim as usize + 8);
    let k_steps = comptime!(cfg.value_dim as usize / 16);

    let ratio = heads / kv_heads;
    let row0 = CUBE_POS_X * rows as u32;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let state_base = (((bi * kv_heads + kvh) * n_chunks + u) * big_d) as usize;

    let mut row_index = SharedMemory::<u32>::new(rows);
    let mut sx = SharedMemory::<f16>::new(rows * xs);
    let mut sw = SharedMemory::<f16>::new(rows * ws);
    let mut coef_state = SharedMemory::<f32>::new(rows);
    let mut coef_sum = SharedMemory::<f32>::new(rows);
    let mut decay_of = SharedMemory::<f32>::new(rows);
    let mut part = SharedMemory::<f32>::new(units);
    // rows padded by one float: the lanes of a plane add to 16 different rows at once
    let dxs_s = comptime!(cfg.head_dim as usize + 1);
    let mut dxs = SharedMemory::<f32>::new(rows * dxs_s);
    let mut sst = SharedMemory::<f16>::new(2 * FEATS * ss);
    let mut zb = SharedMemory::<f32>::new(2 * FEATS);
    let mut stage = SharedMemory::<f32>::new(planes * 16 * STAGE_STRIDE);
    let mut sphi = SharedMemory::<f16>::new(rows * A_STRIDE);

    // row ρ of the tile is position ρ / r of head kvh·r + ρ mod r
    if UNIT_POS < rows as u32 {
        let rho = row0 + UNIT_POS;
        let pos = rho / ratio;
        let at = (bi * seq + chunk_start + pos) * heads + kvh * ratio + rho % ratio;
        row_index[UNIT_POS as usize] = select(pos < chunk && chunk_start + pos < seq, at, SKIP_ROW);
    }
    let mut idx = UNIT_POS as usize;
    while idx < rows * dxs_s {
        dxs[idx] = 0.0;
        idx += units;
    }
    sync_cube();

    // units 2ρ, 2ρ + 1 load the two halves of row ρ: x (scaled) as f16, w / α as f16
    let lrow = UNIT_POS as usize / 2;
    let half_sel = UNIT_POS as usize % 2;
    let at = row_index[lrow];
    let mut wmax = 0.0f32;
    if at != SKIP_ROW {
        for c in 0..e / 2 {
            let col = half_sel * (e / 2) + c;
            wmax = f32::max(wmax, f32::abs(f32::cast_from(w[at as usize * e + col])));
        }
    }
    part[UNIT_POS as usize] = wmax;
    sync_cube();
    let alpha_raw = f32::max(part[2 * lrow], part[2 * lrow + 1]);
    let alpha = select(alpha_raw > 0.0, alpha_raw, 1.0f32);
    let inv_alpha = 1.0 / alpha;
    for c in 0..e / 2 {
        let col = half_sel * (e / 2) + c;
        let mut val = 0.0f32;
        if at != SKIP_ROW {
            val = f32::cast_from(w[at as usize * e + col]) * inv_alpha;
        }
        sw[lrow * ws + col] = f16::cast_from(val);
    }
    for c in 0..d / 2 {
        let col = half_sel * (d / 2) + c;
        let mut val = 0.0f32;
        if at != SKIP_ROW {
            val = f32::cast_from(x[at as usize * d + col]) * x_scale;
        }
        sx[lrow * xs + col] = f16::cast_from(val);
    }
    if half_sel == 0 {
        let pos = (row0 + lrow as u32) / ratio;
        let mut decay = 1.0f32;
        if comptime!(cfg.gated) {
            if at != SKIP_ROW {
                let g = gates[gate_base + (chunk_start + pos) as usize];
                if comptime!(cfg.keys) {
                    decay = f32::exp(gates[gate_base + (chunk_start + chunk - 1) as usize] - g);
                } else {
                    decay = f32::exp(g);
                }
            }
        }
        let mut om = 0.0f32;
        if at != SKIP_ROW {
            if comptime!(cfg.keys) {
                om = 1.0;
            } else {
                om = omega[at as usize];
            }
        }
        let gamma = f32::sqrt(f32::cast_from(big_d));
        coef_state[lrow] = decay * alpha * gamma;
        coef_sum[lrow] = decay * om;
        decay_of[lrow] = decay;
    }
    sync_cube();

    // this plane's rows of w/α as A fragments, kept for the whole walk
    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let mut a_frags = Sequence::<cmma::Matrix<f16>>::new();
    #[unroll]
    for ks in 0..k_steps {
        a_frags.push(cmma::Matrix::<f16>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &sw.slice(plane * 16 * ws + ks * 16, sw.len()),
            ws as u32,
        ));
    }
    let mut dv_acc = Sequence::<cmma::Matrix<f32>>::new();
    if comptime!(cfg.keys) {
        #[unroll]
        for _ in 0..k_steps {
            dv_acc.push(cmma::Matrix::<f32>::from_value(
                cmma::MatrixIdent::Accumulator,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::Undefined,
                0.0,
            ));
        }
    }

    // lane (ρ, h): row 16·plane + ρ, features 2r + h (r < 8) of each group
    let rl = lane % 16;
    let h = lane / 16;
    let row = plane * 16 + rl;
    let cs = coef_state[row];
    let cz = coef_sum[row];
    let mut dacc = Array::<f32>::new(8usize);
    let mut xin = Array::<f32>::new(8usize);
    #[unroll]
    for r in 0..8usize {
        dacc[r] = 0.0;
        xin[r] = 0.0;
    }
    let mut cur_m = 0u32;
    let mut have_m = false;
    // the walk's next group `(x, 16m..16m + 16)`, advanced in step with `g` (see
    // [`feature_pairs`](crate::feature_pairs): block `m` holds `x < 16(m + 1)`)
    let mut walk_x: u32 = 0u32;
    let mut walk_m: u32 = 0u32;
    let mut gsum = 0.0f32;
    let st = plane * 16 * STAGE_STRIDE;

    let groups = big_d / 16;
    let steps = (groups + 1) / 2;
    let mut regs = row_registers::<f16>(FEATS, e, units);
    for step in 0..steps + 1 {
        let producing = step < steps;
        if producing {
            let first = step * FEATS as u32;
            fetch_rows::<f16>(
                states,
                &mut regs,
                (state_base + first as usize) * (e / 8),
                e / 8,
                rows_present(first, big_d),
                FEATS,
                e,
                units,
            );
            if UNIT_POS < FEATS as u32 {
                let f = first + UNIT_POS;
                let mut z = 0.0f32;
                if f < big_d {
                    z = sums[state_base + f as usize];
                }
                zb[(step % 2) as usize * FEATS + UNIT_POS as usize] = z;
            }
        }
        if step > 0 {
            let prev = ((step - 1) % 2) as usize;
            // this plane's 16 rows × 32 features of (w/α)·(M/γ)ᵀ
            #[unroll]
            for ct in 0..2usize {
                let acc = cmma::Matrix::<f32>::from_value(
                    cmma::MatrixIdent::Accumulator,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::Undefined,
                    0.0,
                );
                #[unroll]
                for ks in 0..k_steps {
                    let bm = cmma::Matrix::<f16>::from_slice(
                        cmma::MatrixIdent::B,
                        16usize,
                        16usize,
                        16usize,
                        cmma::MatrixLayout::ColMajor,
                        &sst.slice(prev * FEATS * ss + ct * 16 * ss + ks * 16, sst.len()),
                        ss as u32,
                    );
                    cmma::execute::<f16, f16, f32, f32>(a_frags.index(ks), &bm, &acc, &acc);
                }
                // column-major, 16 floats per feature: lane (ρ, h) reads feature 2r + h of
                // row ρ at bank 16h + ρ, so a plane's 32 reads hit 32 banks
                cmma::store(
                    &mut stage.slice_mut(st + ct * 256, st + 16 * STAGE_STRIDE),
                    &acc,
                    16u32,
                    cmma::MatrixLayout::ColMajor,
                );
            }
            sync_plane();
            #[unroll]
            for gi in 0..2usize {
                let g = (step - 1) * 2 + gi as u32;
                let mut wgt = 0.0f32;
                let mut xo = 0.0f32;
                let mut x_at = 0usize;
                if g < groups {
                    x_at = walk_x as usize;
                    let m = walk_m;
                    let inner0 = (16u32 * m) as usize;
                    walk_x += 1u32;
                    if walk_x == 16u32 * (walk_m + 1u32) {
                        walk_m += 1u32;
                        walk_x = 0u32;
                    }
                    if !have_m || m != cur_m {
                        if have_m {
                            #[unroll]
                            for r in 0..8usize {
                                dxs[row * dxs_s + cur_m as usize * 16 + 2 * r + h] += dacc[r];
                                dacc[r] = 0.0;
                            }
                        }
                        #[unroll]
                        for r in 0..8usize {
                            xin[r] = f32::cast_from(sx[row * xs + inner0 + 2 * r + h]);
                        }
                        cur_m = m;
                        have_m = true;
                    }
                    xo = f32::cast_from(sx[row * xs + x_at]);
                    wgt = 1.0;
                    if comptime!(cfg.keys) {
                        if x_at < inner0 {
                            wgt = 2.0;
                        }
                    }
                }
                let mut psum = 0.0f32;
                #[unroll]
                for r in 0..8usize {
                    let fl = gi * 16 + 2 * r + h;
                    let gval = wgt
                        * (cs * stage[st + gi * 256 + (2 * r + h) * 16 + rl]
                            + cz * zb[prev * FEATS + fl]);
                    dacc[r] += gval * xo;
                    psum += gval * xin[r];
                    if comptime!(cfg.keys) {
                        // the feature itself, for ∂v (the decay is applied at the end, in f32)
                        sphi[row * A_STRIDE + fl] = f16::cast_from(wgt * xo * xin[r]);
                    }
                }
                let total = psum + plane_shuffle_xor(psum, 16u32);
                if g < groups && x_at % 2 == h {
                    dxs[row * dxs_s + x_at] += total;
                    gsum += total * xo;
                }
            }
            if comptime!(cfg.keys) {
                sync_plane();
                // ∂v += φ_K(k) · (Λ/γ) for this plane's rows
                #[unroll]
                for ks in 0..2usize {
                    let am = cmma::Matrix::<f16>::from_slice(
                        cmma::MatrixIdent::A,
                        16usize,
                        16usize,
                        16usize,
                        cmma::MatrixLayout::RowMajor,
                        &sphi.slice(plane * 16 * A_STRIDE + ks * 16, sphi.len()),
                        A_STRIDE as u32,
                    );
                    #[unroll]
                    for ct in 0..k_steps {
                        let bm = cmma::Matrix::<f16>::from_slice(
                            cmma::MatrixIdent::B,
                            16usize,
                            16usize,
                            16usize,
                            cmma::MatrixLayout::RowMajor,
                            &sst.slice(prev * FEATS * ss + ks * 16 * ss + ct * 16, sst.len()),
                            ss as u32,
                        );
                        let c = dv_acc.index(ct);
                        cmma::execute::<f16, f16, f32, f32>(&am, &bm, c, c);
                    }
                }
            }
        }
        if producing {
            let buf = (step % 2) as usize;
            store_rows::<f16, f16>(&regs, &mut sst, buf * FEATS * ss, FEATS, e, ss, units);
        }
        sync_cube();
    }
    if have_m {
        #[unroll]
        for r in 0..8usize {
            dxs[row * dxs_s + cur_m as usize * 16 + 2 * r + h] += dacc[r];
        }
    }

    // every coordinate of the row is owned by one lane: `c mod 2 = h`
    let at = row_index[row];
    if at != SKIP_ROW {
        for j in 0..d / 16 {
            #[unroll]
            for r in 0..8usize {
                let c = j * 16 + 2 * r + h;
                let o = at as usize * d + c;
                dx[o] += out_scale * dxs[row * dxs_s + c];
            }
        }
    }
    let gtotal = gsum + plane_shuffle_xor(gsum, 16u32);
    if at != SKIP_ROW && h == 0 {
        dg[at as usize] += gtotal;
    }

    if comptime!(cfg.keys) {
        // ∂v: δ_j γ times the accumulated product, through this plane's stage
        let gamma = f32::sqrt(f32::cast_from(big_d));
        #[unroll]
        for ct in 0..k_steps {
            sync_plane();
            cmma::store(
                &mut stage.slice_mut(st, st + 16 * STAGE_STRIDE),
                dv_acc.index(ct),
                STAGE_STRIDE as u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_plane();
            #[unroll]
            for m in 0..8usize {
                let i = lane + PLANE as usize * m;
                let r = i / 16;
                let col = i % 16;
                let rr = plane * 16 + r;
                let at_r = row_index[rr];
                if at_r != SKIP_ROW {
                    dv[at_r as usize * e + ct * 16 + col] +=
                        decay_of[rr] * gamma * stage[st + r * STAGE_STRIDE + col];
                }
            }
        }
    }
}

/// Buffers of [`launch_state_grad_rows`] (flat, contiguous, row-major; `rows` stands for
/// `[b, t, heads]` with `heads = hq` for queries and `h` for keys).
pub struct StateGradRowArgs {
    /// The rows' coordinates before scaling (`q` or `k`), `[rows, d]` of `x_dtype`.
    pub x: Buffer,
    /// Element type of `x` (f32, f16 or bf16).
    pub x_dtype: StorageType,
    /// `dN` or `v`, `[rows, e]` of `w_dtype`.
    pub w: Buffer,
    /// Element type of `w` (f32, f16 or bf16).
    pub w_dtype: StorageType,
    /// `dL`, `f32 [rows]` (queries only).
    pub omega: Option<Buffer>,
    /// Cumulative log-gates inside each chunk, `f32 [b, h, n·c]`; `None`: no gating.
    pub gates: Option<Buffer>,
    /// The state blocks divided by `γ = √D`, `f16 [b, h, n, D, e]` (`S_u/γ` for queries,
    /// `Λ_{u+1}/γ` for keys).
    pub states: Buffer,
    /// Their key-sum parts, `f32 [b, h, n, D]` (not divided).
    pub sums: Buffer,
    /// Coordinate gradients to add to, `f32 [rows, d]`.
    pub dx: Buffer,
    /// Gate terms to add to, `f32 [rows]`.
    pub dg: Buffer,
    /// `∂v` to add to, `f32 [b, t, h, e]` (keys only).
    pub dv: Option<Buffer>,
}

/// Adds the state path's gradients of a chunked backward pass to `dx`, `dg` (and `dv` for
/// keys): `keys` picks the side; `x_scale` multiplies `x` (`σ` for queries) and `out_scale` the
/// coordinate gradients (`σ` for queries). `tiles.products` picks the kernel: this module's
/// staged products, the register-contracted ones (`chunk_grad_state_manual`) or the outer
/// products (`chunk_grad_state_outer`): same arguments, same results.
///
/// # Safety
/// The buffers must have the sizes documented on [`StateGradRowArgs`] for `dims`, and `tiles`
/// must come from [`StateGradTiles::plan`] for this client and head dims.
pub unsafe fn launch_state_grad_rows<R: Runtime>(
    client: &ComputeClient<R>,
    dims: GradDims,
    mut tiles: StateGradTiles,
    keys: bool,
    x_scale: f32,
    out_scale: f32,
    args: StateGradRowArgs,
) {
    tiles.gated = args.gates.is_some();
    tiles.keys = keys;
    let dummy = Buffer::unused(client);
    let heads = if keys { dims.kv_heads } else { dims.q_heads };
    let ratio = heads / dims.kv_heads;
    let rows = 16 * tiles.planes as usize;
    let count = CubeCount::Static(
        (ratio * dims.chunk).div_ceil(rows) as u32,
        (dims.n_chunks * dims.kv_heads) as u32,
        dims.batch as u32,
    );
    let omega = args.omega.unwrap_or_else(|| dummy.clone());
    let gates = args.gates.unwrap_or_else(|| dummy.clone());
    let dv = args.dv.unwrap_or_else(|| dummy.clone());
    let dim = CubeDim::new_2d(PLANE, tiles.cube_planes());
    // the two kernels take the same arguments: one launch written once for either
    macro_rules! launch {
        ($kernel:ident) => {
            $kernel::launch_unchecked::<R>(
                client,
                count,
                dim,
                args.x.arg(),
                args.w.arg(),
                omega.arg(),
                gates.arg(),
                args.states.arg(),
                args.sums.arg(),
                args.dx.arg(),
                args.dg.arg(),
                dv.arg(),
                dims.seq as u32,
                heads as u32,
                dims.kv_heads as u32,
                dims.chunk as u32,
                dims.n_chunks as u32,
                dims.expanded_dim as u32,
                x_scale,
                out_scale,
                tiles,
                [args.x_dtype, args.w_dtype],
            )
        };
    }
    // SAFETY: the buffers hold what the caller promised.
    unsafe {
        match tiles.products {
            StateGradProducts::Outer => launch!(chunk_grad_state_outer_kernel),
            StateGradProducts::Registers => launch!(chunk_grad_state_manual_kernel),
            StateGradProducts::Staged => launch!(chunk_grad_state_mma_kernel),
        }
    }
}
