//! The chunk-state products with CUDA's manually managed `mma.sync.m16n8k16` (f16 operands,
//! f32 accumulation), for f16/bf16 inputs: `ΔS = φ_K(k̃)ᵀ (δ ⊙ V)` with `Δz` (forward, and the
//! backward's recompute), and the queries' `dS = φ_Q(σq)ᵀ (e^G ⊙ dN)` with `dz` (backward).
//!
//! A 16-feature group is one coordinate `x` times the 16 coordinates of a block `m` (see
//! [`feature_pairs`](crate::feature_pairs)), so its `16 × 16` tile of `φ(k)ᵀ` over 16 tokens is
//! the key tile's transpose (one `ldmatrix.trans`) with column `t` scaled by `k_t[x]`: one f16
//! multiply per register, no feature written anywhere. The value rows, scaled by each token's
//! decay (and a ninth 8-column tile holding the decay, or `e^G·dL/β` for queries, whose
//! product is `Δz`), are the B operand, also through `ldmatrix.trans`.
//!
//! A cube of 16 planes owns `256·g` features of one chunk (each plane `g` groups, `g = 2` where
//! `e ≤ 64`; 512 units keep the registers at 128 per unit, two cubes' worth of warps per
//! multiprocessor) and walks the chunk's tokens 64 at a time (for queries, those of every query head
//! of the group in turn), the next block staged while the current one is multiplied.

use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::*;
use half::f16;

use crate::config::StateTiles;
use crate::feature_pairs::{feature_pair, pair_weight};
use crate::mma_fragments::b_fragment_pair;
use crate::tile_load::{fetch_rows, row_registers, rows_present};

/// Tokens per step ([`StateTiles::block_k`] of these tiles).
pub(crate) const TOK: usize = 64;
/// Planes per cube.
pub(crate) const PLANES: u32 = 16;

/// Features per cube for `e` value columns: 16 per group, `groups(e)` groups per plane.
pub(crate) fn features_per_cube(value_dim: usize) -> usize {
    16 * PLANES as usize * groups(value_dim)
}

/// Feature groups per plane: two where the accumulators of both fit (`e ≤ 64`).
pub(crate) fn groups(value_dim: usize) -> usize {
    if value_dim <= 64 { 2 } else { 1 }
}

