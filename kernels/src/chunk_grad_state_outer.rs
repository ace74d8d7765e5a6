//! The state path of the backward row passes as products of outer products (CUDA's manually
//! managed `mma.sync.m16n8k16`, f16 operands, f32 accumulation): every multiply-add runs on
//! the tensor cores, none per feature on the FMA units.
//!
//! With `U` the state block written out as a symmetric `d × d × e` tensor
//! (`U[a][b] = M_f` for the feature `f` of the pair `{a, b}`), the row gradients are
//!
//! - `∂x_a = c·δ·Σ_b x_b (Σ_c w_c U[a][b][c] + ω Z[a][b])`: one product of the row's outer
//!   product `x ⊗ w` (`d·e` wide, built in the A operand's registers by one half-precision
//!   multiply per register) with `U` laid out `[(b, c), a]`, and one of `x` with the key-sum
//!   part `Z`; `c = 2` for keys, and for queries `c = 1` with the pairs inside a diagonal
//!   block doubled (a query's feature weighs 1 where a key's weighs 2): in `Z` when it is
//!   staged, in the A operand for the columns of `b`'s own block in the walk;
//! - for keys, `∂v_c = δ·Σ_{(x, y) ∈ F} w_f x_x x_y M_f[c]`: per `y`, the row's `x` (scaled by
//!   `x_y` and the key weight) times the rows `x < 16(m_y + 1)` of the same staged slice;
//! - the gate term `Σ_f g_f φ_f = ½ Σ_a x_a ∂x_a` (φ is homogeneous of degree 2).
//!
//! `δ` is the row's decay and `w` is `dN` (queries) or `v` (keys). A cube stages the slices
//! `U[·][b][·]`, `SLICES` values of `b` per step, by asynchronous 16-byte copies from the f16
//! `D`-layout blocks issued `STAGES − 1` steps ahead (one barrier per stage);
//! its planes own 16 rows each and one product: `∂x` over a part of the `a` columns, or `∂v`
//! over a part of the value columns. B fragments come from `ldmatrix` (transposed for `∂v`).
//! `∂x` multiplies `d·d·e` per row against the `D·e` of the feature form, and in exchange
//! leaves the contraction of each feature gradient with the coordinates to the tensor cores.

use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::barrier::{Barrier, copy_async};
use cubecl::prelude::*;
use half::f16;

use crate::block_mma::SKIP_ROW;
use crate::config::StateGradTiles;
use crate::feature_pairs::pair_feature;
use crate::mma_fragments::b_fragment_pair;

