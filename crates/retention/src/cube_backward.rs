//! The backward pass of the attention and chunked forms on the CubeCL kernels: the forward
//! pass is recomputed (chunk states, then each row's output `y_i` in f32 and its normaliser
//! `L_i`: for f16/bf16 inputs by the forward's own tensor-core kernels, whose chunked forward
//! keeps the rows instead when it runs for a backward pass), the rows' gradients
//! `dN = dy / L`, `dL = −dN·y` ([`row_grads`](retention_kernels::row_grads)), then
//! 1. the gradient the queries send to each chunk's entering state
//!    ([`chunk_state_grad`](retention_kernels::chunk_state_grad)),
//! 2. the reverse scan of state gradients (the initial state's gradient falls out at its end),
//! 3. the query-side and key-side passes: for f32 inputs the FMA kernels
//!    ([`chunk_grad`](retention_kernels::chunk_grad)) do the intra-chunk pairs and the state
//!    path together; for f16/bf16 inputs the pairs run on tensor cores
//!    ([`chunk_grad_intra_mma`](retention_kernels::chunk_grad_intra_mma)) and the state path
//!    adds its share ([`chunk_grad_state_mma`](retention_kernels::chunk_grad_state_mma)),
//! 4. the log-gates' gradient: per position on the cumulative gates, summed backwards
//!    ([`gate_grads`](retention_kernels::gate_grads)).
//!
//! Nothing but the inputs and those rows (`O(t)`) is kept between the passes; the chunk
//! states exist only during the backward call (`O(t/c · D · e)`, as in the forward call).

use std::cell::OnceCell;

use burn::tensor::{DType, Tensor};
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
    tensor::CubeTensor,
};
use retention_kernels::{
    ChunkedTiles, GradTiles, IntraGradTiles, OutputTiles, QueryStateTiles, StateGradTiles,
    StateTiles, Strategy,
    chunk_grad::{
        GradDims, GradInputs, KeyGradArgs, QueryGradArgs, launch_key_grads, launch_query_grads,
    },
    chunk_grad_intra_mma::{IntraGradInputs, launch_intra_key_grads, launch_intra_query_grads},
    chunk_grad_state_mma::{StateGradRowArgs, launch_state_grad_rows},
    chunk_output::{OutputArgs, OutputDims, launch_output},
    chunk_state_grad::{
        StateGradArgs, StateGradDims, StateGradMmaArgs, launch_chunk_state_grad,
        launch_chunk_state_grad_mma,
    },
    cubecl::prelude::ComputeClient,
    discumsum::{ScanArgs, ScanDims, ScanWrites, launch_discumsum},
    gate_grads::{GateGradArgs, launch_gate_grads},
    query_rows_half::{QueryRowsHalfArgs, QueryRowsHalfDims, launch_query_rows_half},
    query_state::{QueryStateArgs, launch_query_state, state_scale},
    row_grads::{RowGradArgs, RowGradDims, launch_row_grads},
};

use crate::RetentionOptions;
use crate::backend::{float, prim};
use crate::backward::{ChunkedUpstream, RetentionGrads, RetentionInputs};
use crate::cube_backend::{
    arg, buffer, chunk_contributions, chunk_gates, dims4, empty, empty_f32, kernel_dtype, strategy,
    to_f32_contiguous as to_f32,
};
use crate::feature_map::expanded_dim;
use crate::reference::ToDtype;

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// The sizes of a chunked call (forward or backward).
#[derive(Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) hq: usize,
    pub(crate) h: usize,
    pub(crate) d: usize,
    pub(crate) e: usize,
    pub(crate) c: usize,
    pub(crate) n: usize,
    pub(crate) big_d: usize,
}

