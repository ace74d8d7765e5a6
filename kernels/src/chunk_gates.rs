//! Cumulative log-gates inside chunks: `log_g [b, t, h]` (the input dtype) → `f32 [b, h, n·c]`,
//! entry `u·c + p` = `Σ_{p' ≤ p} log_g[b, u·c + p', h]`, constant past `t` (padding neither adds
//! nor decays). One cube per (sequence and head, chunk) walks the chunk in segments of
//! `SEGMENT` tokens: the units stage a segment in shared memory, one unit adds it up in order, the
//! units write it out. The sum is sequential on purpose: the kernels take differences
//! `G_i − G_j` of these values, and a sequential sum keeps the error of a difference
//! proportional to the tokens between `j` and `i`, where a tree-shaped scan makes it
//! proportional to `|G|` (≈ 10⁻⁴ relative under strong gates).

use cubecl::prelude::*;

/// Units per cube.
const UNITS: u32 = 256;
/// Positions staged per round.
const SEGMENT: u32 = 1024;

/// Scalar sizes of a gate launch.
#[derive(Debug, Clone, Copy)]
pub struct GateDims {
    /// `b`.
    pub batch: usize,
    /// `t`.
    pub seq: usize,
    /// `h`.
    pub kv_heads: usize,
    /// `c`.
    pub chunk: usize,
    /// `n = ⌈t / c⌉`.
    pub n_chunks: usize,
}

/// Launches the chunked cumulative sum of the log-gates.
///
/// # Safety
/// `log_g` must hold `b·t·h` elements of `dtype` (contiguous `[b, t, h]`) and `out`
/// `b·h·n·c` `f32`.
pub unsafe fn launch_chunk_gates<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: GateDims,
    log_g: ArrayArg<R>,
    out: ArrayArg<R>,
) {
    let count = CubeCount::Static(dims.n_chunks as u32, (dims.batch * dims.kv_heads) as u32, 1);
    unsafe {
        chunk_gates_kernel::launch_unchecked::<R>(
            client,
            count,
            CubeDim::new_1d(UNITS),
            log_g,
            out,
            dims.seq as u32,
            dims.kv_heads as u32,
            dims.chunk as u32,
            dims.n_chunks as u32,
            dtype,
        )
    }
}

#[cube(launch_unchecked)]
fn chunk_gates_kernel<F: Float>(
    log_g: &Array<F>,
    out: &mut Array<f32>,
    seq: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    #[define(F)] _dtype: StorageType,
) {
    let u = CUBE_POS_X;
    let sh = CUBE_POS_Y; // b · h + head
    let bi = sh / kv_heads;
    let kvh = sh % kv_heads;
    let row = ((sh * n_chunks + u) * chunk) as usize;
    let mut stage = SharedMemory::<f32>::new(SEGMENT as usize);
    let mut running = 0.0f32;
    let rounds = (chunk + SEGMENT - 1) / SEGMENT;
    for round in 0..rounds {
        let first = round * SEGMENT;
        let mut p = first + UNIT_POS;
        while p < first + SEGMENT && p < chunk {
            let tok = u * chunk + p;
            let mut g = 0.0f32;
            if tok < seq {
                g = f32::cast_from(log_g[((bi * seq + tok) * kv_heads + kvh) as usize]);
            }
            stage[(p - first) as usize] = g;
            p += UNITS;
        }
        sync_cube();
        if UNIT_POS == 0 {
            let len = select(chunk - first < SEGMENT, chunk - first, SEGMENT);
            for i in 0..len {
                running += stage[i as usize];
                stage[i as usize] = running;
            }
        }
        sync_cube();
        let mut p = first + UNIT_POS;
        while p < first + SEGMENT && p < chunk {
            out[row + p as usize] = stage[(p - first) as usize];
            p += UNITS;
        }
        sync_cube();
    }
}