/// Slices of the state (values of `b`) per step.
pub(crate) const SLICES: usize = 2;
/// Steps staged at once: the copies of a step are issued `STAGES − 1` steps before its
/// products (`d / SLICES` must be a multiple).
pub(crate) const STAGES: usize = 4;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_grad_state_outer_kernel<X: Float, W: Float>(
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
    let tiles = comptime!(cfg.planes as usize);
    let parts = comptime!(cfg.parts as usize);
    let roles = comptime!(if cfg.keys { 2usize } else { 1usize });
    let rows = comptime!(16 * cfg.planes as usize);
    let units = comptime!(32 * cfg.planes as usize * cfg.parts as usize * roles);
    let per_row = comptime!(units / (16 * cfg.planes as usize));
    let xs = comptime!(cfg.head_dim as usize + 8);
    // slice rows in 16-byte vectors: `max(d, e) + 8` halves (Z is staged `d × d` in a buffer)
    let sv = comptime!((usize::max(cfg.head_dim as usize, cfg.value_dim as usize) + 8) / 8);
    let slice_vecs = comptime!(cfg.head_dim as usize * sv);
    let buf_vecs = comptime!(SLICES * cfg.head_dim as usize * sv);
    let ev = comptime!(cfg.value_dim as usize / 8);
    let dx_factor = comptime!(if cfg.keys { 2.0f32 } else { 1.0f32 });
    let x_cols = comptime!(cfg.head_dim as usize / cfg.parts as usize);
    let v_cols = comptime!(cfg.value_dim as usize / cfg.parts as usize);

    let ratio = heads / kv_heads;
    let row0 = CUBE_POS_X * rows as u32;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let state_base = (((bi * kv_heads + kvh) * n_chunks + u) * big_d) as usize;
    let gamma = f32::sqrt(f32::cast_from(big_d));

    let mut row_index = SharedMemory::<u32>::new(rows);
    let mut sx = SharedMemory::<f16>::new(rows * xs);
    let mut alpha = SharedMemory::<f32>::new(rows);
    let mut decay_of = SharedMemory::<f32>::new(rows);
    let mut omega_of = SharedMemory::<f32>::new(rows);
    let mut part = SharedMemory::<f32>::new(units);
    let mut gsum = SharedMemory::<f32>::new(rows * parts);
    let mut slices = SharedMemory::<Vector<f16, Const<8>>>::new(STAGES * buf_vecs);

    // row ρ of the tile is position ρ / r of head kvh·r + ρ mod r
    if UNIT_POS < rows as u32 {
        let rho = row0 + UNIT_POS;
        let pos = rho / ratio;
        let at = (bi * seq + chunk_start + pos) * heads + kvh * ratio + rho % ratio;
        row_index[UNIT_POS as usize] = select(pos < chunk && chunk_start + pos < seq, at, SKIP_ROW);
    }
    sync_cube();

    // the walk over b: `STAGES` buffers of `SLICES` slices each (rows a, value columns), filled
    // by asynchronous copies `STAGES − 1` steps ahead of the products; a stage's barrier
    // completes when every unit's copies into it have landed and every unit has arrived, so it
    // is also the cube barrier that frees the stage consumed the step before
    let mut bars = Sequence::<Shared<Barrier>>::new();
    #[unroll]
    for _ in 0..STAGES {
        bars.push(Barrier::shared(CUBE_DIM, UNIT_POS == 0));
    }
    #[unroll]
    for s in 0..STAGES - 1 {
        issue_slices(
            states,
            &mut slices,
            bars.index(s),
            s as u32,
            s * buf_vecs,
            state_base,
            d,
            ev,
            sv,
            units,
        );
    }
    // x (scaled) as f16; each row's largest |w| from `per_row` units; decays and ω
    let mut idx = UNIT_POS as usize;
    while idx < rows * d {
        let r = idx / d;
        let c = idx % d;
        let at = row_index[r];
        let mut val = 0.0f32;
        if at != SKIP_ROW {
            val = f32::cast_from(x[at as usize * d + c]) * x_scale;
        }
        sx[r * xs + c] = f16::cast_from(val);
        idx += units;
    }
    let lrow = UNIT_POS as usize / per_row;
    let sub = UNIT_POS as usize % per_row;
    let at_l = row_index[lrow];
    let mut wmax = 0.0f32;
    if at_l != SKIP_ROW {
        for c in 0..e / per_row {
            let col = sub * (e / per_row) + c;
            wmax = f32::max(wmax, f32::abs(f32::cast_from(w[at_l as usize * e + col])));
        }
    }
    part[UNIT_POS as usize] = wmax;
    if sub == 0 {
        let pos = (row0 + lrow as u32) / ratio;
        let mut decay = 1.0f32;
        let mut om = 0.0f32;
        if at_l != SKIP_ROW {
            if comptime!(cfg.gated) {
                let g = gates[gate_base + (chunk_start + pos) as usize];
                if comptime!(cfg.keys) {
                    decay = f32::exp(gates[gate_base + (chunk_start + chunk - 1) as usize] - g);
                } else {
                    decay = f32::exp(g);
                }
            }
            if comptime!(cfg.keys) {
                om = 1.0;
            } else {
                om = omega[at_l as usize];
            }
        }
        decay_of[lrow] = decay;
        omega_of[lrow] = om;
    }
    // the key-sum part `Z[a][b]/γ` in the last stage (the walk first fills it after step 0's
    // barrier, which every unit reaches after its `Z` products)
    let zbase = (STAGES - 1) * buf_vecs;
    let mut zi = UNIT_POS as usize;
    while zi < d * (d / 8) {
        let a = (zi / (d / 8)) as u32;
        let vb = zi % (d / 8);
        let mut vec = Vector::<f16, Const<8>>::empty();
        #[unroll]
        for k in 0..8usize {
            let b = (vb * 8 + k) as u32;
            let mut z = sums[state_base + pair_feature(a, b, 16u32) as usize] / gamma;
            if comptime!(!cfg.keys) {
                if a / 16 == b / 16 {
                    z *= 2.0;
                }
            }
            vec[k] = f16::cast_from(z);
        }
        slices[zbase + a as usize * sv + vb] = vec;
        zi += units;
    }
    sync_cube();
    if sub == 0 {
        let mut m = 0.0f32;
        #[unroll]
        for s in 0..per_row {
            m = f32::max(m, part[lrow * per_row + s]);
        }
        alpha[lrow] = select(m > 0.0, m, 1.0f32);
    }
    sync_cube();

    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X;
    let role = plane / (tiles * parts);
    let rem = plane % (tiles * parts);
    let r0 = (rem / parts) * 16;
    let my_part = rem % parts;
    let grads_x = role == 0;

    let def = MmaDefinition::<f16, f16, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NB) = def.vector_size(MatrixIdent::B);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
    let a_len_raw = def.elems_per_lane(MatrixIdent::A);
    let c_len_raw = def.elems_per_lane(MatrixIdent::Accumulator);
    let a_vec_raw = def.vector_size(MatrixIdent::A);
    let c_vec_raw = def.vector_size(MatrixIdent::Accumulator);
    let a_vec = comptime!(a_vec_raw);
    let c_vec = comptime!(c_vec_raw);
    let c_len = comptime!(c_len_raw);
    let a_regs = comptime!(a_len_raw / a_vec_raw);
    let c_regs = comptime!(c_len_raw / c_vec_raw);
    // the accumulator tiles of this plane's product: `x_cols/8` (∂x) or `v_cols/8` (∂v)
    let n_tiles = comptime!(usize::max(x_cols, v_cols) / 8);

    // the rows (of the plane) of this lane's A registers and accumulator elements
    let mut a_row = Array::<u32>::new(a_regs);
    #[unroll]
    for i in 0..a_regs {
        let (r, _c) = def.position_of_nth(lane, comptime!((i * a_vec) as u32), MatrixIdent::A);
        a_row[i] = r;
    }
    let mut acc_row = Array::<u32>::new(c_len);
    let mut acc_col = Array::<u32>::new(c_len);
    #[unroll]
    for j in 0..c_len {
        let (r, c) = def.position_of_nth(lane, j as u32, MatrixIdent::Accumulator);
        acc_row[j] = r;
        acc_col[j] = c;
    }

    // this plane's rows of x as A fragments over the coordinate blocks (k = a coordinate)
    let mut x_frags = Sequence::<Array<Vector<f16, NA>>>::new();
    #[unroll]
    for kb in 0..d / 16 {
        let mut frag = Array::<Vector<f16, NA>>::new(a_regs);
        #[unroll]
        for i in 0..a_regs {
            let mut v = Vector::empty();
            #[unroll]
            for k in 0..a_vec {
                let (r, c) =
                    def.position_of_nth(lane, comptime!((i * a_vec + k) as u32), MatrixIdent::A);
                v[k] = sx[(r0 + r as usize) * xs + kb * 16 + c as usize];
            }
            frag[i] = v;
        }
        x_frags.push(frag);
    }
    // and of w/α over the value blocks (∂x planes; k = a value column)
    let mut w_frags = Sequence::<Array<Vector<f16, NA>>>::new();
    #[unroll]
    for cb in 0..e / 16 {
        let mut frag = Array::<Vector<f16, NA>>::new(a_regs);
        #[unroll]
        for i in 0..a_regs {
            let mut v = Vector::empty();
            #[unroll]
            for k in 0..a_vec {
                let (r, c) =
                    def.position_of_nth(lane, comptime!((i * a_vec + k) as u32), MatrixIdent::A);
                let rr = r0 + r as usize;
                let at = row_index[rr];
                let mut val = 0.0f32;
                if grads_x && at != SKIP_ROW {
                    val = f32::cast_from(w[at as usize * e + cb * 16 + c as usize]) / alpha[rr];
                }
                v[k] = f16::cast_from(val);
            }
            frag[i] = v;
        }
        w_frags.push(frag);
    }

    let mut acc = Sequence::<Array<Vector<f32, NC>>>::new();
    #[unroll]
    for _ in 0..n_tiles {
        let mut t = Array::<Vector<f32, NC>>::new(c_regs);
        #[unroll]
        for i in 0..c_regs {
            t[i] = Vector::new(0.0f32);
        }
        acc.push(t);
    }

    // ∂x planes: `Σ_b x_b Z[a][b]/γ`, then scaled by ω/α so the walk adds to it in w/α units
    if grads_x {
        let a0 = my_part * x_cols;
        #[unroll]
        for kb in 0..d / 16 {
            #[unroll]
            for np in 0..x_cols / 16 {
                let a = a0 + np * 16 + (lane as usize % 8) + 8 * (lane as usize / 16);
                let cv = 2 * kb + (lane as usize / 8) % 2;
                let at = zbase + a * sv + cv;
                let (lo, hi) = b_fragment_pair::<NB>(def, &slices, at, false);
                def.execute_inplace(x_frags.index(kb), &lo, acc.index_mut(comptime!(2 * np)));
                def.execute_inplace(x_frags.index(kb), &hi, acc.index_mut(comptime!(2 * np + 1)));
            }
        }
        #[unroll]
        for nt in 0..x_cols / 8 {
            let t = acc.index_mut(nt);
            #[unroll]
            for vi in 0..c_regs {
                let mut vv = t[vi];
                #[unroll]
                for vk in 0..c_vec {
                    let rr = r0 + acc_row[comptime!(vi * c_vec + vk)] as usize;
                    vv[vk] = vv[vk] * (omega_of[rr] / alpha[rr]);
                }
                t[vi] = vv;
            }
        }
    }

    let steps = comptime!(cfg.head_dim as usize / SLICES);
    for round in 0..comptime!((steps / STAGES) as u32) {
        #[unroll]
        for s in 0..STAGES {
            let step = round * STAGES as u32 + s as u32;
            bars.index(s).arrive_and_wait();
            let next = step + (STAGES - 1) as u32;
            if next < steps as u32 {
                issue_slices(
                    states,
                    &mut slices,
                    bars.index(comptime!((s + STAGES - 1) % STAGES)),
                    next,
                    comptime!(((s + STAGES - 1) % STAGES) * buf_vecs),
                    state_base,
                    d,
                    ev,
                    sv,
                    units,
                );
            }
            #[unroll]
            for sl in 0..SLICES {
                let b = step * SLICES as u32 + sl as u32;
                let base = s * buf_vecs + sl * slice_vecs;
                let mb = b / 16;
                // x_b of the rows of this lane's A registers
                let mut xb = Array::<f16>::new(a_regs);
                #[unroll]
                for i in 0..a_regs {
                    xb[i] = sx[(r0 + a_row[i] as usize) * xs + b as usize];
                }
                if grads_x {
                    let a0 = my_part * x_cols;
                    #[unroll]
                    for cb in 0..e / 16 {
                        let wf = w_frags.index(cb);
                        let mut af = Array::<Vector<f16, NA>>::new(a_regs);
                        // queries: the pairs inside b's block weigh twice (columns of block mb)
                        let mut af2 = Array::<Vector<f16, NA>>::new(a_regs);
                        #[unroll]
                        for i in 0..a_regs {
                            af[i] = wf[i] * Vector::new(xb[i]);
                            if comptime!(!cfg.keys) {
                                af2[i] = af[i] * Vector::new(f16::cast_from(2.0f32));
                            }
                        }
                        #[unroll]
                        for np in 0..x_cols / 16 {
                            let a = a0 + np * 16 + (lane as usize % 8) + 8 * (lane as usize / 16);
                            let cv = 2 * cb + (lane as usize / 8) % 2;
                            let at = base + a * sv + cv;
                            let (lo, hi) = b_fragment_pair::<NB>(def, &slices, at, false);
                            let mut doubled = false;
                            if comptime!(!cfg.keys) {
                                doubled = (a0 / 16 + np) as u32 == mb;
                            }
                            if doubled {
                                def.execute_inplace(&af2, &lo, acc.index_mut(comptime!(2 * np)));
                                def.execute_inplace(
                                    &af2,
                                    &hi,
                                    acc.index_mut(comptime!(2 * np + 1)),
                                );
                            } else {
                                def.execute_inplace(&af, &lo, acc.index_mut(comptime!(2 * np)));
                                def.execute_inplace(&af, &hi, acc.index_mut(comptime!(2 * np + 1)));
                            }
                        }
                    }
                } else {
                    // ∂v: the rows x < 16(m_b + 1) of the slice, weighted 2 below b's block
                    let c0 = my_part * v_cols;
                    #[unroll]
                    for kb in 0..d / 16 {
                        if kb as u32 <= mb {
                            let mut wgt = f16::cast_from(1.0f32);
                            if (kb as u32) < mb {
                                wgt = f16::cast_from(2.0f32);
                            }
                            let xf = x_frags.index(kb);
                            let mut af = Array::<Vector<f16, NA>>::new(a_regs);
                            #[unroll]
                            for i in 0..a_regs {
                                af[i] = xf[i] * Vector::new(xb[i] * wgt);
                            }
                            #[unroll]
                            for np in 0..v_cols / 16 {
                                let a =
                                    kb * 16 + (lane as usize % 8) + 8 * ((lane as usize / 8) % 2);
                                let cv = (c0 + np * 16) / 8 + lane as usize / 16;
                                let at = base + a * sv + cv;
                                let (lo, hi) = b_fragment_pair::<NB>(def, &slices, at, true);
                                def.execute_inplace(&af, &lo, acc.index_mut(comptime!(2 * np)));
                                def.execute_inplace(&af, &hi, acc.index_mut(comptime!(2 * np + 1)));
                            }
                        }
                    }
                }
            }
        }
    }

    if grads_x {
        // ∂x̃ = c·δ·α·γ·acc; dx += out_scale·∂x̃; the gate term ½ Σ x̃_a ∂x̃_a per row
        let a0 = my_part * x_cols;
        let lo_row = acc_row[0];
        let mut g_lo = 0.0f32;
        let mut g_hi = 0.0f32;
        #[unroll]
        for nt in 0..x_cols / 8 {
            let t = acc.index(nt);
            #[unroll]
            for j in 0..c_len {
                let rr = r0 + acc_row[j] as usize;
                let a = a0 + nt * 8 + acc_col[j] as usize;
                let grad = dx_factor
                    * decay_of[rr]
                    * alpha[rr]
                    * gamma
                    * t[comptime!(j / c_vec)][comptime!(j % c_vec)];
                let at = row_index[rr];
                if at != SKIP_ROW {
                    dx[at as usize * d + a] += out_scale * grad;
                }
                let term = grad * f32::cast_from(sx[rr * xs + a]);
                if acc_row[j] == lo_row {
                    g_lo += term;
                } else {
                    g_hi += term;
                }
            }
        }
        // the four lanes of a row (CUDA's accumulator layout), then one lane writes
        g_lo += plane_shuffle_xor(g_lo, 1u32);
        g_lo += plane_shuffle_xor(g_lo, 2u32);
        g_hi += plane_shuffle_xor(g_hi, 1u32);
        g_hi += plane_shuffle_xor(g_hi, 2u32);
        if lane % 4 == 0 {
            gsum[my_part * rows + r0 + lo_row as usize] = g_lo;
            gsum[my_part * rows + r0 + lo_row as usize + 8] = g_hi;
        }
    } else {
        // ∂v = δ·γ·acc
        let c0 = my_part * v_cols;
        #[unroll]
        for nt in 0..v_cols / 8 {
            let t = acc.index(nt);
            #[unroll]
            for j in 0..c_len {
                let rr = r0 + acc_row[j] as usize;
                let at = row_index[rr];
                if at != SKIP_ROW {
                    dv[at as usize * e + c0 + nt * 8 + acc_col[j] as usize] +=
                        decay_of[rr] * gamma * t[comptime!(j / c_vec)][comptime!(j % c_vec)];
                }
            }
        }
    }
    sync_cube();
    if UNIT_POS < rows as u32 {
        let at = row_index[UNIT_POS as usize];
        if at != SKIP_ROW {
            let mut s = 0.0f32;
            #[unroll]
            for p in 0..parts {
                s += gsum[p * rows + UNIT_POS as usize];
            }
            dg[at as usize] += 0.5 * s;
        }
    }
}

