//! Tensor-core (`cmma`) variant of [`chunk_state`](crate::chunk_state) for f16/bf16 inputs.
//!
//! A cube of 8 planes owns 128 features (eight 16-feature groups: one key coordinate `x` times
//! 16 consecutive ones, see [`feature_pairs`](crate::feature_pairs)) × all `e` value columns of
//! one chunk's `ΔS`, as `f32` fragments (plane `p`: features `32·(p mod 4)..`, columns
//! `(e/2)·(p / 4)..`). It walks the chunk 32 tokens at a time: the units build
//! `φ_K(k̃)ᵀ` (features × tokens, discounted to the chunk end, key-side weights included) in
//! f16 whatever the input dtype (bf16 products lose too much of `ΔS` under strong gates) from
//! the key rows in shared memory, and stage the value rows (as f16) with 16-byte loads; both are double-buffered so one barrier per step separates producing the next block
//! from multiplying the current one. `Δz` (the feature rows' sums) accumulates in `f32` per
//! unit and is summed across each plane at the end.

use cubecl::prelude::*;

use half::f16;

use crate::config::StateTiles;
use crate::feature_pairs::feature_pair;

/// Features per cube.
pub(crate) const BF: usize = 128;
/// Tokens per pipeline step.
pub(crate) const BT: usize = 32;
/// Row stride of the feature tile (elements): keeps 16-byte alignment, spreads banks.
pub(crate) const PS: usize = BT + 8;
const PLANES: u32 = 8;
const PLANE: u32 = 32;

/// Shared memory of one cube, in bytes, for inputs of `el` bytes.
pub(crate) fn shared_bytes(head_dim: usize, value_dim: usize, el: usize) -> usize {
    el * 2 * BT * (head_dim + 2)
        + 2 * (2 * BF * PS + 2 * BT * (value_dim + 8))
        + 4 * (2 * BT + (PLANES * PLANE) as usize * 8)
}

/// Loads key rows `first..first + 32` of the chunk into `sk[buf]` (row stride `d + 2`, zeros
/// past the chunk or the sequence; 16-byte loads) and their discounts `e^{A − ā}` into
/// `disc[buf]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_keys<F: Float>(
    k: &Array<Vector<F, Const<8>>>,
    gates: &Array<f32>,
    sk: &mut SharedMemory<F>,
    disc: &mut SharedMemory<f32>,
    buf: usize,
    chunk_start: u32,
    first: u32,
    chunk: u32,
    seq: u32,
    batch: u32,
    heads: u32,
    head: u32,
    gate_base: usize,
    chunk_total: f32,
    #[comptime] d: usize,
    #[comptime] gated: bool,
) {
    let ds = comptime!(d + 2);
    let vecs = comptime!(d / 8);
    let threads = comptime!((PLANES * PLANE) as usize);
    let mut idx = UNIT_POS as usize;
    while idx < BT * vecs {
        let row = idx / vecs;
        let pos = first + row as u32;
        let tok = chunk_start + pos;
        let mut val = Vector::<F, Const<8>>::new(F::cast_from(0.0f32));
        if pos < chunk && tok < seq {
            val = k[((batch * seq + tok) * heads + head) as usize * vecs + idx % vecs];
        }
        let dst = buf * BT * ds + row * ds + (idx % vecs) * 8;
        #[unroll]
        for j in 0..8usize {
            sk[dst + j] = val[j];
        }
        idx += threads;
    }
    if UNIT_POS < BT as u32 {
        let pos = first + UNIT_POS;
        let mut dec = 0.0f32;
        if pos < chunk && chunk_start + pos < seq {
            dec = 1.0;
            if comptime!(gated) {
                dec = f32::exp(chunk_total - gates[gate_base + (chunk_start + pos) as usize]);
            }
        }
        disc[buf * BT + UNIT_POS as usize] = dec;
    }
}

