//! Tensor-core (`cmma`) variant of [`chunk_output`](crate::chunk_output) for f16/bf16 inputs:
//! the intra-chunk part, plus (chunked form) the query-state part computed beforehand by
//! [`query_state`](crate::query_state), then the normalisation.
//!
//! A cube of 8 planes owns 128 query rows of one chunk and head; plane `p` owns rows
//! `16p..16p + 16` and all `e` value columns, so scores, weights and the output accumulators
//! of a row never leave its plane. Per step of 64 keys (staged in shared memory through
//! registers while the previous step computes):
//! 1. `S = Q Kᵀ` on the matrix units (input dtype, `f32` accumulators), through a per-plane
//!    `f32` tile;
//! 2. each lane turns 32 scores of its row into gated powers `(σ s)^p e^{ā_i − ā_j}` in `f32`,
//!    rounds them to **bf16** (the exponent range of `f32`: strong gates and high powers span
//!    more decades than f16 holds) and adds the rounded weight to the row sum, so numerator
//!    and denominator see the same weights;
//! 3. `O += W V` on the matrix units (bf16 operands, `V` converted on staging).
//!
//! Weights carry the row factor `1/(σ|q_i|)²` of the query-state numerators and denominators,
//! which cancels in the division; those come without the row's gate factor `e^{ā_i}`, applied
//! here in `f32` when they are added. Planes whose rows all precede the step's first key skip it.

use cubecl::prelude::*;
use half::bf16;

use crate::config::OutputTiles;
use crate::tile_load::{
    fetch_key_value_rows, fetch_rows, row_registers, rows_present, scaled_norm2, store_rows,
};

/// Query rows per cube.
pub(crate) const BQ: usize = 128;
/// Keys per step.
const BK: usize = 64;
/// Rows per plane.
const PR: usize = 16;
/// Row stride of a plane's `f32` tile (scores, then output columns): a multiple of 4 floats.
const SS: usize = BK + 4;
/// Row stride of a plane's bf16 weight tile: 16-byte aligned rows.
const WS: usize = BK + 8;
const PLANES: u32 = 8;
const PLANE: u32 = 32;
const UNITS: usize = (PLANES * PLANE) as usize;

