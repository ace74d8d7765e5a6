//! Discounted cumulative sum of chunk states across chunks:
//! `S_in[0] = S₀ (or 0)`, `S_in[u+1] = e^{A_u} S_in[u] + ΔS_u`. The states *entering* each chunk
//! overwrite the chunk slots (`f32`, in place), go to a separate half-precision buffer as
//! `S_in/γ` (what the tensor-core query-state kernel reads), or both; the state after the last chunk
//! goes to `last` in `f32`. Memory-bound: each unit walks the chunks for one or four state
//! elements (one for narrow states such as key-sums, so they still spread over many cubes) with
//! `f32` running values, loading four chunks ahead so their loads are in flight together.

use cubecl::prelude::*;
use half::f16;

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
    /// Walk the chunks from the last to the first: the backward pass's scan of state
    /// gradients, `Λ_n = initial`, `Λ_u = e^{A_u} Λ_{u+1} + chunks[u]`; slot `u` receives
    /// `Λ_{u+1}` (the gradient of `ΔS_u`) and `last` receives `Λ_0`.
    pub reverse: bool,
}

/// Buffers of a scan launch.
pub struct ScanArgs<R: Runtime> {
    /// `f32 [b·h, n, width]`, chunk contributions in; entering states out unless `half` is given.
    pub chunks: ArrayArg<R>,
    /// `f16 [b·h, n, width]`: entering states times `half_scale`, instead of in place.
    pub half: Option<ArrayArg<R>>,
    /// Factor of the half-precision output (`1/γ`).
    pub half_scale: f32,
    /// Which of the entering states are written.
    pub writes: ScanWrites,
    /// Initial state `f32 [b·h, width]`, or a 1-element dummy.
    pub initial: Option<ArrayArg<R>>,
    /// Cumulative log-gates inside each chunk, `f32 [b·h, n·c]`, or `None` (no gating).
    pub gates: Option<ArrayArg<R>>,
    /// Output `f32 [b·h, width]`: the state after the last chunk.
    pub last: ArrayArg<R>,
}

/// What a scan writes besides the state after the last chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanWrites {
    /// The entering states: to `half` where it is given, else in place in `f32`.
    Entering,
    /// The entering states to `half` and in place in `f32` (the backward pass reads both).
    EnteringBoth,
    /// Only `last`: the slots keep the contributions (a slice's own final state, whose
    /// contributions a later scan from another initial state reads again).
    LastOnly,
}

const UNITS: u32 = 256;
/// Chunks whose loads are issued together.
const AHEAD: u32 = 4;

/// State elements per unit for a state of `width` elements: four for wide states (fewer, fuller
/// cubes), one for narrow ones (more cubes).
fn per_unit(width: usize) -> u32 {
    if width >= 65_536 { 4 } else { 1 }
}