/// Loads value rows `first..first + 32` of the chunk into registers (16-byte vectors).
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_values<F: Float>(
    v: &Array<Vector<F, Const<8>>>,
    regs: &mut Array<Vector<F, Const<8>>>,
    chunk_start: u32,
    first: u32,
    chunk: u32,
    seq: u32,
    batch: u32,
    heads: u32,
    head: u32,
    #[comptime] e: usize,
    #[comptime] per_unit: usize,
) {
    let vecs = comptime!(e / 8);
    #[unroll]
    for i in 0..per_unit {
        let idx = UNIT_POS as usize + i * (PLANES * PLANE) as usize;
        let pos = first + (idx / vecs) as u32;
        let tok = chunk_start + pos;
        let mut val = Vector::<F, Const<8>>::new(F::cast_from(0.0f32));
        if idx < BT * vecs && pos < chunk && tok < seq {
            val = v[((batch * seq + tok) * heads + head) as usize * vecs + idx % vecs];
        }
        regs[i] = val;
    }
}

/// Writes fetched value rows into `sv[buf]` (row stride `e + 8`).
#[cube]
fn store_values<F: Float>(
    regs: &Array<Vector<F, Const<8>>>,
    sv: &mut SharedMemory<f16>,
    buf: usize,
    #[comptime] e: usize,
    #[comptime] per_unit: usize,
) {
    let vecs = comptime!(e / 8);
    let vs = comptime!(e + 8);
    #[unroll]
    for i in 0..per_unit {
        let idx = UNIT_POS as usize + i * (PLANES * PLANE) as usize;
        if idx < BT * vecs {
            let dst = buf * BT * vs + (idx / vecs) * vs + (idx % vecs) * 8;
            let val = regs[i];
            #[unroll]
            for j in 0..8usize {
                sv[dst + j] = f16::cast_from(val[j]);
            }
        }
    }
}

