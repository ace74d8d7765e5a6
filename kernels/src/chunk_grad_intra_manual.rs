//! The intra-chunk pairs of the backward pass ([`chunk_grad_intra_mma`](crate::chunk_grad_intra_mma)
//! states the gradients and the rounding) on CUDA's manually managed `mma.sync.m16n8k16`:
//! scores, their gradients and the rounded pair weights stay in the accumulator registers, as
//! in [`chunk_output_manual`](crate::chunk_output_manual), instead of a per-plane `f32` tile
//! and a bf16 pair tile in shared memory.
//!
//! [`intra_query_grads_manual_kernel`]: a cube of 8 planes owns 128 queries of one chunk and
//! head (plane `p` rows `16p..16p + 16`, staged once in shared memory with their `dN`) and
//! walks the keys 64 at a time, in two halves of 32 per plane: `S = QKᵀ` and `dP = dN Vᵀ`
//! into accumulators, each lane's 16 pairs turned into `∂S` (rounded to bf16) packed as A
//! fragments, then `∂Q += ∂S K`.
//!
//! [`intra_key_grads_manual_kernel`]: a cube owns 128 keys of one chunk and key/value head
//! and walks the queries of every head of the group 64 at a time: `Sᵀ = K Qᵀ`,
//! `dPᵀ = V dNᵀ`, then `∂V += Wᵀ dN` and `∂K += ∂Sᵀ Q`.

use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::*;
use half::bf16;

use crate::chunk_grad::power_and_slope;
use crate::config::IntraGradTiles;
use crate::mma_fragments::{a_fragment, b_fragments_of_columns, b_fragments_of_rows, zero_tiles};
use crate::tile_load::{fetch_key_value_rows, fetch_rows, row_registers, rows_present, store_rows};

/// Rows a cube owns.
const ROWS: usize = 128;
/// The other side's rows per step.
const STEP: usize = 64;
/// The other side's rows per half step (the pairs a plane holds at once).
const HALF: usize = 32;
/// Rows per plane.
const PR: usize = 16;
const PLANES: u32 = 8;
const PLANE: u32 = 32;
const UNITS: usize = (PLANES * PLANE) as usize;

/// Shared memory of the larger of the two kernels, in bytes, for half inputs.
pub(crate) fn shared_bytes(head_dim: usize, value_dim: usize) -> usize {
    let (ds, vs) = (head_dim + 8, value_dim + 8);
    2 * (ROWS * (ds + vs) + STEP * (2 * ds + vs)) + 4 * 2 * STEP
}

/// Writes `mult` times the plane's `16 × 8·tiles` accumulators to `out` (`width = 8·tiles`
/// floats per row): the lane's rows `r` and `r + 8` at rows `row_lo`, `row_hi` of `out`, when
/// they exist.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_tiles<N: Size>(
    acc: &Sequence<Array<Vector<f32, N>>>,
    out: &mut Array<f32>,
    row_lo: usize,
    row_hi: usize,
    lo_exists: bool,
    hi_exists: bool,
    mult: f32,
    #[comptime] tiles: usize,
    #[comptime] c_vec: usize,
) {
    let quad = UNIT_POS_X as usize % 4;
    let width = comptime!(8 * tiles);
    #[unroll]
    for h in 0..2usize {
        let mut row = row_lo;
        let mut exists = lo_exists;
        if comptime!(h == 1) {
            row = row_hi;
            exists = hi_exists;
        }
        if exists {
            #[unroll]
            for nt in 0..tiles {
                let t = acc.index(nt);
                #[unroll]
                for c in 0..2usize {
                    let jj = comptime!(2 * h + c);
                    out[row * width + nt * 8 + 2 * quad + c] =
                        mult * t[comptime!(jj / c_vec)][comptime!(jj % c_vec)];
                }
            }
        }
    }
}