/// Gradients of the attention form on the kernels, or `None` where they do not apply (the
/// caller runs the reference).
pub(crate) fn attention_backward<R, F, I, BT>(
    inputs: RetentionInputs<Cube<R, F, I, BT>>,
    d_output: CubeTensor<R>,
    options: &RetentionOptions,
) -> Option<RetentionGrads<Cube<R, F, I, BT>>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [b, t, hq, d] = dims4(&inputs.q);
    let [_, _, h, e] = dims4(&inputs.v);
    let client = inputs.q.client.clone();
    if !kernel_dtype(inputs.q.dtype) {
        return None;
    }
    // the rows `y` are recomputed in f32 whatever the inputs (`dL = −dN·y` cancels against
    // `dN·v` in every weight's gradient); half inputs recompute them as the forward does and
    // take the pairs on tensor cores, where both kernels fit, else everything runs on FMA units
    let dtype = DType::F32;
    let types = Dtypes::of(&inputs);
    let tensor_cores = OutputTiles::plan(
        &client,
        types.q.into(),
        strategy(options),
        d,
        e,
        options.degree,
    )
    .filter(|t| t.mma && types.q == types.k && types.k == types.v)
    .zip(IntraGradTiles::plan(
        &client,
        types.q.into(),
        strategy(options),
        d,
        e,
        options.degree,
    ));
    let fma = match tensor_cores {
        Some(_) => None,
        None => Some((
            OutputTiles::plan(
                &client,
                dtype.into(),
                strategy(options),
                d,
                e,
                options.degree,
            )?,
            GradTiles::plan(&client, d, e, options.degree)?,
        )),
    };
    let sizes = Sizes {
        b,
        t,
        hq,
        h,
        d,
        e,
        c: t,
        n: 1,
        big_d: 0,
    };
    let gates = inputs.log_g.map(|g| chunk_gates::<R, F, I, BT>(g, t, 1));
    let out = empty(&inputs.q, &[b, t, hq, e], dtype);
    let stats = empty_f32(&inputs.q, &[b, t, hq]);
    // the operands: as given (tensor cores), or f32 copies (FMA units)
    let (q, k, v) = match fma {
        None => (
            into_contiguous(inputs.q),
            into_contiguous(inputs.k),
            into_contiguous(inputs.v),
        ),
        Some(_) => (
            to_f32::<R, F, I, BT, 4>(inputs.q),
            to_f32::<R, F, I, BT, 4>(inputs.k),
            to_f32::<R, F, I, BT, 4>(inputs.v),
        ),
    };
    let (row_dtype, row_tiles) = match (tensor_cores, fma) {
        (Some((tiles, _)), _) => (types.q, tiles),
        (None, Some((tiles, _))) => (dtype, tiles),
        (None, None) => return None,
    };
    let args = OutputArgs {
        q: arg(q.clone()),
        k: arg(k.clone()),
        v: arg(v.clone()),
        gates: gates.clone().map(arg),
        states: None,
        out: arg(out.clone()),
        out_dtype: dtype.into(),
        stats: Some(arg(stats.clone())),
    };
    // SAFETY: buffers are contiguous with the documented shapes and dtypes.
    unsafe {
        launch_output(
            &client,
            row_dtype.into(),
            output_dims(sizes, options),
            row_tiles,
            args,
        )
    };
    let rows = row_grads::<R, F, I, BT>(
        Some(d_output),
        out,
        stats,
        sizes,
        tensor_cores.is_some(),
        false,
    );
    let grads = match (tensor_cores, fma, rows.d_num_half) {
        (Some((_, tiles)), _, Some(dn16)) => intra_kernels(
            sizes,
            options,
            tiles,
            (q, k, v),
            row_dtype,
            gates,
            dn16,
            rows.d_den,
        ),
        (_, Some((_, tiles)), _) => row_kernels(
            sizes,
            options,
            tiles,
            (q, k, v),
            gates,
            (rows.d_num, rows.d_den),
            None,
            None,
        ),
        // a bf16 `dN` is written whenever the tensor cores run
        _ => return None,
    };
    Some(finish::<R, F, I, BT>(sizes, grads, None, None, types))
}

