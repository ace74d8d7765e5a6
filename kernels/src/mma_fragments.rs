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
    let mut lo = Array::<Vector<f16, N>>::new(2usize);
    let mut hi = Array::<Vector<f16, N>>::new(2usize);
    lo[0] = regs[0];
    lo[1] = regs[1];
    hi[0] = regs[2];
    hi[1] = regs[3];
    (lo, hi)
}