/// Shared memory of one cube, in bytes, for inputs of `el` bytes.
pub(crate) fn shared_bytes(head_dim: usize, value_dim: usize, el: usize) -> usize {
    let (ds, vs) = (head_dim + 8, value_dim + 8);
    el * (BQ + BK) * ds
        + 2 * (BK * vs + PLANES as usize * PR * WS)
        + 4 * (PLANES as usize * PR * SS + BK + UNITS)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_output_mma_kernel<F: Float, O: Float>(
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
    let col_tiles = comptime!(cfg.value_dim as usize / 16);
    let half_e = comptime!(cfg.value_dim as usize / 2);

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
    let r = lane / 2;
    let odd = lane % 2;
    let plane_first = tile_start + (plane * PR) as u32;
    let row_pos = plane_first + r as u32;
    let row_valid = row_pos < chunk_len;

    let mut sq = SharedMemory::<F>::new(BQ * ds);
    let mut sk = SharedMemory::<F>::new(BK * ds);
    let mut sv = SharedMemory::<bf16>::new(BK * vs);
    let mut sw = SharedMemory::<bf16>::new(PLANES as usize * PR * WS);
    let mut so = SharedMemory::<f32>::new(PLANES as usize * PR * SS);
    let mut sg = SharedMemory::<f32>::new(BK);
    let mut lpart = SharedMemory::<f32>::new(UNITS);

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
                sg[UNIT_POS as usize] = g;
            }
        }
    }
    sync_cube();

    // row factor 1/(σ|q_i|)², as the query-state part (a zero row has zero weights anyway)
    let norm2 = scaled_norm2::<F>(&sq, (plane * PR + r) * ds, scale, d);
    let intra_factor = select(norm2 > 0.0, 1.0 / norm2, 0.0f32);
    let mut gq = 0.0f32;
    if comptime!(cfg.gated) {
        if row_valid {
            gq = gates[gate_base + (chunk_start + row_pos) as usize];
        }
    }

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..col_tiles {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    let mut lsum = 0.0f32;
    let tile_s = plane * PR * SS;
    let tile_w = plane * PR * WS;

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
                }
            }
        }
        // the plane works when one of its rows exists and reaches this step's first key
        if plane_first < chunk_len && k0 < plane_first + PR as u32 {
            #[unroll]
            for ct in 0..BK / 16 {
                let s = cmma::Matrix::<f32>::from_value(
                    cmma::MatrixIdent::Accumulator,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::Undefined,
                    0.0,
                );
                #[unroll]
                for ks in 0..d / 16 {
                    let a = cmma::Matrix::<F>::from_slice(
                        cmma::MatrixIdent::A,
                        16usize,
                        16usize,
                        16usize,
                        cmma::MatrixLayout::RowMajor,
                        &sq.slice(plane * PR * ds + ks * 16, sq.len()),
                        ds as u32,
                    );
                    let b = cmma::Matrix::<F>::from_slice(
                        cmma::MatrixIdent::B,
                        16usize,
                        16usize,
                        16usize,
                        cmma::MatrixLayout::ColMajor,
                        &sk.slice(ct * 16 * ds + ks * 16, sk.len()),
                        ds as u32,
                    );
                    cmma::execute::<F, F, f32, f32>(&a, &b, &s, &s);
                }
                cmma::store(
                    &mut so.slice_mut(tile_s + ct * 16, so.len()),
                    &s,
                    SS as u32,
                    cmma::MatrixLayout::RowMajor,
                );
            }
            sync_plane();
            #[unroll]
            for j in 0..BK / 2 {
                let c = odd + 2 * j;
                let sc = scale * so[tile_s + r * SS + c];
                let s2 = sc * sc;
                let mut w = s2;
                #[unroll]
                for _ in 1..comptime!(cfg.degree / 2) {
                    w *= s2;
                }
                if comptime!(cfg.gated) {
                    w *= f32::exp(gq - sg[c]);
                }
                let keep = row_valid && k0 + c as u32 <= row_pos;
                let wb = bf16::cast_from(select(keep, w * intra_factor, 0.0f32));
                lsum += f32::cast_from(wb);
                sw[tile_w + r * WS + c] = wb;
            }
            sync_plane();
            #[unroll]
            for ks in 0..BK / 16 {
                let a = cmma::Matrix::<bf16>::from_slice(
                    cmma::MatrixIdent::A,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::RowMajor,
                    &sw.slice(tile_w + ks * 16, sw.len()),
                    WS as u32,
                );
                #[unroll]
                for ct in 0..col_tiles {
                    let b = cmma::Matrix::<bf16>::from_slice(
                        cmma::MatrixIdent::B,
                        16usize,
                        16usize,
                        16usize,
                        cmma::MatrixLayout::RowMajor,
                        &sv.slice(ks * 16 * vs + ct * 16, sv.len()),
                        vs as u32,
                    );
                    let c = acc.index(ct);
                    cmma::execute::<bf16, bf16, f32, f32>(&a, &b, c, c);
                }
            }
        }
        sync_cube();
        if next {
            store_rows::<F, F>(&kregs, &mut sk, 0, BK, d, ds, UNITS);
            store_rows::<F, bf16>(&vregs, &mut sv, 0, BK, e, vs, UNITS);
            if comptime!(cfg.gated) {
                if UNIT_POS < BK as u32 {
                    sg[UNIT_POS as usize] = greg;
                }
            }
        }
        sync_cube();
    }

    lpart[UNIT_POS as usize] = lsum;
    // the output leaves through the plane's f32 tile, half of the columns at a time
    #[unroll]
    for h in 0..2usize {
        #[unroll]
        for t in 0..col_tiles / 2 {
            cmma::store(
                &mut so.slice_mut(tile_s + t * 16, so.len()),
                acc.index(h * (col_tiles / 2) + t),
                SS as u32,
                cmma::MatrixLayout::RowMajor,
            );
        }
        sync_plane();
        #[unroll]
        for m in 0..PR * half_e / 32 {
            let idx = lane + 32 * m;
            let rr = idx / half_e;
            let col = h * half_e + idx % half_e;
            let pos = plane_first + rr as u32;
            if pos < chunk_len {
                let at = token0 + pos as usize * q_heads as usize + head as usize;
                let mut l = lpart[plane * 32 + 2 * rr] + lpart[plane * 32 + 2 * rr + 1];
                let mut val = so[tile_s + rr * SS + idx % half_e];
                if comptime!(cfg.with_state) {
                    // the query-state part comes without the row's gate factor e^{G_i}, which
                    // is applied here in f32 (in the f16 queries it underflowed for G_i ≲ −15,
                    // dropping the state from rows whose own weights are as small)
                    let mut decay = 1.0f32;
                    if comptime!(cfg.gated) {
                        decay = f32::exp(gates[gate_base + (chunk_start + pos) as usize]);
                    }
                    l += decay * state_den[at];
                    val += decay * state_num[at * e + col];
                }
                let inv = select(l > 0.0, 1.0 / l, 0.0f32);
                out[at * e + col] = O::cast_from(val * inv);
                if comptime!(cfg.with_stats) {
                    if col == 0 {
                        // `l` carries the row factor `1/(σ|q|)²`: the normaliser itself is
                        // `l·(σ|q|)²`
                        stats[at] = l * scaled_norm2::<F>(&sq, (plane * PR + rr) * ds, scale, d);
                    }
                }
            }
        }
        sync_plane();
    }
}