/// Builds `φ_K(k̃)ᵀ` for the key rows in `sk[buf]` into `sphi[buf]`: unit `(group, token)`
/// writes the 16 features of its group for its token and adds them to its `Δz` partials.
#[cube]
#[allow(clippy::too_many_arguments)]
fn build_features<F: Float>(
    sk: &SharedMemory<F>,
    disc: &SharedMemory<f32>,
    sphi: &mut SharedMemory<f16>,
    zpart: &mut Array<f32>,
    x: usize,
    inner: usize,
    weight: f32,
    buf: usize,
    #[comptime] d: usize,
) {
    let ds = comptime!(d + 2);
    let group = UNIT_POS as usize / BT;
    let tok = UNIT_POS as usize % BT;
    let row = buf * BT * ds + tok * ds;
    let a = weight * disc[buf * BT + tok] * f32::cast_from(sk[row + x]);
    let dst = buf * BF * PS + group * 16 * PS + tok;
    #[unroll]
    for r in 0..16usize {
        let phi = f16::cast_from(a * f32::cast_from(sk[row + inner + r]));
        zpart[r] += f32::cast_from(phi);
        sphi[dst + r * PS] = phi;
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
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let ds = comptime!(cfg.head_dim as usize + 2);
    let vs = comptime!(cfg.value_dim as usize + 8);
    let col_tiles = comptime!(cfg.value_dim as usize / 32);
    let per_unit = comptime!((BT * cfg.value_dim as usize / 8).div_ceil(256));

    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let f0 = CUBE_POS_X as usize * BF;
    let plane = UNIT_POS_Y as usize;
    let rg = plane % 4;
    let cg = plane / 4;

    // this unit's feature group (eight per cube; past D: a zero weight)
    let group = UNIT_POS as usize / BT;
    let g = (f0 / 16 + group) as u32;
    let mut x = 0usize;
    let mut inner = 0usize;
    let mut weight = 0.0f32;
    if g * 16 < big_d {
        let pair = feature_pair(g * 16, 16u32);
        x = (pair >> 16) as usize;
        inner = (pair & 0xffff) as usize;
        weight = 1.0;
        if x < inner {
            weight = 2.0;
        }
    }
    let mut chunk_total = 0.0f32;
    if comptime!(cfg.gated) {
        chunk_total = gates[gate_base + (chunk_start + chunk - 1) as usize];
    }

    let mut sk = SharedMemory::<F>::new(2 * BT * ds);
    let mut disc = SharedMemory::<f32>::new(2 * BT);
    let mut sphi = SharedMemory::<f16>::new(2 * BF * PS);
    let mut sv = SharedMemory::<f16>::new(2 * BT * vs);
    let mut stage = SharedMemory::<f32>::new(comptime!((PLANES * PLANE) as usize * 8));

    let mut regs = Array::<Vector<F, Const<8>>>::new(per_unit);
    let mut zpart = Array::<f32>::new(16usize);
    #[unroll]
    for r in 0..16usize {
        zpart[r] = 0.0;
    }
    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..2 * col_tiles {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }

    let steps = (chunk + BT as u32 - 1) / BT as u32;
    load_keys::<F>(
        k,
        gates,
        &mut sk,
        &mut disc,
        0,
        chunk_start,
        0,
        chunk,
        seq,
        bi,
        kv_heads,
        kvh,
        gate_base,
        chunk_total,
        d,
        cfg.gated,
    );
    fetch_values::<F>(
        v,
        &mut regs,
        chunk_start,
        0,
        chunk,
        seq,
        bi,
        kv_heads,
        kvh,
        e,
        per_unit,
    );
    sync_cube();
    build_features::<F>(&sk, &disc, &mut sphi, &mut zpart, x, inner, weight, 0, d);
    store_values::<F>(&regs, &mut sv, 0, e, per_unit);
    sync_cube();

    for step in 0..steps {
        let cur = (step % 2) as usize;
        let nxt = 1 - cur;
        let more = step + 1 < steps;
        if more {
            let first = (step + 1) * BT as u32;
            load_keys::<F>(
                k,
                gates,
                &mut sk,
                &mut disc,
                nxt,
                chunk_start,
                first,
                chunk,
                seq,
                bi,
                kv_heads,
                kvh,
                gate_base,
                chunk_total,
                d,
                cfg.gated,
            );
            fetch_values::<F>(
                v,
                &mut regs,
                chunk_start,
                first,
                chunk,
                seq,
                bi,
                kv_heads,
                kvh,
                e,
                per_unit,
            );
        }
        #[unroll]
        for ks in 0..2usize {
            let a0 = cmma::Matrix::<f16>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &sphi.slice(cur * BF * PS + rg * 32 * PS + ks * 16, 2 * BF * PS),
                PS as u32,
            );
            let a1 = cmma::Matrix::<f16>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &sphi.slice(cur * BF * PS + (rg * 32 + 16) * PS + ks * 16, 2 * BF * PS),
                PS as u32,
            );
            #[unroll]
            for ct in 0..col_tiles {
                let b = cmma::Matrix::<f16>::from_slice(
                    cmma::MatrixIdent::B,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::RowMajor,
                    &sv.slice(
                        cur * BT * vs + ks * 16 * vs + cg * (e / 2) + ct * 16,
                        2 * BT * vs,
                    ),
                    vs as u32,
                );
                let c0 = acc.index(ct);
                cmma::execute::<f16, f16, f32, f32>(&a0, &b, c0, c0);
                let c1 = acc.index(col_tiles + ct);
                cmma::execute::<f16, f16, f32, f32>(&a1, &b, c1, c1);
            }
        }
        if more {
            // the next block's keys were stored above by all units
            sync_cube();
            build_features::<F>(&sk, &disc, &mut sphi, &mut zpart, x, inner, weight, nxt, d);
            store_values::<F>(&regs, &mut sv, nxt, e, per_unit);
        }
        sync_cube();
    }

    let block = ((bi * kv_heads + kvh) * n_chunks + u) as usize * big_d as usize;
    // Δz: the 32 units of a plane hold one group's 16 feature sums over their tokens
    #[unroll]
    for r in 0..16usize {
        let total = plane_sum(zpart[r]);
        let f = f0 + group * 16 + r;
        if UNIT_POS_X == 0 && f < big_d as usize {
            sums[block + f] = total;
        }
    }
    let lane = UNIT_POS_X as usize;
    let st = plane * 256;
    #[unroll]
    for half_rows in 0..2usize {
        #[unroll]
        for ct in 0..col_tiles {
            cmma::store(
                &mut stage.slice_mut(st, st + 256),
                acc.index(half_rows * col_tiles + ct),
                16u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_plane();
            #[unroll]
            for m in 0..8usize {
                let i = lane + 32 * m;
                let f = f0 + rg * 32 + half_rows * 16 + i / 16;
                if f < big_d as usize {
                    states[(block + f) * e + cg * (e / 2) + ct * 16 + i % 16] = stage[st + i];
                }
            }
            sync_plane();
        }
    }
}
