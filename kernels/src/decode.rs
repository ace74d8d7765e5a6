//! One decode step for a batch of sequences in one launch: reads the state with the queries
//! of every query head that shares it, then writes the state advanced by the new token.
//!
//! `y = (g φ_Q(σq)ᵀ S + (σq·k)^p v) / (g φ_Q(σq)·z + (σq·k)^p)`, `S ← g S + φ_K(k) vᵀ`,
//! `z ← g z + φ_K(k)`. A cube owns `block_e` value columns of one key/value head of one
//! sequence and walks all `D` feature rows (`rows` groups of units in parallel), so every state
//! element is read once and written once: the step is bound by the state's bytes.

use cubecl::prelude::*;

use crate::config::DecodeTiles;
use crate::feature_pairs::{feature_row, row_offset};

/// Scalar sizes of a decode launch.
#[derive(Debug, Clone, Copy)]
pub struct DecodeDims {
    /// `b`.
    pub batch: usize,
    /// `hq`.
    pub q_heads: usize,
    /// `h`.
    pub kv_heads: usize,
    /// `D`.
    pub expanded_dim: usize,
    /// `σ`.
    pub scale: f32,
}

/// Buffers of a decode launch.
pub struct DecodeArgs<R: Runtime> {
    /// `q [b, hq, d]`.
    pub q: ArrayArg<R>,
    /// `k [b, h, d]`.
    pub k: ArrayArg<R>,
    /// `v [b, h, e]`.
    pub v: ArrayArg<R>,
    /// Log-gates `f32 [b, h]`, or `None`.
    pub log_g: Option<ArrayArg<R>>,
    /// `f32 [b, h, D, e]`.
    pub state: ArrayArg<R>,
    /// `f32 [b, h, D]`.
    pub key_sum: ArrayArg<R>,
    /// Output `[b, hq, e]`, dtype of `q`.
    pub out: ArrayArg<R>,
    /// Output `f32 [b, h, D, e]`.
    pub new_state: ArrayArg<R>,
    /// Output `f32 [b, h, D]`.
    pub new_key_sum: ArrayArg<R>,
}

/// Launches the decode step.
///
/// # Safety
/// The buffers must have the sizes documented on [`DecodeArgs`], and `dtype` must be the
/// element type of `q`, `k`, `v` and `out`.
pub unsafe fn launch_decode<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: DecodeDims,
    tiles: DecodeTiles,
    args: DecodeArgs<R>,
) {
    let count = CubeCount::Static(
        (tiles.value_dim as usize).div_ceil(tiles.block_e as usize) as u32,
        dims.kv_heads as u32,
        dims.batch as u32,
    );
    let log_g = args
        .log_g
        .unwrap_or_else(|| unsafe { ArrayArg::from_raw_parts(client.empty(4), 1) });
    unsafe {
        decode_kernel::launch_unchecked::<R>(
            client,
            count,
            CubeDim::new_2d(tiles.block_e, tiles.rows),
            args.q,
            args.k,
            args.v,
            log_g,
            args.state,
            args.key_sum,
            args.out,
            args.new_state,
            args.new_key_sum,
            dims.kv_heads as u32,
            dims.expanded_dim as u32,
            dims.scale,
            tiles,
            dtype,
        )
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decode_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    log_g: &Array<f32>,
    state: &Array<f32>,
    key_sum: &Array<f32>,
    out: &mut Array<F>,
    new_state: &mut Array<f32>,
    new_key_sum: &mut Array<f32>,
    kv_heads: u32,
    big_d: u32,
    scale: f32,
    #[comptime] cfg: DecodeTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let ratio = comptime!(cfg.ratio as usize);
    let be = comptime!(cfg.block_e as usize);
    let rows = comptime!(cfg.rows as usize);
    let threads = comptime!((cfg.block_e * cfg.rows) as usize);

    let kvh = CUBE_POS_Y;
    let bi = CUBE_POS_Z;
    let seq_head = (bi * kv_heads + kvh) as usize;
    let col = (CUBE_POS_X * cfg.block_e + UNIT_POS_X) as usize;
    let col_ok = col < e;

    let mut sq = SharedMemory::<f32>::new(ratio * d);
    let mut sk = SharedMemory::<f32>::new(d);
    let mut part_num = SharedMemory::<f32>::new(rows * ratio * be);
    let mut part_den = SharedMemory::<f32>::new(rows * ratio);

    let mut idx = UNIT_POS as usize;
    while idx < ratio * d {
        sq[idx] = scale * f32::cast_from(q[seq_head * ratio * d + idx]);
        idx += threads;
    }
    let mut idx = UNIT_POS as usize;
    while idx < d {
        sk[idx] = f32::cast_from(k[seq_head * d + idx]);
        idx += threads;
    }
    sync_cube();

    let mut g = 1.0f32;
    if comptime!(cfg.gated) {
        g = f32::exp(log_g[seq_head]);
    }
    let mut v_col = 0.0f32;
    if col_ok {
        v_col = f32::cast_from(v[seq_head * e + col]);
    }
    let writes_sum = CUBE_POS_X == 0 && UNIT_POS_X == 0;

    let mut num = Array::<f32>::new(ratio);
    let mut den = Array::<f32>::new(ratio);
    #[unroll]
    for m in 0..ratio {
        num[m] = 0.0;
        den[m] = 0.0;
    }
    let state_base = seq_head * big_d as usize;
    let mut f = UNIT_POS_Y;
    while f < big_d {
        let a = feature_row(f, cfg.head_dim);
        let b = a + f - row_offset(a, cfg.head_dim);
        let mut phi_k = sk[a as usize] * sk[b as usize];
        if a != b {
            phi_k *= 2.0;
        }
        let z_old = key_sum[state_base + f as usize];
        let mut s_old = 0.0f32;
        if col_ok {
            let at = (state_base + f as usize) * e + col;
            s_old = state[at];
            new_state[at] = g * s_old + phi_k * v_col;
        }
        if writes_sum {
            new_key_sum[state_base + f as usize] = g * z_old + phi_k;
        }
        #[unroll]
        for m in 0..ratio {
            let phi_q = sq[m * d + a as usize] * sq[m * d + b as usize];
            num[m] += phi_q * s_old;
            den[m] += phi_q * z_old;
        }
        f += cfg.rows;
    }
    #[unroll]
    for m in 0..ratio {
        part_num[(UNIT_POS_Y as usize * ratio + m) * be + UNIT_POS_X as usize] = num[m];
        if UNIT_POS_X == 0 {
            part_den[UNIT_POS_Y as usize * ratio + m] = den[m];
        }
    }
    sync_cube();

    if UNIT_POS_Y == 0 && col_ok {
        #[unroll]
        for m in 0..ratio {
            let mut total_num = 0.0f32;
            let mut total_den = 0.0f32;
            for r in 0..rows {
                total_num += part_num[(r * ratio + m) * be + UNIT_POS_X as usize];
                total_den += part_den[r * ratio + m];
            }
            let mut s = 0.0f32;
            for x in 0..d {
                s += sq[m * d + x] * sk[x];
            }
            let s2 = s * s;
            let mut now = s2;
            #[unroll]
            for _ in 1..comptime!(cfg.degree / 2) {
                now *= s2;
            }
            let n = g * total_num + now * v_col;
            let l = g * total_den + now;
            let mut y = 0.0f32;
            if l > 0.0 {
                y = n / l;
            }
            out[(seq_head * ratio + m) * e + col] = F::cast_from(y);
        }
    }
}
