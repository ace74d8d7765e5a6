//! Fused query-state product, intra-chunk attention and normalisation.
//!
//! One cube owns `block_q` query rows of one chunk and one query head. It accumulates, in
//! `f32` registers, `Σ_f φ_Q(σq_i)_f S_in[f, :]` over feature blocks (φ built on the fly from
//! the query tile in shared memory), scales it by the decay from the chunk start `e^{ā_i}`,
//! then adds the causal gated power scores `(σ q_i·k_j)^p e^{ā_i − ā_j}` of the chunk's keys,
//! and divides by the matching row sum. Without a state it is the attention form (one chunk
//! spanning the whole sequence).

use cubecl::prelude::*;

use crate::chunk_output_manual::chunk_output_manual_kernel;
use crate::chunk_output_mma::chunk_output_mma_kernel;
use crate::config::OutputTiles;
use crate::feature_pairs::pair_block;
use crate::tile_load::{load_feature_pairs, load_gates, load_key_value_rows, load_token_rows};

/// Scalar sizes of an output launch.
#[derive(Debug, Clone, Copy)]
pub struct OutputDims {
    /// `b`.
    pub batch: usize,
    /// `t` (unpadded).
    pub seq: usize,
    /// `hq`.
    pub q_heads: usize,
    /// `h`.
    pub kv_heads: usize,
    /// Chunk length `c` (the whole sequence for the attention form).
    pub chunk: usize,
    /// Number of chunks `n = ⌈t / c⌉`.
    pub n_chunks: usize,
    /// `D` (used only with a state).
    pub expanded_dim: usize,
    /// `σ`.
    pub scale: f32,
}

/// Buffers of an output launch (flat, contiguous, row-major).
pub struct OutputArgs<R: Runtime> {
    /// `q [b, t, hq, d]`.
    pub q: ArrayArg<R>,
    /// `k [b, t, h, d]`.
    pub k: ArrayArg<R>,
    /// `v [b, t, h, e]`.
    pub v: ArrayArg<R>,
    /// Cumulative log-gates inside each chunk, `f32 [b, h, n·c]`; `None`: no gating.
    pub gates: Option<ArrayArg<R>>,
    /// The chunked form's state part; `None`: the attention form. For the FMA variant: the
    /// states and key-sums entering each chunk, `f32 [b, h, n, D, e]` and `f32 [b, h, n, D]`.
    /// For the tensor-core variant (`tiles.mma`): the numerators and denominators from
    /// [`launch_query_state`](crate::query_state::launch_query_state), `f32 [b, t, hq, e]` and
    /// `f32 [b, t, hq]`.
    pub states: Option<(ArrayArg<R>, ArrayArg<R>)>,
    /// Output `[b, t, hq, e]`, of `out_dtype`.
    pub out: ArrayArg<R>,
    /// The element type of `out`: that of `q` for a forward pass; `f32` where a backward pass
    /// needs the rows at full precision.
    pub out_dtype: StorageType,
    /// Each row's normaliser `L_i` (`y_i = N_i / L_i`; the backward pass reads it),
    /// `f32 [b, t, hq]`; `None`: not written.
    pub stats: Option<ArrayArg<R>>,
}