/// Gradients of the chunked form on the kernels (degree 2), or `None` where they do not apply.
pub(crate) fn chunked_backward<R, F, I, BT>(
    mut inputs: RetentionInputs<Cube<R, F, I, BT>>,
    chunk: usize,
    upstream: ChunkedUpstream<Cube<R, F, I, BT>>,
    options: &RetentionOptions,
) -> Option<RetentionGrads<Cube<R, F, I, BT>>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [b, t, hq, d] = dims4(&inputs.q);
    let [_, _, h, e] = dims4(&inputs.v);
    let client = inputs.q.client.clone();
    let initial_ok = inputs
        .initial
        .as_ref()
        .is_none_or(|(s, z)| s.dtype != DType::F64 && z.dtype != DType::F64);
    if options.degree != 2 || !kernel_dtype(inputs.q.dtype) || !initial_ok {
        return None;
    }
    // rows and gradients in f32, as the attention form's backward
    let dtype = DType::F32;
    let types = Dtypes::of(&inputs);
    // half-precision inputs take the state path on tensor cores (f16 state operands: their
    // rounding is below the half inputs' own, not below f32's)
    let state_mma = matches!(types.q, DType::F16 | DType::BF16)
        .then(|| StateGradTiles::plan(&client, strategy(options), d, e))
        .flatten();
    // with it, the forward is recomputed as the forward computed it (tensor cores, from the
    // half-precision inputs), only the rows written in f32
    let half_tiles = state_mma
        .and_then(|_| half_forward_tiles(&client, [types.q, types.k, types.v], d, e, options));
    // rows the forward kept (the same kernels at the same chunk) are taken as they are
    let kept = inputs.rows.take().filter(|_| half_tiles.is_some());
    let chunk = match kept {
        Some(_) => chunk,
        None => backward_chunk(chunk),
    };
    // the FMA kernels' tiles, for f32 inputs (and any part the tensor cores do not take)
    let tiles = ChunkedTiles::plan(&client, dtype.into(), Strategy::Fma, d, e)?;
    let grad_tiles = GradTiles::plan(&client, d, e, 2)?;
    let n = t.div_ceil(chunk);
    let big_d = expanded_dim(d, 2);
    let sizes = Sizes {
        b,
        t,
        hq,
        h,
        d,
        e,
        c: chunk,
        n,
        big_d,
    };
    let (q_in, k_in, v_in) = (
        into_contiguous(inputs.q),
        into_contiguous(inputs.k),
        into_contiguous(inputs.v),
    );
    let half_forward = half_tiles.map(|(tiles, query)| HalfForward {
        tiles,
        query,
        q: q_in.clone(),
        k: k_in.clone(),
        v: v_in.clone(),
    });
    // f32 copies of the rows, made where a part runs on the FMA kernels (the tensor-core
    // kernels read the rows as given)
    let rows_f32 = OnceCell::new();
    let f32_rows = || {
        rows_f32
            .get_or_init(|| {
                (
                    to_f32::<R, F, I, BT, 4>(q_in.clone()),
                    to_f32::<R, F, I, BT, 4>(k_in.clone()),
                    to_f32::<R, F, I, BT, 4>(v_in.clone()),
                )
            })
            .clone()
    };
    // the device and client every new buffer takes
    let q = &q_in;
    let gates = inputs
        .log_g
        .map(|g| chunk_gates::<R, F, I, BT>(g, chunk, n));
    let half = |shape: &[usize]| state_mma.map(|_| empty(q, shape, DType::F16));

    // 1. the forward pass again: states entering each chunk (in place), final state, rows
    let (states, sums) = match &half_forward {
        Some(hf) => chunk_contributions(&hf.k, &hf.v, &gates, types.k, hf.tiles.state, chunk, n),
        None => {
            let (_, k, v) = f32_rows();
            chunk_contributions(&k, &v, &gates, dtype, tiles.state, chunk, n)
        }
    };
    let final_state = empty_f32(q, &[b, h, big_d, e]);
    let final_sum = empty_f32(q, &[b, h, big_d]);
    let initial = inputs
        .initial
        .map(|(s, z)| (to_f32::<R, F, I, BT, 4>(s), to_f32::<R, F, I, BT, 3>(z)));
    let (s0, z0) = initial.unzip();
    let half_states = half(&[b, h, n, big_d, e]);
    scan(
        &client,
        sizes,
        &gates,
        [
            (&states, s0, &final_state, big_d * e, half_states.clone()),
            (&sums, z0, &final_sum, big_d, None),
        ],
        false,
        // the f32 entering states feed the FMA kernels only
        match half_forward {
            None => ScanWrites::EnteringBoth,
            Some(_) => ScanWrites::Entering,
        },
    );
    let dims = output_dims(sizes, options);
    let (row_inputs, row_tiles, state_part) = match (half_forward, &half_states) {
        (Some(hf), Some(_)) if kept.is_some() => {
            ((hf.q, hf.k, hf.v, types.q), hf.tiles.output, None)
        }
        (Some(hf), Some(half_states)) => {
            let num = empty_f32(q, &[b, t, hq, e]);
            let den = empty_f32(q, &[b, t, hq]);
            let args = QueryStateArgs {
                q: arg(hf.q.clone()),
                states: arg(half_states.clone()),
                sums: arg(sums.clone()),
                num: arg(num.clone()),
                den: arg(den.clone()),
            };
            // SAFETY: buffers are contiguous with the documented shapes and dtypes.
            unsafe { launch_query_state(&client, types.q.into(), dims, hf.query, args) };
            (
                (hf.q, hf.k, hf.v, types.q),
                hf.tiles.output,
                Some((arg(num), arg(den))),
            )
        }
        // the FMA output kernel reads the f32 entering states
        _ => (
            {
                let (q, k, v) = f32_rows();
                (q, k, v, dtype)
            },
            tiles.output,
            Some((arg(states.clone()), arg(sums.clone()))),
        ),
    };
    let (rq, rk, rv, row_dtype) = row_inputs;
    // the intra-chunk pairs on tensor cores where the forward ran there
    let intra = IntraGradTiles::plan(&client, row_dtype.into(), strategy(options), d, e, 2)
        .filter(|_| row_dtype != dtype)
        .map(|tiles| (tiles, (rq.clone(), rk.clone(), rv.clone())));
    let (out, stats) = match (kept, state_part) {
        (Some(rows), _) => (rows.output, rows.normaliser),
        (None, state_part) => {
            let out = empty_f32(q, &[b, t, hq, e]);
            let stats = empty_f32(q, &[b, t, hq]);
            let args = OutputArgs {
                q: arg(rq),
                k: arg(rk),
                v: arg(rv),
                gates: gates.clone().map(arg),
                states: state_part,
                out: arg(out.clone()),
                out_dtype: DType::F32.into(),
                stats: Some(arg(stats.clone())),
            };
            // SAFETY: buffers are contiguous with the documented shapes and dtypes.
            unsafe { launch_output(&client, row_dtype.into(), dims, row_tiles, args) };
            (out, stats)
        }
    };
    let f16_state_tiles = state_mma
        .and_then(|_| StateTiles::plan(&client, DType::F16.into(), strategy(options), d, e))
        .filter(|tiles| tiles.mma);
    let rows = row_grads::<R, F, I, BT>(
        upstream.output,
        out,
        stats,
        sizes,
        intra.is_some(),
        f16_state_tiles.is_some(),
    );
    let (d_num, d_den) = (rows.d_num, rows.d_den);

    // 2. what the queries send to the entering states, scanned backwards from the final
    //    state's gradient: slot u then holds the gradient of ΔS_u, the end that of S_0
    let lambda = empty_f32(q, &[b, h, n, big_d, e]);
    let lambda_z = empty_f32(q, &[b, h, n, big_d]);
    let grad_dims = StateGradDims {
        batch: b,
        seq: t,
        q_heads: hq,
        kv_heads: h,
        chunk,
        n_chunks: n,
        expanded_dim: big_d,
        scale: options.scale_for(d) as f32,
    };
    if let (Some(mma_tiles), Some(row_max)) = (f16_state_tiles, rows.row_max) {
        let (q16, dn16, scales) = half_query_rows::<R, F, I, BT>(
            (q_in.clone(), types.q),
            &d_num,
            row_max,
            sizes,
            options.scale_for(d),
        );
        let grad_args = StateGradMmaArgs {
            q: arg(q16),
            d_num: arg(dn16),
            d_den: arg(d_den.clone()),
            scales: arg(scales),
            gates: gates.clone().map(arg),
            states: arg(lambda.clone()),
            sums: arg(lambda_z.clone()),
        };
        // SAFETY: buffers are contiguous with the documented shapes and dtypes.
        unsafe { launch_chunk_state_grad_mma(&client, grad_dims, mma_tiles, grad_args) };
    } else {
        let grad_args = StateGradArgs {
            q: arg(f32_rows().0),
            d_num: arg(d_num.clone()),
            d_den: arg(d_den.clone()),
            gates: gates.clone().map(arg),
            states: arg(lambda.clone()),
            sums: arg(lambda_z.clone()),
        };
        // SAFETY: buffers are contiguous with the documented shapes and dtypes.
        unsafe {
            launch_chunk_state_grad(&client, dtype.into(), grad_dims, tiles.state, grad_args)
        };
    }
    let d_final_s = upstream.state.map(to_f32::<R, F, I, BT, 4>);
    let d_final_z = upstream.key_sum.map(to_f32::<R, F, I, BT, 3>);
    let final_term =
        final_gate_term::<R, F, I, BT>((&d_final_s, &d_final_z), (&final_state, &final_sum), sizes);
    let d_s0 = empty_f32(q, &[b, h, big_d, e]);
    let d_z0 = empty_f32(q, &[b, h, big_d]);
    let half_lambda = half(&[b, h, n, big_d, e]);
    scan(
        &client,
        sizes,
        &gates,
        [
            (&lambda, d_final_s, &d_s0, big_d * e, half_lambda.clone()),
            (&lambda_z, d_final_z, &d_z0, big_d, None),
        ],
        true,
        // the f32 slots feed the FMA row kernels only
        match state_mma {
            None => ScanWrites::EnteringBoth,
            Some(_) => ScanWrites::Entering,
        },
    );

    // 3. rows: the state path on the FMA row kernels, or on tensor cores after them
    let fma_state = state_mma.is_none();
    let grads = match (intra, rows.d_num_half) {
        (Some((tiles, half)), Some(dn16)) => intra_kernels(
            sizes,
            options,
            tiles,
            half,
            row_dtype,
            gates.clone(),
            dn16,
            d_den.clone(),
        ),
        _ => row_kernels(
            sizes,
            options,
            grad_tiles,
            f32_rows(),
            gates.clone(),
            (d_num.clone(), d_den.clone()),
            fma_state.then(|| (states, sums.clone())),
            fma_state.then(|| (lambda, lambda_z.clone())),
        ),
    };
    if let (Some(tiles), Some(half_states), Some(half_lambda)) =
        (state_mma, half_states, half_lambda)
    {
        let dims = grad_dims_of(sizes, options);
        let sigma = options.scale_for(d) as f32;
        let queries = StateGradRowArgs {
            x: buffer(q_in.clone()),
            x_dtype: types.q.into(),
            w: buffer(d_num),
            w_dtype: DType::F32.into(),
            omega: Some(buffer(d_den)),
            gates: gates.clone().map(buffer),
            states: buffer(half_states),
            sums: buffer(sums),
            dx: buffer(grads.dq.clone()),
            dg: buffer(grads.dg_q.clone()),
            dv: None,
        };
        let keys = StateGradRowArgs {
            x: buffer(k_in.clone()),
            x_dtype: types.k.into(),
            w: buffer(v_in.clone()),
            w_dtype: types.v.into(),
            omega: None,
            gates: gates.map(buffer),
            states: buffer(half_lambda),
            sums: buffer(lambda_z),
            dx: buffer(grads.dk.clone()),
            dg: buffer(grads.dg_k.clone()),
            dv: Some(buffer(grads.dv.clone())),
        };
        // SAFETY: buffers are contiguous with the documented shapes and dtypes.
        unsafe {
            launch_state_grad_rows(&client, dims, tiles, false, sigma, sigma, queries);
            launch_state_grad_rows(&client, dims, tiles, true, 1.0, 1.0, keys);
        }
    }
    let d_initial = types.initial.map(|_| (d_s0, d_z0));
    Some(finish::<R, F, I, BT>(
        sizes, grads, final_term, d_initial, types,
    ))
}

