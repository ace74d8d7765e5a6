//! Tensor-core (`cmma`) variant of [`chunk_state`](crate::chunk_state) for f16/bf16 inputs.
//!
//! A cube of 8 planes owns 64 features × all `e` value columns of one chunk's `ΔS` as `f32`
//! fragments (plane `p`: feature tile `p mod 4`, every other column tile from `p / 4`). For each
//! block of 64 tokens the units build `φ_K(k̃)ᵀ` (features × tokens, discounted to the chunk
//! end, key-side weights included) in shared memory in the input dtype, and the planes multiply
//! it with the value block. `Δz` is summed in `f32` on the units.

use cubecl::prelude::*;

use crate::config::StateTiles;
use crate::feature_pairs::{feature_row, row_offset};
use crate::tile_load::load_key_value_rows;

const BF: usize = 64;
const BK: usize = 64;
const PLANES: u32 = 8;
const PLANE: u32 = 32;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_state_mma_kernel<F: Float>(
    k: &Array<F>,
    v: &Array<F>,
    gates: &Array<f32>,
    states: &mut Array<f32>,
    sums: &mut Array<f32>,
    seq: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    #[comptime] cfg: StateTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let n_acc = comptime!(cfg.value_dim as usize / 32);
    let threads = comptime!((PLANES * PLANE) as usize);

    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let f0 = CUBE_POS_X as usize * BF;

    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let rt = plane % 4;
    let ct0 = plane / 4;
    let my_row = UNIT_POS as usize / 4;
    let my_col = UNIT_POS as usize % 4;

    // this unit's feature
    let f = (f0 + my_row) as u32;
    let mut a = 0u32;
    let mut b = 0u32;
    let mut weight = 0.0f32;
    if f < big_d {
        a = feature_row(f, cfg.head_dim);
        b = a + f - row_offset(a, cfg.head_dim);
        weight = 1.0;
        if a != b {
            weight = 2.0;
        }
    }
    let mut chunk_total = 0.0f32;
    if comptime!(cfg.gated) {
        chunk_total = gates[gate_base + (chunk_start + chunk - 1) as usize];
    }

    let mut sk = SharedMemory::<F>::new(BK * d);
    let mut sv = SharedMemory::<F>::new(BK * e);
    let mut sphi = SharedMemory::<F>::new(BF * BK);
    let mut discount = SharedMemory::<f32>::new(BK);
    let mut stage = SharedMemory::<f32>::new(threads * 8);
    let mut zpart = SharedMemory::<f32>::new(threads);

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
    let mut zsum = 0.0f32;

    let k_blocks = (chunk + BK as u32 - 1) / BK as u32;
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
        if UNIT_POS < BK as u32 {
            let pos = k0 + UNIT_POS;
            let mut dec = 1.0f32;
            if comptime!(cfg.gated) {
                if pos < chunk {
                    dec = f32::exp(chunk_total - gates[gate_base + (chunk_start + pos) as usize]);
                }
            }
            discount[UNIT_POS as usize] = dec;
        }
        sync_cube();
        #[unroll]
        for m in 0..BK / 4 {
            let j = my_col + 4 * m;
            let phi = weight
                * discount[j]
                * f32::cast_from(sk[j * d + a as usize])
                * f32::cast_from(sk[j * d + b as usize]);
            zsum += phi;
            sphi[my_row * BK + j] = F::cast_from(phi);
        }
        sync_cube();
        #[unroll]
        for ks in 0..BK / 16 {
            let am = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &sphi.slice(rt * 16 * BK + ks * 16, BF * BK),
                BK as u32,
            );
            #[unroll]
            for jj in 0..n_acc {
                let ct = ct0 + 2 * jj;
                let bm = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::RowMajor,
                    &sv.slice(ks * 16 * e + ct * 16, BK * e),
                    e as u32,
                );
                let c = acc.index(jj);
                cmma::execute::<F, F, f32, f32>(&am, &bm, c, c);
            }
        }
    }

    zpart[UNIT_POS as usize] = zsum;
    sync_cube();
    let block = ((bi * kv_heads + kvh) * n_chunks + u) as usize * big_d as usize;
    if my_col == 0 && f < big_d {
        let base = UNIT_POS as usize;
        sums[block + f as usize] =
            zpart[base] + zpart[base + 1] + zpart[base + 2] + zpart[base + 3];
    }
    let st = plane * 256;
    #[unroll]
    for jj in 0..n_acc {
        let ct = ct0 + 2 * jj;
        cmma::store(
            &mut stage.slice_mut(st, st + 256),
            acc.index(jj),
            16,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
        #[unroll]
        for m in 0..8usize {
            let idx = lane + 32 * m;
            let fr = f0 + rt * 16 + idx / 16;
            if fr < big_d as usize {
                states[(block + fr) * e + ct * 16 + idx % 16] = stage[st + idx];
            }
        }
        sync_plane();
    }
}