/// Issues the asynchronous copies of step `step`'s slices (rows `a` of `U[·][b][·]` for the
/// step's `SLICES` values of `b`, gathered from the `D`-layout block) into the stage at `base`,
/// and ties their completion to `bar`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue_slices(
    states: &Array<Vector<f16, Const<8>>>,
    slices: &mut SharedMemory<Vector<f16, Const<8>>>,
    bar: &Shared<Barrier>,
    step: u32,
    base: usize,
    state_base: usize,
    #[comptime] d: usize,
    #[comptime] ev: usize,
    #[comptime] sv: usize,
    #[comptime] units: usize,
) {
    let loads = comptime!((SLICES * d * ev).div_ceil(units));
    #[unroll]
    for i in 0..loads {
        let li = UNIT_POS as usize + i * units;
        if li < SLICES * d * ev {
            let sl = li / (d * ev);
            let r = li % (d * ev);
            let a = (r / ev) as u32;
            let f = pair_feature(a, step * SLICES as u32 + sl as u32, 16u32);
            let src = (state_base + f as usize) * ev + r % ev;
            let dst = base + sl * d * sv + a as usize * sv + r % ev;
            copy_async(
                &states.slice(src, src + 1),
                &mut slices.slice_mut(dst, dst + 1),
                8u32,
            );
        }
    }
    bar.commit_copy_async();
}