/// The largest chunk of the backward pass. Any chunk gives the same gradients: the
/// intra-chunk pairs cost `O(c)` per row while the state passes cost `O(D·e)` per row whatever
/// the chunk, so a chunk smaller than the forward's trades state memory (`O(t/c · D · e)`
/// during the call) for intra-chunk work. Measured on an H200 (bf16, t = 16k, forward chunk
/// 1024): fwd+bwd 97.7 → 81.3 → 74.0 ms at 8 × d 64 heads and 1591 → 1444 → 1381 ms at
/// Brumby's heads for a backward chunk of 1024 → 512 → 256; 512 keeps the states at twice the
/// forward's size. With the pairs on tensor cores the difference shrank to 1.1 ms of 25 (mha64)
/// and 7 ms of 381 (Brumby heads), less than the rows' recompute it saves: where the forward
/// kept its rows, the backward runs at the forward's chunk.
const BACKWARD_CHUNK: usize = 512;

fn backward_chunk(forward: usize) -> usize {
    forward.min(BACKWARD_CHUNK)
}

/// The forward's tensor-core tiles for f16/bf16 `q, k, v` of one dtype (chunk contributions,
/// output) and its query-state tiles: the backward pass computes the forward's rows again
/// with them, exactly as the forward computed them. `None` where any part would run on FMA
/// units.
fn half_forward_tiles<R: CubeRuntime>(
    client: &ComputeClient<R>,
    [q, k, v]: [DType; 3],
    d: usize,
    e: usize,
    options: &RetentionOptions,
) -> Option<(ChunkedTiles, QueryStateTiles)> {
    if !matches!(q, DType::F16 | DType::BF16) || k != q || v != q {
        return None;
    }
    let tiles = ChunkedTiles::plan(client, q.into(), strategy(options), d, e)
        .filter(|t| t.state.mma && t.output.mma)?;
    tiles.query.map(|query| (tiles, query))
}

