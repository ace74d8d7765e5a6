//! Tensor-core (`cmma`) variant of [`chunk_output`](crate::chunk_output) for f16/bf16 inputs.
//!
//! A cube of 8 planes owns 64 query rows of one chunk and head, all `e` value columns.
//! - State part (the bulk of the work, `φ_Q(q̃)ᵀ S_in`): for each block of 64 features the
//!   units build `φ_Q` from the query tile in shared memory and stage the state block beside
//!   it, both as **f16** whatever the input dtype (4× bf16's precision), and the planes multiply
//!   into `f32` fragments (plane `p`: row tile `p mod 4`, every other column tile from `p / 4`).
//!   Each row is scaled by `c_i = γ / (σ|q_i|)²` and the state by `1/γ` (`γ = √D`) so both
//!   operands stay well inside f16's range; the factor cancels in the normalisation, and the
//!   row sums `φ·z` use the same rounded features as the product.
//! - Intra-chunk part: scores `Q Kᵀ` from the matrix units in the input dtype, then the gated
//!   powers and `W V` in `f32` on the units (exact weights: strong gates and p = 4 make them
//!   span more decades than a half-precision operand holds).

use cubecl::prelude::*;
use half::f16;

use crate::config::OutputTiles;
use crate::tile_load::{load_feature_pairs, load_gates, load_key_value_rows, load_token_rows};

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
    states: &Array<f32>,
    sums: &Array<f32>,
    out: &mut Array<F>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    scale: f32,
    #[comptime] cfg: OutputTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let n_acc = comptime!(cfg.value_dim as usize / 32);
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
    let mut sphi = SharedMemory::<f16>::new(BQ * BK);
    let mut sst = SharedMemory::<f16>::new(BK * e);
    // scores during the key loop, then the output tile: one buffer
    let mut sc =
        SharedMemory::<f32>::new(comptime!(if BQ * SS > BQ * e { BQ * SS } else { BQ * e }));
    let mut gq = SharedMemory::<f32>::new(BQ);
    let mut gk = SharedMemory::<f32>::new(BK);
    let mut fa = SharedMemory::<u32>::new(BK);
    let mut fb = SharedMemory::<u32>::new(BK);
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

    // row factor c_i = γ / (σ|q_i|)², 1 for a zero row
    let mut gamma = 1.0f32;
    if big_d > 0 {
        gamma = f32::sqrt(f32::cast_from(big_d));
    }
    let mut norm2 = 0.0f32;
    for x in 0..d {
        let qx = f32::cast_from(sq[my_row * d + x]);
        norm2 += qx * qx;
    }
    norm2 *= scale * scale;
    let mut row_factor = 1.0f32;
    if norm2 > 0.0 {
        row_factor = gamma / norm2;
    }
    let inv_gamma = 1.0 / gamma;

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..n_acc {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    let mut accf = Array::<f32>::new(per_unit);
    #[unroll]
    for m in 0..per_unit {
        accf[m] = 0.0;
    }
    let mut lsum = 0.0f32;

    if comptime!(cfg.with_state) {
        let mut phi_factor = scale * scale * row_factor;
        if comptime!(cfg.gated) {
            phi_factor *= f32::exp(gq[my_row]);
        }
        let block = (((bi * kv_heads + kvh) * n_chunks + u) * big_d) as usize;
        let n_blocks = (big_d as usize).div_ceil(BK);
        for fblk in 0..n_blocks {
            let f0 = fblk * BK;
            sync_cube();
            load_feature_pairs(
                sums,
                &mut fa,
                &mut fb,
                &mut gk,
                block,
                f0,
                big_d,
                cfg.head_dim,
                inv_gamma,
                BK,
            );
            let mut idx = UNIT_POS as usize;
            while idx < BK * e {
                let f = f0 + idx / e;
                let mut val = 0.0f32;
                if f < big_d as usize {
                    val = states[(block + f) * e + idx % e] * inv_gamma;
                }
                sst[idx] = f16::cast_from(val);
                idx += threads;
            }
            sync_cube();
            #[unroll]
            for m in 0..BK / 4 {
                let j = my_col + 4 * m;
                let phi = f16::cast_from(
                    phi_factor
                        * f32::cast_from(sq[my_row * d + fa[j] as usize])
                        * f32::cast_from(sq[my_row * d + fb[j] as usize]),
                );
                lsum += f32::cast_from(phi) * gk[j];
                sphi[my_row * BK + j] = phi;
            }
            sync_cube();
            #[unroll]
            for ks in 0..BK / 16 {
                let a = cmma::Matrix::<f16>::from_slice(
                    cmma::MatrixIdent::A,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::RowMajor,
                    &sphi.slice(rt * 16 * BK + ks * 16, BQ * BK),
                    BK as u32,
                );
                #[unroll]
                for jj in 0..n_acc {
                    let ct = ct0 + 2 * jj;
                    let b = cmma::Matrix::<f16>::from_slice(
                        cmma::MatrixIdent::B,
                        16usize,
                        16usize,
                        16usize,
                        cmma::MatrixLayout::RowMajor,
                        &sst.slice(ks * 16 * e + ct * 16, BK * e),
                        e as u32,
                    );
                    let c = acc.index(jj);
                    cmma::execute::<f16, f16, f32, f32>(&a, &b, c, c);
                }
            }
        }
    }

    let intra_factor = row_factor * inv_gamma;
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

    // combine: fragments into the f32 output tile, then add the unit accumulators
    sync_cube();
    #[unroll]
    for jj in 0..n_acc {
        let ct = ct0 + 2 * jj;
        cmma::store(
            &mut sc.slice_mut(rt * 16 * e + ct * 16, BQ * e),
            acc.index(jj),
            e as u32,
            cmma::MatrixLayout::RowMajor,
        );
    }
    lpart[UNIT_POS as usize] = lsum;
    sync_cube();
    let pos = tile_start + my_row as u32;
    let tok = chunk_start + pos;
    if pos < chunk && tok < seq {
        let base = my_row * 4;
        let l = lpart[base] + lpart[base + 1] + lpart[base + 2] + lpart[base + 3];
        let mut inv = 0.0f32;
        if l > 0.0 {
            inv = 1.0 / l;
        }
        let out_base = ((bi * seq + tok) * q_heads + head) as usize * e;
        #[unroll]
        for m in 0..per_unit {
            let col = my_col + 4 * m;
            out[out_base + col] = F::cast_from((sc[my_row * e + col] + accf[m]) * inv);
        }
    }
}
