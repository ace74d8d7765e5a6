//! The state path of the backward row passes with manually managed MMA registers (CUDA's
//! `mma.sync.m16n8k16`, f16 operands, f32 accumulation): the same products as
//! [`chunk_grad_state_mma`](crate::chunk_grad_state_mma), but the feature gradients are
//! contracted with the coordinates where the accumulators sit, in registers, instead of
//! leaving through shared memory.
//!
//! A plane owns 16 rows (queries of a GQA group folded into the row dimension, or keys) and
//! multiplies them, 8 features at a time, by the f16 state block double-buffered in shared
//! memory. In CUDA's accumulator layout lane `ℓ` holds rows `g = ℓ/4` and `g + 8` at the
//! features `2(ℓ mod 4)` and `2(ℓ mod 4) + 1` of each 8-feature tile, so for a 16-feature
//! group `(x, 16m..16m + 16)` a lane holds 4 inner coordinates of two rows:
//! - `∂x_inner += g x_x` accumulates in 8 registers while the block `m` lasts, then goes to the
//!   rows' shared accumulators (every `(row, inner)` pair belongs to one lane);
//! - `∂x_x += Σ g x_inner` is summed over the lane's features, then over the 4 lanes of the
//!   row (two shuffles), and written by the lane that owns `x` as an inner coordinate
//!   (`(x mod 8)/2 = ℓ mod 4`): no two lanes ever write the same shared word, no barrier.
//!
//! For keys the feature values `w φ_K` are products of registers the lane holds already, in
//! the A operand's layout, so `∂v += φ_K Λ` needs no staging either.
//!
//! The register layouts come from [`MmaDefinition::position_of_nth`]; the ownership rules
//! above hold for CUDA's layout, which [`StateGradTiles::plan`] requires before it picks this
//! kernel.

use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::*;
use half::f16;

use crate::block_mma::SKIP_ROW;
use crate::config::StateGradTiles;
use crate::tile_load::{fetch_rows, row_registers, rows_present, store_rows};

