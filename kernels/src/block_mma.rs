//! The tensor-core block product the two state kernels share: a cube of 8 planes accumulates
//! a `128 × e` `f32` tile (`e ≤ 128`, a multiple of 32) as `A · B` over steps of
//! `A [128 × 32]` × `B [32 × e]`, both f16 in shared memory, then writes the tile row by row.
//!
//! Plane `p` owns rows `32·(p mod 4)..+32` and columns `(e/2)·(p / 4)..+e/2`: two row tiles ×
//! `e/32` column tiles of 16×16 fragments.

use cubecl::prelude::*;
use half::f16;

/// Rows of the accumulated tile.
pub(crate) const ROWS: usize = 128;
/// Depth of one step (`A`'s columns, `B`'s rows).
pub(crate) const DEPTH: usize = 32;
/// Row stride of the `A` tile (halves): 16-byte aligned rows, banks spread.
pub(crate) const A_STRIDE: usize = DEPTH + 8;
/// Planes per cube.
pub(crate) const PLANES: u32 = 8;
/// Units per plane.
pub(crate) const PLANE: u32 = 32;
/// Units per cube.
pub(crate) const UNITS: usize = (PLANES * PLANE) as usize;
/// `f32` staging per cube for [`store_accumulators`] (one 16×16 tile per plane).
pub(crate) const STAGE: usize = UNITS * 8;
/// Sentinel of [`store_accumulators`]' row index: the row is not written.
pub(crate) const SKIP_ROW: u32 = u32::MAX;

/// The cube shape of kernels built on this product.
pub(crate) fn cube_dim() -> CubeDim {
    CubeDim::new_2d(PLANE, PLANES)
}

/// Row stride of the `B` tile for `e` value columns (halves).
pub(crate) const fn b_stride(value_dim: usize) -> usize {
    value_dim + 8
}

/// This plane's zeroed accumulators (`2 · e/32` fragments).
#[cube]
pub(crate) fn zero_accumulators(#[comptime] value_dim: usize) -> Sequence<cmma::Matrix<f32>> {
    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..2 * (value_dim / 32) {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    acc
}

/// `acc += A · B` for one step: `A` at `a[a_offset..]` (128 rows, stride [`A_STRIDE`]), `B` at
/// `b[b_offset..]` (32 rows, stride [`b_stride`]).
#[cube]
pub(crate) fn multiply_step(
    acc: &mut Sequence<cmma::Matrix<f32>>,
    a: &SharedMemory<f16>,
    a_offset: usize,
    b: &SharedMemory<f16>,
    b_offset: usize,
    #[comptime] value_dim: usize,
) {
    let col_tiles = comptime!(value_dim / 32);
    let bs = comptime!(b_stride(value_dim));
    let plane = UNIT_POS_Y as usize;
    let row = a_offset + (plane % 4) * 32 * A_STRIDE;
    let col = b_offset + (plane / 4) * (value_dim / 2);
    #[unroll]
    for ks in 0..DEPTH / 16 {
        let a0 = cmma::Matrix::<f16>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &a.slice(row + ks * 16, a.len()),
            A_STRIDE as u32,
        );
        let a1 = cmma::Matrix::<f16>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &a.slice(row + 16 * A_STRIDE + ks * 16, a.len()),
            A_STRIDE as u32,
        );
        #[unroll]
        for ct in 0..col_tiles {
            let bm = cmma::Matrix::<f16>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &b.slice(col + ks * 16 * bs + ct * 16, b.len()),
                bs as u32,
            );
            let c0 = acc.index(ct);
            cmma::execute::<f16, f16, f32, f32>(&a0, &bm, c0, c0);
            let c1 = acc.index(col_tiles + ct);
            cmma::execute::<f16, f16, f32, f32>(&a1, &bm, c1, c1);
        }
    }
}

/// Writes the accumulated tile times `mult`: tile row `i` goes to `out[row_index[i]·e ..]`, rows
/// whose index is [`SKIP_ROW`] are left alone. Each fragment passes through this plane's 16×16 slot of
/// `stage` ([`STAGE`] floats) so the stores are row-contiguous.
#[cube]
pub(crate) fn store_accumulators(
    acc: &Sequence<cmma::Matrix<f32>>,
    stage: &mut SharedMemory<f32>,
    row_index: &SharedMemory<u32>,
    out: &mut Array<f32>,
    mult: f32,
    #[comptime] value_dim: usize,
) {
    let col_tiles = comptime!(value_dim / 32);
    let plane = UNIT_POS_Y as usize;
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
                let at = row_index[(plane % 4) * 32 + half_rows * 16 + i / 16];
                if at != SKIP_ROW {
                    let col = (plane / 4) * (value_dim / 2) + ct * 16 + i % 16;
                    out[at as usize * value_dim + col] = mult * stage[st + i];
                }
            }
            sync_plane();
        }
    }
}
