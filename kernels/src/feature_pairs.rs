//! The exact degree-2 feature layout, evaluated inside kernels.
//!
//! Feature `f` of the `D = d(d+1)/2` features is the pair `(i, j)`, `i ≤ j`, in lexicographic
//! order: row `i` starts at `i·(2d − i + 1)/2`. Kernels recover `(i, j)` from `f` with one square
//! root and a one-step correction, so no index table lives in device memory.

use cubecl::prelude::*;

/// Index of the first feature `(i, i)` of row `i`.
#[cube]
pub fn row_offset(i: u32, d: u32) -> u32 {
    i * (2 * d - i + 1) / 2
}

/// The row `i` of feature `f` (`f < d(d+1)/2`).
#[cube]
pub fn feature_row(f: u32, d: u32) -> u32 {
    let b = f32::cast_from(2 * d + 1);
    let disc = b * b - 8.0 * f32::cast_from(f);
    let root = f32::sqrt(f32::max(disc, 0.0));
    let mut i = u32::cast_from(f32::floor((b - root) * 0.5));
    if i >= d {
        i = d - 1;
    }
    if row_offset(i + 1, d) <= f {
        i += 1;
    }
    if row_offset(i, d) > f {
        i -= 1;
    }
    i
}
