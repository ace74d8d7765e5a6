//! Tensor-core (`cmma`) variant of [`chunk_state`](crate::chunk_state) for f16/bf16 inputs.
//!
//! A cube of 8 planes owns 128 features (eight 16-feature groups: one key coordinate `x` times
//! 16 consecutive ones, see [`feature_pairs`](crate::feature_pairs)) × all `e` value columns of
//! one chunk's `ΔS`, accumulated by the block product of [`block_mma`](crate::block_mma). It
//! walks the chunk 32 tokens at a time: the units build `φ_K(k̃)ᵀ` (features × tokens,
//! discounted to the chunk end, key-side weights included) in f16 whatever the input dtype
//! (bf16 products lose too much of `ΔS` under strong gates) from the key rows staged as f16
//! in shared memory (one f16 multiply per feature), and stage the value rows (as f16) with 16-byte loads; feature and value tiles are
//! double-buffered so the matrix units take block `s − 1` while block `s` is produced. `Δz`
//! (the feature rows' sums) accumulates in `f32` per unit and is summed across each plane.

use cubecl::prelude::*;
use half::f16;

use crate::block_mma::{
    A_STRIDE, DEPTH, ROWS, SKIP_ROW, STAGE, UNITS, b_stride, multiply_step, store_accumulators,
    zero_accumulators,
};
use crate::config::StateTiles;
use crate::feature_pairs::{feature_pair, pair_weight};
use crate::tile_load::{fetch_rows, row_registers, rows_present, store_rows};

/// Shared memory of one cube, in bytes (key and value rows are staged as f16 whatever the
/// input dtype).
pub(crate) fn shared_bytes(head_dim: usize, value_dim: usize) -> usize {
    2 * DEPTH * (head_dim + 2)
        + 2 * (2 * ROWS * A_STRIDE + 2 * DEPTH * b_stride(value_dim))
        + 4 * (DEPTH + ROWS + STAGE)
}

