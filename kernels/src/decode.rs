//! Recurrent steps for a batch of sequences over a **window** of `n` recent tokens: one launch
//! streams the state `(S, z)` once, reading it with the queries of every query head that shares
//! it and/or writing it advanced by the window; a small second launch adds the partial
//! products up, adds the window's own tokens (attention over `n ≤` [`MAX_WINDOW`] keys) and
//! normalises.
//!
//! With `G_j` the inclusive cumulative log-gate inside the window and `G = G_n`:
//! `y = (e^G φ_Q(σq)ᵀ S + Σ_j e^{G − G_j} (σq·k_j)^p v_j) / (e^G φ_Q(σq)·z + Σ_j e^{G − G_j} (σq·k_j)^p)`
//! is the output of the window's last token, and `S ← e^G S + Σ_j e^{G − G_j} φ_K(k_j) v_jᵀ`,
//! `z ← e^G z + Σ_j e^{G − G_j} φ_K(k_j)` the state after it. Three launches use this:
//! - [`DecodeMode::Step`](crate::DecodeMode::Step): window = the new token; reads and advances the state (`n = 1`);
//! - [`DecodeMode::Read`](crate::DecodeMode::Read): the output only (the state is left as it is: a decoder that keeps
//!   its last tokens beside `S` reads `S` once per step and writes nothing);
//! - [`DecodeMode::Absorb`](crate::DecodeMode::Absorb): the state advanced by the window, no output (the fold of those
//!   kept tokens, every `n` steps).
//!
//! A cube of the state launch owns `block_e` value columns of a slice of the `D` feature rows of
//! one key/value head of one sequence; a lane streams 4 columns of a row (16-byte loads and
//! stores), so every state element is read once (and written once) and batch 1 still spreads
//! over the whole GPU.

use cubecl::prelude::*;

use crate::Buffer;
use crate::config::DecodeTiles;
use crate::feature_pairs::{feature_pair, pair_block, pair_weight};

/// The most tokens a window may hold.
pub const MAX_WINDOW: usize = 64;

/// Units of the reduction cube.
const REDUCE_UNITS: usize = 128;

/// State rows a lane loads before it uses the first.
const ROW_LOADS: usize = 4;

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
    /// Tokens in the window, `1..=`[`MAX_WINDOW`].
    pub window: usize,
}

impl DecodeDims {
    /// Slices for a GPU of `units` multiprocessors: at least one wave of four cubes per unit,
    /// and up to eight such waves (a launch of 1.45 waves runs its second wave half empty: at
    /// batch 32 and Brumby heads that tail cost a quarter of the step) while every row slot
    /// keeps four rows and, when the queries read the state, the slices' partial products stay
    /// under 1/32 of the state's bytes.
    pub fn slices_for(&self, tiles: &DecodeTiles, units: usize) -> usize {
        let col_blocks = (tiles.value_dim as usize).div_ceil(tiles.block_e as usize);
        let per_slice = (col_blocks * self.batch * self.kv_heads).max(1);
        let wave = 4 * units.max(1);
        let by_rows = self
            .expanded_dim
            .div_ceil(4 * tiles.slots() as usize)
            .max(1);
        let by_partials = if tiles.mode.reads() {
            (self.expanded_dim / (32 * tiles.ratio.max(1) as usize)).max(1)
        } else {
            by_rows
        };
        let one_wave = wave.div_ceil(per_slice);
        let eight_waves = (8 * wave).div_ceil(per_slice);
        eight_waves
            .min(by_partials)
            .max(one_wave)
            .min(by_rows)
            .max(1)
    }
}

