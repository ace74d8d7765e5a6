//! The intra-chunk pairs of the backward pass on tensor cores (bf16 operands, f32
//! accumulation), flash-attention-backward style, for f16/bf16 inputs: the same gradients as
//! the FMA row kernels' intra-chunk part ([`chunk_grad`](crate::chunk_grad) states the
//! formulas), written (not added) before the state path
//! ([`chunk_grad_state_mma`](crate::chunk_grad_state_mma)) adds its share.
//!
//! Per pair `(i, j)`, `j ≤ i` in the chunk: `s = σq_i·k_j`, `w = s^p e^{G_i − G_j}`,
//! `dw = dN_i·v_j + dL_i`, the gate terms `w·dw`, `∂s = p s^{p−1} e^{G_i − G_j} dw`.
//!
//! [`launch_intra_query_grads`]: a cube of 8 planes owns 128 queries of one chunk and head
//! (plane `p` rows `16p..16p + 16`, their `q` and `dN` kept as fragments) and walks the keys
//! 64 at a time: `S = QKᵀ` and `dP = dN Vᵀ` through a per-plane f32 tile, the elementwise step
//! by each lane on 32 pairs of its row, `∂S` rounded to bf16 (f32's exponent range: strong
//! gates and high powers span more decades than f16 holds), then `∂Q += ∂S K`.
//!
//! [`launch_intra_key_grads`]: a cube owns 128 keys of one chunk and key/value head (their `k`
//! and `v` kept as fragments) and walks the queries of every head of the group 64 at a time:
//! `Sᵀ = K Qᵀ`, `dPᵀ = V dNᵀ`, then `∂V += Wᵀ dN` and `∂K += ∂Sᵀ Q`.
//!
//! The other side's rows are staged through registers while the previous step computes: keys
//! (or queries) twice, in the input dtype for the scores (computed as the forward computes
//! them) and in bf16 for the products with `∂S`; values and `dN` in bf16. `dN` arrives in bf16
//! (the caller rounds it once, so both kernels see the same operands and their gate terms
//! cancel as they should). A cube's own 128 rows reach their fragments through a 64-row tile,
//! in two halves.

use cubecl::prelude::*;
use half::bf16;

use crate::Buffer;
use crate::chunk_grad::{GradDims, power_and_slope};
use crate::chunk_grad_intra_manual::{
    intra_key_grads_manual_kernel, intra_query_grads_manual_kernel,
};
use crate::config::IntraGradTiles;
use crate::tile_load::{fetch_key_value_rows, fetch_rows, row_registers, rows_present, store_rows};

/// Rows a cube owns.
const ROWS: usize = 128;
/// The other side's rows per step.
const STEP: usize = 64;
/// Rows per plane.
const PR: usize = 16;
/// Row stride of a plane's f32 tile: a multiple of 4 floats.
const SS: usize = STEP + 4;
const PLANES: u32 = 8;
const PLANE: u32 = 32;
const UNITS: usize = (PLANES * PLANE) as usize;

/// Row stride of the per-plane bf16 tiles, which first hold the plane's own rows (`d` or `e`
/// wide) and then the step's `16 × 64` pair tile.
const fn wide_stride(head_dim: usize, value_dim: usize) -> usize {
    let mut w = STEP;
    if head_dim > w {
        w = head_dim;
    }
    if value_dim > w {
        w = value_dim;
    }
    w + 8
}

/// Shared memory of the larger of the two kernels (the key side), in bytes, for half inputs.
pub(crate) fn shared_bytes(head_dim: usize, value_dim: usize) -> usize {
    let ws = wide_stride(head_dim, value_dim);
    2 * 2 * STEP * (head_dim + 8)
        + 2 * STEP * (value_dim + 8)
        + 2 * 2 * ROWS * ws
        + 4 * (PLANES as usize * PR * SS)
        + 4 * 2 * STEP
}

