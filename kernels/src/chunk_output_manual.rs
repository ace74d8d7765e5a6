//! The output kernel of [`chunk_output_mma`](crate::chunk_output_mma) on CUDA's manually
//! managed `mma.sync.m16n8k16`, flash-attention style: scores, weights and output accumulators
//! stay in registers.
//!
//! A cube of 8 planes owns 128 query rows of one chunk and head (plane `p` rows
//! `16p..16p + 16`). Per step of 64 keys (staged in shared memory through registers while the
//! previous step computes), each plane:
//! 1. multiplies its rows' `Q` (fragments loaded from shared memory with `ldmatrix`) by the
//!    keys (`ldmatrix`, rows of `K` are the columns of `Kᵀ`) into eight `16 × 8` `f32`
//!    accumulator tiles, in the input dtype as the other variants;
//! 2. turns each lane's 32 scores into gated powers `(σ s)^p e^{ā_i − ā_j}` in `f32`, rounds
//!    them to **bf16** (the exponent range of `f32`, as the other variants) and adds the
//!    rounded weights to its rows' partial sums;
//! 3. packs the rounded weights into bf16 A fragments without moving them: an `m16n8`
//!    accumulator holds rows `r`, `r + 8` and columns `2(l mod 4) + {0, 1}`, exactly the lane's
//!    part of an `m16k16` A operand whose halves are two adjacent tiles, and multiplies them
//!    by the values (`ldmatrix.trans`, bf16) into the output accumulators.
//!
//! No per-plane `f32` score tile, no weight tile, no plane barriers: the cmma variant's round
//! trips through shared memory are gone. The epilogue sums each row's weights across the four
//! lanes that hold it and writes the normalised rows (with the query-state part and, for the
//! backward, the row's normaliser) straight from the accumulators.

use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::*;
use half::bf16;

use crate::chunk_output_mma::BQ;
use crate::config::OutputTiles;
use crate::mma_fragments::{a_fragment, b_fragments_of_columns, b_fragments_of_rows, zero_tiles};
use crate::tile_load::{
    fetch_key_value_rows, fetch_rows, row_registers, rows_present, scaled_norm2, store_rows,
};

/// Keys per step.
const BK: usize = 64;
/// Rows per plane.
const PR: usize = 16;
const PLANES: u32 = 8;
const PLANE: u32 = 32;
const UNITS: usize = (PLANES * PLANE) as usize;

