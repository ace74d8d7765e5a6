//! The query–state product of [`query_state`](crate::query_state) with CUDA's manually managed
//! `mma.sync.m16n8k16` (f16 operands, f32 accumulation): the same outputs (`num`, `den` times
//! the row factor, without the gate factor), no feature tile built in shared memory.
//!
//! A 16-feature group is one coordinate `x` times the 16 coordinates of a block `m` (see
//! [`feature_pairs`](crate::feature_pairs)), so the A operand for it is the rows' block `m` of
//! `q′` (one `ldmatrix` from the staged rows) times each row's `q′_x`: one f16 multiply per
//! register. The B operand is the group's 16 state rows (`S/γ`), with the key-sum entries
//! `z/γ` as an extra 8-column tile whose product is the denominator.
//!
//! A cube of `P` planes ([`QueryStateTiles::planes`]) owns `16·P` rows of a chunk (the query
//! heads of a GQA group folded into the row dimension, as in [`query_state`](crate::query_state));
//! plane `p` owns 32 rows (two row tiles, so every B fragment serves two products) and half of
//! the value columns (the first half also the denominator). The walk takes the features 64 at
//! a time, the next block staged while the current one is multiplied; each group's coordinate
//! pair comes from a table the cube fills once (inverting the layout costs a square root and
//! some thirty instructions, as much as the group's A operand).

use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::*;
use half::f16;

use crate::block_mma::SKIP_ROW;
use crate::config::QueryStateTiles;
use crate::feature_pairs::{feature_groups, feature_pair};
use crate::mma_fragments::b_fragment_pair;
use crate::tile_load::rows_present;

/// Features per step (four 16-feature groups).
const FEATS: usize = 64;

/// Shared memory of one cube of `planes` planes, in bytes.
pub(crate) fn shared_bytes(planes: u32, head_dim: usize, value_dim: usize) -> usize {
    let rows = 16 * planes as usize;
    4 * rows
        + 4 * 2 * rows
        + 2 * rows * (head_dim + 8)
        + 2 * head_dim * rows
        + 2 * 2 * FEATS * (value_dim + 24)
        + 4 * feature_groups(head_dim)
}