/// The plane's `16 × 64` product `A · Bᵀ` (A as `tiles` fragments kept by the plane, B the
/// step's rows in shared memory with row stride `stride`) stored into the plane's f32 tile.
#[cube]
fn product_to_tile<E: Float>(
    a: &Sequence<cmma::Matrix<E>>,
    b_rows: &SharedMemory<E>,
    stride: usize,
    tile: &mut SharedMemory<f32>,
    tile_at: usize,
    #[comptime] tiles: usize,
) {
    #[unroll]
    for ct in 0..STEP / 16 {
        let acc = cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        );
        #[unroll]
        for ks in 0..tiles {
            let b = cmma::Matrix::<E>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::ColMajor,
                &b_rows.slice(ct * 16 * stride + ks * 16, b_rows.len()),
                stride as u32,
            );
            cmma::execute::<E, E, f32, f32>(a.index(ks), &b, &acc, &acc);
        }
        cmma::store(
            &mut tile.slice_mut(tile_at + ct * 16, tile.len()),
            &acc,
            SS as u32,
            cmma::MatrixLayout::RowMajor,
        );
    }
}

/// `acc += A · B` with A the plane's `16 × 64` bf16 pair tile and B the step's 64 rows
/// (`tiles · 16` columns, row stride `stride`).
#[cube]
fn accumulate_pairs(
    pairs: &SharedMemory<bf16>,
    pairs_at: usize,
    pairs_stride: usize,
    b_rows: &SharedMemory<bf16>,
    stride: usize,
    acc: &mut Sequence<cmma::Matrix<f32>>,
    #[comptime] tiles: usize,
) {
    #[unroll]
    for ks in 0..STEP / 16 {
        let a = cmma::Matrix::<bf16>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &pairs.slice(pairs_at + ks * 16, pairs.len()),
            pairs_stride as u32,
        );
        #[unroll]
        for ct in 0..tiles {
            let b = cmma::Matrix::<bf16>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &b_rows.slice(ks * 16 * stride + ct * 16, b_rows.len()),
                stride as u32,
            );
            let c = acc.index(ct);
            cmma::execute::<bf16, bf16, f32, f32>(&a, &b, c, c);
        }
    }
}

/// The plane's A fragments of its 16 rows staged (`tiles · 16` wide) at `at` in `src`.
#[cube]
fn row_fragments(
    src: &SharedMemory<bf16>,
    at: usize,
    stride: usize,
    #[comptime] tiles: usize,
) -> Sequence<cmma::Matrix<bf16>> {
    let mut frags = Sequence::<cmma::Matrix<bf16>>::new();
    #[unroll]
    for ks in 0..tiles {
        frags.push(cmma::Matrix::<bf16>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &src.slice(at + ks * 16, src.len()),
            stride as u32,
        ));
    }
    frags
}

/// The plane's A fragments (input dtype) of the cube's 128 own rows, staged through `stage`
/// (64 rows) in two halves: rows of `src` at vector `first + ρ·row_stride`, the first
/// `present` of them (zeros past it).
#[cube]
#[allow(clippy::too_many_arguments)]
fn own_fragments<F: Float>(
    src: &Array<Vector<F, Const<8>>>,
    stage: &mut SharedMemory<F>,
    first: usize,
    row_stride: usize,
    present: u32,
    #[comptime] width: usize,
    #[comptime] stride: usize,
) -> Sequence<cmma::Matrix<F>> {
    let plane = UNIT_POS_Y as usize;
    let mut frags = Sequence::<cmma::Matrix<F>>::new();
    #[unroll]
    for _ in 0..width / 16 {
        frags.push(unsafe {
            cmma::Matrix::<F>::uninitialized(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
            )
        });
    }
    let mut regs = row_registers::<F>(STEP, width, UNITS);
    #[unroll]
    for half in 0..2usize {
        fetch_rows::<F>(
            src,
            &mut regs,
            first + half * STEP * row_stride,
            row_stride,
            rows_present((half * STEP) as u32, present),
            STEP,
            width,
            UNITS,
        );
        store_rows::<F, F>(&regs, stage, 0, STEP, width, stride, UNITS);
        sync_cube();
        if plane / 4 == half {
            #[unroll]
            for ks in 0..width / 16 {
                cmma::load(
                    frags.index(ks),
                    &stage.slice((plane % 4) * PR * stride + ks * 16, stage.len()),
                    stride as u32,
                );
            }
        }
        sync_cube();
    }
    frags
}