/// Whether a chunked forward call keeps its rows for the backward pass (`dtypes`: q, k, v,
/// then the initial state and key-sum if given): where the backward pass would compute them
/// again on the forward's own tensor-core kernels. It then runs at the forward's chunk.
pub(crate) fn keeps_rows<R: CubeRuntime>(
    client: &ComputeClient<R>,
    dtypes: &[DType],
    d: usize,
    e: usize,
    options: &RetentionOptions,
) -> bool {
    let [q, k, v, ..] = dtypes else {
        return false;
    };
    options.degree == 2
        && dtypes.iter().all(|&t| kernel_dtype(t))
        && StateGradTiles::plan(client, strategy(options), d, e).is_some()
        && half_forward_tiles(client, [*q, *k, *v], d, e, options).is_some()
}

/// The half-precision inputs and tiles of a forward pass recomputed on tensor cores.
struct HalfForward<R: CubeRuntime> {
    tiles: ChunkedTiles,
    query: QueryStateTiles,
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
}

/// The dtypes the gradients take: those of the inputs.
#[derive(Clone, Copy)]
struct Dtypes {
    q: DType,
    k: DType,
    v: DType,
    log_g: Option<DType>,
    initial: Option<(DType, DType)>,
}

impl Dtypes {
    fn of<R, F, I, BT>(inputs: &RetentionInputs<Cube<R, F, I, BT>>) -> Self
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        Self {
            q: inputs.q.dtype,
            k: inputs.k.dtype,
            v: inputs.v.dtype,
            log_g: inputs.log_g.as_ref().map(|g| g.dtype),
            initial: inputs.initial.as_ref().map(|(s, z)| (s.dtype, z.dtype)),
        }
    }
}

pub(crate) fn output_dims(s: Sizes, options: &RetentionOptions) -> OutputDims {
    OutputDims {
        batch: s.b,
        seq: s.t,
        q_heads: s.hq,
        kv_heads: s.h,
        chunk: s.c,
        n_chunks: s.n,
        expanded_dim: s.big_d,
        scale: options.scale_for(s.d) as f32,
    }
}

/// One scan: chunk slots (in place), initial state, where the end state goes, width, and
/// where an f16 copy of the slots divided by `γ = √D` goes (if anywhere).
pub(crate) type ScanPart<'a, R> = (
    &'a CubeTensor<R>,
    Option<CubeTensor<R>>,
    &'a CubeTensor<R>,
    usize,
    Option<CubeTensor<R>>,
);

