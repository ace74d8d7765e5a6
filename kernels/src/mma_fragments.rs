//! Fragment loads the kernels on CUDA's manually managed `mma.sync.m16n8k16` share
//! ([`chunk_grad_state_outer`](crate::chunk_grad_state_outer),
//! [`chunk_state_outer`](crate::chunk_state_outer), `query_state_outer`).

use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::*;
use half::f16;

/// Two B fragments (two 8-column tiles of one 16-deep step) from one `ldmatrix.x4`: this lane
/// passes the 16-byte row `tile[at]` of the four 8 × 8 matrices (lanes `8q..8q + 8` address
/// matrix `q`; matrices 0, 1 make the first fragment, 2, 3 the second). `transpose` loads the
/// matrices transposed (rows of the tile along the fragments' depth).
#[cube]
#[allow(clippy::type_complexity)]
pub(crate) fn b_fragment_pair<N: Size>(
    def: MmaDefinition<f16, f16, f32>,
    tile: &SharedMemory<Vector<f16, Const<8>>>,
    at: usize,
    #[comptime] transpose: bool,
) -> (Array<Vector<f16, N>>, Array<Vector<f16, N>>) {
    let regs = def.load_matrix::<Vector<f16, Const<8>>, N>(
        &tile.slice(at, at + 1),
        MatrixIdent::B,
        4usize,
        transpose,
    );
    split_pair(regs)
}

/// The A fragment (`16 × 16`, `mma.m16n8k16`) of the rows `row0..row0 + 16`, columns
/// `col0..col0 + 16` of a row-major tile with row stride `stride` (elements; rows 16-byte
/// aligned), through one `ldmatrix.x4`: lanes `8m..8m + 8` address matrix `m`, which holds
/// rows `8·(m mod 2)` and columns `8·(m / 2)` of the block (the fragment's register order).
#[cube]
pub(crate) fn a_fragment<E: Float, N: Size>(
    def: MmaDefinition<E, E, f32>,
    tile: &SharedMemory<E>,
    row0: usize,
    col0: usize,
    #[comptime] stride: usize,
) -> Array<Vector<E, N>> {
    let lane = UNIT_POS_X as usize;
    let at = (row0 + lane % 8 + 8 * ((lane / 8) % 2)) * stride + col0 + 8 * (lane / 16);
    def.load_matrix::<E, N>(&tile.slice(at, at + 8), MatrixIdent::A, 4usize, false)
}

/// Two B fragments (`16 × 8` each, `mma.m16n8k16`) of `Bᵀ` stored row-major: B's columns
/// `n0..n0 + 8` and `n0 + 8..n0 + 16` are the tile's rows, its depth the columns
/// `col0..col0 + 16` (as the keys in `Q Kᵀ`). One `ldmatrix.x4`; matrix `m` holds rows
/// `n0 + 8·(m / 2)`, columns `col0 + 8·(m mod 2)`.
#[cube]
#[allow(clippy::type_complexity)]
pub(crate) fn b_fragments_of_rows<E: Float, N: Size>(
    def: MmaDefinition<E, E, f32>,
    tile: &SharedMemory<E>,
    n0: usize,
    col0: usize,
    #[comptime] stride: usize,
) -> (Array<Vector<E, N>>, Array<Vector<E, N>>) {
    let lane = UNIT_POS_X as usize;
    let at = (n0 + lane % 8 + 8 * (lane / 16)) * stride + col0 + 8 * ((lane / 8) % 2);
    let regs = def.load_matrix::<E, N>(&tile.slice(at, at + 8), MatrixIdent::B, 4usize, false);
    split_pair(regs)
}

/// Two B fragments of `B` stored row-major: depth along the tile's rows `k0..k0 + 16`, the
/// columns `n0..n0 + 8` and `n0 + 8..n0 + 16` (as the values in `W V`). One
/// `ldmatrix.x4.trans`; matrix `m` holds rows `k0 + 8·(m mod 2)`, columns `n0 + 8·(m / 2)`.
#[cube]
#[allow(clippy::type_complexity)]
pub(crate) fn b_fragments_of_columns<E: Float, N: Size>(
    def: MmaDefinition<E, E, f32>,
    tile: &SharedMemory<E>,
    k0: usize,
    n0: usize,
    #[comptime] stride: usize,
) -> (Array<Vector<E, N>>, Array<Vector<E, N>>) {
    let lane = UNIT_POS_X as usize;
    let at = (k0 + lane % 8 + 8 * ((lane / 8) % 2)) * stride + n0 + 8 * (lane / 16);
    let regs = def.load_matrix::<E, N>(&tile.slice(at, at + 8), MatrixIdent::B, 4usize, true);
    split_pair(regs)
}

/// The two fragments of one `ldmatrix.x4` B load (registers 0, 1 and 2, 3).
#[cube]
#[allow(clippy::type_complexity)]
fn split_pair<E: Float, N: Size>(
    regs: Array<Vector<E, N>>,
) -> (Array<Vector<E, N>>, Array<Vector<E, N>>) {
    let mut lo = Array::<Vector<E, N>>::new(2usize);
    let mut hi = Array::<Vector<E, N>>::new(2usize);
    lo[0] = regs[0];
    lo[1] = regs[1];
    hi[0] = regs[2];
    hi[1] = regs[3];
    (lo, hi)
}

/// `count` zeroed `m16n8` accumulator tiles (`regs` registers of `N` floats each).
#[cube]
pub(crate) fn zero_tiles<N: Size>(
    #[comptime] count: usize,
    #[comptime] regs: usize,
) -> Sequence<Array<Vector<f32, N>>> {
    let mut tiles = Sequence::<Array<Vector<f32, N>>>::new();
    #[unroll]
    for _ in 0..count {
        let mut t = Array::<Vector<f32, N>>::new(regs);
        #[unroll]
        for i in 0..regs {
            t[i] = Vector::new(0.0f32);
        }
        tiles.push(t);
    }
    tiles
}