/// `tiles` zeroed accumulators.
#[cube]
fn zeros(#[comptime] tiles: usize) -> Sequence<cmma::Matrix<f32>> {
    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..tiles {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    acc
}

/// Writes the plane's accumulated `16 × (tiles·16)` rows times `mult` to `out` (row `ρ` of the
/// plane at element `(first_row + ρ·row_stride) · width`), through its f32 tile, 64 columns at
/// a time; rows at or past `limit` (plane-relative) are skipped.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_rows(
    acc: &Sequence<cmma::Matrix<f32>>,
    tile: &mut SharedMemory<f32>,
    tile_at: usize,
    out: &mut Array<f32>,
    first_row: usize,
    row_stride: usize,
    limit: u32,
    mult: f32,
    #[comptime] tiles: usize,
) {
    let per = comptime!(if tiles < 4 { tiles } else { 4 });
    let width = comptime!(tiles * 16);
    let lane = UNIT_POS_X as usize;
    #[unroll]
    for g in 0..tiles / per {
        sync_plane();
        #[unroll]
        for t in 0..per {
            cmma::store(
                &mut tile.slice_mut(tile_at + t * 16, tile.len()),
                acc.index(g * per + t),
                SS as u32,
                cmma::MatrixLayout::RowMajor,
            );
        }
        sync_plane();
        #[unroll]
        for m in 0..comptime!(PR * per * 16 / 32) {
            let idx = lane + 32 * m;
            let rr = idx / (per * 16);
            let col = idx % (per * 16);
            if (rr as u32) < limit {
                out[(first_row + rr * row_stride) * width + g * per * 16 + col] =
                    mult * tile[tile_at + rr * SS + col];
            }
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn intra_query_grads_kernel<F: Float>(
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
    let ws = comptime!(wide_stride(cfg.head_dim as usize, cfg.value_dim as usize));
    let d_tiles = comptime!(cfg.head_dim as usize / 16);
    let e_tiles = comptime!(cfg.value_dim as usize / 16);

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
    let r = lane / 2;
    let odd = lane % 2;
    let plane_first = tile_start + (plane * PR) as u32;
    let row_pos = plane_first + r as u32;
    let row_valid = row_pos < chunk_len;
    let tile_s = plane * PR * SS;
    let tile_w = plane * PR * ws;

    // keys in the input dtype (scores, as the forward computes them) and in bf16 (`∂S K`)
    let mut sk = SharedMemory::<F>::new(STEP * ds);
    let mut skb = SharedMemory::<bf16>::new(STEP * ds);
    let mut sv = SharedMemory::<bf16>::new(STEP * vs);
    let mut sw = SharedMemory::<bf16>::new(ROWS * ws);
    let mut so = SharedMemory::<f32>::new(PLANES as usize * PR * SS);
    let mut sg = SharedMemory::<f32>::new(STEP);

    let token0 = ((bi * seq + chunk_start) as usize) * q_heads as usize;
    let kv_token0 = ((bi * seq + chunk_start) as usize) * kv_heads as usize;
    let own = token0 + tile_start as usize * q_heads as usize + head as usize;

    // this plane's queries (through the key tile) and dN (through the pair tile) as fragments
    let q_frags = own_fragments::<F>(
        q,
        &mut sk,
        own * (d / 8),
        q_heads as usize * (d / 8),
        q_rows,
        d,
        ds,
    );
    let mut nregs = row_registers::<bf16>(ROWS, e, UNITS);
    fetch_rows::<bf16>(
        d_num,
        &mut nregs,
        own * (e / 8),
        q_heads as usize * (e / 8),
        q_rows,
        ROWS,
        e,
        UNITS,
    );
    store_rows::<bf16, bf16>(&nregs, &mut sw, 0, ROWS, e, ws, UNITS);
    sync_cube();
    let n_frags = row_fragments(&sw, tile_w, ws, e_tiles);

    let mut row_dl = 0.0f32;
    let mut gq = 0.0f32;
    if row_valid {
        row_dl = d_den[token0 + row_pos as usize * q_heads as usize + head as usize];
        if comptime!(cfg.gated) {
            gq = gates[gate_base + (chunk_start + row_pos) as usize];
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
    sync_cube();
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

    let mut acc = zeros(d_tiles);
    let mut gsum = 0.0f32;
    let mut sval = Array::<f32>::new(STEP / 2);
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
        // the plane works when one of its rows exists and reaches this step's first key
        if plane_first < chunk_len && k0 < plane_first + PR as u32 {
            product_to_tile::<F>(&q_frags, &sk, ds, &mut so, tile_s, d_tiles);
            sync_plane();
            #[unroll]
            for j in 0..STEP / 2 {
                sval[j] = so[tile_s + r * SS + odd + 2 * j];
            }
            sync_plane();
            product_to_tile::<bf16>(&n_frags, &sv, vs, &mut so, tile_s, e_tiles);
            sync_plane();
            #[unroll]
            for j in 0..STEP / 2 {
                let c = odd + 2 * j;
                let sc = scale * sval[j];
                let mut gate = 1.0f32;
                if comptime!(cfg.gated) {
                    gate = f32::exp(gq - sg[c]);
                }
                let (power, slope) = power_and_slope(sc, comptime!(cfg.degree));
                let keep = row_valid && k0 + c as u32 <= row_pos;
                let dw = so[tile_s + r * SS + c] + row_dl;
                gsum += select(keep, gate * power * dw, 0.0f32);
                sw[tile_w + r * ws + c] = bf16::cast_from(select(keep, gate * slope * dw, 0.0f32));
            }
            sync_plane();
            accumulate_pairs(&sw, tile_w, ws, &skb, ds, &mut acc, d_tiles);
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

    if k_blocks > 0 {
        let limit = rows_present(plane_first, chunk_len);
        let first = token0 + plane_first as usize * q_heads as usize + head as usize;
        write_rows(
            &acc,
            &mut so,
            tile_s,
            dq,
            first,
            q_heads as usize,
            limit,
            scale,
            d_tiles,
        );
    }
    let total = gsum + plane_shuffle_xor(gsum, 1u32);
    if row_valid && odd == 0 {
        dg[token0 + row_pos as usize * q_heads as usize + head as usize] = total;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn intra_key_grads_kernel<F: Float>(
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
    let ws = comptime!(wide_stride(cfg.head_dim as usize, cfg.value_dim as usize));
    let d_tiles = comptime!(cfg.head_dim as usize / 16);
    let e_tiles = comptime!(cfg.value_dim as usize / 16);

    let ratio = q_heads / kv_heads;
    let kb = CUBE_POS_X;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let tile_start = kb * ROWS as u32;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let chunk_len = select(seq - chunk_start < chunk, seq - chunk_start, chunk);
    let k_rows = rows_present(tile_start, chunk_len);

    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let r = lane / 2;
    let odd = lane % 2;
    let plane_first = tile_start + (plane * PR) as u32;
    let key_pos = plane_first + r as u32;
    let key_valid = key_pos < chunk_len;
    let tile_s = plane * PR * SS;
    let tile_w = plane * PR * ws;

    // queries in the input dtype (scores, as the forward computes them) and in bf16 (`∂Sᵀ Q`)
    let mut sq = SharedMemory::<F>::new(STEP * ds);
    let mut sqb = SharedMemory::<bf16>::new(STEP * ds);
    let mut sn = SharedMemory::<bf16>::new(STEP * vs);
    let mut sw = SharedMemory::<bf16>::new(ROWS * ws);
    let mut sx = SharedMemory::<bf16>::new(ROWS * ws);
    let mut so = SharedMemory::<f32>::new(PLANES as usize * PR * SS);
    let mut sg = SharedMemory::<f32>::new(STEP);
    let mut sl = SharedMemory::<f32>::new(STEP);

    let token0 = ((bi * seq + chunk_start) as usize) * q_heads as usize;
    let kv_token0 = ((bi * seq + chunk_start) as usize) * kv_heads as usize;
    let own = kv_token0 + tile_start as usize * kv_heads as usize + kvh as usize;

    // this plane's keys (through the query tile) and values (through a pair tile) as fragments
    let k_frags = own_fragments::<F>(
        k,
        &mut sq,
        own * (d / 8),
        kv_heads as usize * (d / 8),
        k_rows,
        d,
        ds,
    );
    let mut vregs = row_registers::<F>(ROWS, e, UNITS);
    fetch_rows::<F>(
        v,
        &mut vregs,
        own * (e / 8),
        kv_heads as usize * (e / 8),
        k_rows,
        ROWS,
        e,
        UNITS,
    );
    store_rows::<F, bf16>(&vregs, &mut sx, 0, ROWS, e, ws, UNITS);
    sync_cube();
    let v_frags = row_fragments(&sx, tile_w, ws, e_tiles);

    let mut gk = 0.0f32;
    if comptime!(cfg.gated) {
        if key_valid {
            gk = gates[gate_base + (chunk_start + key_pos) as usize];
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
    sync_cube();
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

    let mut acc_k = zeros(d_tiles);
    let mut acc_v = zeros(e_tiles);
    let mut gsum = 0.0f32;
    let mut sval = Array::<f32>::new(STEP / 2);
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
        // the plane works when one of its keys exists and some query of the step reaches it
        if plane_first < chunk_len && q0 + STEP as u32 > plane_first {
            product_to_tile::<F>(&k_frags, &sq, ds, &mut so, tile_s, d_tiles);
            sync_plane();
            #[unroll]
            for j in 0..STEP / 2 {
                sval[j] = so[tile_s + r * SS + odd + 2 * j];
            }
            sync_plane();
            product_to_tile::<bf16>(&v_frags, &sn, vs, &mut so, tile_s, e_tiles);
            sync_plane();
            #[unroll]
            for j in 0..STEP / 2 {
                let c = odd + 2 * j;
                let qpos = q0 + c as u32;
                let sc = scale * sval[j];
                let mut gate = 1.0f32;
                if comptime!(cfg.gated) {
                    gate = f32::exp(sg[c] - gk);
                }
                let (power, slope) = power_and_slope(sc, comptime!(cfg.degree));
                let keep = key_valid && qpos >= key_pos && qpos < chunk_len;
                let w = gate * power;
                let dw = so[tile_s + r * SS + c] + sl[c];
                gsum += select(keep, w * dw, 0.0f32);
                sw[tile_w + r * ws + c] = bf16::cast_from(select(keep, w, 0.0f32));
                sx[tile_w + r * ws + c] = bf16::cast_from(select(keep, gate * slope * dw, 0.0f32));
            }
            sync_plane();
            accumulate_pairs(&sw, tile_w, ws, &sn, vs, &mut acc_v, e_tiles);
            accumulate_pairs(&sx, tile_w, ws, &sqb, ds, &mut acc_k, d_tiles);
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

    if k_rows > 0 {
        let limit = rows_present(plane_first, chunk_len);
        let first = kv_token0 + plane_first as usize * kv_heads as usize + kvh as usize;
        write_rows(
            &acc_k,
            &mut so,
            tile_s,
            dk,
            first,
            kv_heads as usize,
            limit,
            scale,
            d_tiles,
        );
        write_rows(
            &acc_v,
            &mut so,
            tile_s,
            dv,
            first,
            kv_heads as usize,
            limit,
            1.0,
            e_tiles,
        );
    }
    let total = gsum + plane_shuffle_xor(gsum, 1u32);
    if key_valid && odd == 0 {
        dg[kv_token0 + key_pos as usize * kv_heads as usize + kvh as usize] = total;
    }
}

/// What both intra-chunk launches read (flat, contiguous, row-major).
pub struct IntraGradInputs {
    /// `q [b, t, hq, d]`, of the launch's dtype.
    pub q: Buffer,
    /// `k [b, t, h, d]`, of the launch's dtype.
    pub k: Buffer,
    /// `v [b, t, h, e]`, of the launch's dtype.
    pub v: Buffer,
    /// `dN`, `bf16 [b, t, hq, e]`.
    pub d_num: Buffer,
    /// `dL`, `f32 [b, t, hq]`.
    pub d_den: Buffer,
    /// Cumulative log-gates inside each chunk, `f32 [b, h, n·c]`; `None`: no gating.
    pub gates: Option<Buffer>,
}

/// Writes the intra-chunk part of `∂q` (`f32 [b, t, hq, d]`) and of the query side of the gate
/// gradient (`f32 [b, t, hq]`).
///
/// # Safety
/// The buffers must have the sizes documented on [`IntraGradInputs`] for `dims`, `dtype` must
/// be the element type of `q`, `k` and `v`, `d % 8 == e % 8 == 0`, and `tiles` must come from
/// [`IntraGradTiles::plan`] for this client, dtype and head dims.
pub unsafe fn launch_intra_query_grads<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: GradDims,
    mut tiles: IntraGradTiles,
    inputs: &IntraGradInputs,
    dq: &Buffer,
    dg: &Buffer,
) {
    tiles.gated = inputs.gates.is_some();
    let gates = inputs
        .gates
        .clone()
        .unwrap_or_else(|| Buffer::unused(client));
    let ratio = dims.q_heads / dims.kv_heads;
    let count = CubeCount::Static(
        (dims.chunk.div_ceil(ROWS) * ratio) as u32,
        (dims.n_chunks * dims.kv_heads) as u32,
        dims.batch as u32,
    );
    // SAFETY: the buffers hold what the caller promised.
    unsafe {
        let launch = if tiles.manual {
            intra_query_grads_manual_kernel::launch_unchecked::<R>
        } else {
            intra_query_grads_kernel::launch_unchecked::<R>
        };
        launch(
            client,
            count,
            CubeDim::new_2d(PLANE, PLANES),
            inputs.q.arg(),
            inputs.k.arg(),
            inputs.v.arg(),
            inputs.d_num.arg(),
            inputs.d_den.arg(),
            gates.arg(),
            dq.arg(),
            dg.arg(),
            dims.seq as u32,
            dims.q_heads as u32,
            dims.kv_heads as u32,
            dims.chunk as u32,
            dims.n_chunks as u32,
            dims.scale,
            tiles,
            dtype,
        )
    }
}

/// Writes the intra-chunk part of `∂k` (`f32 [b, t, h, d]`), `∂v` (`f32 [b, t, h, e]`) and of
/// the key side of the gate gradient (`f32 [b, t, h]`, to subtract).
///
/// # Safety
/// As [`launch_intra_query_grads`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_intra_key_grads<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: GradDims,
    mut tiles: IntraGradTiles,
    inputs: &IntraGradInputs,
    dk: &Buffer,
    dv: &Buffer,
    dg: &Buffer,
) {
    tiles.gated = inputs.gates.is_some();
    let gates = inputs
        .gates
        .clone()
        .unwrap_or_else(|| Buffer::unused(client));
    let count = CubeCount::Static(
        dims.chunk.div_ceil(ROWS) as u32,
        (dims.n_chunks * dims.kv_heads) as u32,
        dims.batch as u32,
    );
    // SAFETY: the buffers hold what the caller promised.
    unsafe {
        let launch = if tiles.manual {
            intra_key_grads_manual_kernel::launch_unchecked::<R>
        } else {
            intra_key_grads_kernel::launch_unchecked::<R>
        };
        launch(
            client,
            count,
            CubeDim::new_2d(PLANE, PLANES),
            inputs.q.arg(),
            inputs.k.arg(),
            inputs.v.arg(),
            inputs.d_num.arg(),
            inputs.d_den.arg(),
            gates.arg(),
            dk.arg(),
            dv.arg(),
            dg.arg(),
            dims.seq as u32,
            dims.q_heads as u32,
            dims.kv_heads as u32,
            dims.chunk as u32,
            dims.n_chunks as u32,
            dims.scale,
            tiles,
            dtype,
        )
    }
}
