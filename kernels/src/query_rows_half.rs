//! The query side's operands of the tensor-core `dS` product (backward pass) in one pass over
//! the rows: `σq` and `dN/β` rounded to f16, `β` a positive scale per `(b, h)` (the caller's:
//! the largest `|dN|` of each, 1 where that is zero). A scale, a division and two casts as
//! tensor ops wrote the same values in four passes.

use cubecl::prelude::*;
use half::f16;

use crate::Buffer;

/// Units per cube.
const UNITS: u32 = 256;
/// Cubes of one launch at most; each unit walks the elements `UNITS · cubes` apart.
const MAX_CUBES: usize = 4096;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn query_rows_half_kernel<Q: Float>(
    q: &Array<Vector<Q, Const<8>>>,
    d_num: &Array<Vector<f32, Const<8>>>,
    beta: &Array<f32>,
    q_half: &mut Array<Vector<f16, Const<8>>>,
    d_num_half: &mut Array<Vector<f16, Const<8>>>,
    rows: u32,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] value_dim: usize,
    #[define(Q)] _dtype: StorageType,
) {
    // eight columns per unit and step: both widths are multiples of 8
    let stride = (CUBE_COUNT_X * UNITS) as usize;
    let start = (CUBE_POS_X * UNITS + UNIT_POS_X) as usize;
    let mut i = start;
    while i < rows as usize * (head_dim / 8) {
        let x = q[i];
        let mut out = Vector::<f16, Const<8>>::empty();
        #[unroll]
        for c in 0..8usize {
            out[c] = f16::cast_from(f32::cast_from(x[c]) * scale);
        }
        q_half[i] = out;
        i += stride;
    }
    let ratio = q_heads / kv_heads;
    let mut j = start;
    while j < rows as usize * (value_dim / 8) {
        // row = (bi·t + pos)·hq + head (`b·t·hq` fits in 32 bits)
        let row = (j / (value_dim / 8)) as u32;
        let head = row % q_heads;
        let bi = row / q_heads / seq;
        let b = beta[(bi * kv_heads + head / ratio) as usize];
        let x = d_num[j];
        let mut out = Vector::<f16, Const<8>>::empty();
        #[unroll]
        for c in 0..8usize {
            out[c] = f16::cast_from(x[c] / b);
        }
        d_num_half[j] = out;
        j += stride;
    }
}

/// Buffers of [`launch_query_rows_half`] (contiguous, row-major; `rows = b·t·hq`).
pub struct QueryRowsHalfArgs {
    /// The queries, `[rows, d]` of the launch's dtype.
    pub q: Buffer,
    /// `dN`, `f32 [rows, e]`.
    pub d_num: Buffer,
    /// `β` per `(b, h)`, `f32 [b, h]`, every element positive.
    pub beta: Buffer,
    /// Output `σq`, `f16 [rows, d]`.
    pub q_half: Buffer,
    /// Output `dN/β`, `f16 [rows, e]`.
    pub d_num_half: Buffer,
}

/// Sizes of [`launch_query_rows_half`] (`d` and `e` multiples of 8).
#[derive(Debug, Clone, Copy)]
pub struct QueryRowsHalfDims {
    /// `b`.
    pub batch: usize,
    /// `t`.
    pub seq: usize,
    /// `hq`.
    pub q_heads: usize,
    /// `h` (`hq` a multiple of it).
    pub kv_heads: usize,
    /// `d`.
    pub head_dim: usize,
    /// `e`.
    pub value_dim: usize,
}

/// Writes `f16(σ·q)` and `f16(dN/β)` for every row; `dtype` is the element type of `q`.
///
/// # Safety
/// The buffers must have the sizes documented on [`QueryRowsHalfArgs`] for `dims`, and `d`
/// and `e` must be multiples of 8 (a non-positive `β` divides by it all the same).
pub unsafe fn launch_query_rows_half<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: QueryRowsHalfDims,
    scale: f32,
    args: QueryRowsHalfArgs,
) {
    let rows = dims.batch * dims.seq * dims.q_heads;
    let widest = rows * dims.head_dim.max(dims.value_dim) / 8;
    let cubes = widest.div_ceil(UNITS as usize).clamp(1, MAX_CUBES);
    // SAFETY: the buffers hold what the caller promised.
    unsafe {
        query_rows_half_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d(UNITS),
            args.q.arg(),
            args.d_num.arg(),
            args.beta.arg(),
            args.q_half.arg(),
            args.d_num_half.arg(),
            rows as u32,
            dims.seq as u32,
            dims.q_heads as u32,
            dims.kv_heads as u32,
            scale,
            dims.head_dim,
            dims.value_dim,
            dtype,
        )
    }
}