/// Stages `ROWS` rows (`width` wide, row stride `stride` in `dst`) of `src` from vector
/// `first`, rows `row_stride` vectors apart, the first `present` of them (zeros past it).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_own_rows<F: Float, S: Float>(
    src: &Array<Vector<F, Const<8>>>,
    dst: &mut SharedMemory<S>,
    first: usize,
    row_stride: usize,
    present: u32,
    #[comptime] width: usize,
    #[comptime] stride: usize,
) {
    let mut regs = row_registers::<F>(ROWS, width, UNITS);
    fetch_rows::<F>(
        src, &mut regs, first, row_stride, present, ROWS, width, UNITS,
    );
    store_rows::<F, S>(&regs, dst, 0, ROWS, width, stride, UNITS);
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn intra_query_grads_manual_kernel<F: Float>(
    q: &Array<Vector<F, Const<8>>>,
    k: &Array<Vector<F, Const<8>>>,
    v: &Array<Vector<F, Const<8>>>,
    d_num: &Array<Vector<bf16, Const<8>>>,
    d_den: &Array<f32>,
    gates: &Array<f32>,
    dq: &mut Array<f32>,
    dg: &mut Array<f32>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    scale: f32,
    #[comptime] cfg: IntraGradTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let ds = comptime!(cfg.head_dim as usize + 8);
    let vs = comptime!(cfg.value_dim as usize + 8);

    let ratio = q_heads / kv_heads;
    let q_blocks = (chunk + ROWS as u32 - 1) / ROWS as u32;
    let qb = CUBE_POS_X % q_blocks;
    let kvh = CUBE_POS_Y / n_chunks;
    let head = kvh * ratio + CUBE_POS_X / q_blocks;
    let u = CUBE_POS_Y % n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let tile_start = qb * ROWS as u32;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let chunk_len = select(seq - chunk_start < chunk, seq - chunk_start, chunk);
    let q_rows = rows_present(tile_start, chunk_len);

    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let quad = lane % 4;
    let plane_first = tile_start + (plane * PR) as u32;
    let row_lo = plane_first + (lane / 4) as u32;
    let row_hi = row_lo + 8;

    let mut sq = SharedMemory::<F>::new(ROWS * ds);
    let mut sn = SharedMemory::<bf16>::new(ROWS * vs);
    // keys in the input dtype (scores, as the forward computes them) and in bf16 (`∂S K`)
    let mut sk = SharedMemory::<F>::new(STEP * ds);
    let mut skb = SharedMemory::<bf16>::new(STEP * ds);
    let mut sv = SharedMemory::<bf16>::new(STEP * vs);
    let mut sg = SharedMemory::<f32>::new(STEP);

    let token0 = ((bi * seq + chunk_start) as usize) * q_heads as usize;
    let kv_token0 = ((bi * seq + chunk_start) as usize) * kv_heads as usize;
    let own = token0 + tile_start as usize * q_heads as usize + head as usize;
    let q_stride = q_heads as usize;
    stage_own_rows::<F, F>(q, &mut sq, own * (d / 8), q_stride * (d / 8), q_rows, d, ds);
    stage_own_rows::<bf16, bf16>(
        d_num,
        &mut sn,
        own * (e / 8),
        q_stride * (e / 8),
        q_rows,
        e,
        vs,
    );

    let mut dl_lo = 0.0f32;
    let mut dl_hi = 0.0f32;
    let mut g_lo = 0.0f32;
    let mut g_hi = 0.0f32;
    if row_lo < chunk_len {
        dl_lo = d_den[token0 + row_lo as usize * q_stride + head as usize];
        if comptime!(cfg.gated) {
            g_lo = gates[gate_base + (chunk_start + row_lo) as usize];
        }
    }
    if row_hi < chunk_len {
        dl_hi = d_den[token0 + row_hi as usize * q_stride + head as usize];
        if comptime!(cfg.gated) {
            g_hi = gates[gate_base + (chunk_start + row_hi) as usize];
        }
    }

    let mut last = tile_start + ROWS as u32;
    if last > chunk_len {
        last = chunk_len;
    }
    let k_blocks = select(q_rows > 0, (last + STEP as u32 - 1) / STEP as u32, 0u32);
    let mut kregs = row_registers::<F>(STEP, d, UNITS);
    let mut vregs = row_registers::<F>(STEP, e, UNITS);
    let mut greg = 0.0f32;
    let key_stride = kv_heads as usize;
    if k_blocks > 0 {
        let present = rows_present(0, chunk_len);
        let at = kv_token0 + kvh as usize;
        fetch_key_value_rows::<F>(
            k, v, &mut kregs, &mut vregs, at, key_stride, present, STEP, d, e, UNITS,
        );
        store_rows::<F, F>(&kregs, &mut sk, 0, STEP, d, ds, UNITS);
        store_rows::<F, bf16>(&kregs, &mut skb, 0, STEP, d, ds, UNITS);
        store_rows::<F, bf16>(&vregs, &mut sv, 0, STEP, e, vs, UNITS);
        if comptime!(cfg.gated) {
            if UNIT_POS < STEP as u32 {
                sg[UNIT_POS as usize] = select(
                    UNIT_POS < chunk,
                    gates[gate_base + (chunk_start + UNIT_POS) as usize],
                    0.0f32,
                );
            }
        }
    }
    sync_cube();

    let qk = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    let hb = MmaDefinition::<bf16, bf16, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = qk.vector_size(MatrixIdent::A);
    let size!(NB) = qk.vector_size(MatrixIdent::B);
    let size!(HA) = hb.vector_size(MatrixIdent::A);
    let size!(HB) = hb.vector_size(MatrixIdent::B);
    let size!(NC) = qk.vector_size(MatrixIdent::Accumulator);
    let c_len_raw = qk.elems_per_lane(MatrixIdent::Accumulator);
    let c_vec_raw = qk.vector_size(MatrixIdent::Accumulator);
    let c_vec = comptime!(c_vec_raw);
    let c_regs = comptime!(c_len_raw / c_vec_raw);

    let mut acc = zero_tiles::<NC>(d / 8, c_regs);
    let mut gsum_lo = 0.0f32;
    let mut gsum_hi = 0.0f32;
    for kb in 0..k_blocks {
        let k0 = kb * STEP as u32;
        let next = kb + 1 < k_blocks;
        if next {
            let first = k0 + STEP as u32;
            let present = rows_present(first, chunk_len);
            let at = kv_token0 + first as usize * key_stride + kvh as usize;
            fetch_key_value_rows::<F>(
                k, v, &mut kregs, &mut vregs, at, key_stride, present, STEP, d, e, UNITS,
            );
            if comptime!(cfg.gated) {
                if UNIT_POS < STEP as u32 {
                    let pos = first + UNIT_POS;
                    greg = select(
                        pos < chunk,
                        gates[gate_base + (chunk_start + pos) as usize],
                        0.0,
                    );
                }
            }
        }
        #[unroll]
        for hh in 0..STEP / HALF {
            let h0 = comptime!(hh * HALF);
            // the plane works when one of its rows exists and reaches this half's first key
            if plane_first < chunk_len && k0 + (h0 as u32) < plane_first + PR as u32 {
                let mut s = zero_tiles::<NC>(HALF / 8, c_regs);
                let mut p = zero_tiles::<NC>(HALF / 8, c_regs);
                #[unroll]
                for ks in 0..d / 16 {
                    let a = a_fragment::<F, NA>(qk, &sq, plane * PR, 16 * ks, ds);
                    #[unroll]
                    for np in 0..HALF / 16 {
                        let (lo, hi) =
                            b_fragments_of_rows::<F, NB>(qk, &sk, h0 + 16 * np, 16 * ks, ds);
                        qk.execute_inplace(&a, &lo, s.index_mut(comptime!(2 * np)));
                        qk.execute_inplace(&a, &hi, s.index_mut(comptime!(2 * np + 1)));
                    }
                }
                #[unroll]
                for ks in 0..e / 16 {
                    let a = a_fragment::<bf16, HA>(hb, &sn, plane * PR, 16 * ks, vs);
                    #[unroll]
                    for np in 0..HALF / 16 {
                        let (lo, hi) =
                            b_fragments_of_rows::<bf16, HB>(hb, &sv, h0 + 16 * np, 16 * ks, vs);
                        hb.execute_inplace(&a, &lo, p.index_mut(comptime!(2 * np)));
                        hb.execute_inplace(&a, &hi, p.index_mut(comptime!(2 * np + 1)));
                    }
                }
                // ∂S, rounded to bf16 and packed as A fragments (tiles 2kk, 2kk + 1)
                let mut x = Sequence::<Array<Vector<bf16, HA>>>::new();
                #[unroll]
                for kk in 0..HALF / 16 {
                    let mut frag = Array::<Vector<bf16, HA>>::new(4usize);
                    #[unroll]
                    for half in 0..2usize {
                        let nt = comptime!(2 * kk + half);
                        let st = s.index(nt);
                        let pt = p.index(nt);
                        #[unroll]
                        for h in 0..2usize {
                            let mut pair = Vector::<bf16, HA>::empty();
                            #[unroll]
                            for c in 0..2usize {
                                let jj = comptime!(2 * h + c);
                                let col = h0 + nt * 8 + 2 * quad + c;
                                let mut row = row_lo;
                                let mut g = g_lo;
                                let mut dl = dl_lo;
                                if comptime!(h == 1) {
                                    row = row_hi;
                                    g = g_hi;
                                    dl = dl_hi;
                                }
                                let sc = scale * st[comptime!(jj / c_vec)][comptime!(jj % c_vec)];
                                let mut gate = 1.0f32;
                                if comptime!(cfg.gated) {
                                    gate = f32::exp(g - sg[col]);
                                }
                                let (power, slope) = power_and_slope(sc, comptime!(cfg.degree));
                                let keep = row < chunk_len && k0 + (col as u32) <= row;
                                let dw = pt[comptime!(jj / c_vec)][comptime!(jj % c_vec)] + dl;
                                let gterm = select(keep, gate * power * dw, 0.0f32);
                                if comptime!(h == 0) {
                                    gsum_lo += gterm;
                                } else {
                                    gsum_hi += gterm;
                                }
                                pair[c] = bf16::cast_from(select(keep, gate * slope * dw, 0.0f32));
                            }
                            frag[comptime!(2 * half + h)] = pair;
                        }
                    }
                    x.push(frag);
                }
                #[unroll]
                for kk in 0..HALF / 16 {
                    #[unroll]
                    for np in 0..d / 16 {
                        let (lo, hi) =
                            b_fragments_of_columns::<bf16, HB>(hb, &skb, h0 + 16 * kk, 16 * np, ds);
                        hb.execute_inplace(x.index(kk), &lo, acc.index_mut(comptime!(2 * np)));
                        hb.execute_inplace(x.index(kk), &hi, acc.index_mut(comptime!(2 * np + 1)));
                    }
                }
            }
        }
        sync_cube();
        if next {
            store_rows::<F, F>(&kregs, &mut sk, 0, STEP, d, ds, UNITS);
            store_rows::<F, bf16>(&kregs, &mut skb, 0, STEP, d, ds, UNITS);
            store_rows::<F, bf16>(&vregs, &mut sv, 0, STEP, e, vs, UNITS);
            if comptime!(cfg.gated) {
                if UNIT_POS < STEP as u32 {
                    sg[UNIT_POS as usize] = greg;
                }
            }
        }
        sync_cube();
    }

    let at_lo = token0 + row_lo as usize * q_stride + head as usize;
    let at_hi = token0 + row_hi as usize * q_stride + head as usize;
    let lo_exists = row_lo < chunk_len;
    let hi_exists = row_hi < chunk_len;
    store_tiles::<NC>(
        &acc,
        dq,
        at_lo,
        at_hi,
        lo_exists,
        hi_exists,
        scale,
        d / 8,
        c_vec,
    );
    gsum_lo += plane_shuffle_xor(gsum_lo, 1u32);
    gsum_lo += plane_shuffle_xor(gsum_lo, 2u32);
    gsum_hi += plane_shuffle_xor(gsum_hi, 1u32);
    gsum_hi += plane_shuffle_xor(gsum_hi, 2u32);
    if quad == 0 {
        if lo_exists {
            dg[at_lo] = gsum_lo;
        }
        if hi_exists {
            dg[at_hi] = gsum_hi;
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn intra_key_grads_manual_kernel<F: Float>(
    q: &Array<Vector<F, Const<8>>>,
    k: &Array<Vector<F, Const<8>>>,
    v: &Array<Vector<F, Const<8>>>,
    d_num: &Array<Vector<bf16, Const<8>>>,
    d_den: &Array<f32>,
    gates: &Array<f32>,
    dk: &mut Array<f32>,
    dv: &mut Array<f32>,
    dg: &mut Array<f32>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    scale: f32,
    #[comptime] cfg: IntraGradTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let ds = comptime!(cfg.head_dim as usize + 8);
    let vs = comptime!(cfg.value_dim as usize + 8);

    let ratio = q_heads / kv_heads;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let tile_start = CUBE_POS_X * ROWS as u32;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let chunk_len = select(seq - chunk_start < chunk, seq - chunk_start, chunk);
    let k_rows = rows_present(tile_start, chunk_len);

    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let quad = lane % 4;
    let plane_first = tile_start + (plane * PR) as u32;
    let key_lo = plane_first + (lane / 4) as u32;
    let key_hi = key_lo + 8;

    let mut sk = SharedMemory::<F>::new(ROWS * ds);
    let mut sv = SharedMemory::<bf16>::new(ROWS * vs);
    // queries in the input dtype (scores, as the forward computes them) and in bf16 (`∂Sᵀ Q`)
    let mut sq = SharedMemory::<F>::new(STEP * ds);
    let mut sqb = SharedMemory::<bf16>::new(STEP * ds);
    let mut sn = SharedMemory::<bf16>::new(STEP * vs);
    let mut sg = SharedMemory::<f32>::new(STEP);
    let mut sl = SharedMemory::<f32>::new(STEP);

    let token0 = ((bi * seq + chunk_start) as usize) * q_heads as usize;
    let kv_token0 = ((bi * seq + chunk_start) as usize) * kv_heads as usize;
    let own = kv_token0 + tile_start as usize * kv_heads as usize + kvh as usize;
    let kv_stride = kv_heads as usize;
    stage_own_rows::<F, F>(
        k,
        &mut sk,
        own * (d / 8),
        kv_stride * (d / 8),
        k_rows,
        d,
        ds,
    );
    stage_own_rows::<F, bf16>(
        v,
        &mut sv,
        own * (e / 8),
        kv_stride * (e / 8),
        k_rows,
        e,
        vs,
    );

    let mut gk_lo = 0.0f32;
    let mut gk_hi = 0.0f32;
    if comptime!(cfg.gated) {
        if key_lo < chunk_len {
            gk_lo = gates[gate_base + (chunk_start + key_lo) as usize];
        }
        if key_hi < chunk_len {
            gk_hi = gates[gate_base + (chunk_start + key_hi) as usize];
        }
    }

    // the queries of every head of the group, from the block holding the first key on
    let q_first = tile_start / STEP as u32;
    let q_steps = select(
        k_rows > 0,
        (chunk_len + STEP as u32 - 1) / STEP as u32 - q_first,
        0u32,
    );
    let steps = ratio * q_steps;
    let mut qregs = row_registers::<F>(STEP, d, UNITS);
    let mut nregs = row_registers::<bf16>(STEP, e, UNITS);
    let mut greg = 0.0f32;
    let mut lreg = 0.0f32;
    let q_stride = q_heads as usize;
    if steps > 0 {
        let q0 = q_first * STEP as u32;
        let present = rows_present(q0, chunk_len);
        let at = token0 + q0 as usize * q_stride + (kvh * ratio) as usize;
        fetch_rows::<F>(
            q,
            &mut qregs,
            at * (d / 8),
            q_stride * (d / 8),
            present,
            STEP,
            d,
            UNITS,
        );
        fetch_rows::<bf16>(
            d_num,
            &mut nregs,
            at * (e / 8),
            q_stride * (e / 8),
            present,
            STEP,
            e,
            UNITS,
        );
        store_rows::<F, F>(&qregs, &mut sq, 0, STEP, d, ds, UNITS);
        store_rows::<F, bf16>(&qregs, &mut sqb, 0, STEP, d, ds, UNITS);
        store_rows::<bf16, bf16>(&nregs, &mut sn, 0, STEP, e, vs, UNITS);
        if UNIT_POS < STEP as u32 {
            let pos = q0 + UNIT_POS;
            let mut l = 0.0f32;
            let mut g = 0.0f32;
            if pos < chunk_len {
                l = d_den[at + UNIT_POS as usize * q_stride];
                if comptime!(cfg.gated) {
                    g = gates[gate_base + (chunk_start + pos) as usize];
                }
            }
            sl[UNIT_POS as usize] = l;
            sg[UNIT_POS as usize] = g;
        }
    }
    sync_cube();

    let qk = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    let hb = MmaDefinition::<bf16, bf16, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = qk.vector_size(MatrixIdent::A);
    let size!(NB) = qk.vector_size(MatrixIdent::B);
    let size!(HA) = hb.vector_size(MatrixIdent::A);
    let size!(HB) = hb.vector_size(MatrixIdent::B);
    let size!(NC) = qk.vector_size(MatrixIdent::Accumulator);
    let c_len_raw = qk.elems_per_lane(MatrixIdent::Accumulator);
    let c_vec_raw = qk.vector_size(MatrixIdent::Accumulator);
    let c_vec = comptime!(c_vec_raw);
    let c_regs = comptime!(c_len_raw / c_vec_raw);

    let mut acc_k = zero_tiles::<NC>(d / 8, c_regs);
    let mut acc_v = zero_tiles::<NC>(e / 8, c_regs);
    let mut gsum_lo = 0.0f32;
    let mut gsum_hi = 0.0f32;
    for step in 0..steps {
        let q0 = (q_first + step % q_steps) * STEP as u32;
        let next = step + 1 < steps;
        if next {
            let nstep = step + 1;
            let first = (q_first + nstep % q_steps) * STEP as u32;
            let head = kvh * ratio + nstep / q_steps;
            let present = rows_present(first, chunk_len);
            let at = token0 + first as usize * q_stride + head as usize;
            fetch_rows::<F>(
                q,
                &mut qregs,
                at * (d / 8),
                q_stride * (d / 8),
                present,
                STEP,
                d,
                UNITS,
            );
            fetch_rows::<bf16>(
                d_num,
                &mut nregs,
                at * (e / 8),
                q_stride * (e / 8),
                present,
                STEP,
                e,
                UNITS,
            );
            if UNIT_POS < STEP as u32 {
                let pos = first + UNIT_POS;
                lreg = 0.0;
                greg = 0.0;
                if pos < chunk_len {
                    lreg = d_den[at + UNIT_POS as usize * q_stride];
                    if comptime!(cfg.gated) {
                        greg = gates[gate_base + (chunk_start + pos) as usize];
                    }
                }
            }
        }
        #[unroll]
        for hh in 0..STEP / HALF {
            let h0 = comptime!(hh * HALF);
            // the plane works when one of its keys exists and some query of the half reaches it
            if plane_first < chunk_len && q0 + (h0 + HALF) as u32 > plane_first {
                let mut s = zero_tiles::<NC>(HALF / 8, c_regs);
                let mut p = zero_tiles::<NC>(HALF / 8, c_regs);
                #[unroll]
                for ks in 0..d / 16 {
                    let a = a_fragment::<F, NA>(qk, &sk, plane * PR, 16 * ks, ds);
                    #[unroll]
                    for np in 0..HALF / 16 {
                        let (lo, hi) =
                            b_fragments_of_rows::<F, NB>(qk, &sq, h0 + 16 * np, 16 * ks, ds);
                        qk.execute_inplace(&a, &lo, s.index_mut(comptime!(2 * np)));
                        qk.execute_inplace(&a, &hi, s.index_mut(comptime!(2 * np + 1)));
                    }
                }
                #[unroll]
                for ks in 0..e / 16 {
                    let a = a_fragment::<bf16, HA>(hb, &sv, plane * PR, 16 * ks, vs);
                    #[unroll]
                    for np in 0..HALF / 16 {
                        let (lo, hi) =
                            b_fragments_of_rows::<bf16, HB>(hb, &sn, h0 + 16 * np, 16 * ks, vs);
                        hb.execute_inplace(&a, &lo, p.index_mut(comptime!(2 * np)));
                        hb.execute_inplace(&a, &hi, p.index_mut(comptime!(2 * np + 1)));
                    }
                }
                // Wᵀ and ∂Sᵀ, rounded to bf16 and packed as A fragments (tiles 2kk, 2kk + 1)
                let mut w = Sequence::<Array<Vector<bf16, HA>>>::new();
                let mut x = Sequence::<Array<Vector<bf16, HA>>>::new();
                #[unroll]
                for kk in 0..HALF / 16 {
                    let mut wfrag = Array::<Vector<bf16, HA>>::new(4usize);
                    let mut xfrag = Array::<Vector<bf16, HA>>::new(4usize);
                    #[unroll]
                    for half in 0..2usize {
                        let nt = comptime!(2 * kk + half);
                        let st = s.index(nt);
                        let pt = p.index(nt);
                        #[unroll]
                        for h in 0..2usize {
                            let mut wpair = Vector::<bf16, HA>::empty();
                            let mut xpair = Vector::<bf16, HA>::empty();
                            #[unroll]
                            for c in 0..2usize {
                                let jj = comptime!(2 * h + c);
                                let col = h0 + nt * 8 + 2 * quad + c;
                                let qpos = q0 + col as u32;
                                let mut key = key_lo;
                                let mut gk = gk_lo;
                                if comptime!(h == 1) {
                                    key = key_hi;
                                    gk = gk_hi;
                                }
                                let sc = scale * st[comptime!(jj / c_vec)][comptime!(jj % c_vec)];
                                let mut gate = 1.0f32;
                                if comptime!(cfg.gated) {
                                    gate = f32::exp(sg[col] - gk);
                                }
                                let (power, slope) = power_and_slope(sc, comptime!(cfg.degree));
                                let keep = key < chunk_len && qpos >= key && qpos < chunk_len;
                                let wt = gate * power;
                                let dw = pt[comptime!(jj / c_vec)][comptime!(jj % c_vec)] + sl[col];
                                let gterm = select(keep, wt * dw, 0.0f32);
                                if comptime!(h == 0) {
                                    gsum_lo += gterm;
                                } else {
                                    gsum_hi += gterm;
                                }
                                wpair[c] = bf16::cast_from(select(keep, wt, 0.0f32));
                                xpair[c] = bf16::cast_from(select(keep, gate * slope * dw, 0.0f32));
                            }
                            wfrag[comptime!(2 * half + h)] = wpair;
                            xfrag[comptime!(2 * half + h)] = xpair;
                        }
                    }
                    w.push(wfrag);
                    x.push(xfrag);
                }
                #[unroll]
                for kk in 0..HALF / 16 {
                    #[unroll]
                    for np in 0..e / 16 {
                        let (lo, hi) =
                            b_fragments_of_columns::<bf16, HB>(hb, &sn, h0 + 16 * kk, 16 * np, vs);
                        hb.execute_inplace(w.index(kk), &lo, acc_v.index_mut(comptime!(2 * np)));
                        hb.execute_inplace(
                            w.index(kk),
                            &hi,
                            acc_v.index_mut(comptime!(2 * np + 1)),
                        );
                    }
                    #[unroll]
                    for np in 0..d / 16 {
                        let (lo, hi) =
                            b_fragments_of_columns::<bf16, HB>(hb, &sqb, h0 + 16 * kk, 16 * np, ds);
                        hb.execute_inplace(x.index(kk), &lo, acc_k.index_mut(comptime!(2 * np)));
                        hb.execute_inplace(
                            x.index(kk),
                            &hi,
                            acc_k.index_mut(comptime!(2 * np + 1)),
                        );
                    }
                }
            }
        }
        sync_cube();
        if next {
            store_rows::<F, F>(&qregs, &mut sq, 0, STEP, d, ds, UNITS);
            store_rows::<F, bf16>(&qregs, &mut sqb, 0, STEP, d, ds, UNITS);
            store_rows::<bf16, bf16>(&nregs, &mut sn, 0, STEP, e, vs, UNITS);
            if UNIT_POS < STEP as u32 {
                sl[UNIT_POS as usize] = lreg;
                sg[UNIT_POS as usize] = greg;
            }
        }
        sync_cube();
    }

    let at_lo = kv_token0 + key_lo as usize * kv_stride + kvh as usize;
    let at_hi = kv_token0 + key_hi as usize * kv_stride + kvh as usize;
    let lo_exists = key_lo < chunk_len;
    let hi_exists = key_hi < chunk_len;
    store_tiles::<NC>(
        &acc_k,
        dk,
        at_lo,
        at_hi,
        lo_exists,
        hi_exists,
        scale,
        d / 8,
        c_vec,
    );
    store_tiles::<NC>(
        &acc_v,
        dv,
        at_lo,
        at_hi,
        lo_exists,
        hi_exists,
        1.0,
        e / 8,
        c_vec,
    );
    gsum_lo += plane_shuffle_xor(gsum_lo, 1u32);
    gsum_lo += plane_shuffle_xor(gsum_lo, 2u32);
    gsum_hi += plane_shuffle_xor(gsum_hi, 1u32);
    gsum_hi += plane_shuffle_xor(gsum_hi, 2u32);
    if quad == 0 {
        if lo_exists {
            dg[at_lo] = gsum_lo;
        }
        if hi_exists {
            dg[at_hi] = gsum_hi;
        }
    }
}
