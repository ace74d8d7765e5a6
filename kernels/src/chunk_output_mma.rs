//! Tensor-core (`cmma`) variant of [`chunk_output`](crate::chunk_output) for f16/bf16 inputs:
//! the intra-chunk part, plus (chunked form) the query-state part computed beforehand by
//! [`query_state`](crate::query_state), then the normalisation.
//!
//! A cube of 8 planes owns 64 query rows of one chunk and head, all `e` value columns. Scores
//! `Q Kᵀ` come from the matrix units in the input dtype; the gated powers and `W V` run in
//! `f32` on the units (exact weights: strong gates and p = 4 make them span more decades than
//! a half-precision operand holds). Weights carry the row factor `1/(σ|q_i|)²` of the
//! query-state numerators and denominators, which cancels in the division.

use cubecl::prelude::*;

use crate::config::OutputTiles;
use crate::tile_load::{load_gates, load_key_value_rows, load_token_rows, scaled_norm2};

const BQ: usize = 64;
const BK: usize = 64;
/// Row stride of the `f32` score tile: 68 puts the 8 rows a plane reads in distinct banks.
const SS: usize = 68;
const PLANES: u32 = 8;
const PLANE: u32 = 32;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_output_mma_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    gates: &Array<f32>,
    state_num: &Array<f32>,
    state_den: &Array<f32>,
    out: &mut Array<F>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    _big_d: u32,
    scale: f32,
    #[comptime] cfg: OutputTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let per_unit = comptime!(cfg.value_dim as usize / 4);
    let threads = comptime!((PLANES * PLANE) as usize);

    let ratio = q_heads / kv_heads;
    let q_blocks = (chunk + BQ as u32 - 1) / BQ as u32;
    let qb = CUBE_POS_X % q_blocks;
    let head = (CUBE_POS_Y / n_chunks) * ratio + CUBE_POS_X / q_blocks;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let tile_start = qb * BQ as u32;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;

    let plane = UNIT_POS_Y as usize;
    let rt = plane % 4;
    let ct0 = plane / 4;
    let my_row = UNIT_POS as usize / 4;
    let my_col = UNIT_POS as usize % 4;

    let mut sq = SharedMemory::<F>::new(BQ * d);
    let mut sk = SharedMemory::<F>::new(BK * d);
    let mut sv = SharedMemory::<F>::new(BK * e);
    // scores during the key loop, then the output tile: one buffer
    let mut sc = SharedMemory::<f32>::new(BQ * SS);
    let mut gq = SharedMemory::<f32>::new(BQ);
    let mut gk = SharedMemory::<f32>::new(BK);
    let mut lpart = SharedMemory::<f32>::new(threads);

    load_token_rows::<F, F>(
        q,
        &mut sq,
        chunk_start,
        tile_start,
        chunk,
        seq,
        bi,
        q_heads,
        head,
        1.0,
        BQ,
        d,
        d,
        threads,
    );
    if comptime!(cfg.gated) {
        load_gates(
            gates,
            &mut gq,
            gate_base,
            chunk_start,
            tile_start,
            chunk,
            BQ as u32,
        );
    }
    sync_cube();

    // row factor 1/(σ|q_i|)², as the query-state part (a zero row has zero weights anyway)
    let norm2 = scaled_norm2::<F>(&sq, my_row * d, scale, d);
    let mut intra_factor = 1.0f32;
    if norm2 > 0.0 {
        intra_factor = 1.0 / norm2;
    }

    let mut accf = Array::<f32>::new(per_unit);
    #[unroll]
    for m in 0..per_unit {
        accf[m] = 0.0;
    }
    let mut lsum = 0.0f32;

    let mut last = tile_start + BQ as u32;
    if last > chunk {
        last = chunk;
    }
    let k_blocks = (last - 1) / BK as u32 + 1;
    for kb in 0..k_blocks {
        let k0 = kb * BK as u32;
        sync_cube();
        load_key_value_rows::<F, F>(
            k,
            v,
            &mut sk,
            &mut sv,
            chunk_start,
            k0,
            chunk,
            seq,
            bi,
            kv_heads,
            kvh,
            BK,
            d,
            d,
            e,
            threads,
        );
        if comptime!(cfg.gated) {
            load_gates(gates, &mut gk, gate_base, chunk_start, k0, chunk, BK as u32);
        }
        sync_cube();
        // scores Q Kᵀ: this plane's row tile × key tiles ct0 and ct0 + 2
        #[unroll]
        for jj in 0..2usize {
            let ct = ct0 + 2 * jj;
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
                    &sq.slice(rt * 16 * d + ks * 16, BQ * d),
                    d as u32,
                );
                let b = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::ColMajor,
                    &sk.slice(ct * 16 * d + ks * 16, BK * d),
                    d as u32,
                );
                cmma::execute::<F, F, f32, f32>(&a, &b, &s, &s);
            }
            cmma::store(
                &mut sc.slice_mut(rt * 16 * SS + ct * 16, BQ * SS),
                &s,
                SS as u32,
                cmma::MatrixLayout::RowMajor,
            );
        }
        sync_cube();
        let q_pos = tile_start + my_row as u32;
        for j in 0..BK {
            let mut w = 0.0f32;
            if k0 + j as u32 <= q_pos {
                let s = scale * sc[my_row * SS + j];
                let s2 = s * s;
                w = s2;
                #[unroll]
                for _ in 1..comptime!(cfg.degree / 2) {
                    w *= s2;
                }
                if comptime!(cfg.gated) {
                    w *= f32::exp(gq[my_row] - gk[j]);
                }
                w *= intra_factor;
            }
            if my_col == 0 {
                lsum += w;
            }
            #[unroll]
            for m in 0..per_unit {
                accf[m] += w * f32::cast_from(sv[j * e + my_col + 4 * m]);
            }
        }
    }

    sync_cube();
    lpart[UNIT_POS as usize] = lsum;
    sync_cube();
    let pos = tile_start + my_row as u32;
    let tok = chunk_start + pos;
    if pos < chunk && tok < seq {
        let base = my_row * 4;
        let at = ((bi * seq + tok) * q_heads + head) as usize;
        let mut l = lpart[base] + lpart[base + 1] + lpart[base + 2] + lpart[base + 3];
        if comptime!(cfg.with_state) {
            l += state_den[at];
        }
        let mut inv = 0.0f32;
        if l > 0.0 {
            inv = 1.0 / l;
        }
        #[unroll]
        for m in 0..per_unit {
            let col = my_col + 4 * m;
            let mut val = accf[m];
            if comptime!(cfg.with_state) {
                val += state_num[at * e + col];
            }
            out[at * e + col] = F::cast_from(val * inv);
        }
    }
}