/// Where row `ρ` of the cube sits in a coordinate row of the transposed copy of `q′`: the four
/// rows whose `q′_x` a lane multiplies into its A registers (`j, j + 8` of both row tiles of
/// its plane, `j = lane / 4`) lie next to each other, in register order: one 8-byte load per
/// group instead of four 2-byte loads and their addresses.
#[cube]
fn lane_rows(rho: usize) -> usize {
    let w = rho % 32;
    (rho / 32) * 32 + (w % 8) * 4 + w / 8
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_state_outer_kernel<F: Float>(
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
    let e = comptime!(cfg.value_dim as usize);
    let ds = comptime!(cfg.head_dim as usize + 8);
    let planes = comptime!(cfg.planes as usize);
    let rows = comptime!(16 * cfg.planes as usize);
    let units = comptime!(32 * cfg.planes as usize);
    let n_groups = comptime!(feature_groups(cfg.head_dim as usize));
    let ev = comptime!(cfg.value_dim as usize / 8);
    let sv = comptime!(cfg.value_dim as usize / 8 + 3);
    let s_buf = comptime!(FEATS * (cfg.value_dim as usize / 8 + 3));
    let half_cols = comptime!(cfg.value_dim as usize / 2);
    // per row tile: the half's value tiles, then (first half) the denominator tile
    let v_tiles = comptime!(cfg.value_dim as usize / 16);
    let n_tiles = comptime!(cfg.value_dim as usize / 16 + 1);
    let dvecs = comptime!(cfg.head_dim as usize / 8);

    let ratio = q_heads / kv_heads;
    let row0 = CUBE_POS_X * rows as u32;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let state_base = (((bi * kv_heads + kvh) * n_chunks + u) * big_d) as usize;
    let gamma = f32::sqrt(f32::cast_from(big_d));
    let inv_gamma = 1.0 / gamma;

    let mut row_index = SharedMemory::<u32>::new(rows);
    let mut npart = SharedMemory::<f32>::new(2 * rows);
    let mut sq = SharedMemory::<f16>::new(rows * ds);
    // q′ again, coordinate-major in lane order (see `lane_rows`)
    let mut sqt =
        SharedMemory::<f16>::new(comptime!(cfg.head_dim as usize * 16 * cfg.planes as usize));
    let mut pairs = SharedMemory::<u32>::new(n_groups);
    let mut sst = SharedMemory::<Vector<f16, Const<8>>>::new(2 * s_buf);

    // group g's coordinate pair (`x << 16 | 16m`), read by every plane at every group
    let mut pi = UNIT_POS as usize;
    while pi < n_groups {
        pairs[pi] = feature_pair(pi as u32 * 16, 16u32);
        pi += units;
    }
    if UNIT_POS < rows as u32 {
        let rho = row0 + UNIT_POS;
        let pos = rho / ratio;
        let at = (bi * seq + chunk_start + pos) * q_heads + kvh * ratio + rho % ratio;
        row_index[UNIT_POS as usize] = select(pos < chunk && chunk_start + pos < seq, at, SKIP_ROW);
    }
    sync_cube();

    // units 2ρ, 2ρ + 1 hold the halves of query row ρ; the row factor γ/|q|² (as the cmma
    // kernel: the features `q′_x q′_y` stay ≤ γ) scales q′ = q·√factor, staged as f16
    let row = UNIT_POS as usize / 2;
    let half = UNIT_POS as usize % 2;
    let at = row_index[row];
    let mut qv = Array::<Vector<F, Const<8>>>::new(dvecs / 2);
    let mut norm2 = 0.0f32;
    #[unroll]
    for j in 0..dvecs / 2 {
        let mut val = Vector::<F, Const<8>>::new(F::cast_from(0.0f32));
        if at != SKIP_ROW {
            val = q[at as usize * dvecs + half * (dvecs / 2) + j];
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
    let norm2 = npart[2 * row] + npart[2 * row + 1];
    let fac = select(norm2 > 0.0, gamma / norm2, 0.0f32);
    let root = f32::sqrt(fac);
    let row_t = lane_rows(row);
    #[unroll]
    for j in 0..dvecs / 2 {
        #[unroll]
        for i in 0..8usize {
            let col = (half * (dvecs / 2) + j) * 8 + i;
            let h = f16::cast_from(f32::cast_from(qv[j][i]) * root);
            sq[row * ds + col] = h;
            sqt[col * rows + row_t] = h;
        }
    }
    sync_cube();

    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    // plane p: rows 32·(p mod P/2).., value columns (p / (P/2))·e/2..
    let row_planes = comptime!(planes / 2);
    let r0 = (plane % row_planes) * 32;
    let col_half = plane / row_planes;
    let c0 = col_half * half_cols;
    let with_den = col_half == 0;
    let def = MmaDefinition::<f16, f16, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NB) = def.vector_size(MatrixIdent::B);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
    let c_len_raw = def.elems_per_lane(MatrixIdent::Accumulator);
    let c_vec_raw = def.vector_size(MatrixIdent::Accumulator);
    let c_len = comptime!(c_len_raw);
    let c_vec = comptime!(c_vec_raw);
    let c_regs = comptime!(c_len_raw / c_vec_raw);

    let mut acc = Sequence::<Array<Vector<f32, NC>>>::new();
    #[unroll]
    for _ in 0..2 * n_tiles {
        let mut t = Array::<Vector<f32, NC>>::new(c_regs);
        #[unroll]
        for i in 0..c_regs {
            t[i] = Vector::new(0.0f32);
        }
        acc.push(t);
    }

    let groups = big_d / 16;
    let steps = (big_d + FEATS as u32 - 1) / FEATS as u32;
    // this lane's offsets, fixed for the walk: its A rows in `sq`, its q′_x quadruple in `sqt`,
    // its B rows in a stage
    let a_row = lane % 8 + 8 * ((lane / 8) % 2);
    let mut a_at = Array::<usize>::new(2usize);
    #[unroll]
    for mt in 0..2usize {
        a_at[mt] = (r0 + mt * 16 + a_row) * ds + 8 * (lane / 16);
    }
    let scale_at = r0 + (lane / 4) * 4;
    let b_at = a_row * sv + c0 / 8 + lane / 16;
    let loads = comptime!((FEATS * cfg.value_dim as usize / 8).div_ceil(units));
    let mut regs = Array::<Vector<f16, Const<8>>>::new(loads);
    // the key sums of the features whose first 8 columns a unit stages, loaded with the state
    // rows (a load consumed at once stalled the walk)
    let mut zregs_f = Array::<f32>::new(loads);
    for step in 0..steps + 1 {
        let producing = step < steps;
        let first = step * FEATS as u32;
        if producing {
            let present = rows_present(first, big_d);
            #[unroll]
            for i in 0..loads {
                let li = UNIT_POS as usize + i * units;
                let mut val = Vector::<f16, Const<8>>::new(f16::cast_from(0.0f32));
                let mut z = 0.0f32;
                if li < FEATS * ev && ((li / ev) as u32) < present {
                    val = states[(state_base + first as usize + li / ev) * ev + li % ev];
                    if li % ev == 0 {
                        z = sums[state_base + first as usize + li / ev];
                    }
                }
                regs[i] = val;
                zregs_f[i] = z;
            }
        }
        if step > 0 {
            let prev = step - 1;
            let base = (prev % 2) as usize * s_buf;
            #[unroll]
            for gi in 0..FEATS / 16 {
                let g = prev * comptime!(FEATS as u32 / 16) + gi as u32;
                if g < groups {
                    let pair = pairs[g as usize];
                    let x = (pair >> 16) as usize;
                    let m = ((pair & 0xffff) / 16) as usize;
                    // this lane's rows' q′_x: j and j + 8 of each row tile
                    let at_x = x * rows + scale_at;
                    let quad = sqt
                        .slice(at_x, at_x + 4)
                        .into_vectorized()
                        .with_vector_size::<Const<4>>();
                    let qx = quad[0];
                    // A per row tile: block m of the rows' q′ times each row's q′_x
                    let mut a_frags = Sequence::<Array<Vector<f16, NA>>>::new();
                    #[unroll]
                    for mt in 0..2usize {
                        let at = a_at[mt] + 16 * m;
                        let raw = def.load_matrix::<f16, NA>(
                            &sq.slice(at, at + 8),
                            MatrixIdent::A,
                            4usize,
                            false,
                        );
                        let s_lo = Vector::<f16, NA>::new(qx[comptime!(2 * mt)]);
                        let s_hi = Vector::<f16, NA>::new(qx[comptime!(2 * mt + 1)]);
                        let mut af = Array::<Vector<f16, NA>>::new(4usize);
                        af[0] = raw[0] * s_lo;
                        af[1] = raw[1] * s_hi;
                        af[2] = raw[2] * s_lo;
                        af[3] = raw[3] * s_hi;
                        a_frags.push(af);
                    }
                    // B: the group's 16 state rows, two 8-column tiles per load
                    #[unroll]
                    for np in 0..v_tiles / 2 {
                        let at = base + b_at + gi * 16 * sv + 2 * np;
                        let (lo, hi) = b_fragment_pair::<NB>(def, &sst, at, true);
                        #[unroll]
                        for mt in 0..2usize {
                            def.execute_inplace(
                                a_frags.index(mt),
                                &lo,
                                acc.index_mut(comptime!(mt * n_tiles + 2 * np)),
                            );
                            def.execute_inplace(
                                a_frags.index(mt),
                                &hi,
                                acc.index_mut(comptime!(mt * n_tiles + 2 * np + 1)),
                            );
                        }
                    }
                    if with_den {
                        let at = base + (gi * 16 + a_row) * sv + ev;
                        let zregs = def.load_matrix::<Vector<f16, Const<8>>, NB>(
                            &sst.slice(at, at + 1),
                            MatrixIdent::B,
                            2usize,
                            true,
                        );
                        #[unroll]
                        for mt in 0..2usize {
                            def.execute_inplace(
                                a_frags.index(mt),
                                &zregs,
                                acc.index_mut(comptime!(mt * n_tiles + n_tiles - 1)),
                            );
                        }
                    }
                }
            }
        }
        if producing {
            let base = (step % 2) as usize * s_buf;
            #[unroll]
            for i in 0..loads {
                let li = UNIT_POS as usize + i * units;
                if li < FEATS * ev {
                    let f = li / ev;
                    sst[base + f * sv + li % ev] = regs[i];
                    if li % ev == 0 {
                        let mut zv = Vector::<f16, Const<8>>::new(f16::cast_from(0.0f32));
                        zv[0] = f16::cast_from(zregs_f[i] * inv_gamma);
                        sst[base + f * sv + ev] = zv;
                    }
                }
            }
        }
        sync_cube();
    }

    // the rows straight from the accumulators
    #[unroll]
    for mt in 0..2usize {
        #[unroll]
        for nt in 0..n_tiles {
            let t = acc.index(comptime!(mt * n_tiles + nt));
            #[unroll]
            for j in 0..c_len {
                let (r, c) = def.position_of_nth(lane as u32, j as u32, MatrixIdent::Accumulator);
                let at = row_index[r0 + mt * 16 + r as usize];
                let val = t[comptime!(j / c_vec)][comptime!(j % c_vec)];
                if at != SKIP_ROW {
                    if comptime!(nt < n_tiles - 1) {
                        num[at as usize * e + c0 + nt * 8 + c as usize] = val;
                    } else if with_den && c == 0 {
                        den[at as usize] = val;
                    }
                }
            }
        }
    }
}
