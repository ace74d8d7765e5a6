//! The query side of the backward pass (see [`chunk_grad`](crate::chunk_grad)): one cube owns
//! `block_rows` query rows of one chunk and query head; it walks the state entering the chunk
//! feature block by feature block (`∂φ_Q`), then the chunk's keys up to its last row (`∂s`).

use cubecl::prelude::*;

use crate::chunk_grad::{power_and_slope, scatter_pair_grads};
use crate::config::GradTiles;
use crate::feature_pairs::pair_block;
use crate::tile_load::{load_feature_pairs, load_gates, load_token_rows};

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_grad_queries_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    gates: &Array<f32>,
    d_num: &Array<f32>,
    d_den: &Array<f32>,
    states: &Array<f32>,
    sums: &Array<f32>,
    dq: &mut Array<f32>,
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
    let ds = comptime!(cfg.head_dim as usize + 1);
    // rows of the other side's second tile are read lane-strided: pad them off one bank
    let es = comptime!(cfg.value_dim as usize + 1);

    let ratio = q_heads / kv_heads;
    let blocks = (chunk + cfg.block_rows - 1) / cfg.block_rows;
    let qb = CUBE_POS_X % blocks;
    let head = (CUBE_POS_Y / n_chunks) * ratio + CUBE_POS_X / blocks;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let row = UNIT_POS as usize / lanes;
    let lane = UNIT_POS as usize % lanes;
    let chunk_start = u * chunk;
    let tile_start = qb * cfg.block_rows;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;

    // own rows: σq, dN, G, dL, and the state path's coordinate gradients
    let mut sx = SharedMemory::<f32>::new(br * ds);
    let mut sn = SharedMemory::<f32>::new(br * e);
    let mut gr = SharedMemory::<f32>::new(br);
    let mut lr = SharedMemory::<f32>::new(br);
    let mut dxs = SharedMemory::<f32>::new(br * d);
    // the other side: keys and values, or a block of state features
    let mut so = SharedMemory::<f32>::new(bn * ds);
    let mut st = SharedMemory::<f32>::new(bn * es);
    let mut go = SharedMemory::<f32>::new(bn);
    let mut fa = SharedMemory::<u32>::new(bn);
    let mut fb = SharedMemory::<u32>::new(bn);
    let mut sp = SharedMemory::<f32>::new(br * bn);
    let mut part = SharedMemory::<f32>::new(threads);

    load_token_rows::<F, f32>(
        q,
        &mut sx,
        chunk_start,
        tile_start,
        chunk,
        seq,
        bi,
        q_heads,
        head,
        scale,
        br,
        d,
        ds,
        threads,
    );
    load_token_rows::<f32, f32>(
        d_num,
        &mut sn,
        chunk_start,
        tile_start,
        chunk,
        seq,
        bi,
        q_heads,
        head,
        1.0,
        br,
        e,
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
    if UNIT_POS < cfg.block_rows {
        let pos = tile_start + UNIT_POS;
        let tok = chunk_start + pos;
        let mut dl = 0.0f32;
        if pos < chunk && tok < seq {
            dl = d_den[((bi * seq + tok) * q_heads + head) as usize];
        }
        lr[UNIT_POS as usize] = dl;
    }
    let mut idx = UNIT_POS as usize;
    while idx < br * d {
        dxs[idx] = 0.0;
        idx += threads;
    }
    let mut acc = Array::<f32>::new(per_d);
    #[unroll]
    for m in 0..per_d {
        acc[m] = 0.0;
    }
    let mut gsum = 0.0f32;
    sync_cube();

    if comptime!(cfg.with_state) {
        let mut decay = 1.0f32;
        if comptime!(cfg.gated) {
            decay = f32::exp(gr[row]);
        }
        let block = (((bi * kv_heads + kvh) * n_chunks + u) * big_d) as usize;
        for fblk in 0..f_count {
            let f0 = (f_first + fblk) as usize * bn;
            sync_cube();
            load_feature_pairs(
                sums,
                &mut fa,
                &mut fb,
                &mut go,
                block,
                f0,
                big_d,
                1.0,
                comptime!(pair_block(cfg.head_dim)),
                bn,
            );
            let mut idx = UNIT_POS as usize;
            while idx < bn * e {
                let f = f0 + idx / e;
                let mut val = 0.0f32;
                if f < big_d as usize {
                    val = states[(block + f) * e + idx % e];
                }
                st[(idx / e) * es + idx % e] = val;
                idx += threads;
            }
            sync_cube();
            // ∂φ_Q(σq_i)_f = e^{G_i}(S_f·dN_i + z_f dL_i); its gate share is Σ_f g_f φ_f
            // the row's units split the block: unit `lane` takes `lane`, `lane + lanes`, …
            #[unroll]
            for m in 0..comptime!(bn.div_ceil(lanes)) {
                let fl = lane + m * lanes;
                if fl < bn {
                    let mut dot = go[fl] * lr[row];
                    for c in 0..e {
                        dot += st[fl * es + c] * sn[row * e + c];
                    }
                    let g = decay * dot;
                    gsum += g * sx[row * ds + fa[fl] as usize] * sx[row * ds + fb[fl] as usize];
                    sp[row * bn + fl] = g;
                }
            }
            sync_cube();
            scatter_pair_grads(&sp, &fa, &fb, &sx, &mut dxs, row, lane, lanes, bn, d, ds);
        }
    }

    let me = tile_start + row as u32;
    if comptime!(cfg.intra) {
        // intra-chunk weights, key blocks up to this tile's last row
        let mut last = tile_start + cfg.block_rows;
        if last > chunk {
            last = chunk;
        }
        let k_blocks = (last - 1) / cfg.block_inner + 1;
        for kb in 0..k_blocks {
            let k0 = kb * cfg.block_inner;
            sync_cube();
            load_token_rows::<F, f32>(
                k,
                &mut so,
                chunk_start,
                k0,
                chunk,
                seq,
                bi,
                kv_heads,
                kvh,
                1.0,
                bn,
                d,
                ds,
                threads,
            );
            load_token_rows::<F, f32>(
                v,
                &mut st,
                chunk_start,
                k0,
                chunk,
                seq,
                bi,
                kv_heads,
                kvh,
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
                    k0,
                    chunk,
                    cfg.block_inner,
                );
            }
            sync_cube();
            // the row's units split the block: unit `lane` takes `lane`, `lane + lanes`, …
            #[unroll]
            for m in 0..comptime!(bn.div_ceil(lanes)) {
                let j = lane + m * lanes;
                if j < bn {
                    let mut val = 0.0f32;
                    if k0 + j as u32 <= me && me < chunk {
                        let mut s = 0.0f32;
                        for x in 0..d {
                            s += sx[row * ds + x] * so[j * ds + x];
                        }
                        let (w, slope) = power_and_slope(s, cfg.degree);
                        let mut dec = 1.0f32;
                        if comptime!(cfg.gated) {
                            dec = f32::exp(gr[row] - go[j]);
                        }
                        let mut dw = lr[row];
                        for c in 0..e {
                            dw += sn[row * e + c] * st[j * es + c];
                        }
                        gsum += w * dec * dw;
                        val = dw * slope * dec;
                    }
                    sp[row * bn + j] = val;
                }
            }
            sync_cube();
            for j in 0..bn {
                let val = sp[row * bn + j];
                #[unroll]
                for m in 0..per_d {
                    let coord = lane + m * lanes;
                    if coord < d {
                        acc[m] += val * so[j * ds + coord];
                    }
                }
            }
        }
    }

    part[UNIT_POS as usize] = gsum;
    sync_cube();
    let tok = chunk_start + me;
    if me < chunk && tok < seq {
        let at = ((bi * seq + tok) * q_heads + head) as usize;
        #[unroll]
        for m in 0..per_d {
            let coord = lane + m * lanes;
            if coord < d {
                let mut prev = 0.0f32;
                if comptime!(cfg.accumulate) {
                    prev = dq[at * d + coord];
                }
                dq[at * d + coord] = prev + scale * (acc[m] + dxs[row * d + coord]);
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
