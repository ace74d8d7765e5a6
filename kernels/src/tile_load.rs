//! Loads shared by the kernels: token rows of a `[b, t, heads, width]` array into shared
//! memory, and the feature pairs (plus key-sum entries) of a block of features.

use cubecl::prelude::*;

use crate::feature_pairs::feature_pair;

/// Copies `rows` token rows (`first..first + rows` of the chunk starting at `chunk_start`) of
/// head `head`, scaled by `mult`, into `dst` with row stride `stride`; rows past the chunk or
/// the sequence are zero. All units of the cube take part.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_token_rows<F: Float, S: Float>(
    src: &Array<F>,
    dst: &mut SharedMemory<S>,
    chunk_start: u32,
    first: u32,
    chunk: u32,
    seq: u32,
    batch: u32,
    heads: u32,
    head: u32,
    mult: f32,
    #[comptime] rows: usize,
    #[comptime] width: usize,
    #[comptime] stride: usize,
    #[comptime] threads: usize,
) {
    let mut idx = UNIT_POS as usize;
    while idx < rows * width {
        let row = idx / width;
        let pos = first + row as u32;
        let tok = chunk_start + pos;
        let mut val = 0.0f32;
        if pos < chunk && tok < seq {
            let at = ((batch * seq + tok) * heads + head) as usize * width + idx % width;
            val = mult * f32::cast_from(src[at]);
        }
        dst[row * stride + idx % width] = S::cast_from(val);
        idx += threads;
    }
}

/// Units `0..block` write the pair `(a, b)` of features `f0..f0 + block` into `fa`, `fb` and
/// their key-sum entry `sums[base + f]`, times `mult`, into `zs` (zeros past `big_d`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_feature_pairs(
    sums: &Array<f32>,
    fa: &mut SharedMemory<u32>,
    fb: &mut SharedMemory<u32>,
    zs: &mut SharedMemory<f32>,
    base: usize,
    f0: usize,
    big_d: u32,
    mult: f32,
    #[comptime] beta: u32,
    #[comptime] block: usize,
) {
    if (UNIT_POS as usize) < block {
        let f = (f0 + UNIT_POS as usize) as u32;
        let mut a = 0u32;
        let mut b = 0u32;
        let mut z = 0.0f32;
        if f < big_d {
            let pair = feature_pair(f, beta);
            a = pair >> 16;
            b = pair & 0xffff;
            z = sums[base + f as usize] * mult;
        }
        fa[UNIT_POS as usize] = a;
        fb[UNIT_POS as usize] = b;
        zs[UNIT_POS as usize] = z;
    }
}

/// Copies the key and value rows `first..first + rows` of key/value head `head` into `sk`
/// (row stride `k_stride`) and `sv` (row stride `value_dim`), as [`load_token_rows()`].
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_key_value_rows<F: Float, S: Float>(
    k: &Array<F>,
    v: &Array<F>,
    sk: &mut SharedMemory<S>,
    sv: &mut SharedMemory<S>,
    chunk_start: u32,
    first: u32,
    chunk: u32,
    seq: u32,
    batch: u32,
    heads: u32,
    head: u32,
    #[comptime] rows: usize,
    #[comptime] head_dim: usize,
    #[comptime] k_stride: usize,
    #[comptime] value_dim: usize,
    #[comptime] threads: usize,
) {
    load_token_rows::<F, S>(
        k,
        sk,
        chunk_start,
        first,
        chunk,
        seq,
        batch,
        heads,
        head,
        1.0,
        rows,
        head_dim,
        k_stride,
        threads,
    );
    load_token_rows::<F, S>(
        v,
        sv,
        chunk_start,
        first,
        chunk,
        seq,
        batch,
        heads,
        head,
        1.0,
        rows,
        value_dim,
        value_dim,
        threads,
    );
}

/// Units `0..block` copy the cumulative gates of positions `first..first + block` of the chunk
/// (entries `base + chunk_start + pos` of `gates`, zero past the chunk) into `dst`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_gates(
    gates: &Array<f32>,
    dst: &mut SharedMemory<f32>,
    base: usize,
    chunk_start: u32,
    first: u32,
    chunk: u32,
    #[comptime] block: u32,
) {
    if UNIT_POS < block {
        let pos = first + UNIT_POS;
        let mut g = 0.0f32;
        if pos < chunk {
            g = gates[base + (chunk_start + pos) as usize];
        }
        dst[UNIT_POS as usize] = g;
    }
}