/// Shared memory of one cube, in bytes.
pub(crate) fn shared_bytes(head_dim: usize, value_dim: usize) -> usize {
    2 * 2 * TOK * (head_dim + 8) + 2 * 2 * TOK * (value_dim + 24)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_state_outer_kernel<F: Float>(
    k: &Array<Vector<F, Const<8>>>,
    v: &Array<Vector<F, Const<8>>>,
    gates: &Array<f32>,
    states: &mut Array<Vector<f32, Const<2>>>,
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
    state_outer_body::<F>(
        k, v, gates, gates, gates, states, sums, seq, kv_heads, kv_heads, 1u32, chunk, n_chunks,
        big_d, cfg, false,
    );
}

/// The query side's transpose of the query–state product (backward pass), as
/// [`query_state_grad_mma_kernel`](crate::chunk_state_mma): `q` holds `σq`, `dn` holds `dN/β`
/// (f16), `β` per `(b, h)` in `scales`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_state_grad_outer_kernel<F: Float>(
    q: &Array<Vector<F, Const<8>>>,
    dn: &Array<Vector<F, Const<8>>>,
    gates: &Array<f32>,
    dl: &Array<f32>,
    scales: &Array<f32>,
    states: &mut Array<Vector<f32, Const<2>>>,
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
    state_outer_body::<F>(
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

/// Both entry kernels: `rows_x` (`k`, or `σq`) and `rows_w` (`v`, or `dN/β`) walked over the
/// chunk's tokens of each of the `heads_per_kv` row heads of key/value head `kvh`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn state_outer_body<F: Float>(
    rows_x: &Array<Vector<F, Const<8>>>,
    rows_w: &Array<Vector<F, Const<8>>>,
    gates: &Array<f32>,
    dl: &Array<f32>,
    scales: &Array<f32>,
    states: &mut Array<Vector<f32, Const<2>>>,
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
    let gpp = comptime!(groups(cfg.value_dim as usize));
    let units = comptime!(32 * PLANES as usize);
    let ks = comptime!(cfg.head_dim as usize + 8);
    let k_buf = comptime!(TOK * (cfg.head_dim as usize + 8));
    let wv = comptime!(cfg.value_dim as usize / 8 + 3);
    let w_buf = comptime!(TOK * (cfg.value_dim as usize / 8 + 3));
    let n_tiles = comptime!(cfg.value_dim as usize / 8 + 1);

    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let chunk_start = u * chunk;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;
    let block = ((bi * kv_heads + kvh) * n_chunks + u) as usize * big_d as usize;
    let g0 = CUBE_POS_X * comptime!(PLANES * gpp as u32);
    let mut tokens = rows_present(chunk_start, seq);
    if tokens > chunk {
        tokens = chunk;
    }
    let k_stride = row_heads as usize;
    let mut chunk_total = 0.0f32;
    if comptime!(cfg.gated) {
        chunk_total = gates[gate_base + (chunk_start + chunk - 1) as usize];
    }
    let mut beta = 1.0f32;
    if comptime!(queries) {
        beta = scales[(bi * kv_heads + kvh) as usize];
    }
    let inv_beta = 1.0 / beta;

    let plane = UNIT_POS_Y;
    let lane = UNIT_POS_X as usize;

    // this plane's groups: coordinate x, block m, key-side weight (0 past D)
    let mut gx = Array::<u32>::new(gpp);
    let mut gm = Array::<u32>::new(gpp);
    let mut gw = Array::<f32>::new(gpp);
    #[unroll]
    for gi in 0..gpp {
        let g = g0 + plane * gpp as u32 + gi as u32;
        let mut x = 0u32;
        let mut m = 0u32;
        let mut w = 0.0f32;
        if g * 16 < big_d {
            let pair = feature_pair(g * 16, 16u32);
            x = pair >> 16;
            m = (pair & 0xffff) / 16;
            w = 1.0;
            if comptime!(!queries) {
                w = pair_weight(x, 16 * m, 16u32);
            }
        }
        gx[gi] = x;
        gm[gi] = m;
        gw[gi] = w;
    }

    let mut sk = SharedMemory::<f16>::new(2 * k_buf);
    let mut sw = SharedMemory::<Vector<f16, Const<8>>>::new(2 * w_buf);

    let def = MmaDefinition::<f16, f16, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NB) = def.vector_size(MatrixIdent::B);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
    let c_len_raw = def.elems_per_lane(MatrixIdent::Accumulator);
    let c_vec_raw = def.vector_size(MatrixIdent::Accumulator);
    let c_vec = comptime!(c_vec_raw);
    let c_regs = comptime!(c_len_raw / c_vec_raw);

    let mut acc = Sequence::<Array<Vector<f32, NC>>>::new();
    #[unroll]
    for _ in 0..gpp * n_tiles {
        let mut t = Array::<Vector<f32, NC>>::new(c_regs);
        #[unroll]
        for i in 0..c_regs {
            t[i] = Vector::new(0.0f32);
        }
        acc.push(t);
    }

    let mut xregs = row_registers::<F>(TOK, d, units);
    let mut wregs = row_registers::<F>(TOK, e, units);
    let per_head = (chunk + TOK as u32 - 1) / TOK as u32;
    let steps = per_head * heads_per_kv;
    for step in 0..steps + 1 {
        let producing = step < steps;
        let j = step / per_head;
        let first = (step % per_head) * TOK as u32;
        let row0 = ((bi * seq + chunk_start) * row_heads + kvh * heads_per_kv + j) as usize;
        let present = rows_present(first, tokens);
        if producing {
            let at = (row0 + first as usize * k_stride) * (d / 8);
            fetch_rows::<F>(
                rows_x,
                &mut xregs,
                at,
                k_stride * (d / 8),
                present,
                TOK,
                d,
                units,
            );
            let at = (row0 + first as usize * k_stride) * (e / 8);
            fetch_rows::<F>(
                rows_w,
                &mut wregs,
                at,
                k_stride * (e / 8),
                present,
                TOK,
                e,
                units,
            );
        }
        if step > 0 {
            let kb = ((step - 1) % 2) as usize * k_buf;
            let wb = ((step - 1) % 2) as usize * w_buf;
            #[unroll]
            for kk in 0..TOK / 16 {
                let t0 = kk * 16;
                // A: each group's φ tile, the key tile's transpose times k_t[x] per column
                let mut a_frags = Sequence::<Array<Vector<f16, NA>>>::new();
                #[unroll]
                for gi in 0..gpp {
                    let t = t0 + lane % 8 + 8 * (lane / 16);
                    let y = 16 * gm[gi] as usize + 8 * ((lane / 8) % 2);
                    let at = kb + t * ks + y;
                    let raw = def.load_matrix::<f16, NA>(
                        &sk.slice(at, at + 8),
                        MatrixIdent::A,
                        4usize,
                        true,
                    );
                    let tq = t0 + 2 * (lane % 4);
                    let x = gx[gi] as usize;
                    let mut s_lo = Vector::<f16, NA>::empty();
                    let mut s_hi = Vector::<f16, NA>::empty();
                    s_lo[0] = sk[kb + tq * ks + x];
                    s_lo[1] = sk[kb + (tq + 1) * ks + x];
                    s_hi[0] = sk[kb + (tq + 8) * ks + x];
                    s_hi[1] = sk[kb + (tq + 9) * ks + x];
                    let mut af = Array::<Vector<f16, NA>>::new(4usize);
                    af[0] = raw[0] * s_lo;
                    af[1] = raw[1] * s_lo;
                    af[2] = raw[2] * s_hi;
                    af[3] = raw[3] * s_hi;
                    a_frags.push(af);
                }
                // B: the decayed value rows, two 8-column tiles per load
                #[unroll]
                for np in 0..e / 16 {
                    let t = t0 + lane % 8 + 8 * ((lane / 8) % 2);
                    let at = wb + t * wv + 2 * np + lane / 16;
                    let (lo, hi) = b_fragment_pair::<NB>(def, &sw, at, true);
                    #[unroll]
                    for gi in 0..gpp {
                        def.execute_inplace(
                            a_frags.index(gi),
                            &lo,
                            acc.index_mut(comptime!(gi * n_tiles + 2 * np)),
                        );
                        def.execute_inplace(
                            a_frags.index(gi),
                            &hi,
                            acc.index_mut(comptime!(gi * n_tiles + 2 * np + 1)),
                        );
                    }
                }
                // the sums' tile: column e holds the decay (or e^G·dL/β)
                let t = t0 + lane % 8 + 8 * ((lane / 8) % 2);
                let at = wb + t * wv + e / 8;
                let zregs = def.load_matrix::<Vector<f16, Const<8>>, NB>(
                    &sw.slice(at, at + 1),
                    MatrixIdent::B,
                    2usize,
                    true,
                );
                #[unroll]
                for gi in 0..gpp {
                    def.execute_inplace(
                        a_frags.index(gi),
                        &zregs,
                        acc.index_mut(comptime!(gi * n_tiles + n_tiles - 1)),
                    );
                }
            }
        }
        if producing {
            let kb = (step % 2) as usize * k_buf;
            let wb = (step % 2) as usize * w_buf;
            let dvecs = comptime!(cfg.head_dim as usize / 8);
            #[unroll]
            for i in 0..comptime!((TOK * cfg.head_dim as usize / 8).div_ceil(32 * PLANES as usize))
            {
                let idx = UNIT_POS as usize + i * units;
                if idx < TOK * dvecs {
                    let at = kb + (idx / dvecs) * ks + (idx % dvecs) * 8;
                    let val = xregs[i];
                    #[unroll]
                    for c in 0..8usize {
                        sk[at + c] = f16::cast_from(val[c]);
                    }
                }
            }
            let evecs = comptime!(cfg.value_dim as usize / 8);
            #[unroll]
            for i in 0..comptime!((TOK * cfg.value_dim as usize / 8).div_ceil(32 * PLANES as usize))
            {
                let idx = UNIT_POS as usize + i * units;
                if idx < TOK * evecs {
                    let r = idx / evecs;
                    let pos = first + r as u32;
                    // the token's decay to the chunk end (keys) or from the chunk start (queries)
                    let mut dec = 0.0f32;
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
                    }
                    let val = wregs[i];
                    let mut out = Vector::<f16, Const<8>>::empty();
                    #[unroll]
                    for c in 0..8usize {
                        out[c] = f16::cast_from(f32::cast_from(val[c]) * dec);
                    }
                    sw[wb + r * wv + idx % evecs] = out;
                    if idx % evecs == 0 {
                        let mut zw = dec;
                        if comptime!(queries) {
                            if dec > 0.0 {
                                zw = dec * dl[row0 + pos as usize * k_stride] * inv_beta;
                            }
                        }
                        let mut zv = Vector::<f16, Const<8>>::new(f16::cast_from(0.0f32));
                        zv[0] = f16::cast_from(zw);
                        sw[wb + r * wv + evecs] = zv;
                    }
                }
            }
        }
        sync_cube();
    }

    // write the groups' rows: f32 states (× weight, × β for queries) and the sums; an
    // accumulator register holds two adjacent columns of one row (`c_vec == 2` on CUDA), written
    // as one 8-byte store
    let mut acc_row = Array::<u32>::new(c_regs);
    let mut acc_col = Array::<u32>::new(c_regs);
    #[unroll]
    for i in 0..c_regs {
        let (r, c) = def.position_of_nth(
            lane as u32,
            comptime!((i * c_vec) as u32),
            MatrixIdent::Accumulator,
        );
        acc_row[i] = r;
        acc_col[i] = c;
    }
    #[unroll]
    for gi in 0..gpp {
        let g = g0 + plane * gpp as u32 + gi as u32;
        if g * 16 < big_d {
            let mult = gw[gi] * beta;
            #[unroll]
            for nt in 0..n_tiles {
                let t = acc.index(comptime!(gi * n_tiles + nt));
                #[unroll]
                for i in 0..c_regs {
                    let f = (g * 16 + acc_row[i]) as usize;
                    if comptime!(nt < n_tiles - 1) {
                        let mut pair = Vector::<f32, Const<2>>::empty();
                        pair[0] = mult * t[i][0];
                        pair[1] = mult * t[i][comptime!(c_vec - 1)];
                        states[((block + f) * e + nt * 8 + acc_col[i] as usize) / 2] = pair;
                    } else if acc_col[i] == 0 {
                        sums[block + f] = mult * t[i][0];
                    }
                }
            }
        }
    }
}