/// Shared memory of one cube, in bytes, for inputs of `el` bytes.
pub(crate) fn shared_bytes(head_dim: usize, value_dim: usize, el: usize) -> usize {
    el * (BQ + BK) * (head_dim + 8) + 2 * BK * (value_dim + 8) + 4 * BK
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_output_manual_kernel<F: Float, O: Float>(
    q: &Array<Vector<F, Const<8>>>,
    k: &Array<Vector<F, Const<8>>>,
    v: &Array<Vector<F, Const<8>>>,
    gates: &Array<f32>,
    state_num: &Array<f32>,
    state_den: &Array<f32>,
    out: &mut Array<O>,
    stats: &mut Array<f32>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    _big_d: u32,
    scale: f32,
    #[comptime] cfg: OutputTiles,
    #[define(F, O)] _dtypes: [StorageType; 2],
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let ds = comptime!(cfg.head_dim as usize + 8);
    let vs = comptime!(cfg.value_dim as usize + 8);
    let s_tiles = comptime!(BK / 8);
    let o_tiles = comptime!(cfg.value_dim as usize / 8);

    let ratio = q_heads / kv_heads;
    let q_blocks = (chunk + BQ as u32 - 1) / BQ as u32;
    let qb = CUBE_POS_X % q_blocks;
    let kvh = CUBE_POS_Y / n_chunks;
    let head = kvh * ratio + CUBE_POS_X / q_blocks;
    let u = CUBE_POS_Y % n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let tile_start = qb * BQ as u32;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    // positions of this chunk that hold tokens
    let chunk_len = select(seq - chunk_start < chunk, seq - chunk_start, chunk);
    let q_rows = rows_present(tile_start, chunk_len);

    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    // an accumulator's rows r, r + 8 and its columns 2·quad + {0, 1} of each 8-column tile
    let r = lane / 4;
    let quad = lane % 4;
    let plane_first = tile_start + (plane * PR) as u32;

    let mut sq = SharedMemory::<F>::new(BQ * ds);
    let mut sk = SharedMemory::<F>::new(BK * ds);
    let mut sv = SharedMemory::<bf16>::new(BK * vs);
    let mut sg = SharedMemory::<f32>::new(BK);
    // e^{G_ref − G_j} per key of the step, G_ref the step's last key: the gate factor of the
    // steps whose keys all precede the plane's rows (see `weights`)
    let mut sgf = SharedMemory::<f32>::new(BK);

    let token0 = ((bi * seq + chunk_start) as usize) * q_heads as usize;
    let kv_token0 = ((bi * seq + chunk_start) as usize) * kv_heads as usize;
    let mut qregs = row_registers::<F>(BQ, d, UNITS);
    fetch_rows::<F>(
        q,
        &mut qregs,
        ((token0 + tile_start as usize * q_heads as usize) + head as usize) * (d / 8),
        q_heads as usize * (d / 8),
        q_rows,
        BQ,
        d,
        UNITS,
    );
    store_rows::<F, F>(&qregs, &mut sq, 0, BQ, d, ds, UNITS);

    let mut last = tile_start + BQ as u32;
    if last > chunk_len {
        last = chunk_len;
    }
    let k_blocks = select(q_rows > 0, (last + BK as u32 - 1) / BK as u32, 0u32);
    let mut kregs = row_registers::<F>(BK, d, UNITS);
    let mut vregs = row_registers::<F>(BK, e, UNITS);
    let mut greg = 0.0f32;
    let mut gref = 0.0f32;
    let key_stride = kv_heads as usize;
    if k_blocks > 0 {
        let present = rows_present(0, chunk_len);
        fetch_key_value_rows::<F>(
            k,
            v,
            &mut kregs,
            &mut vregs,
            kv_token0 + kvh as usize,
            key_stride,
            present,
            BK,
            d,
            e,
            UNITS,
        );
        store_rows::<F, F>(&kregs, &mut sk, 0, BK, d, ds, UNITS);
        store_rows::<F, bf16>(&vregs, &mut sv, 0, BK, e, vs, UNITS);
        if comptime!(cfg.gated) {
            if UNIT_POS < BK as u32 {
                let g = select(
                    UNIT_POS < chunk,
                    gates[gate_base + (chunk_start + UNIT_POS) as usize],
                    0.0f32,
                );
                let g_ref = step_reference_gate(gates, gate_base + chunk_start as usize, 0, chunk);
                sg[UNIT_POS as usize] = g;
                sgf[UNIT_POS as usize] = f32::exp(g_ref - g);
            }
        }
    }
    sync_cube();

    // per row of the lane (r, r + 8): position, validity, gate, and the row factor
    // 1/(σ|q_i|)² of the query-state part (a zero row has zero weights anyway)
    let row_lo = plane_first + r as u32;
    let row_hi = row_lo + 8;
    let norm_lo = scaled_norm2::<F>(&sq, (plane * PR + r) * ds, scale, d);
    let norm_hi = scaled_norm2::<F>(&sq, (plane * PR + r + 8) * ds, scale, d);
    let factor_lo = select(norm_lo > 0.0, 1.0 / norm_lo, 0.0f32);
    let factor_hi = select(norm_hi > 0.0, 1.0 / norm_hi, 0.0f32);
    let mut g_lo = 0.0f32;
    let mut g_hi = 0.0f32;
    if comptime!(cfg.gated) {
        if row_lo < chunk_len {
            g_lo = gates[gate_base + (chunk_start + row_lo) as usize];
        }
        if row_hi < chunk_len {
            g_hi = gates[gate_base + (chunk_start + row_hi) as usize];
        }
    }

    let qk = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    let wv = MmaDefinition::<bf16, bf16, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = qk.vector_size(MatrixIdent::A);
    let size!(NB) = qk.vector_size(MatrixIdent::B);
    let size!(NW) = wv.vector_size(MatrixIdent::A);
    let size!(NV) = wv.vector_size(MatrixIdent::B);
    let size!(NC) = qk.vector_size(MatrixIdent::Accumulator);
    let c_len_raw = qk.elems_per_lane(MatrixIdent::Accumulator);
    let c_vec_raw = qk.vector_size(MatrixIdent::Accumulator);
    let c_vec = comptime!(c_vec_raw);
    let c_regs = comptime!(c_len_raw / c_vec_raw);

    let mut acc = zero_tiles::<NC>(o_tiles, c_regs);
    // the rows' weight sums (rows r, r + 8 of the lane)
    let mut sums = Array::<f32>::new(2usize);
    sums[0] = 0.0f32;
    sums[1] = 0.0f32;

    for kb in 0..k_blocks {
        let k0 = kb * BK as u32;
        let next = kb + 1 < k_blocks;
        if next {
            let first = k0 + BK as u32;
            let present = rows_present(first, chunk_len);
            let at = kv_token0 + first as usize * key_stride + kvh as usize;
            fetch_key_value_rows::<F>(
                k, v, &mut kregs, &mut vregs, at, key_stride, present, BK, d, e, UNITS,
            );
            if comptime!(cfg.gated) {
                if UNIT_POS < BK as u32 {
                    let pos = first + UNIT_POS;
                    greg = select(
                        pos < chunk,
                        gates[gate_base + (chunk_start + pos) as usize],
                        0.0,
                    );
                    gref =
                        step_reference_gate(gates, gate_base + chunk_start as usize, first, chunk);
                }
            }
        }
        // the plane works when one of its rows exists and reaches this step's first key
        if plane_first < chunk_len && k0 < plane_first + PR as u32 {
            // 1. S = Q Kᵀ, eight 16 × 8 tiles
            let mut s = zero_tiles::<NC>(s_tiles, c_regs);
            #[unroll]
            for ks in 0..d / 16 {
                let a = a_fragment::<F, NA>(qk, &sq, plane * PR, ks * 16, ds);
                #[unroll]
                for np in 0..BK / 16 {
                    let (lo, hi) = b_fragments_of_rows::<F, NB>(qk, &sk, 16 * np, ks * 16, ds);
                    qk.execute_inplace(&a, &lo, s.index_mut(comptime!(2 * np)));
                    qk.execute_inplace(&a, &hi, s.index_mut(comptime!(2 * np + 1)));
                }
            }
            // 2. gated powers, rounded to bf16, packed as the A fragments of W·V; 3. O += W V.
            // A step whose keys all precede the plane's rows needs no mask and no exponential
            // per weight: e^{G_i − G_j} = e^{G_i − G_ref}·e^{G_ref − G_j}, both factors ≤ 1
            // (G falls along the chunk) with G_ref the step's last key
            if k0 + (BK as u32) <= plane_first {
                // the step's last key is present (it precedes the plane's rows)
                let mut g_ref = 0.0f32;
                if comptime!(cfg.gated) {
                    g_ref = sg[BK - 1];
                }
                let w = weights::<NC, NW>(
                    &s, &sg, &sgf, k0, row_lo, chunk_len, factor_lo, factor_hi, g_lo, g_hi, g_ref,
                    scale, &mut sums, quad, c_vec, cfg, true,
                );
                multiply_values::<NW, NV, NC>(wv, &w, &sv, &mut acc, e, vs);
            } else {
                let w = weights::<NC, NW>(
                    &s, &sg, &sgf, k0, row_lo, chunk_len, factor_lo, factor_hi, g_lo, g_hi, 0.0,
                    scale, &mut sums, quad, c_vec, cfg, false,
                );
                multiply_values::<NW, NV, NC>(wv, &w, &sv, &mut acc, e, vs);
            }
        }
        sync_cube();
        if next {
            store_rows::<F, F>(&kregs, &mut sk, 0, BK, d, ds, UNITS);
            store_rows::<F, bf16>(&vregs, &mut sv, 0, BK, e, vs, UNITS);
            if comptime!(cfg.gated) {
                if UNIT_POS < BK as u32 {
                    sg[UNIT_POS as usize] = greg;
                    sgf[UNIT_POS as usize] = f32::exp(gref - greg);
                }
            }
        }
        sync_cube();
    }

    // each row's weights are spread over the four lanes of its quad
    let mut l_lo = sums[0];
    let mut l_hi = sums[1];
    l_lo += plane_shuffle_xor(l_lo, 1u32);
    l_lo += plane_shuffle_xor(l_lo, 2u32);
    l_hi += plane_shuffle_xor(l_hi, 1u32);
    l_hi += plane_shuffle_xor(l_hi, 2u32);

    #[unroll]
    for h in 0..2usize {
        let mut pos = row_lo;
        let mut l = l_lo;
        let mut norm2 = norm_lo;
        if comptime!(h == 1) {
            pos = row_hi;
            l = l_hi;
            norm2 = norm_hi;
        }
        if pos < chunk_len {
            let at = token0 + pos as usize * q_heads as usize + head as usize;
            // the query-state part comes without the row's gate factor e^{G_i}, applied here in
            // f32 (see the cmma variant)
            let mut decay = 1.0f32;
            if comptime!(cfg.with_state) {
                if comptime!(cfg.gated) {
                    decay = f32::exp(gates[gate_base + (chunk_start + pos) as usize]);
                }
                l += decay * state_den[at];
            }
            let inv = select(l > 0.0, 1.0 / l, 0.0f32);
            #[unroll]
            for nt in 0..o_tiles {
                let t = acc.index(nt);
                #[unroll]
                for c in 0..2usize {
                    let col = nt * 8 + 2 * quad + c;
                    let jj = comptime!(2 * h + c);
                    let mut val = t[comptime!(jj / c_vec)][comptime!(jj % c_vec)];
                    if comptime!(cfg.with_state) {
                        val += decay * state_num[at * e + col];
                    }
                    out[at * e + col] = O::cast_from(val * inv);
                }
            }
            if comptime!(cfg.with_stats) {
                if quad == 0 {
                    // `l` carries the row factor `1/(σ|q|)²`: the normaliser is `l·(σ|q|)²`
                    stats[at] = l * norm2;
                }
            }
        }
    }
}

/// The gate sum `G_ref` of the last key of the step starting at `first` (the chunk's last
/// position where the step runs past it).
#[cube]
fn step_reference_gate(gates: &Array<f32>, base: usize, first: u32, chunk: u32) -> f32 {
    let mut last = first + BK as u32 - 1;
    if last >= chunk {
        last = chunk - 1;
    }
    gates[base + last as usize]
}

/// `x^p` for even `p ≥ 2`.
#[cube]
fn power(x: f32, #[comptime] degree: u32) -> f32 {
    let x2 = x * x;
    let mut p = x2;
    #[unroll]
    for _ in 1..comptime!(degree / 2) {
        p *= x2;
    }
    p
}

/// One step's weights for the lane's rows, rounded to bf16 and packed as the A fragments of
/// `W·V` (fragment `kk` holds accumulator tiles `2kk` (registers 0, 1) and `2kk + 1`
/// (registers 2, 3), rows `r` then `r + 8`); their sums are added to `sums`.
///
/// `before` (comptime): every key of the step precedes every row of the plane, so no weight
/// is masked and the gate factor is `e^{G_i − G_ref}` per row times `e^{G_ref − G_j}` per key
/// (`sgf`); otherwise each weight is masked (causality, absent rows) and its factor is
/// `e^{G_i − G_j}`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn weights<NC: Size, NW: Size>(
    s: &Sequence<Array<Vector<f32, NC>>>,
    sg: &SharedMemory<f32>,
    sgf: &SharedMemory<f32>,
    k0: u32,
    row_lo: u32,
    chunk_len: u32,
    factor_lo: f32,
    factor_hi: f32,
    g_lo: f32,
    g_hi: f32,
    g_ref: f32,
    scale: f32,
    sums: &mut Array<f32>,
    quad: usize,
    #[comptime] c_vec: usize,
    #[comptime] cfg: OutputTiles,
    #[comptime] before: bool,
) -> Sequence<Array<Vector<bf16, NW>>> {
    let row_hi = row_lo + 8;
    // per row: σ^p, the row factor and e^{G_i − G_ref} for `before` steps; absent rows weigh 0
    let mut scale_p = 1.0f32;
    #[unroll]
    for _ in 0..comptime!(cfg.degree) {
        scale_p *= scale;
    }
    let mut row_lo_w = 0.0f32;
    let mut row_hi_w = 0.0f32;
    if comptime!(before) {
        let mut e_lo = 1.0f32;
        let mut e_hi = 1.0f32;
        if comptime!(cfg.gated) {
            e_lo = f32::exp(g_lo - g_ref);
            e_hi = f32::exp(g_hi - g_ref);
        }
        row_lo_w = select(row_lo < chunk_len, scale_p * factor_lo * e_lo, 0.0f32);
        row_hi_w = select(row_hi < chunk_len, scale_p * factor_hi * e_hi, 0.0f32);
    }
    let mut w = Sequence::<Array<Vector<bf16, NW>>>::new();
    #[unroll]
    for kk in 0..BK / 16 {
        let mut frag = Array::<Vector<bf16, NW>>::new(4usize);
        #[unroll]
        for half in 0..2usize {
            let nt = comptime!(2 * kk + half);
            let t = s.index(nt);
            #[unroll]
            for h in 0..2usize {
                let mut pair = Vector::<bf16, NW>::empty();
                #[unroll]
                for c in 0..2usize {
                    let col = nt * 8 + 2 * quad + c;
                    let jj = comptime!(2 * h + c);
                    let raw = t[comptime!(jj / c_vec)][comptime!(jj % c_vec)];
                    let wt = if comptime!(before) {
                        let mut row_w = row_lo_w;
                        if comptime!(h == 1) {
                            row_w = row_hi_w;
                        }
                        let mut key_w = 1.0f32;
                        if comptime!(cfg.gated) {
                            key_w = sgf[col];
                        }
                        power(raw, cfg.degree) * key_w * row_w
                    } else {
                        let pos = k0 + col as u32;
                        let mut row = row_lo;
                        let mut factor = factor_lo;
                        let mut g = g_lo;
                        if comptime!(h == 1) {
                            row = row_hi;
                            factor = factor_hi;
                            g = g_hi;
                        }
                        let keep = row < chunk_len && pos <= row;
                        let mut p = power(scale * raw, cfg.degree);
                        if comptime!(cfg.gated) {
                            p *= f32::exp(g - sg[col]);
                        }
                        select(keep, p * factor, 0.0f32)
                    };
                    let wb = bf16::cast_from(wt);
                    sums[h] += f32::cast_from(wb);
                    pair[c] = wb;
                }
                frag[comptime!(2 * half + h)] = pair;
            }
        }
        w.push(frag);
    }
    w
}

/// `O += W·V` for one step: the weight fragments `w` times the staged values `sv`.
#[cube]
fn multiply_values<NW: Size, NV: Size, NC: Size>(
    wv: MmaDefinition<bf16, bf16, f32>,
    w: &Sequence<Array<Vector<bf16, NW>>>,
    sv: &SharedMemory<bf16>,
    acc: &mut Sequence<Array<Vector<f32, NC>>>,
    #[comptime] e: usize,
    #[comptime] vs: usize,
) {
    #[unroll]
    for kk in 0..BK / 16 {
        #[unroll]
        for np in 0..e / 16 {
            let (lo, hi) = b_fragments_of_columns::<bf16, NV>(wv, sv, 16 * kk, 16 * np, vs);
            wv.execute_inplace(w.index(kk), &lo, acc.index_mut(comptime!(2 * np)));
            wv.execute_inplace(w.index(kk), &hi, acc.index_mut(comptime!(2 * np + 1)));
        }
    }
}