/// Buffers of a decode launch.
pub struct DecodeArgs {
    /// `q [b, hq, d]` (read by [`DecodeMode::Step`](crate::DecodeMode::Step) and [`DecodeMode::Read`](crate::DecodeMode::Read)).
    pub q: Buffer,
    /// The window's keys `[b, n, h, d]`.
    pub keys: Buffer,
    /// The window's values `[b, n, h, e]` (`e` a multiple of 4).
    pub values: Buffer,
    /// The window's log-gates `f32 [b, n, h]`, or `None`.
    pub log_g: Option<Buffer>,
    /// `f32 [b, h, D, e]`: the state before the window.
    pub state: Buffer,
    /// `f32 [b, h, D]`.
    pub key_sum: Buffer,
    /// Output `[b, hq, e]`, dtype of `q` (`Step`, `Read`).
    pub out: Option<Buffer>,
    /// The state and key-sum after the window, `f32 [b, h, D, e]` and `f32 [b, h, D]`
    /// (`Step`, `Absorb`).
    pub new_state: Option<(Buffer, Buffer)>,
    /// Scratch `f32 [slices, b, hq, e]` (`Step`, `Read`).
    pub partial_num: Buffer,
    /// Scratch `f32 [slices, b, hq]` (`Step`, `Read`).
    pub partial_den: Buffer,
}

/// Launches the state kernel and, when an output is asked for, the reduction.
///
/// # Safety
/// The buffers must have the sizes documented on [`DecodeArgs`] for `dims`, `dtype` must be the
/// element type of `q`, the window's keys and values and `out`, and `tiles` must come from
/// [`DecodeTiles::plan`] for this client, head dims, mode and window.
pub unsafe fn launch_decode<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: DecodeDims,
    tiles: DecodeTiles,
    args: DecodeArgs,
) {
    let tiles = DecodeTiles {
        gated: args.log_g.is_some(),
        ..tiles
    };
    let dummy = || Buffer {
        handle: client.empty(16),
        len: 4,
    };
    let log_g = args.log_g.unwrap_or_else(dummy);
    let (new_state, new_key_sum) = args.new_state.unwrap_or_else(|| (dummy(), dummy()));
    let e = tiles.value_dim as usize;
    let count = CubeCount::Static(
        e.div_ceil(tiles.block_e as usize) as u32,
        dims.slices as u32,
        (dims.batch * dims.kv_heads) as u32,
    );
    let vectors = |b: &Buffer| unsafe { ArrayArg::from_raw_parts(b.handle.clone(), b.len / 4) };
    unsafe {
        decode_state_kernel::launch_unchecked::<R>(
            client,
            count,
            CubeDim::new_2d(32, tiles.rows),
            args.q.arg(),
            args.keys.arg(),
            vectors(&args.values),
            log_g.arg(),
            vectors(&args.state),
            args.key_sum.arg(),
            vectors(&new_state),
            new_key_sum.arg(),
            vectors(&args.partial_num),
            args.partial_den.arg(),
            dims.kv_heads as u32,
            dims.expanded_dim as u32,
            dims.slices as u32,
            dims.scale,
            tiles,
            dtype,
        );
        if let Some(out) = args.out {
            decode_reduce_kernel::launch_unchecked::<R>(
                client,
                CubeCount::Static((dims.batch * dims.q_heads) as u32, 1, 1),
                CubeDim::new_1d(REDUCE_UNITS as u32),
                args.q.arg(),
                args.keys.arg(),
                args.values.arg(),
                log_g.arg(),
                args.partial_num.arg(),
                args.partial_den.arg(),
                out.arg(),
                (dims.batch * dims.q_heads) as u32,
                dims.q_heads as u32,
                dims.kv_heads as u32,
                dims.slices as u32,
                dims.window as u32,
                dims.scale,
                tiles,
                dtype,
            );
        }
    }
}