/// Launches the scan.
///
/// # Safety
/// The buffers must have the sizes documented on [`ScanArgs`].
pub unsafe fn launch_discumsum<R: Runtime>(
    client: &ComputeClient<R>,
    dims: ScanDims,
    args: ScanArgs<R>,
) {
    let per_unit = per_unit(dims.width);
    let count = CubeCount::Static(
        dims.width.div_ceil((UNITS * per_unit) as usize) as u32,
        dims.sequences as u32,
        1,
    );
    let has_initial = args.initial.is_some();
    let to_half = args.half.is_some() && args.writes != ScanWrites::LastOnly;
    let keep_f32 = match args.writes {
        ScanWrites::Entering => !to_half,
        ScanWrites::EnteringBoth => true,
        ScanWrites::LastOnly => false,
    };
    let gated = args.gates.is_some();
    let dummy = || unsafe { ArrayArg::from_raw_parts(client.empty(4), 1) };
    unsafe {
        discumsum_kernel::launch_unchecked::<R>(
            client,
            count,
            CubeDim::new_1d(UNITS),
            args.chunks,
            args.half.unwrap_or_else(dummy),
            args.initial.unwrap_or_else(dummy),
            args.gates.unwrap_or_else(dummy),
            args.last,
            dims.width as u32,
            dims.n_chunks as u32,
            dims.chunk as u32,
            args.half_scale,
            has_initial,
            gated,
            to_half,
            keep_f32,
            per_unit,
            dims.reverse,
        )
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn discumsum_kernel(
    chunks: &mut Array<f32>,
    half: &mut Array<f16>,
    initial: &Array<f32>,
    gates: &Array<f32>,
    last: &mut Array<f32>,
    width: u32,
    n_chunks: u32,
    chunk: u32,
    half_scale: f32,
    #[comptime] has_initial: bool,
    #[comptime] gated: bool,
    #[comptime] to_half: bool,
    #[comptime] keep_f32: bool,
    #[comptime] per_unit: u32,
    #[comptime] reverse: bool,
) {
    let pu = comptime!(per_unit as usize);
    let ahead = comptime!(AHEAD as usize);
    let seq = CUBE_POS_Y;
    let x0 = CUBE_POS_X * UNITS * per_unit + UNIT_POS;
    let mut running = Array::<f32>::new(pu);
    #[unroll]
    for j in 0..pu {
        running[j] = 0.0;
        if comptime!(has_initial) {
            let x = x0 + j as u32 * UNITS;
            if x < width {
                running[j] = initial[(seq * width + x) as usize];
            }
        }
    }
    let base = (seq * n_chunks) as usize * width as usize;
    let gate_base = (seq * n_chunks * chunk) as usize;
    let mut delta = Array::<f32>::new(comptime!(pu * ahead));
    let mut decay = Array::<f32>::new(ahead);
    let groups = (n_chunks + AHEAD - 1) / AHEAD;
    for gi in 0..groups {
        // the loads of `AHEAD` chunks first, then the dependent updates
        #[unroll]
        for a in 0..ahead {
            let u = slot(gi * AHEAD + a as u32, n_chunks, reverse);
            decay[a] = 1.0;
            if comptime!(gated) {
                if u < n_chunks {
                    decay[a] = f32::exp(gates[gate_base + ((u + 1) * chunk - 1) as usize]);
                }
            }
            let row = base + u as usize * width as usize;
            #[unroll]
            for j in 0..pu {
                let x = x0 + j as u32 * UNITS;
                delta[a * pu + j] = 0.0;
                if u < n_chunks && x < width {
                    delta[a * pu + j] = chunks[row + x as usize];
                }
            }
        }
        #[unroll]
        for a in 0..ahead {
            let u = slot(gi * AHEAD + a as u32, n_chunks, reverse);
            let row = base + u as usize * width as usize;
            if u < n_chunks {
                #[unroll]
                for j in 0..pu {
                    let x = x0 + j as u32 * UNITS;
                    if x < width {
                        if comptime!(to_half) {
                            half[row + x as usize] = f16::cast_from(running[j] * half_scale);
                        }
                        if comptime!(keep_f32) {
                            chunks[row + x as usize] = running[j];
                        }
                    }
                    running[j] = running[j] * decay[a] + delta[a * pu + j];
                }
            }
        }
    }
    #[unroll]
    for j in 0..pu {
        let x = x0 + j as u32 * UNITS;
        if x < width {
            last[(seq * width + x) as usize] = running[j];
        }
    }
}

/// The chunk visited at step `step`: `step` itself, or counted from the end when `reverse`
/// (`n_chunks` or more past the last step, so the callers' `u < n_chunks` guards hold).
#[cube]
fn slot(step: u32, n_chunks: u32, #[comptime] reverse: bool) -> u32 {
    let mut u = step;
    if comptime!(reverse) {
        u = n_chunks;
        if step < n_chunks {
            u = n_chunks - 1 - step;
        }
    }
    u
}
