//! The key side of the backward pass (see [`chunk_grad`](crate::chunk_grad)): one cube owns
//! `block_rows` keys (and their values) of one chunk and key/value head; it walks the gradient
//! of the state after the chunk feature block by feature block (`∂φ_K`, `∂v`), then the queries
//! of every head of the group from its first row to the chunk's end (`∂s`, `∂v`).

use cubecl::prelude::*;

use crate::chunk_grad::{power_and_slope, scatter_pair_grads};
use crate::config::GradTiles;
use crate::feature_pairs::{pair_block, pair_weight};
use crate::tile_load::{load_feature_pairs, load_gates, load_key_value_rows, load_token_rows};

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_grad_keys_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    gates: &Array<f32>,
    d_num: &Array<f32>,
    d_den: &Array<f32>,
    lambda: &Array<f32>,
    lambda_z: &Array<f32>,
    dk: &mut Array<f32>,
    dv: &mut Array<f32>,
    dg: &mut Array<f32>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    scale: f32,
    f_first: u32,
    f_count: u32,
    #[comptime] cfg: GradTiles,
    #[define(F)] _dtype: StorageType,
) {
    let br = comptime!(cfg.block_rows as usize);
    let bn = comptime!(cfg.block_inner as usize);
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let threads = comptime!(cfg.threads as usize);
    let lanes = comptime!((cfg.threads / cfg.block_rows) as usize);
    let per_d =
        comptime!((cfg.head_dim as usize).div_ceil((cfg.threads / cfg.block_rows) as usize));
    let per_e =
        comptime!((cfg.value_dim as usize).div_ceil((cfg.threads / cfg.block_rows) as usize));
    let ds = comptime!(cfg.head_dim as usize + 1);
    // rows of the other side's second tile are read lane-strided: pad them off one bank
    let es = comptime!(cfg.value_dim as usize + 1);
    let beta = comptime!(pair_block(cfg.head_dim));

    let ratio = q_heads / kv_heads;
    let kb = CUBE_POS_X;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let row = UNIT_POS as usize / lanes;
    let lane = UNIT_POS as usize % lanes;
    let chunk_start = u * chunk;
    let tile_start = kb * cfg.block_rows;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;

    // own rows: keys, values, G, and the state path's coordinate gradients
    let mut sx = SharedMemory::<f32>::new(br * ds);
    let mut sn = SharedMemory::<f32>::new(br * e);
    let mut gr = SharedMemory::<f32>::new(br);
    let mut dxs = SharedMemory::<f32>::new(br * d);
    // the other side: σq and dN of a query block, or a block of the state gradient
    let mut so = SharedMemory::<f32>::new(bn * ds);
    let mut st = SharedMemory::<f32>::new(bn * es);
    let mut go = SharedMemory::<f32>::new(bn);
    let mut lo = SharedMemory::<f32>::new(bn);
    let mut fa = SharedMemory::<u32>::new(bn);
    let mut fb = SharedMemory::<u32>::new(bn);
    let mut sp = SharedMemory::<f32>::new(br * bn);
    let mut sp2 = SharedMemory::<f32>::new(br * bn);
    let mut part = SharedMemory::<f32>::new(threads);

    load_key_value_rows::<F, f32>(
        k,
        v,
        &mut sx,
        &mut sn,
        chunk_start,
        tile_start,
        chunk,
        seq,
        bi,
        kv_heads,
        kvh,
        br,
        d,
        ds,
        e,
        threads,
    );
    if comptime!(cfg.gated) {
        load_gates(
            gates,
            &mut gr,
            gate_base,
            chunk_start,
            tile_start,
            chunk,
            cfg.block_rows,
        );
    }
    let mut idx = UNIT_POS as usize;
    while idx < br * d {
        dxs[idx] = 0.0;
        idx += threads;
    }
    let mut acc_k = Array::<f32>::new(per_d);
    #[unroll]
    for m in 0..per_d {
        acc_k[m] = 0.0;
    }
    let mut acc_v = Array::<f32>::new(per_e);
    #[unroll]
    for c in 0..per_e {
        acc_v[c] = 0.0;
    }
    let mut gsum = 0.0f32;
    sync_cube();

    if comptime!(cfg.with_state) {
        // the key reaches the state after its chunk discounted by e^{A_u − G_j}
        let mut decay = 1.0f32;
        if comptime!(cfg.gated) {
            decay = f32::exp(gates[gate_base + (chunk_start + chunk - 1) as usize] - gr[row]);
        }
        let block = (((bi * kv_heads + kvh) * n_chunks + u) * big_d) as usize;
        for fblk in 0..f_count {
            let f0 = (f_first + fblk) as usize * bn;
            sync_cube();
            load_feature_pairs(
                lambda_z, &mut fa, &mut fb, &mut go, block, f0, big_d, 1.0, beta, bn,
            );
            let mut idx = UNIT_POS as usize;
            while idx < bn * e {
                let f = f0 + idx / e;
                let mut val = 0.0f32;
                if f < big_d as usize {
                    val = lambda[(block + f) * e + idx % e];
                }
                st[(idx / e) * es + idx % e] = val;
                idx += threads;
            }
            sync_cube();
            // ∂φ_K(k_j)_f = w_f e^{A_u − G_j}(Λ_f·v_j + Λz_f); the gate share is Σ_f g_f k_a k_b
            // the row's units split the block: unit `lane` takes `lane`, `lane + lanes`, …
            #[unroll]
            for m in 0..comptime!(bn.div_ceil(lanes)) {
                let fl = lane + m * lanes;
                if fl < bn {
                    let a = fa[fl] as usize;
                    let b = fb[fl] as usize;
                    let mut dot = go[fl];
                    for c in 0..e {
                        dot += st[fl * es + c] * sn[row * e + c];
                    }
                    let g = pair_weight(fa[fl], fb[fl], beta) * decay * dot;
                    gsum += g * sx[row * ds + a] * sx[row * ds + b];
                    sp[row * bn + fl] = g;
                }
            }
            // ∂v_j += φ_K(k̃_j)ᵀ Λ
            for fl in 0..bn {
                let phi = pair_weight(fa[fl], fb[fl], beta)
                    * decay
                    * sx[row * ds + fa[fl] as usize]
                    * sx[row * ds + fb[fl] as usize];
                #[unroll]
                for c in 0..per_e {
                    let col = lane + c * lanes;
                    if col < e {
                        acc_v[c] += phi * st[fl * es + col];
                    }
                }
            }
            sync_cube();
            scatter_pair_grads(&sp, &fa, &fb, &sx, &mut dxs, row, lane, lanes, bn, d, ds);
        }
    }

    let me = tile_start + row as u32;
    if comptime!(cfg.intra) {
        // intra-chunk weights: the queries of every head of the group from this tile's first row
        let q_blocks = (chunk + cfg.block_inner - 1) / cfg.block_inner;
        let first = tile_start / cfg.block_inner;
        for rr in 0..ratio {
            let head = kvh * ratio + rr;
            for qb in first..q_blocks {
                let q0 = qb * cfg.block_inner;
                sync_cube();
                load_token_rows::<F, f32>(
                    q,
                    &mut so,
                    chunk_start,
                    q0,
                    chunk,
                    seq,
                    bi,
                    q_heads,
                    head,
                    scale,
                    bn,
                    d,
                    ds,
                    threads,
                );
                load_token_rows::<f32, f32>(
                    d_num,
                    &mut st,
                    chunk_start,
                    q0,
                    chunk,
                    seq,
                    bi,
                    q_heads,
                    head,
                    1.0,
                    bn,
                    e,
                    es,
                    threads,
                );
                if comptime!(cfg.gated) {
                    load_gates(
                        gates,
                        &mut go,
                        gate_base,
                        chunk_start,
                        q0,
                        chunk,
                        cfg.block_inner,
                    );
                }
                if UNIT_POS < cfg.block_inner {
                    let pos = q0 + UNIT_POS;
                    let tok = chunk_start + pos;
                    let mut dl = 0.0f32;
                    if pos < chunk && tok < seq {
                        dl = d_den[((bi * seq + tok) * q_heads + head) as usize];
                    }
                    lo[UNIT_POS as usize] = dl;
                }
                sync_cube();
                // the row's units split the block: unit `lane` takes `lane`, `lane + lanes`, …
                #[unroll]
                for m in 0..comptime!(bn.div_ceil(lanes)) {
                    let i = lane + m * lanes;
                    if i < bn {
                        let mut wv = 0.0f32;
                        let mut sv = 0.0f32;
                        // queries past the chunk have gate 0 here: skip them, not just their zero scores
                        if me <= q0 + i as u32 && q0 + (i as u32) < chunk {
                            let mut s = 0.0f32;
                            for x in 0..d {
                                s += sx[row * ds + x] * so[i * ds + x];
                            }
                            let (w, slope) = power_and_slope(s, cfg.degree);
                            let mut dec = 1.0f32;
                            if comptime!(cfg.gated) {
                                dec = f32::exp(go[i] - gr[row]);
                            }
                            let mut dw = lo[i];
                            for c in 0..e {
                                dw += st[i * es + c] * sn[row * e + c];
                            }
                            wv = w * dec;
                            gsum += wv * dw;
                            sv = dw * slope * dec;
                        }
                        sp[row * bn + i] = wv;
                        sp2[row * bn + i] = sv;
                    }
                }
                sync_cube();
                for i in 0..bn {
                    let wv = sp[row * bn + i];
                    let sv = sp2[row * bn + i];
                    #[unroll]
                    for c in 0..per_e {
                        let col = lane + c * lanes;
                        if col < e {
                            acc_v[c] += wv * st[i * es + col];
                        }
                    }
                    #[unroll]
                    for m in 0..per_d {
                        let coord = lane + m * lanes;
                        if coord < d {
                            acc_k[m] += sv * so[i * ds + coord];
                        }
                    }
                }
            }
        }
    }

    part[UNIT_POS as usize] = gsum;
    sync_cube();
    let tok = chunk_start + me;
    if me < chunk && tok < seq {
        let at = ((bi * seq + tok) * kv_heads + kvh) as usize;
        #[unroll]
        for m in 0..per_d {
            let coord = lane + m * lanes;
            if coord < d {
                let mut prev = 0.0f32;
                if comptime!(cfg.accumulate) {
                    prev = dk[at * d + coord];
                }
                dk[at * d + coord] = prev + acc_k[m] + dxs[row * d + coord];
            }
        }
        #[unroll]
        for c in 0..per_e {
            let col = lane + c * lanes;
            if col < e {
                let mut prev = 0.0f32;
                if comptime!(cfg.accumulate) {
                    prev = dv[at * e + col];
                }
                dv[at * e + col] = prev + acc_v[c];
            }
        }
        if lane == 0 {
            let mut total = 0.0f32;
            for l in 0..lanes {
                total += part[row * lanes + l];
            }
            if comptime!(cfg.accumulate) {
                total += dg[at];
            }
            dg[at] = total;
        }
    }
}
