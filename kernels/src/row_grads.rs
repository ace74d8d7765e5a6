//! The output rows' gradients that start the backward pass: with `y_i = N_i / L_i` and the
//! upstream `dy_i`, `dN_i = dy_i / L_i` and `dL_i = −dN_i·y_i` (zero where `L_i ≤ 0`: the
//! forward wrote a zero row there), in one pass over the rows (32 units per row, columns read 32
//! apart, 8 rows per cube) instead of a chain of tensor ops.
//!
//! Options: `dN` rounded to bf16 (kept in f32: the tensor-core backward multiplies bf16 `dN`,
//! and `dL` must come from the same rounded values so each pair's `dw = dN·(v_j − y_i)`
//! cancels), a half-precision copy of `dN` for those kernels, and each row's largest `|dN_i|`
//! laid out `[b, h, t·r]` (a query head `h·r + ρ` at `t·r + ρ`), so a per-`(b, h)` maximum is a
//! reduction over contiguous memory.

use cubecl::prelude::*;
use half::bf16;

use crate::Buffer;

/// Units per row: a row's columns are read `ROW_UNITS` apart (coalesced), its dot product and
/// maximum reduced in shared memory.
const ROW_UNITS: u32 = 32;
/// Rows per cube.
const ROWS: u32 = 8;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn row_grads_kernel<F: Float, H: Float>(
    dy: &Array<F>,
    y: &Array<f32>,
    stats: &Array<f32>,
    d_num: &mut Array<f32>,
    d_den: &mut Array<f32>,
    d_num_half: &mut Array<H>,
    row_max: &mut Array<f32>,
    rows: u32,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    #[comptime] e: usize,
    #[comptime] round: bool,
    #[comptime] half_out: bool,
    #[comptime] with_max: bool,
    #[define(F, H)] _dtypes: [StorageType; 2],
) {
    let units = comptime!((ROW_UNITS * ROWS) as usize);
    let mut dots = SharedMemory::<f32>::new(units);
    let mut maxima = SharedMemory::<f32>::new(units);
    let local = UNIT_POS / ROW_UNITS;
    let lane = UNIT_POS % ROW_UNITS;
    let row = CUBE_POS_X * ROWS + local;
    let mut dot = 0.0f32;
    let mut largest = 0.0f32;
    if row < rows {
        let l = stats[row as usize];
        let inv = select(l > 0.0, 1.0 / l, 0.0f32);
        let base = row as usize * e;
        let mut c = lane as usize;
        while c < e {
            let mut dn = f32::cast_from(dy[base + c]) * inv;
            if comptime!(round) {
                dn = f32::cast_from(bf16::cast_from(dn));
            }
            d_num[base + c] = dn;
            if comptime!(half_out) {
                d_num_half[base + c] = H::cast_from(dn);
            }
            dot += dn * y[base + c];
            largest = f32::max(largest, f32::abs(dn));
            c += ROW_UNITS as usize;
        }
    }
    dots[UNIT_POS as usize] = dot;
    maxima[UNIT_POS as usize] = largest;
    sync_cube();
    if lane == 0 && row < rows {
        let first = (local * ROW_UNITS) as usize;
        let mut total = 0.0f32;
        let mut most = 0.0f32;
        for j in 0..ROW_UNITS as usize {
            total += dots[first + j];
            most = f32::max(most, maxima[first + j]);
        }
        d_den[row as usize] = -total;
        if comptime!(with_max) {
            // row = (bi·t + pos)·hq + head, head = kvh·r + ρ
            let ratio = q_heads / kv_heads;
            let head = row % q_heads;
            let token = row / q_heads;
            let pos = token % seq;
            let bi = token / seq;
            let kvh = head / ratio;
            let at = ((bi * kv_heads + kvh) * seq + pos) * ratio + head % ratio;
            row_max[at as usize] = most;
        }
    }
}

/// Buffers of [`launch_row_grads`] (flat, contiguous, row-major; `rows = b·t·hq`).
pub struct RowGradArgs {
    /// The upstream gradient `dy`, `[rows, e]` of the launch's dtype.
    pub dy: Buffer,
    /// The recomputed rows `y`, `f32 [rows, e]`.
    pub y: Buffer,
    /// Their normalisers `L`, `f32 [rows]`.
    pub stats: Buffer,
    /// Output `dN`, `f32 [rows, e]`.
    pub d_num: Buffer,
    /// Output `dL`, `f32 [rows]`.
    pub d_den: Buffer,
    /// Output: `dN` in half precision (`[rows, e]` of `half_dtype`); `None`: not written.
    pub d_num_half: Option<Buffer>,
    /// Output: each row's largest `|dN|`, `f32 [b, h, t·r]`; `None`: not written.
    pub row_max: Option<Buffer>,
}

/// Sizes of [`launch_row_grads`].
#[derive(Debug, Clone, Copy)]
pub struct RowGradDims {
    /// `b`.
    pub batch: usize,
    /// `t`.
    pub seq: usize,
    /// `hq`.
    pub q_heads: usize,
    /// `h`.
    pub kv_heads: usize,
    /// `e`.
    pub value_dim: usize,
}

/// Writes `dN` and `dL` (and the optional outputs) for every row; `round` rounds `dN` to bf16
/// first. `half_dtype` is the element type of `d_num_half` (any float type where it is `None`).
///
/// # Safety
/// The buffers must have the sizes documented on [`RowGradArgs`] for `dims`, and `dtype` must
/// be the element type of `dy`.
pub unsafe fn launch_row_grads<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    half_dtype: StorageType,
    dims: RowGradDims,
    round: bool,
    args: RowGradArgs,
) {
    let rows = dims.batch * dims.seq * dims.q_heads;
    let dummy = Buffer::unused(client);
    let half_out = args.d_num_half.is_some();
    let with_max = args.row_max.is_some();
    let half = args.d_num_half.unwrap_or_else(|| dummy.clone());
    let row_max = args.row_max.unwrap_or(dummy);
    // SAFETY: the buffers hold what the caller promised.
    unsafe {
        row_grads_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(rows.div_ceil(ROWS as usize) as u32, 1, 1),
            CubeDim::new_1d(ROW_UNITS * ROWS),
            args.dy.arg(),
            args.y.arg(),
            args.stats.arg(),
            args.d_num.arg(),
            args.d_den.arg(),
            half.arg(),
            row_max.arg(),
            rows as u32,
            dims.seq as u32,
            dims.q_heads as u32,
            dims.kv_heads as u32,
            dims.value_dim,
            round,
            half_out,
            with_max,
            [dtype, half_dtype],
        )
    }
}