/// Launches the output kernel with tiles from [`OutputTiles::plan`] (its `mma` field picks the
/// tensor-core variant).
///
/// # Safety
/// The buffers must have the sizes documented on [`OutputArgs`] for `dims`, `dtype` must be
/// the element type of `q`, `k`, `v` (and `args.out_dtype` that of `out`), and `tiles` must come from
/// [`OutputTiles::plan`] for this client, dtype and head dims.
pub unsafe fn launch_output<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
    dims: OutputDims,
    mut tiles: OutputTiles,
    args: OutputArgs<R>,
) {
    tiles.gated = args.gates.is_some();
    tiles.with_state = args.states.is_some();
    tiles.with_stats = args.stats.is_some();
    let dummy = || unsafe { ArrayArg::from_raw_parts(client.empty(4), 1) };
    let gates = args.gates.unwrap_or_else(dummy);
    let (states, sums) = args.states.unwrap_or_else(|| (dummy(), dummy()));
    let stats = args.stats.unwrap_or_else(dummy);
    let ratio = dims.q_heads / dims.kv_heads;
    let q_blocks = dims.chunk.div_ceil(tiles.block_q as usize);
    let count = CubeCount::Static(
        (q_blocks * ratio) as u32,
        (dims.n_chunks * dims.kv_heads) as u32,
        dims.batch as u32,
    );
    let (launch, cube_dim) = if tiles.manual {
        (
            chunk_output_manual_kernel::launch_unchecked::<R> as OutputLaunch<R>,
            CubeDim::new_2d(32, 8),
        )
    } else if tiles.mma {
        (
            chunk_output_mma_kernel::launch_unchecked::<R> as OutputLaunch<R>,
            CubeDim::new_2d(32, 8),
        )
    } else {
        (
            chunk_output_kernel::launch_unchecked::<R> as OutputLaunch<R>,
            CubeDim::new_1d(tiles.threads),
        )
    };
    unsafe {
        launch(
            client,
            count,
            cube_dim,
            args.q,
            args.k,
            args.v,
            gates,
            states,
            sums,
            args.out,
            stats,
            dims.seq as u32,
            dims.q_heads as u32,
            dims.kv_heads as u32,
            dims.chunk as u32,
            dims.n_chunks as u32,
            dims.expanded_dim as u32,
            dims.scale,
            tiles,
            [dtype, args.out_dtype],
        )
    }
}

