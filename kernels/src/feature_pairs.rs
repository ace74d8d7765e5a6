//! The degree-2 feature layout, evaluated inside kernels.
//!
//! The `d` coordinates are split into `M = d/β` blocks of `β` (the largest power of two ≤ 16
//! dividing `d`: 16 for every head dim the tensor-core paths take). Feature
//! `f = β²·m(m+1)/2 + β·x + r` (block `m < M`, outer coordinate `x < β(m+1)`, offset `r < β`) is
//! the product of coordinates `x` and `βm + r`; keys weigh it 2 when `x < βm` (the pair appears
//! once) and 1 otherwise (inside the diagonal block both orders appear). `D = d(d+β)/2`.
//! For `d % 16 == 0` this is the layout of Manifest's Triton kernels. A block of `β` consecutive
//! features is one query coordinate times `β` consecutive ones, which is what makes the
//! feature tiles cheap to build.

use cubecl::prelude::*;

/// `β` for head dim `d`: the largest power of two ≤ 16 dividing `d` (1 for odd `d`).
pub fn pair_block(head_dim: u32) -> u32 {
    if head_dim == 0 {
        1
    } else {
        (head_dim & head_dim.wrapping_neg()).min(16)
    }
}

/// The 16-feature groups of head dim `d` (a multiple of 16): `D/16`, `D = d(d + 16)/2`.
pub fn feature_groups(head_dim: usize) -> usize {
    head_dim * (head_dim + 16) / 32
}

/// The block `m` of feature `f`: the largest `m` with `β·m(m+1)/2 ≤ f/β`.
#[cube]
pub fn feature_block(f: u32, #[comptime] beta: u32) -> u32 {
    let g = f / beta;
    let root = f32::sqrt(1.0 + 8.0 * f32::cast_from(g) / f32::cast_from(beta));
    let mut m = u32::cast_from(f32::floor((root - 1.0) * 0.5));
    if beta * (m + 1) * (m + 2) / 2 <= g {
        m += 1;
    }
    if m > 0 {
        if beta * m * (m + 1) / 2 > g {
            m -= 1;
        }
    }
    m
}

/// The coordinate pair of feature `f`, packed as `x << 16 | (βm + r)` (see the module docs).
#[cube]
pub fn feature_pair(f: u32, #[comptime] beta: u32) -> u32 {
    let m = feature_block(f, beta);
    let x = f / beta - beta * m * (m + 1) / 2;
    let inner = beta * m + f % beta;
    (x << 16) | inner
}

/// Key-side weight of the pair `(x, inner)`: 2 when `x` lies in an earlier block than `inner`.
#[cube]
pub fn pair_weight(x: u32, inner: u32, #[comptime] beta: u32) -> f32 {
    let mut w = 1.0f32;
    if x < inner - inner % beta {
        w = 2.0;
    }
    w
}

/// The feature of the coordinate pair `{a, b}` (the inverse of [`feature_pair()`] up to the
/// pair's order): `x` is the coordinate of the lower block, `a` where both share one.
#[cube]
pub fn pair_feature(a: u32, b: u32, #[comptime] beta: u32) -> u32 {
    let ma = a / beta;
    let mb = b / beta;
    let mut f = beta * beta * ma * (ma + 1) / 2 + beta * b + (a - beta * ma);
    if ma <= mb {
        f = beta * beta * mb * (mb + 1) / 2 + beta * a + (b - beta * mb);
    }
    f
}