/// Builds `φ_K(k̃)ᵀ` for the key rows in `sk` into `sphi[offset..]`: unit `(group, token)`
/// writes the 16 features of its group for its token and adds them, times `zw`, to its `Δz`
/// partials.
#[cube]
#[allow(clippy::too_many_arguments)]
fn build_features(
    sk: &SharedMemory<f16>,
    disc: &SharedMemory<f32>,
    sphi: &mut SharedMemory<f16>,
    zpart: &mut Array<f32>,
    zw: f32,
    x: usize,
    inner: usize,
    weight: f32,
    offset: usize,
    #[comptime] ds: usize,
) {
    let group = UNIT_POS as usize / DEPTH;
    let tok = UNIT_POS as usize % DEPTH;
    let a = f16::cast_from(weight * disc[tok] * f32::cast_from(sk[tok * ds + x]));
    let dst = offset + group * 16 * A_STRIDE + tok;
    #[unroll]
    for r in 0..16usize {
        // one f16 multiply per feature (the key rows are staged as f16)
        let phi = a * sk[tok * ds + inner + r];
        zpart[r] += f32::cast_from(phi) * zw;
        sphi[dst + r * A_STRIDE] = phi;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_state_mma_kernel<F: Float>(
    k: &Array<Vector<F, Const<8>>>,
    v: &Array<Vector<F, Const<8>>>,
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
    // `gates` stands in for the query side's arrays, which the key side never reads
    state_mma_body::<F>(
        k, v, gates, gates, gates, states, sums, seq, kv_heads, kv_heads, 1u32, chunk, n_chunks,
        big_d, cfg, false,
    );
}

/// The query side's transpose of the query–state product (backward pass):
/// `dS_u = Σ_i e^{G_i} φ_Q(σq_i) dN_iᵀ`, `dz_u = Σ_i e^{G_i} φ_Q(σq_i) dL_i` over the rows of
/// every query head of the group. `q` holds `σq` and `dn` holds `dN/β` (f16), `β` per
/// `(b, h)` in `scales`, so the f16 operands stay in range whatever the gradients' scale.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_state_grad_mma_kernel<F: Float>(
    q: &Array<Vector<F, Const<8>>>,
    dn: &Array<Vector<F, Const<8>>>,
    gates: &Array<f32>,
    dl: &Array<f32>,
    scales: &Array<f32>,
    states: &mut Array<f32>,
    sums: &mut Array<f32>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    #[comptime] cfg: StateTiles,
    #[define(F)] _dtype: StorageType,
) {
    state_mma_body::<F>(
        q,
        dn,
        gates,
        dl,
        scales,
        states,
        sums,
        seq,
        q_heads,
        kv_heads,
        q_heads / kv_heads,
        chunk,
        n_chunks,
        big_d,
        cfg,
        true,
    );
}

/// The product of both entry kernels: `rows` (`k`, or `σq`) walked over the chunk's tokens of
/// each of the `heads_per_kv` row heads of key/value head `kvh` (row head `kvh·heads_per_kv + j`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn state_mma_body<F: Float>(
    k: &Array<Vector<F, Const<8>>>,
    v: &Array<Vector<F, Const<8>>>,
    gates: &Array<f32>,
    dl: &Array<f32>,
    scales: &Array<f32>,
    states: &mut Array<f32>,
    sums: &mut Array<f32>,
    seq: u32,
    row_heads: u32,
    kv_heads: u32,
    heads_per_kv: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    #[comptime] cfg: StateTiles,
    #[comptime] queries: bool,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let ds = comptime!(cfg.head_dim as usize + 2);
    let vs = comptime!(b_stride(cfg.value_dim as usize));

    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let block = ((bi * kv_heads + kvh) * n_chunks + u) as usize * big_d as usize;
    let f0 = CUBE_POS_X as usize * ROWS;
    // tokens of this chunk in the sequence, and the vector index of its first key/value row
    let mut tokens = rows_present(chunk_start, seq);
    if tokens > chunk {
        tokens = chunk;
    }
    let k_stride = row_heads as usize;

    // this unit's feature group (a plane per group; past D: weight 0)
    let group = UNIT_POS as usize / DEPTH;
    let g = (f0 / 16 + group) as u32;
    let mut x = 0usize;
    let mut inner = 0usize;
    let mut weight = 0.0f32;
    if g * 16 < big_d {
        let pair = feature_pair(g * 16, 16u32);
        x = (pair >> 16) as usize;
        inner = (pair & 0xffff) as usize;
        weight = 1.0;
        if comptime!(!queries) {
            weight = pair_weight(x as u32, inner as u32, 16u32);
        }
    }
    let mut chunk_total = 0.0f32;
    if comptime!(cfg.gated) {
        chunk_total = gates[gate_base + (chunk_start + chunk - 1) as usize];
    }

    let mut sk = SharedMemory::<f16>::new(DEPTH * ds);
    let mut disc = SharedMemory::<f32>::new(DEPTH);
    let mut sdl = SharedMemory::<f32>::new(DEPTH);
    let mut sphi = SharedMemory::<f16>::new(2 * ROWS * A_STRIDE);
    let mut sv = SharedMemory::<f16>::new(2 * DEPTH * vs);
    let mut row_index = SharedMemory::<u32>::new(ROWS);
    let mut stage = SharedMemory::<f32>::new(STAGE);

    let mut kregs = row_registers::<F>(DEPTH, d, UNITS);
    let mut vregs = row_registers::<F>(DEPTH, e, UNITS);
    let mut zpart = Array::<f32>::new(16usize);
    #[unroll]
    for r in 0..16usize {
        zpart[r] = 0.0;
    }
    let mut acc = zero_accumulators(e);

    // step s produces block s (tokens 32·s.. of row head s / per_head) into buffer s mod 2
    // while the matrix units take block s − 1
    let per_head = (chunk + DEPTH as u32 - 1) / DEPTH as u32;
    let steps = per_head * heads_per_kv;
    for step in 0..steps + 1 {
        let producing = step < steps;
        let j = step / per_head;
        let first = (step % per_head) * DEPTH as u32;
        let k_row0 = ((bi * seq + chunk_start) * row_heads + kvh * heads_per_kv + j) as usize;
        if producing {
            let present = rows_present(first, tokens);
            let row = (k_row0 + first as usize * k_stride) * (d / 8);
            fetch_rows::<F>(
                k,
                &mut kregs,
                row,
                k_stride * (d / 8),
                present,
                DEPTH,
                d,
                UNITS,
            );
            let row = (k_row0 + first as usize * k_stride) * (e / 8);
            fetch_rows::<F>(
                v,
                &mut vregs,
                row,
                k_stride * (e / 8),
                present,
                DEPTH,
                e,
                UNITS,
            );
        }
        if step > 0 {
            let prev = ((step - 1) % 2) as usize;
            multiply_step(
                &mut acc,
                &sphi,
                prev * ROWS * A_STRIDE,
                &sv,
                prev * DEPTH * vs,
                e,
            );
        }
        if producing {
            let buf = (step % 2) as usize;
            store_rows::<F, f16>(&kregs, &mut sk, 0, DEPTH, d, ds, UNITS);
            store_rows::<F, f16>(&vregs, &mut sv, buf * DEPTH * vs, DEPTH, e, vs, UNITS);
            if UNIT_POS < DEPTH as u32 {
                let pos = first + UNIT_POS;
                let mut dec = 0.0f32;
                let mut w = 1.0f32;
                if pos < tokens {
                    dec = 1.0;
                    if comptime!(cfg.gated) {
                        let g = gates[gate_base + (chunk_start + pos) as usize];
                        if comptime!(queries) {
                            dec = f32::exp(g);
                        } else {
                            dec = f32::exp(chunk_total - g);
                        }
                    }
                    if comptime!(queries) {
                        w = dl[k_row0 + (pos as usize) * k_stride];
                    }
                }
                disc[UNIT_POS as usize] = dec;
                sdl[UNIT_POS as usize] = w;
            }
            sync_cube();
            let tok = UNIT_POS as usize % DEPTH;
            build_features(
                &sk,
                &disc,
                &mut sphi,
                &mut zpart,
                sdl[tok],
                x,
                inner,
                weight,
                buf * ROWS * A_STRIDE,
                ds,
            );
        }
        sync_cube();
    }

    // Δz: the 32 units of a plane hold one group's 16 feature sums over their tokens
    #[unroll]
    for r in 0..16usize {
        let total = plane_sum(zpart[r]);
        let f = f0 + group * 16 + r;
        if UNIT_POS_X == 0 && f < big_d as usize {
            sums[block + f] = total;
        }
    }
    if UNIT_POS < ROWS as u32 {
        let f = f0 + UNIT_POS as usize;
        row_index[UNIT_POS as usize] = select(f < big_d as usize, (block + f) as u32, SKIP_ROW);
    }
    sync_cube();
    let mut mult = 1.0f32;
    if comptime!(queries) {
        mult = scales[(bi * kv_heads + kvh) as usize];
    }
    store_accumulators(&acc, &mut stage, &row_index, states, mult, e);
}
