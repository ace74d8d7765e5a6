//! One decode step for a batch of sequences: one launch reads the state with the queries of
//! every query head that shares it and writes the state advanced by the new token; a small
//! second launch adds the partial products up and normalises.
//!
//! `y = (g φ_Q(σq)ᵀ S + (σq·k)^p v) / (g φ_Q(σq)·z + (σq·k)^p)`, `S ← g S + φ_K(k) vᵀ`,
//! `z ← g z + φ_K(k)`. A cube of the first launch owns `block_e` value columns of a slice of
//! the `D` feature rows of one key/value head of one sequence, so every state element is read
//! once and written once (the step is bound by the state's bytes), and batch 1 still spreads
//! over the whole GPU.

use cubecl::prelude::*;

use crate::Buffer;
use crate::config::DecodeTiles;
use crate::feature_pairs::{feature_pair, pair_block, pair_weight};

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
    /// Slices of the feature rows per (sequence, head); more slices, more cubes.
    pub slices: usize,
}

impl DecodeDims {
    /// Slices giving about `target_cubes` cubes in the state launch.
    pub fn slices_for(&self, tiles: &DecodeTiles, target_cubes: usize) -> usize {
        let col_blocks = (tiles.value_dim as usize).div_ceil(tiles.block_e as usize);
        let per_slice = col_blocks * self.batch * self.kv_heads;
        target_cubes
            .div_ceil(per_slice)
            .clamp(1, self.expanded_dim.div_ceil(64).max(1))
    }
}

/// Buffers of a decode launch.
pub struct DecodeArgs {
    /// `q [b, hq, d]`.
    pub q: Buffer,
    /// `k [b, h, d]`.
    pub k: Buffer,
    /// `v [b, h, e]`.
    pub v: Buffer,
    /// Log-gates `f32 [b, h]`, or `None`.
    pub log_g: Option<Buffer>,
    /// `f32 [b, h, D, e]`.
    pub state: Buffer,
    /// `f32 [b, h, D]`.
    pub key_sum: Buffer,
    /// Output `[b, hq, e]`, dtype of `q`.
    pub out: Buffer,
    /// Output `f32 [b, h, D, e]`.
    pub new_state: Buffer,
    /// Output `f32 [b, h, D]`.
    pub new_key_sum: Buffer,
    /// Scratch `f32 [slices, b, hq, e]`.
    pub partial_num: Buffer,
    /// Scratch `f32 [slices, b, hq]`.
    pub partial_den: Buffer,
}