/// The launch signature both output variants share.
type OutputLaunch<R> = unsafe fn(
    &ComputeClient<R>,
    CubeCount,
    CubeDim,
    ArrayArg<R>,
    ArrayArg<R>,
    ArrayArg<R>,
    ArrayArg<R>,
    ArrayArg<R>,
    ArrayArg<R>,
    ArrayArg<R>,
    ArrayArg<R>,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    f32,
    OutputTiles,
    [StorageType; 2],
);

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn chunk_output_kernel<F: Float, O: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    gates: &Array<f32>,
    states: &Array<f32>,
    sums: &Array<f32>,
    out: &mut Array<O>,
    stats: &mut Array<f32>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    chunk: u32,
    n_chunks: u32,
    big_d: u32,
    scale: f32,
    #[comptime] cfg: OutputTiles,
    #[define(F, O)] _dtypes: [StorageType; 2],
) {
    let bq = comptime!(cfg.block_q as usize);
    let bk = comptime!(cfg.block_k as usize);
    let d = comptime!(cfg.head_dim as usize);
    let e = comptime!(cfg.value_dim as usize);
    let threads = comptime!(cfg.threads as usize);
    let lanes = comptime!(cfg.threads as usize / cfg.block_q as usize);
    let per_unit =
        comptime!((cfg.value_dim as usize).div_ceil(cfg.threads as usize / cfg.block_q as usize));
    let ds = comptime!(cfg.head_dim as usize + 1);

    let ratio = q_heads / kv_heads;
    let q_blocks = (chunk + cfg.block_q - 1) / cfg.block_q;
    let qb = CUBE_POS_X % q_blocks;
    let head = (CUBE_POS_Y / n_chunks) * ratio + CUBE_POS_X / q_blocks;
    let u = CUBE_POS_Y % n_chunks;
    let kvh = CUBE_POS_Y / n_chunks;
    let bi = CUBE_POS_Z;
    let row = UNIT_POS as usize / lanes;
    let lane = UNIT_POS as usize % lanes;
    let chunk_start = u * chunk;
    let tile_start = qb * cfg.block_q;
    let gate_base = ((bi * kv_heads + kvh) * n_chunks * chunk) as usize;

    let mut sq = SharedMemory::<f32>::new(bq * ds);
    let mut gq = SharedMemory::<f32>::new(bq);
    let mut sk = SharedMemory::<f32>::new(bk * ds);
    let mut sv = SharedMemory::<f32>::new(bk * e);
    let mut gk = SharedMemory::<f32>::new(bk);
    let mut fa = SharedMemory::<u32>::new(bk);
    let mut fb = SharedMemory::<u32>::new(bk);
    let mut w = SharedMemory::<f32>::new(bq * bk);

    // query tile, pre-scaled by σ; rows past the chunk or the sequence are zero
    load_token_rows::<F, f32>(
        q,
        &mut sq,
        chunk_start,
        tile_start,
        chunk,
        seq,
        bi,
        q_heads,
        head,
        scale,
        bq,
        d,
        ds,
        threads,
    );
    if comptime!(cfg.gated) {
        load_gates(
            gates,
            &mut gq,
            gate_base,
            chunk_start,
            tile_start,
            chunk,
            cfg.block_q,
        );
    }

    let mut acc = Array::<f32>::new(per_unit);
    #[unroll]
    for c in 0..per_unit {
        acc[c] = 0.0;
    }
    let mut lsum = 0.0f32;

    if comptime!(cfg.with_state) {
        let block = (((bi * kv_heads + kvh) * n_chunks + u) * big_d) as usize;
        let n_blocks = (big_d as usize).div_ceil(bk);
        for fblk in 0..n_blocks {
            let f0 = fblk * bk;
            sync_cube();
            load_feature_pairs(
                sums,
                &mut fa,
                &mut fb,
                &mut gk,
                block,
                f0,
                big_d,
                1.0,
                comptime!(pair_block(cfg.head_dim)),
                bk,
            );
            let mut idx = UNIT_POS as usize;
            while idx < bk * e {
                let f = f0 + idx / e;
                let mut val = 0.0f32;
                if f < big_d as usize {
                    val = states[(block + f) * e + idx % e];
                }
                sv[idx] = val;
                idx += threads;
            }
            sync_cube();
            for fl in 0..bk {
                let phi = sq[row * ds + fa[fl] as usize] * sq[row * ds + fb[fl] as usize];
                lsum += phi * gk[fl];
                #[unroll]
                for c in 0..per_unit {
                    let col = lane + c * lanes;
                    if col < e {
                        acc[c] += phi * sv[fl * e + col];
                    }
                }
            }
        }
        if comptime!(cfg.gated) {
            let decay = f32::exp(gq[row]);
            lsum *= decay;
            #[unroll]
            for c in 0..per_unit {
                acc[c] *= decay;
            }
        }
    }

    // intra-chunk causal attention, key blocks up to this tile's last row
    let mut last = tile_start + cfg.block_q;
    if last > chunk {
        last = chunk;
    }
    let k_blocks = (last - 1) / cfg.block_k + 1;
    for kb in 0..k_blocks {
        let k0 = kb * cfg.block_k;
        sync_cube();
        load_key_value_rows::<F, f32>(
            k,
            v,
            &mut sk,
            &mut sv,
            chunk_start,
            k0,
            chunk,
            seq,
            bi,
            kv_heads,
            kvh,
            bk,
            d,
            ds,
            e,
            threads,
        );
        if comptime!(cfg.gated) {
            load_gates(
                gates,
                &mut gk,
                gate_base,
                chunk_start,
                k0,
                chunk,
                cfg.block_k,
            );
        }
        sync_cube();
        let mut idx = UNIT_POS as usize;
        while idx < bq * bk {
            let i = idx / bk;
            let j = idx % bk;
            let mut weight = 0.0f32;
            if k0 + j as u32 <= tile_start + i as u32 {
                let mut s = 0.0f32;
                for x in 0..d {
                    s += sq[i * ds + x] * sk[j * ds + x];
                }
                let s2 = s * s;
                weight = s2;
                #[unroll]
                for _ in 1..comptime!(cfg.degree / 2) {
                    weight *= s2;
                }
                if comptime!(cfg.gated) {
                    weight *= f32::exp(gq[i] - gk[j]);
                }
            }
            w[idx] = weight;
            idx += threads;
        }
        sync_cube();
        for j in 0..bk {
            let weight = w[row * bk + j];
            lsum += weight;
            #[unroll]
            for c in 0..per_unit {
                let col = lane + c * lanes;
                if col < e {
                    acc[c] += weight * sv[j * e + col];
                }
            }
        }
    }

    let pos = tile_start + row as u32;
    let tok = chunk_start + pos;
    if pos < chunk && tok < seq {
        let mut inv = 0.0f32;
        if lsum > 0.0 {
            inv = 1.0 / lsum;
        }
        let base = ((bi * seq + tok) * q_heads + head) as usize * e;
        #[unroll]
        for c in 0..per_unit {
            let col = lane + c * lanes;
            if col < e {
                out[base + col] = O::cast_from(acc[c] * inv);
            }
        }
        if comptime!(cfg.with_stats) {
            if lane == 0 {
                stats[base / e] = lsum;
            }
        }
    }
}