/// One scan launch per part; `reverse` walks from the last chunk; `writes`: which entering
/// states are written besides the end state.
pub(crate) fn scan<R: CubeRuntime>(
    client: &retention_kernels::cubecl::prelude::ComputeClient<R>,
    s: Sizes,
    gates: &Option<CubeTensor<R>>,
    parts: [ScanPart<'_, R>; 2],
    reverse: bool,
    writes: ScanWrites,
) {
    for (chunks, init, last, width, half) in parts {
        let dims = ScanDims {
            sequences: s.b * s.h,
            width,
            n_chunks: s.n,
            chunk: s.c,
            reverse,
        };
        let args = ScanArgs {
            chunks: arg(chunks.clone()),
            half: half.map(arg),
            half_scale: state_scale(s.big_d.max(1)),
            writes,
            initial: init.map(arg),
            gates: gates.clone().map(arg),
            last: arg(last.clone()),
        };
        // SAFETY: buffers are contiguous f32 with the documented shapes.
        unsafe { launch_discumsum(client, dims, args) };
    }
}

/// What [`row_grads`] returns.
struct RowGradients<R: CubeRuntime> {
    /// `dN = dy / L`, `f32 [b, t, hq, e]`.
    d_num: CubeTensor<R>,
    /// `dL = −dN·y`, `f32 [b, t, hq]`.
    d_den: CubeTensor<R>,
    /// `dN` in bf16 for the tensor-core pair kernels, if asked for.
    d_num_half: Option<CubeTensor<R>>,
    /// Each row's largest `|dN|`, `f32 [b, h, t·r]`, if asked for.
    row_max: Option<CubeTensor<R>>,
}

/// `dN = dy / L`, `dL = −dN·y` ([`row_grads`](retention_kernels::row_grads)), zero where
/// `L ≤ 0` (the forward pass wrote a zero row there) or no output gradient arrived.
///
/// `half`: the tensor-core pair kernels run: `dN` is rounded to bf16 (kept in f32, and in a
/// bf16 copy for them) and `dL` taken from the rounded `dN`: each pair's `dw = dN·(v_j − y_i)`
/// then cancels as it should (a `dL` from the unrounded `dN` leaves `(dN' − dN)·y_i` in every
/// pair, which the gate gradients sum over whole rows). `with_max`: also each row's largest
/// `|dN|`.
fn row_grads<R, F, I, BT>(
    d_output: Option<CubeTensor<R>>,
    out: CubeTensor<R>,
    stats: CubeTensor<R>,
    s: Sizes,
    half: bool,
    with_max: bool,
) -> RowGradients<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let d_num = empty_f32(&out, &[s.b, s.t, s.hq, s.e]);
    let d_den = empty_f32(&out, &[s.b, s.t, s.hq]);
    let d_num_half = half.then(|| empty(&out, &[s.b, s.t, s.hq, s.e], DType::BF16));
    let row_max = with_max.then(|| empty_f32(&out, &[s.b, s.h, s.t * (s.hq / s.h)]));
    // no upstream gradient: as a zero one
    let dy = d_output.map(into_contiguous).unwrap_or_else(|| {
        into_contiguous(prim(Tensor::<Cube<R, F, I, BT>, 1>::zeros(
            [s.b * s.t * s.hq * s.e],
            (&out.device, DType::F32),
        )))
    });
    let dims = RowGradDims {
        batch: s.b,
        seq: s.t,
        q_heads: s.hq,
        kv_heads: s.h,
        value_dim: s.e,
    };
    let args = RowGradArgs {
        dy: buffer(dy.clone()),
        y: buffer(out),
        stats: buffer(stats),
        d_num: buffer(d_num.clone()),
        d_den: buffer(d_den.clone()),
        d_num_half: d_num_half.clone().map(buffer),
        row_max: row_max.clone().map(buffer),
    };
    let half_dtype = if half { DType::BF16 } else { DType::F32 };
    // SAFETY: buffers are contiguous with the documented shapes; `dy` has its own dtype.
    unsafe {
        launch_row_grads(
            &dy.client,
            dy.dtype.into(),
            half_dtype.into(),
            dims,
            half,
            args,
        )
    };
    RowGradients {
        d_num,
        d_den,
        d_num_half,
        row_max,
    }
}

/// The tensor-core state-gradient kernel's operands: `σq` in f16, `dN/β` in f16 with `β` the
/// largest `|dN|` of each `(b, h)` (from the rows' maxima, so the f16 rows stay in range
/// whatever the gradients' scale; 1 where all are zero), and `β` (`f32 [b, h]`).
fn half_query_rows<R, F, I, BT>(
    (q, q_dtype): (CubeTensor<R>, DType),
    d_num: &CubeTensor<R>,
    row_max: CubeTensor<R>,
    s: Sizes,
    scale: f64,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let beta = last_axis_max(float::<Cube<R, F, I, BT>, 3>(row_max));
    let beta = into_contiguous(prim(
        beta.clone()
            .mask_fill(beta.equal_elem(0.0), 1.0)
            .reshape([s.b, s.h]),
    ));
    let q16 = empty(&q, &[s.b, s.t, s.hq, s.d], DType::F16);
    let dn16 = empty(&q, &[s.b, s.t, s.hq, s.e], DType::F16);
    let dims = QueryRowsHalfDims {
        batch: s.b,
        seq: s.t,
        q_heads: s.hq,
        kv_heads: s.h,
        head_dim: s.d,
        value_dim: s.e,
    };
    let args = QueryRowsHalfArgs {
        q: buffer(q.clone()),
        d_num: buffer(d_num.clone()),
        beta: buffer(beta.clone()),
        q_half: buffer(q16.clone()),
        d_num_half: buffer(dn16.clone()),
    };
    // SAFETY: contiguous buffers with the documented shapes; `q` of `q_dtype`.
    unsafe { launch_query_rows_half(&q.client, q_dtype.into(), dims, scale as f32, args) };
    (q16, dn16, beta)
}

