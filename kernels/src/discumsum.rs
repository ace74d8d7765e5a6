//! Discounted cumulative sum of chunk states across chunks, in place:
//! `S_in[0] = S₀ (or 0)`, `S_in[u+1] = e^{A_u} S_in[u] + ΔS_u`; the chunk slots are overwritten
//! with the states *entering* each chunk, and the state after the last chunk goes to `last`.
//! Memory-bound: one unit per state element walks the chunks with an `f32` running value.

use cubecl::prelude::*;

/// Scalar sizes of a scan launch.
#[derive(Debug, Clone, Copy)]
pub struct ScanDims {
    /// `b · h` (independent scans).
    pub sequences: usize,
    /// Elements per chunk state (`D·e` for states, `D` for key-sums).
    pub width: usize,
    /// `n`.
    pub n_chunks: usize,
    /// `c`: the chunk total `A_u` is the gate entry `u·c + c − 1`.
    pub chunk: usize,
}

/// Buffers of a scan launch.
pub struct ScanArgs<R: Runtime> {
    /// `f32 [b·h, n, width]`, chunk contributions in, entering states out.
    pub chunks: ArrayArg<R>,
    /// Initial state `f32 [b·h, width]`, or a 1-element dummy.
    pub initial: Option<ArrayArg<R>>,
    /// Cumulative log-gates inside each chunk, `f32 [b·h, n·c]`, or `None` (no gating).
    pub gates: Option<ArrayArg<R>>,
    /// Output `f32 [b·h, width]`: the state after the last chunk.
    pub last: ArrayArg<R>,
}

const UNITS: u32 = 256;

/// Launches the scan.
///
/// # Safety
/// The buffers must have the sizes documented on [`ScanArgs`].
pub unsafe fn launch_discumsum<R: Runtime>(
    client: &ComputeClient<R>,
    dims: ScanDims,
    args: ScanArgs<R>,
) {
    let count = CubeCount::Static(
        dims.width.div_ceil(UNITS as usize) as u32,
        dims.sequences as u32,
        1,
    );
    let has_initial = args.initial.is_some();
    let gated = args.gates.is_some();
    let dummy = || unsafe { ArrayArg::from_raw_parts(client.empty(4), 1) };
    unsafe {
        discumsum_kernel::launch_unchecked::<R>(
            client,
            count,
            CubeDim::new_1d(UNITS),
            args.chunks,
            args.initial.unwrap_or_else(dummy),
            args.gates.unwrap_or_else(dummy),
            args.last,
            dims.width as u32,
            dims.n_chunks as u32,
            dims.chunk as u32,
            has_initial,
            gated,
        )
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn discumsum_kernel(
    chunks: &mut Array<f32>,
    initial: &Array<f32>,
    gates: &Array<f32>,
    last: &mut Array<f32>,
    width: u32,
    n_chunks: u32,
    chunk: u32,
    #[comptime] has_initial: bool,
    #[comptime] gated: bool,
) {
    let x = CUBE_POS_X * UNITS + UNIT_POS;
    if x >= width {
        terminate!();
    }
    let seq = CUBE_POS_Y;
    let mut running = 0.0f32;
    if comptime!(has_initial) {
        running = initial[(seq * width + x) as usize];
    }
    let base = (seq * n_chunks) as usize * width as usize + x as usize;
    let gate_base = (seq * n_chunks * chunk) as usize;
    for u in 0..n_chunks {
        let idx = base + u as usize * width as usize;
        let delta = chunks[idx];
        chunks[idx] = running;
        if comptime!(gated) {
            running *= f32::exp(gates[gate_base + ((u + 1) * chunk - 1) as usize]);
        }
        running += delta;
    }
    last[(seq * width + x) as usize] = running;
}