/// Features per step (two 16-feature groups, four 8-feature MMA tiles).
const FEATS: usize = 32;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_grad_state_manual_kernel<X: Float, W: Float>(
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
    let rows = comptime!(16 * cfg.planes as usize);
    let units = comptime!(32 * cfg.planes as usize);
    let xs = comptime!(cfg.head_dim as usize + 2);
    let ws = comptime!(cfg.value_dim as usize + 8);
    let ss = comptime!(cfg.value_dim as usize + 8);
    let dxs_s = comptime!(cfg.head_dim as usize + 1);
    let k_steps = comptime!(cfg.value_dim as usize / 16);
    let v_tiles = comptime!(cfg.value_dim as usize / 8);

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
    let mut dxs = SharedMemory::<f32>::new(rows * dxs_s);
    let mut sst = SharedMemory::<f16>::new(2 * FEATS * ss);
    let mut zb = SharedMemory::<f32>::new(2 * FEATS);

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

    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X;
    let def = MmaDefinition::<f16, f16, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NB) = def.vector_size(MatrixIdent::B);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
    let a_len_raw = def.elems_per_lane(MatrixIdent::A);
    let b_len_raw = def.elems_per_lane(MatrixIdent::B);
    let c_len_raw = def.elems_per_lane(MatrixIdent::Accumulator);
    let a_vec_raw = def.vector_size(MatrixIdent::A);
    let b_vec_raw = def.vector_size(MatrixIdent::B);
    let c_vec_raw = def.vector_size(MatrixIdent::Accumulator);
    let c_len = comptime!(c_len_raw);
    let a_vec = comptime!(a_vec_raw);
    let b_vec = comptime!(b_vec_raw);
    let c_vec = comptime!(c_vec_raw);
    let a_regs = comptime!(a_len_raw / a_vec_raw);
    let b_regs = comptime!(b_len_raw / b_vec_raw);
    let c_regs = comptime!(c_len_raw / c_vec_raw);
    let c_len2 = comptime!(2 * c_len_raw);
    let c_half = comptime!(c_len_raw / 2);

    // this plane's 16 rows of w/α as A fragments, kept for the whole walk
    let mut a_frags = Sequence::<Array<Vector<f16, NA>>>::new();
    #[unroll]
    for ks in 0..k_steps {
        let mut frag = Array::<Vector<f16, NA>>::new(a_regs);
        #[unroll]
        for i in 0..a_regs {
            let mut v = Vector::empty();
            #[unroll]
            for k in 0..a_vec {
                let (r, c) =
                    def.position_of_nth(lane, comptime!((i * a_vec + k) as u32), MatrixIdent::A);
                v[k] = sw[(plane * 16 + r as usize) * ws + ks * 16 + c as usize];
            }
            frag[i] = v;
        }
        a_frags.push(frag);
    }

    // the accumulator element j of this lane: row (of the plane) and column (of the tile)
    let mut acc_row = Array::<u32>::new(c_len);
    let mut acc_col = Array::<u32>::new(c_len);
    #[unroll]
    for j in 0..c_len {
        let (r, c) = def.position_of_nth(lane, j as u32, MatrixIdent::Accumulator);
        acc_row[j] = r;
        acc_col[j] = c;
    }
    let mut cs = Array::<f32>::new(c_len);
    let mut cz = Array::<f32>::new(c_len);
    #[unroll]
    for j in 0..c_len {
        cs[j] = coef_state[plane * 16 + acc_row[j] as usize];
        cz[j] = coef_sum[plane * 16 + acc_row[j] as usize];
    }
    // the row pair of this lane (`g`, `g + 8` in CUDA's layout): elements 0 and c_len - 1
    let row_lo = plane * 16 + acc_row[0] as usize;
    let row_hi = plane * 16 + acc_row[comptime!(c_len_raw - 1)] as usize;
    // owner of coordinate `c` among the 4 lanes of a row: `(c mod 8) / 2`
    let quad = lane % 4;

    // ∂v accumulators (keys): `e/8` tiles of 16 rows × 8 value columns
    let mut dv_acc = Sequence::<Array<Vector<f32, NC>>>::new();
    if comptime!(cfg.keys) {
        #[unroll]
        for _ in 0..v_tiles {
            let mut acc = Array::<Vector<f32, NC>>::new(c_regs);
            #[unroll]
            for i in 0..c_regs {
                acc[i] = Vector::new(0.0f32);
            }
            dv_acc.push(acc);
        }
    }

    // inner-coordinate gradients of the current block, per accumulator element and tile half
    let mut dacc = Array::<f32>::new(c_len2);
    let mut xin = Array::<f32>::new(c_len2);
    #[unroll]
    for j in 0..c_len2 {
        dacc[j] = 0.0;
        xin[j] = 0.0;
    }
    let mut cur_m = 0u32;
    let mut have_m = false;
    let mut gsum_lo = 0.0f32;
    let mut gsum_hi = 0.0f32;
    // the walk's next group `(x, 16m..16m + 16)` (block `m` holds `x < 16(m + 1)`)
    let mut walk_x: u32 = 0u32;
    let mut walk_m: u32 = 0u32;

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
            let sbase = prev * FEATS * ss;
            #[unroll]
            for gi in 0..2usize {
                let g = (step - 1) * 2 + gi as u32;
                let mut wgt = 0.0f32;
                let mut x_at = 0usize;
                if g < groups {
                    x_at = walk_x as usize;
                    let m = walk_m;
                    walk_x += 1u32;
                    if walk_x == 16u32 * (walk_m + 1u32) {
                        walk_m += 1u32;
                        walk_x = 0u32;
                    }
                    if !have_m || m != cur_m {
                        if have_m {
                            flush_block(
                                &mut dxs, &dacc, &acc_row, &acc_col, plane, cur_m, dxs_s, c_len,
                            );
                            #[unroll]
                            for j in 0..c_len2 {
                                dacc[j] = 0.0;
                            }
                        }
                        #[unroll]
                        for hf in 0..2usize {
                            #[unroll]
                            for j in 0..c_len {
                                let r = plane * 16 + acc_row[j] as usize;
                                let c = (16 * m) as usize + 8 * hf + acc_col[j] as usize;
                                xin[comptime!(hf * c_len + j)] = f32::cast_from(sx[r * xs + c]);
                            }
                        }
                        cur_m = m;
                        have_m = true;
                    }
                    wgt = 1.0;
                    if comptime!(cfg.keys) {
                        if x_at < (16 * m) as usize {
                            wgt = 2.0;
                        }
                    }
                }
                let xo_lo = f32::cast_from(sx[row_lo * xs + x_at]);
                let xo_hi = f32::cast_from(sx[row_hi * xs + x_at]);
                let mut psum_lo = 0.0f32;
                let mut psum_hi = 0.0f32;
                // the two 8-feature tiles of this group
                #[unroll]
                for hf in 0..2usize {
                    let f0 = gi * 16 + hf * 8;
                    let mut acc = Array::<Vector<f32, NC>>::new(c_regs);
                    #[unroll]
                    for i in 0..c_regs {
                        acc[i] = Vector::new(0.0f32);
                    }
                    #[unroll]
                    for ks in 0..k_steps {
                        // B[k][n] = (M/γ)[f0 + n][16·ks + k]
                        let mut b = Array::<Vector<f16, NB>>::new(b_regs);
                        #[unroll]
                        for i in 0..b_regs {
                            let mut v = Vector::empty();
                            #[unroll]
                            for k in 0..b_vec {
                                let (kr, nc) = def.position_of_nth(
                                    lane,
                                    comptime!((i * b_vec + k) as u32),
                                    MatrixIdent::B,
                                );
                                v[k] = sst[sbase + (f0 + nc as usize) * ss + ks * 16 + kr as usize];
                            }
                            b[i] = v;
                        }
                        def.execute_inplace(a_frags.index(ks), &b, &mut acc);
                    }
                    #[unroll]
                    for j in 0..c_len {
                        let val = acc[comptime!(j / c_vec)][comptime!(j % c_vec)];
                        let f = f0 + acc_col[j] as usize;
                        let gval = wgt * (cs[j] * val + cz[j] * zb[prev * FEATS + f]);
                        let lo = comptime!(j < c_half);
                        if lo {
                            dacc[comptime!(hf * c_len + j)] += gval * xo_lo;
                            psum_lo += gval * xin[comptime!(hf * c_len + j)];
                        } else {
                            dacc[comptime!(hf * c_len + j)] += gval * xo_hi;
                            psum_hi += gval * xin[comptime!(hf * c_len + j)];
                        }
                    }
                }
                // the row sums over the 4 lanes of each row; the owner of x writes them
                psum_lo += plane_shuffle_xor(psum_lo, 1u32);
                psum_lo += plane_shuffle_xor(psum_lo, 2u32);
                psum_hi += plane_shuffle_xor(psum_hi, 1u32);
                psum_hi += plane_shuffle_xor(psum_hi, 2u32);
                if g < groups && ((x_at % 8) / 2) as u32 == quad {
                    dxs[row_lo * dxs_s + x_at] += psum_lo;
                    dxs[row_hi * dxs_s + x_at] += psum_hi;
                    gsum_lo += psum_lo * xo_lo;
                    gsum_hi += psum_hi * xo_hi;
                }
                if comptime!(cfg.keys) {
                    // ∂v += (w φ_K)·(Λ/γ): the A operand is 16 rows × the group's 16 features
                    let mut phi = Array::<Vector<f16, NA>>::new(a_regs);
                    #[unroll]
                    for i in 0..a_regs {
                        let mut v = Vector::empty();
                        #[unroll]
                        for k in 0..a_vec {
                            let (r, c) = def.position_of_nth(
                                lane,
                                comptime!((i * a_vec + k) as u32),
                                MatrixIdent::A,
                            );
                            let rr = plane * 16 + r as usize;
                            let xo = f32::cast_from(sx[rr * xs + x_at]);
                            let xi =
                                f32::cast_from(sx[rr * xs + (16 * cur_m) as usize + c as usize]);
                            v[k] = f16::cast_from(wgt * xo * xi);
                        }
                        phi[i] = v;
                    }
                    #[unroll]
                    for ct in 0..v_tiles {
                        let mut b = Array::<Vector<f16, NB>>::new(b_regs);
                        #[unroll]
                        for i in 0..b_regs {
                            let mut v = Vector::empty();
                            #[unroll]
                            for k in 0..b_vec {
                                let (kr, nc) = def.position_of_nth(
                                    lane,
                                    comptime!((i * b_vec + k) as u32),
                                    MatrixIdent::B,
                                );
                                v[k] = sst
                                    [sbase + (gi * 16 + kr as usize) * ss + ct * 8 + nc as usize];
                            }
                            b[i] = v;
                        }
                        def.execute_inplace(&phi, &b, dv_acc.index_mut(ct));
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
        flush_block(
            &mut dxs, &dacc, &acc_row, &acc_col, plane, cur_m, dxs_s, c_len,
        );
    }
    sync_plane();

    // every coordinate of a row belongs to one lane of its four: `(c mod 8)/2 = ℓ mod 4`
    add_row_grads(
        dx,
        &dxs,
        row_index[row_lo],
        row_lo,
        quad,
        out_scale,
        d,
        dxs_s,
    );
    add_row_grads(
        dx,
        &dxs,
        row_index[row_hi],
        row_hi,
        quad,
        out_scale,
        d,
        dxs_s,
    );
    gsum_lo += plane_shuffle_xor(gsum_lo, 1u32);
    gsum_lo += plane_shuffle_xor(gsum_lo, 2u32);
    gsum_hi += plane_shuffle_xor(gsum_hi, 1u32);
    gsum_hi += plane_shuffle_xor(gsum_hi, 2u32);
    if quad == 0 {
        let at_lo = row_index[row_lo];
        if at_lo != SKIP_ROW {
            dg[at_lo as usize] += gsum_lo;
        }
        let at_hi = row_index[row_hi];
        if at_hi != SKIP_ROW {
            dg[at_hi as usize] += gsum_hi;
        }
    }

    if comptime!(cfg.keys) {
        // ∂v: δ_j γ times the accumulated product, straight from the registers
        let gamma = f32::sqrt(f32::cast_from(big_d));
        #[unroll]
        for ct in 0..v_tiles {
            let acc = dv_acc.index(ct);
            #[unroll]
            for j in 0..c_len {
                let rr = plane * 16 + acc_row[j] as usize;
                let at_r = row_index[rr];
                if at_r != SKIP_ROW {
                    dv[at_r as usize * e + ct * 8 + acc_col[j] as usize] +=
                        decay_of[rr] * gamma * acc[comptime!(j / c_vec)][comptime!(j % c_vec)];
                }
            }
        }
    }
}

/// Adds a block's inner-coordinate gradients (`dacc`, per accumulator element and tile half)
/// to the rows' shared accumulators: each `(row, coordinate)` belongs to one lane.
#[cube]
#[allow(clippy::too_many_arguments)]
fn flush_block(
    dxs: &mut SharedMemory<f32>,
    dacc: &Array<f32>,
    acc_row: &Array<u32>,
    acc_col: &Array<u32>,
    plane: usize,
    m: u32,
    #[comptime] dxs_s: usize,
    #[comptime] c_len: usize,
) {
    #[unroll]
    for hf in 0..2usize {
        #[unroll]
        for j in 0..c_len {
            let r = plane * 16 + acc_row[j] as usize;
            let c = (16 * m) as usize + 8 * hf + acc_col[j] as usize;
            dxs[r * dxs_s + c] += dacc[comptime!(hf * c_len + j)];
        }
    }
}

/// Adds this lane's coordinates (`8j + 2·quad`, `+ 1`) of a row's shared accumulator, scaled,
/// to `dx` at the row's position `at`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn add_row_grads(
    dx: &mut Array<f32>,
    dxs: &SharedMemory<f32>,
    at: u32,
    row: usize,
    quad: u32,
    out_scale: f32,
    #[comptime] d: usize,
    #[comptime] dxs_s: usize,
) {
    if at != SKIP_ROW {
        for j in 0..d / 8 {
            #[unroll]
            for k in 0..2usize {
                let c = j * 8 + 2 * quad as usize + k;
                dx[at as usize * d + c] += out_scale * dxs[row * dxs_s + c];
            }
        }
    }
}