/// Launches the decode step (state launch, then the reduction).
///
/// # Safety
/// The buffers must have the sizes documented on [`DecodeArgs`], and `dtype` must be the
/// element type of `q`, `k`, `v` and `out`.
pub unsafe fn launch_decode<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: DecodeDims,
    tiles: DecodeTiles,
    args: DecodeArgs,
) {
    let gated = args.log_g.is_some();
    let tiles = DecodeTiles { gated, ..tiles };
    let log_g = args.log_g.unwrap_or_else(|| Buffer {
        handle: client.empty(4),
        len: 1,
    });
    let e = tiles.value_dim as usize;
    let count = CubeCount::Static(
        e.div_ceil(tiles.block_e as usize) as u32,
        dims.slices as u32,
        (dims.batch * dims.kv_heads) as u32,
    );
    unsafe {
        decode_state_kernel::launch_unchecked::<R>(
            client,
            count,
            CubeDim::new_2d(tiles.block_e, tiles.rows),
            args.q.arg(),
            args.k.arg(),
            args.v.arg(),
            log_g.arg(),
            args.state.arg(),
            args.key_sum.arg(),
            args.new_state.arg(),
            args.new_key_sum.arg(),
            args.partial_num.arg(),
            args.partial_den.arg(),
            dims.kv_heads as u32,
            dims.expanded_dim as u32,
            dims.slices as u32,
            dims.scale,
            tiles,
            dtype,
        );
        let outputs = dims.batch * dims.q_heads * e;
        decode_reduce_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(outputs.div_ceil(256) as u32, 1, 1),
            CubeDim::new_1d(256),
            args.q.arg(),
            args.k.arg(),
            args.v.arg(),
            log_g.arg(),
            args.partial_num.arg(),
            args.partial_den.arg(),
            args.out.arg(),
            (dims.batch * dims.q_heads) as u32,
            dims.q_heads as u32,
            dims.kv_heads as u32,
            dims.slices as u32,
            dims.scale,
            tiles,
            dtype,
        );
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decode_state_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    log_g: &Array<f32>,
    state: &Array<f32>,
    key_sum: &Array<f32>,
    new_state: &mut Array<f32>,
    new_key_sum: &mut Array<f32>,
    partial_num: &mut Array<f32>,
    partial_den: &mut Array<f32>,
    kv_heads: u32,
    big_d: u32,
    slices: u32,
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

    let slice = CUBE_POS_Y;
    let seq_head = CUBE_POS_Z as usize; // b * kv_heads + kvh
    let batch_count = CUBE_COUNT_Z as usize / kv_heads as usize;
    let col = (CUBE_POS_X * cfg.block_e + UNIT_POS_X) as usize;
    let col_ok = col < e;
    let per_slice = (big_d + slices - 1) / slices;
    let f_start = slice * per_slice;
    let mut f_end = f_start + per_slice;
    if f_end > big_d {
        f_end = big_d;
    }

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
    // four feature rows per iteration, their loads issued together
    let mut f = f_start + UNIT_POS_Y;
    while f < f_end {
        let mut fs = Array::<u32>::new(4usize);
        let mut zs = Array::<f32>::new(4usize);
        let mut ss = Array::<f32>::new(4usize);
        #[unroll]
        for i in 0..4u32 {
            let fi = f + i * cfg.rows;
            fs[i as usize] = fi;
            let mut z = 0.0f32;
            let mut st = 0.0f32;
            if fi < f_end {
                z = key_sum[state_base + fi as usize];
                if col_ok {
                    st = state[(state_base + fi as usize) * e + col];
                }
            }
            zs[i as usize] = z;
            ss[i as usize] = st;
        }
        #[unroll]
        for i in 0..4usize {
            let fi = fs[i];
            if fi < f_end {
                let pair = feature_pair(fi, comptime!(pair_block(cfg.head_dim)));
                let a = pair >> 16;
                let b = pair & 0xffff;
                let phi_k = sk[a as usize]
                    * sk[b as usize]
                    * pair_weight(a, b, comptime!(pair_block(cfg.head_dim)));
                let z_old = zs[i];
                let s_old = ss[i];
                if col_ok {
                    new_state[(state_base + fi as usize) * e + col] = g * s_old + phi_k * v_col;
                }
                if writes_sum {
                    new_key_sum[state_base + fi as usize] = g * z_old + phi_k;
                }
                #[unroll]
                for m in 0..ratio {
                    let phi_q = sq[m * d + a as usize] * sq[m * d + b as usize];
                    num[m] += phi_q * s_old;
                    den[m] += phi_q * z_old;
                }
            }
        }
        f += 4 * cfg.rows;
    }
    #[unroll]
    for m in 0..ratio {
        part_num[(UNIT_POS_Y as usize * ratio + m) * be + UNIT_POS_X as usize] = num[m];
        if UNIT_POS_X == 0 {
            part_den[UNIT_POS_Y as usize * ratio + m] = den[m];
        }
    }
    sync_cube();
    if UNIT_POS_Y == 0 {
        // partials are laid out [slice, b, hq, e]: seq_head * ratio + m = b * hq + head
        let rows_out = batch_count * kv_heads as usize * ratio;
        #[unroll]
        for m in 0..ratio {
            let head_row = seq_head * ratio + m;
            if col_ok {
                let mut total = 0.0f32;
                for r in 0..rows {
                    total += part_num[(r * ratio + m) * be + UNIT_POS_X as usize];
                }
                partial_num[(slice as usize * rows_out + head_row) * e + col] = total;
            }
            if CUBE_POS_X == 0 && UNIT_POS_X == 0 {
                let mut total = 0.0f32;
                for r in 0..rows {
                    total += part_den[r * ratio + m];
                }
                partial_den[slice as usize * rows_out + head_row] = total;
            }
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decode_reduce_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    log_g: &Array<f32>,
    partial_num: &Array<f32>,
    partial_den: &Array<f32>,
    out: &mut Array<F>,
    head_rows: u32,
    q_heads: u32,
    kv_heads: u32,
    slices: u32,
    scale: f32,
    #[comptime] cfg: DecodeTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let idx = ABSOLUTE_POS;
    if idx >= head_rows as usize * e {
        terminate!();
    }
    let row = idx / e; // b * hq + head
    let col = idx % e;
    let ratio = q_heads / kv_heads;
    let seq_head = row / ratio as usize; // b * kv_heads + kvh
    let mut num = 0.0f32;
    let mut den = 0.0f32;
    for s in 0..slices as usize {
        num += partial_num[(s * head_rows as usize + row) * e + col];
        den += partial_den[s * head_rows as usize + row];
    }
    let mut g = 1.0f32;
    if comptime!(cfg.gated) {
        g = f32::exp(log_g[seq_head]);
    }
    let mut dot = 0.0f32;
    for x in 0..d {
        dot += f32::cast_from(q[row * d + x]) * f32::cast_from(k[seq_head * d + x]);
    }
    let s = scale * dot;
    let s2 = s * s;
    let mut now = s2;
    #[unroll]
    for _ in 1..comptime!(cfg.degree / 2) {
        now *= s2;
    }
    let n = g * num + now * f32::cast_from(v[seq_head * e + col]);
    let l = g * den + now;
    let mut y = 0.0f32;
    if l > 0.0 {
        y = n / l;
    }
    out[idx] = F::cast_from(y);
}