/// Rows of a row block that exist: `min(limit − first, rows)`, 0 past `limit`.
#[cube]
pub fn rows_present(first: u32, limit: u32) -> u32 {
    let mut n = 0u32;
    if first < limit {
        n = limit - first;
    }
    n
}

/// Fetches `rows` key rows (`d` wide) and value rows (`e` wide) into registers, as
/// [`fetch_rows()`] twice: row `i` of each is row `row + i·stride` of the `[.., d]` and `[.., e]`
/// tensors `k` and `v`, the first `present` of them (zeros past it).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn fetch_key_value_rows<F: Float>(
    k: &Array<Vector<F, Const<8>>>,
    v: &Array<Vector<F, Const<8>>>,
    kregs: &mut Array<Vector<F, Const<8>>>,
    vregs: &mut Array<Vector<F, Const<8>>>,
    row: usize,
    stride: usize,
    present: u32,
    #[comptime] rows: usize,
    #[comptime] d: usize,
    #[comptime] e: usize,
    #[comptime] threads: usize,
) {
    fetch_rows::<F>(
        k,
        kregs,
        row * (d / 8),
        stride * (d / 8),
        present,
        rows,
        d,
        threads,
    );
    fetch_rows::<F>(
        v,
        vregs,
        row * (e / 8),
        stride * (e / 8),
        present,
        rows,
        e,
        threads,
    );
}

/// Fetches `rows` rows of `width` elements into registers with 16-byte loads: row `i` starts
/// at vector `first + i·stride` of `src`; rows `present..` are zeros. Pair with [`store_rows()`]
/// (issue the loads, do other work, then store).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn fetch_rows<F: Float>(
    src: &Array<Vector<F, Const<8>>>,
    regs: &mut Array<Vector<F, Const<8>>>,
    first: usize,
    stride: usize,
    present: u32,
    #[comptime] rows: usize,
    #[comptime] width: usize,
    #[comptime] threads: usize,
) {
    let vecs = comptime!(width / 8);
    #[unroll]
    for i in 0..comptime!((rows * width / 8).div_ceil(threads)) {
        let idx = UNIT_POS as usize + i * threads;
        let row = idx / vecs;
        let mut val = Vector::<F, Const<8>>::new(F::cast_from(0.0f32));
        if idx < rows * vecs && (row as u32) < present {
            val = src[first + row * stride + idx % vecs];
        }
        regs[i] = val;
    }
}

/// Stores rows fetched by [`fetch_rows()`] into `dst[offset..]` (row stride `dst_stride`),
/// converted to `S`.
#[cube]
pub fn store_rows<F: Float, S: Float>(
    regs: &Array<Vector<F, Const<8>>>,
    dst: &mut SharedMemory<S>,
    offset: usize,
    #[comptime] rows: usize,
    #[comptime] width: usize,
    #[comptime] dst_stride: usize,
    #[comptime] threads: usize,
) {
    let vecs = comptime!(width / 8);
    #[unroll]
    for i in 0..comptime!((rows * width / 8).div_ceil(threads)) {
        let idx = UNIT_POS as usize + i * threads;
        if idx < rows * vecs {
            let at = offset + (idx / vecs) * dst_stride + (idx % vecs) * 8;
            let val = regs[i];
            #[unroll]
            for j in 0..8usize {
                dst[at + j] = S::cast_from(val[j]);
            }
        }
    }
}

/// Registers for [`fetch_rows()`] of `rows × width` elements.
#[cube]
pub fn row_registers<F: Float>(
    #[comptime] rows: usize,
    #[comptime] width: usize,
    #[comptime] threads: usize,
) -> Array<Vector<F, Const<8>>> {
    Array::<Vector<F, Const<8>>>::new(comptime!((rows * width / 8).div_ceil(threads)))
}

/// `(σ|x|)²` of the row of `d` elements at `src[offset..]`.
#[cube]
pub fn scaled_norm2<F: Float>(
    src: &SharedMemory<F>,
    offset: usize,
    scale: f32,
    #[comptime] d: usize,
) -> f32 {
    let mut norm2 = 0.0f32;
    for x in 0..d {
        let v = f32::cast_from(src[offset + x]);
        norm2 += v * v;
    }
    norm2 * scale * scale
}