/// The largest element along the last axis of `x [a, b, n]`, as `[a, b, 1]`: two reductions
/// over `[a, b, p, n / p]` (`p` the largest divisor of `n` up to 256). One reduction over all
/// `n` elements had only `a·b` outputs to spread over the GPU: 0.7 ms for the rows' maxima of
/// mha64 at t = 16k (`a·b = 32`, `n = 16,384`).
fn last_axis_max<B: burn::tensor::backend::Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [a, b, n] = x.dims();
    let parts = (1..=256.min(n.max(1)))
        .rev()
        .find(|p| n % p == 0)
        .unwrap_or(1);
    x.reshape([a, b, parts, n / parts])
        .max_dim(3)
        .max_dim(2)
        .reshape([a, b, 1])
}

/// The final state's gate term `⟨dS_T, S_T⟩ + ⟨dz_T, z_T⟩` per `(b, h)`, if either gradient
/// arrived.
fn final_gate_term<R, F, I, BT>(
    d_final: (&Option<CubeTensor<R>>, &Option<CubeTensor<R>>),
    last: (&CubeTensor<R>, &CubeTensor<R>),
    s: Sizes,
) -> Option<Tensor<Cube<R, F, I, BT>, 2>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let ds = d_final.0.as_ref().map(|ds| {
        (float::<Cube<R, F, I, BT>, 4>(ds.clone()) * float::<Cube<R, F, I, BT>, 4>(last.0.clone()))
            .reshape([s.b, s.h, s.big_d * s.e])
            .sum_dim(2)
            .reshape([s.b, s.h])
    });
    let dz = d_final.1.as_ref().map(|dz| {
        (float::<Cube<R, F, I, BT>, 3>(dz.clone()) * float::<Cube<R, F, I, BT>, 3>(last.1.clone()))
            .sum_dim(2)
            .reshape([s.b, s.h])
    });
    match (ds, dz) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

fn grad_dims_of(s: Sizes, options: &RetentionOptions) -> GradDims {
    GradDims {
        batch: s.b,
        seq: s.t,
        q_heads: s.hq,
        kv_heads: s.h,
        chunk: s.c,
        n_chunks: s.n,
        expanded_dim: s.big_d,
        scale: options.scale_for(s.d) as f32,
    }
}

/// The kernels' raw outputs: `∂q`, `∂k`, `∂v` in f32, the query and key sides of `∂G`.
struct RowGrads<R: CubeRuntime> {
    dq: CubeTensor<R>,
    dk: CubeTensor<R>,
    dv: CubeTensor<R>,
    dg_q: CubeTensor<R>,
    dg_k: CubeTensor<R>,
}