/// The window's decay factors, by unit 0 into `sc`: `sc[j] = e^{G − G_j}`, `sc[n] = e^G`.
#[cube]
fn window_decays(
    log_g: &Array<f32>,
    sc: &mut SharedMemory<f32>,
    first: usize,
    stride: usize,
    window: u32,
    #[comptime] gated: bool,
) {
    if UNIT_POS == 0 {
        let mut total = 0.0f32;
        if comptime!(gated) {
            for j in 0..window as usize {
                total += log_g[first + j * stride];
                sc[j] = total;
            }
            for j in 0..window as usize {
                sc[j] = f32::exp(total - sc[j]);
            }
        } else {
            for j in 0..window as usize {
                sc[j] = 1.0;
            }
        }
        sc[window as usize] = f32::exp(total);
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decode_state_kernel<F: Float>(
    q: &Array<F>,
    keys: &Array<F>,
    values: &Array<Vector<F, Const<4>>>,
    log_g: &Array<f32>,
    state: &Array<Vector<f32, Const<4>>>,
    key_sum: &Array<f32>,
    new_state: &mut Array<Vector<f32, Const<4>>>,
    new_key_sum: &mut Array<f32>,
    partial_num: &mut Array<Vector<f32, Const<4>>>,
    partial_den: &mut Array<f32>,
    kv_heads: u32,
    big_d: u32,
    slices: u32,
    scale: f32,
    #[comptime] cfg: DecodeTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let ratio = comptime!(cfg.ratio as usize);
    let lpr = comptime!(cfg.block_e as usize / 4);
    let slots = comptime!(cfg.slots() as usize);
    let threads = comptime!(32 * cfg.rows as usize);
    let ev = comptime!(cfg.value_dim as usize / 4);
    let n = comptime!(cfg.window as usize);
    let beta = comptime!(pair_block(cfg.head_dim));
    let read = comptime!(cfg.mode.reads());
    let advance = comptime!(cfg.mode.advances());
    // buffers a mode does not use keep one element
    let q_len = comptime!(if cfg.mode.reads() {
        (cfg.ratio * cfg.head_dim) as usize
    } else {
        1
    });
    let part_len = comptime!(if cfg.mode.reads() {
        cfg.slots() as usize * cfg.ratio as usize
    } else {
        1
    });
    let k_len = comptime!((cfg.window * cfg.head_dim).max(1) as usize);
    let v_len = comptime!((cfg.window * cfg.value_dim / 4).max(1) as usize);

    let slice = CUBE_POS_Y;
    let seq_head = CUBE_POS_Z as usize; // b * kv_heads + kvh
    let bi = seq_head / kv_heads as usize;
    let kvh = seq_head % kv_heads as usize;
    let batch_count = CUBE_COUNT_Z as usize / kv_heads as usize;
    let lane = UNIT_POS_X as usize;
    let slot = UNIT_POS_Y as usize * (32 / lpr) + lane / lpr;
    let cv = CUBE_POS_X as usize * lpr + lane % lpr; // this lane's 4-column vector
    let col_ok = cv < ev;
    let per_slice = (big_d + slices - 1) / slices;
    let f_start = slice * per_slice;
    let mut f_end = f_start + per_slice;
    if f_end > big_d {
        f_end = big_d;
    }

    let mut sq = SharedMemory::<f32>::new(q_len);
    let mut sk = SharedMemory::<f32>::new(k_len);
    let mut sv = SharedMemory::<Vector<f32, Const<4>>>::new(v_len);
    let mut sc = SharedMemory::<f32>::new(MAX_WINDOW + 1);
    let mut part_num = SharedMemory::<Vector<f32, Const<4>>>::new(part_len * lpr);
    let mut part_den = SharedMemory::<f32>::new(part_len);

    if comptime!(read) {
        let mut idx = UNIT_POS as usize;
        while idx < ratio * d {
            sq[idx] = scale * f32::cast_from(q[seq_head * ratio * d + idx]);
            idx += threads;
        }
    }
    if comptime!(advance) {
        // window row j of this head: token (bi, j), head kvh
        let mut idx = UNIT_POS as usize;
        while idx < n * d {
            let j = idx / d;
            sk[idx] = f32::cast_from(keys[((bi * n + j) * kv_heads as usize + kvh) * d + idx % d]);
            idx += threads;
        }
        let mut idx = UNIT_POS as usize;
        while idx < n * ev {
            let j = idx / ev;
            sv[idx] =
                Vector::cast_from(values[((bi * n + j) * kv_heads as usize + kvh) * ev + idx % ev]);
            idx += threads;
        }
        window_decays(
            log_g,
            &mut sc,
            bi * n * kv_heads as usize + kvh,
            kv_heads as usize,
            n as u32,
            cfg.gated,
        );
    }
    sync_cube();
    let writes_sum = CUBE_POS_X == 0 && lane % lpr == 0;

    let mut num = Array::<Vector<f32, Const<4>>>::new(ratio);
    let mut den = Array::<f32>::new(ratio);
    #[unroll]
    for m in 0..ratio {
        num[m] = Vector::new(0.0);
        den[m] = 0.0;
    }
    let state_base = seq_head * big_d as usize;
    // `ROW_LOADS` rows per lane per pass, their loads issued before any is used: a lane keeps
    // several 16-byte loads in flight (one is not enough to cover the memory latency)
    let mut s_rows = Array::<Vector<f32, Const<4>>>::new(ROW_LOADS);
    let mut z_rows = Array::<f32>::new(ROW_LOADS);
    let mut f = f_start + slot as u32;
    while f < f_end {
        #[unroll]
        for u in 0..ROW_LOADS {
            let fu = f + (u * slots) as u32;
            s_rows[u] = Vector::new(0.0);
            z_rows[u] = 0.0;
            if fu < f_end {
                if col_ok {
                    s_rows[u] = state[(state_base + fu as usize) * ev + cv];
                }
                z_rows[u] = key_sum[state_base + fu as usize];
            }
        }
        #[unroll]
        for u in 0..ROW_LOADS {
            let fu = f + (u * slots) as u32;
            if fu < f_end {
                let at = (state_base + fu as usize) * ev + cv;
                let s_old = s_rows[u];
                let z_old = z_rows[u];
                let pair = feature_pair(fu, beta);
                let a = (pair >> 16) as usize;
                let b = (pair & 0xffff) as usize;
                if comptime!(advance) {
                    let decay = sc[n];
                    let weight = pair_weight(a as u32, b as u32, beta);
                    let mut s_new = s_old * Vector::new(decay);
                    let mut z_new = z_old * decay;
                    #[unroll]
                    for j in 0..n {
                        let phi = sk[j * d + a] * sk[j * d + b] * weight * sc[j];
                        z_new += phi;
                        if col_ok {
                            s_new += sv[j * ev + cv] * Vector::new(phi);
                        }
                    }
                    if col_ok {
                        new_state[at] = s_new;
                    }
                    if writes_sum {
                        new_key_sum[state_base + fu as usize] = z_new;
                    }
                }
                if comptime!(read) {
                    #[unroll]
                    for m in 0..ratio {
                        let phi_q = sq[m * d + a] * sq[m * d + b];
                        num[m] += s_old * Vector::new(phi_q);
                        den[m] += phi_q * z_old;
                    }
                }
            }
        }
        f += (ROW_LOADS * slots) as u32;
    }
    if comptime!(read) {
        #[unroll]
        for m in 0..ratio {
            part_num[(slot * ratio + m) * lpr + lane % lpr] = num[m];
            if lane % lpr == 0 {
                part_den[slot * ratio + m] = den[m];
            }
        }
        sync_cube();
        // partials are laid out [slice, b, hq, e]: seq_head * ratio + m = b * hq + head
        let rows_out = batch_count * kv_heads as usize * ratio;
        let mut idx = UNIT_POS as usize;
        while idx < ratio * lpr {
            let m = idx / lpr;
            let cvl = idx % lpr;
            let c = CUBE_POS_X as usize * lpr + cvl;
            let head_row = seq_head * ratio + m;
            if c < ev {
                let mut total = Vector::<f32, Const<4>>::new(0.0);
                for s in 0..slots {
                    total += part_num[(s * ratio + m) * lpr + cvl];
                }
                partial_num[(slice as usize * rows_out + head_row) * ev + c] = total;
            }
            if CUBE_POS_X == 0 && cvl == 0 {
                let mut total = 0.0f32;
                for s in 0..slots {
                    total += part_den[s * ratio + m];
                }
                partial_den[slice as usize * rows_out + head_row] = total;
            }
            idx += threads;
        }
    }
}

/// One cube of [`REDUCE_UNITS`] units per output row `(b, head)`: sums the slices' partial
/// products (eight slices' loads in flight at a time), adds the window's tokens and normalises.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decode_reduce_kernel<F: Float>(
    q: &Array<F>,
    keys: &Array<F>,
    values: &Array<F>,
    log_g: &Array<f32>,
    partial_num: &Array<f32>,
    partial_den: &Array<f32>,
    out: &mut Array<F>,
    head_rows: u32,
    q_heads: u32,
    kv_heads: u32,
    slices: u32,
    window: u32,
    scale: f32,
    #[comptime] cfg: DecodeTiles,
    #[define(F)] _dtype: StorageType,
) {
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let row = CUBE_POS_X as usize; // b * hq + head
    let lane = UNIT_POS_X as usize;
    let ratio = q_heads / kv_heads;
    let seq_head = row / ratio as usize; // b * kv_heads + kvh
    let bi = seq_head / kv_heads as usize;
    let kvh = seq_head % kv_heads as usize;
    let n = window as usize;
    let rows = head_rows as usize;
    let mut sw = SharedMemory::<f32>::new(MAX_WINDOW);
    let mut sc = SharedMemory::<f32>::new(MAX_WINDOW + 1);

    // the window's scores (one unit per token) and decays
    if lane < n {
        let at = ((bi * n + lane) * kv_heads as usize + kvh) * d;
        let mut dot = 0.0f32;
        for x in 0..d {
            dot += f32::cast_from(q[row * d + x]) * f32::cast_from(keys[at + x]);
        }
        sw[lane] = scale * dot;
    }
    window_decays(
        log_g,
        &mut sc,
        bi * n * kv_heads as usize + kvh,
        kv_heads as usize,
        window,
        cfg.gated,
    );
    sync_cube();
    if lane < n {
        let s2 = sw[lane] * sw[lane];
        let mut w = s2;
        #[unroll]
        for _ in 1..comptime!(cfg.degree / 2) {
            w *= s2;
        }
        sw[lane] = w * sc[lane];
    }
    sync_cube();
    let decay = sc[n];

    // slices eight at a time, their loads issued together
    let mut den = Array::<f32>::new(8usize);
    #[unroll]
    for i in 0..8usize {
        den[i] = 0.0;
    }
    let blocks = (slices + 7) / 8;
    for blk in 0..blocks {
        let s = blk as usize * 8;
        #[unroll]
        for i in 0..8usize {
            if s + i < slices as usize {
                den[i] += partial_den[(s + i) * rows + row];
            }
        }
    }
    let mut l = decay * (den[0] + den[1] + den[2] + den[3] + den[4] + den[5] + den[6] + den[7]);
    for j in 0..n {
        l += sw[j];
    }
    let inv = select(l > 0.0, 1.0 / l, 0.0f32);
    let mut col = lane;
    while col < e {
        let mut num = Array::<f32>::new(8usize);
        #[unroll]
        for i in 0..8usize {
            num[i] = 0.0;
        }
        for blk in 0..blocks {
            let s = blk as usize * 8;
            #[unroll]
            for i in 0..8usize {
                if s + i < slices as usize {
                    num[i] += partial_num[((s + i) * rows + row) * e + col];
                }
            }
        }
        let mut total =
            decay * (num[0] + num[1] + num[2] + num[3] + num[4] + num[5] + num[6] + num[7]);
        for j in 0..n {
            total +=
                sw[j] * f32::cast_from(values[((bi * n + j) * kv_heads as usize + kvh) * e + col]);
        }
        out[row * e + col] = F::cast_from(total * inv);
        col += REDUCE_UNITS;
    }
}