impl<R: CubeRuntime> RowGrads<R> {
    /// Uninitialised f32 outputs on `like`'s device (the first kernel of a pass writes them).
    fn empty(like: &CubeTensor<R>, s: Sizes) -> Self {
        Self {
            dq: empty_f32(like, &[s.b, s.t, s.hq, s.d]),
            dk: empty_f32(like, &[s.b, s.t, s.h, s.d]),
            dv: empty_f32(like, &[s.b, s.t, s.h, s.e]),
            dg_q: empty_f32(like, &[s.b, s.t, s.hq]),
            dg_k: empty_f32(like, &[s.b, s.t, s.h]),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn row_kernels<R: CubeRuntime>(
    s: Sizes,
    options: &RetentionOptions,
    tiles: GradTiles,
    (q, k, v): (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>),
    gates: Option<CubeTensor<R>>,
    (d_num, d_den): (CubeTensor<R>, CubeTensor<R>),
    states: Option<(CubeTensor<R>, CubeTensor<R>)>,
    lambda: Option<(CubeTensor<R>, CubeTensor<R>)>,
) -> RowGrads<R> {
    let client = q.client.clone();
    let dtype = q.dtype;
    let dims = grad_dims_of(s, options);
    let inputs = || GradInputs {
        q: buffer(q.clone()),
        k: buffer(k.clone()),
        v: buffer(v.clone()),
        gates: gates.clone().map(buffer),
        d_num: buffer(d_num.clone()),
        d_den: buffer(d_den.clone()),
    };
    let grads = RowGrads::empty(&q, s);
    let args = QueryGradArgs {
        inputs: inputs(),
        states: states.map(|(st, z)| (buffer(st), buffer(z))),
        dq: buffer(grads.dq.clone()),
        dg: buffer(grads.dg_q.clone()),
    };
    // SAFETY: buffers are contiguous with the documented shapes and dtypes.
    unsafe { launch_query_grads(&client, dtype.into(), dims, tiles, args) };
    let args = KeyGradArgs {
        inputs: inputs(),
        lambda: lambda.map(|(l, z)| (buffer(l), buffer(z))),
        dk: buffer(grads.dk.clone()),
        dv: buffer(grads.dv.clone()),
        dg: buffer(grads.dg_k.clone()),
    };
    // SAFETY: as above.
    unsafe { launch_key_grads(&client, dtype.into(), dims, tiles, args) };
    grads
}

/// The intra-chunk pairs on tensor cores
/// ([`chunk_grad_intra_mma`](retention_kernels::chunk_grad_intra_mma)): `∂q`, `∂k`, `∂v` and
/// both sides of the gate terms, written for the state path to add to. `dN` enters in bf16
/// (`dn16`, from [`row_grads`]), so both kernels multiply the same operands.
#[allow(clippy::too_many_arguments)]
fn intra_kernels<R: CubeRuntime>(
    s: Sizes,
    options: &RetentionOptions,
    tiles: IntraGradTiles,
    (q, k, v): (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>),
    dtype: DType,
    gates: Option<CubeTensor<R>>,
    dn16: CubeTensor<R>,
    d_den: CubeTensor<R>,
) -> RowGrads<R> {
    let client = q.client.clone();
    let dims = grad_dims_of(s, options);
    let grads = RowGrads::empty(&q, s);
    let inputs = IntraGradInputs {
        q: buffer(q),
        k: buffer(k),
        v: buffer(v),
        d_num: buffer(dn16),
        d_den: buffer(d_den),
        gates: gates.map(buffer),
    };
    let out = |t: &CubeTensor<R>| buffer(t.clone());
    // SAFETY: buffers are contiguous with the documented shapes and dtypes.
    unsafe {
        launch_intra_query_grads(
            &client,
            dtype.into(),
            dims,
            tiles,
            &inputs,
            &out(&grads.dq),
            &out(&grads.dg_q),
        );
        launch_intra_key_grads(
            &client,
            dtype.into(),
            dims,
            tiles,
            &inputs,
            &out(&grads.dk),
            &out(&grads.dv),
            &out(&grads.dg_k),
        );
    }
    grads
}

/// Casts the gradients to the inputs' dtypes and turns the per-position gate terms into
/// `∂log_g` ([`gate_grads`](retention_kernels::gate_grads)): `∂G = Σ_heads(query side) − key
/// side (+ the final state's term at the last position)`, then `∂log_g_t = Σ_{i ≥ t} ∂G_i`.
fn finish<R, F, I, BT>(
    s: Sizes,
    g: RowGrads<R>,
    final_term: Option<Tensor<Cube<R, F, I, BT>, 2>>,
    initial: Option<(CubeTensor<R>, CubeTensor<R>)>,
    types: Dtypes,
) -> RetentionGrads<Cube<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let log_g = types.log_g.map(|gate_dtype| {
        let out = empty_f32(&g.dg_k, &[s.b, s.t, s.h]);
        let args = GateGradArgs {
            dg_q: buffer(g.dg_q.clone()),
            dg_k: buffer(g.dg_k.clone()),
            last: final_term.map(|term| buffer(into_contiguous(prim(term)))),
            out: buffer(out.clone()),
        };
        // SAFETY: buffers are contiguous f32 with the documented shapes.
        unsafe { launch_gate_grads(&out.client, [s.b, s.t, s.hq, s.h], args) };
        prim(float::<Cube<R, F, I, BT>, 3>(out).to_dtype(gate_dtype))
    });
    let cast =
        |x: CubeTensor<R>, dtype: DType| prim(float::<Cube<R, F, I, BT>, 4>(x).to_dtype(dtype));
    RetentionGrads {
        q: cast(g.dq, types.q),
        k: cast(g.dk, types.k),
        v: cast(g.dv, types.v),
        log_g,
        initial: initial.zip(types.initial).map(|((ds0, dz0), (st, zt))| {
            (
                cast(ds0, st),
                prim(float::<Cube<R, F, I, BT>, 3>(dz0).to_dtype(zt)),
            )
        }),
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, Tensor};

    use super::last_axis_max;

    #[test]
    fn last_axis_max_equals_one_reduction() {
        let dev = Default::default();
        // lengths with many, few and no divisors up to 256
        for n in [1, 7, 96, 1000, 4099, 16384] {
            let x = Tensor::<NdArray, 3>::random([2, 3, n], Distribution::Normal(0.0, 1.0), &dev);
            let want = x.clone().max_dim(2).into_data();
            let got = last_axis_max(x).into_data();
            assert_eq!(got.shape, want.shape, "n = {n}");
            assert_eq!(got, want, "n = {n}");
        }
    }
}
