//! `CubeBackend<R>` (CUDA, ROCm/HIP, wgpu): the forms run on the CubeCL kernels of
//! `retention-kernels`; what the kernels do not cover falls back to the reference:
//! f64 inputs, a degree other than 2 in the chunked form and the step (the attention-form
//! kernel takes any even degree), and head dims whose tiles do not fit the device's shared
//! memory (the kernels' `plan` functions decide before anything is launched).

use burn::tensor::{DType, Shape, ops::FloatTensor};
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
    ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor,
};
use retention_kernels::{
    Buffer, ChunkedTiles, DecodeMode, DecodeTiles, OutputTiles, Strategy,
    chunk_gates::{GateDims, launch_chunk_gates},
    chunk_output::{OutputArgs, OutputDims, launch_output},
    chunk_state::{StateArgs, StateDims, launch_chunk_state},
    cubecl::prelude::ArrayArg,
    decode::{DecodeArgs, DecodeDims, launch_decode},
    discumsum::ScanWrites,
    query_state::{QueryStateArgs, launch_query_state},
};

use std::hash::{DefaultHasher, Hash, Hasher};

use crate::ChunkContributions;
use crate::backend::{
    RetentionBackend, float, input_dtypes, prim, reference_absorb, reference_attention,
    reference_chunked, reference_chunked_state, reference_step, reference_window,
};
use crate::backward::{
    ChunkedUpstream, ForwardRows, RetentionGrads, RetentionInputs, reference_attention_backward,
    reference_chunked_backward,
};
use crate::cube_backward::{
    Sizes, attention_backward, chunked_backward, keeps_rows, output_dims, scan,
};
use crate::device_failure::{self, guarded, guarded_until_built};
use crate::feature_map::expanded_dim;
use crate::reference::ToDtype;
use crate::{KernelChoice, RetentionOptions};

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// The kernels' [`Strategy`] for `options.kernels`.
pub(crate) fn strategy(options: &RetentionOptions) -> Strategy {
    match options.kernels {
        KernelChoice::Auto => Strategy::Auto,
        KernelChoice::Cmma => Strategy::Cmma,
        KernelChoice::Fma => Strategy::Fma,
    }
}

/// Whether the kernels take inputs of this dtype.
pub(crate) fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

pub(crate) fn arg<R: CubeRuntime>(t: CubeTensor<R>) -> ArrayArg<R> {
    t.into_array_arg()
}

pub(crate) fn buffer<R: CubeRuntime>(t: CubeTensor<R>) -> Buffer {
    let len = t.meta.num_elements();
    Buffer {
        handle: t.handle,
        len,
    }
}

/// A new contiguous tensor on `like`'s device.
pub(crate) fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: &[usize],
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape.to_vec()),
        dtype,
    )
}

pub(crate) fn empty_f32<R: CubeRuntime>(like: &CubeTensor<R>, shape: &[usize]) -> CubeTensor<R> {
    empty(like, shape, DType::F32)
}

/// `log_g [b, t, h]` → cumulative log-gates inside chunks of `chunk`, `f32 [b, h, n·chunk]`,
/// constant past `t` (padding neither adds nor decays): one kernel launch.
pub(crate) fn chunk_gates<R, F, I, BT>(
    log_g: CubeTensor<R>,
    chunk: usize,
    n_chunks: usize,
) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    // the kernel reads f32/f16/bf16 gates as they are; anything else is converted first
    let log_g = if kernel_dtype(log_g.dtype) {
        into_contiguous(log_g)
    } else {
        to_f32_contiguous::<R, F, I, BT, 3>(log_g)
    };
    let [b, t, h] = {
        let s = log_g.meta.shape();
        [s[0], s[1], s[2]]
    };
    let out = empty_f32(&log_g, &[b, h, n_chunks * chunk]);
    let dims = GateDims {
        batch: b,
        seq: t,
        kv_heads: h,
        chunk,
        n_chunks,
    };
    let (client, dtype) = (log_g.client.clone(), log_g.dtype);
    // SAFETY: `log_g` is contiguous `[b, t, h]`, `out` holds `b·h·n·c` f32.
    unsafe { launch_chunk_gates(&client, dtype.into(), dims, arg(log_g), arg(out.clone())) };
    out
}

pub(crate) fn to_f32_contiguous<R, F, I, BT, const N: usize>(t: CubeTensor<R>) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if t.dtype == DType::F32 {
        return into_contiguous(t);
    }
    into_contiguous(prim(float::<Cube<R, F, I, BT>, N>(t).to_dtype(DType::F32)))
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RetentionBackend
    for CubeBackend<R, F, I, BT>
{
    fn retention_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        options: &RetentionOptions,
    ) -> FloatTensor<Self> {
        let device = q.device.clone();
        guarded::<R, _, _>(
            &device,
            "the attention form",
            (q, k, v, log_g),
            |(q, k, v, log_g)| attention_form::<R, F, I, BT>(q, k, v, log_g, options),
        )
    }

    fn retention_chunked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        initial: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        chunk_size: usize,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let device = q.device.clone();
        let (y, s, z, _) = guarded::<R, _, _>(
            &device,
            "the chunked form",
            (q, k, v, log_g, initial),
            |(q, k, v, log_g, initial)| {
                chunked_forward::<R, F, I, BT>(
                    q, k, v, log_g, initial, None, chunk_size, options, false,
                )
            },
        );
        (y, s, z)
    }

    fn retention_keeps_contributions(
        device: &Self::Device,
        dtypes: &[DType],
        head_dim: usize,
        value_dim: usize,
        options: &RetentionOptions,
    ) -> bool {
        let client = R::client(device);
        keeps_contributions(&client, dtypes, head_dim, value_dim, options)
    }

    fn retention_chunked_state_keeping(
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        chunk_size: usize,
        options: &RetentionOptions,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<ChunkContributions<Self>>,
    ) {
        let device = k.device.clone();
        guarded::<R, _, _>(&device, "the state pass", (k, v, log_g), |(k, v, log_g)| {
            state_pass::<R, F, I, BT>(k, v, log_g, None, chunk_size, options, true)
        })
    }

    fn retention_chunked_from_contributions(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        initial: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        contributions: ChunkContributions<Self>,
        chunk_size: usize,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let device = q.device.clone();
        let (y, s, z, _) = guarded::<R, _, _>(
            &device,
            "the chunked form",
            (q, k, v, log_g, initial, contributions),
            |(q, k, v, log_g, initial, contributions)| {
                chunked_forward::<R, F, I, BT>(
                    q,
                    k,
                    v,
                    log_g,
                    initial,
                    Some(contributions),
                    chunk_size,
                    options,
                    false,
                )
            },
        );
        (y, s, z)
    }

    fn retention_max_allocation(device: &Self::Device) -> Option<usize> {
        // the runtime's page limit (wgpu: the storage-binding limit, 128 MiB on lavapipe); an
        // allocation above it fails inside the runtime, not as an error here
        let bytes = R::client(device).properties().memory.max_page_size;
        usize::try_from(bytes).ok()
    }

    fn retention_direct_moves(device: &Self::Device) -> bool {
        // cubecl-cuda moves buffers between devices over NCCL; wgpu and HIP panic there
        R::name(&R::client(device)) == "cuda"
    }

    fn retention_device_failure(device: &Self::Device) -> Option<String> {
        device_failure::take(device_failure::device_key::<R>(device))
    }

    fn retention_flush(device: &Self::Device) {
        // a failed flush surfaces at the device's next read or sync
        let _ = R::client(device).flush();
    }

    fn retention_chunked_state(
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        initial: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        chunk_size: usize,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let device = k.device.clone();
        let (s, z, _) = guarded::<R, _, _>(
            &device,
            "the state pass",
            (k, v, log_g, initial),
            |(k, v, log_g, initial)| {
                state_pass::<R, F, I, BT>(k, v, log_g, initial, chunk_size, options, false)
            },
        );
        (s, z)
    }

    fn retention_keeps_rows(
        device: &Self::Device,
        dtypes: &[DType],
        head_dim: usize,
        value_dim: usize,
        options: &RetentionOptions,
    ) -> bool {
        let client = R::client(device);
        keeps_rows(&client, dtypes, head_dim, value_dim, options)
    }

    fn retention_chunked_keeping_rows(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        initial: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        chunk_size: usize,
        options: &RetentionOptions,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<ForwardRows<Self>>,
    ) {
        let device = q.device.clone();
        guarded::<R, _, _>(
            &device,
            "the chunked form",
            (q, k, v, log_g, initial),
            |(q, k, v, log_g, initial)| {
                chunked_forward::<R, F, I, BT>(
                    q, k, v, log_g, initial, None, chunk_size, options, true,
                )
            },
        )
    }

    fn retention_step(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        state: FloatTensor<Self>,
        key_sum: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let Some(tiles) = decode_tiles(DecodeMode::Step, &q, &k, &v, &state, &key_sum, options)
        else {
            return reference_step::<Self>(q, k, v, log_g, state, key_sum, options);
        };
        let window = Window {
            keys: k,
            values: v,
            log_g,
        };
        match decode_guarded::<R, F, I, BT>(tiles, Some(q), window, state, key_sum, options) {
            (Some(y), Some((s, z))) => (y, s, z),
            _ => unreachable!("a step returns an output and a state"),
        }
    }

    fn retention_window(
        q: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        state: FloatTensor<Self>,
        key_sum: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> FloatTensor<Self> {
        let Some(tiles) = decode_tiles(
            DecodeMode::Read,
            &q,
            &keys,
            &values,
            &state,
            &key_sum,
            options,
        ) else {
            return reference_window::<Self>(q, keys, values, log_g, state, key_sum, options);
        };
        let window = Window {
            keys,
            values,
            log_g,
        };
        match decode_guarded::<R, F, I, BT>(tiles, Some(q), window, state, key_sum, options) {
            (Some(y), _) => y,
            _ => unreachable!("a window read returns an output"),
        }
    }

    fn retention_absorb(
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        state: FloatTensor<Self>,
        key_sum: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(tiles) = decode_tiles(
            DecodeMode::Absorb,
            &keys,
            &keys,
            &values,
            &state,
            &key_sum,
            options,
        ) else {
            return reference_absorb::<Self>(keys, values, log_g, state, key_sum, options);
        };
        let window = Window {
            keys,
            values,
            log_g,
        };
        match decode_guarded::<R, F, I, BT>(tiles, None, window, state, key_sum, options) {
            (_, Some(state)) => state,
            _ => unreachable!("an absorption returns a state"),
        }
    }

    fn retention_attention_backward(
        inputs: RetentionInputs<Self>,
        d_output: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> RetentionGrads<Self> {
        let device = inputs.q.device.clone();
        guarded::<R, _, _>(
            &device,
            "the attention form's backward pass",
            (inputs, d_output),
            |(inputs, d_output)| {
                // the kernels apply unless the dtype or the head dims rule them out
                match attention_backward::<R, F, I, BT>(inputs.clone(), d_output.clone(), options) {
                    Some(grads) => grads,
                    None => reference_attention_backward::<Self>(inputs, d_output, options),
                }
            },
        )
    }

    fn retention_chunked_backward(
        inputs: RetentionInputs<Self>,
        chunk_size: usize,
        upstream: ChunkedUpstream<Self>,
        options: &RetentionOptions,
    ) -> RetentionGrads<Self> {
        let device = inputs.q.device.clone();
        guarded::<R, _, _>(
            &device,
            "the chunked form's backward pass",
            (inputs, upstream),
            |(inputs, upstream)| match chunked_backward::<R, F, I, BT>(
                inputs.clone(),
                chunk_size,
                upstream.clone(),
                options,
            ) {
                Some(grads) => grads,
                None => reference_chunked_backward::<Self>(inputs, chunk_size, upstream, options),
            },
        )
    }
}

/// The attention form on the kernels, or the reference where they do not take the inputs.
fn attention_form<R, F, I, BT>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    log_g: Option<CubeTensor<R>>,
    options: &RetentionOptions,
) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [b, t, hq, d] = dims4(&q);
    let [_, _, h, e] = dims4(&v);
    let dtype = q.dtype;
    let client = q.client.clone();
    let tiles = kernel_dtype(dtype)
        .then(|| {
            OutputTiles::plan(
                &client,
                dtype.into(),
                strategy(options),
                d,
                e,
                options.degree,
            )
        })
        .flatten();
    let Some(tiles) = tiles else {
        return reference_attention::<Cube<R, F, I, BT>>(q, k, v, log_g, options);
    };
    let gates = log_g.map(|g| chunk_gates::<R, F, I, BT>(g, t, 1));
    let out = empty(&q, &[b, t, hq, e], dtype);
    let dims = OutputDims {
        batch: b,
        seq: t,
        q_heads: hq,
        kv_heads: h,
        chunk: t,
        n_chunks: 1,
        expanded_dim: 0,
        scale: options.scale_for(d) as f32,
    };
    let args = OutputArgs {
        q: arg(into_contiguous(q)),
        k: arg(into_contiguous(k)),
        v: arg(into_contiguous(v)),
        gates: gates.map(arg),
        states: None,
        out: arg(out.clone()),
        out_dtype: dtype.into(),
        stats: None,
    };
    // SAFETY: buffers are contiguous with the documented shapes and dtype.
    unsafe { launch_output(&client, dtype.into(), dims, tiles, args) };
    out
}

/// The state after the tokens `k`, `v` from `initial` (zeros when `None`) on the kernels:
/// each chunk's contribution, then a scan that writes only the end state (the slots keep the
/// contributions). With `keep`, the contributions are returned too, where
/// [`keeps_contributions`] says so. The reference where the kernels do not take the inputs.
/// Serves [`RetentionBackend::retention_chunked_state`] and
/// [`RetentionBackend::retention_chunked_state_keeping`].
#[allow(clippy::type_complexity)]
fn state_pass<R, F, I, BT>(
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    log_g: Option<CubeTensor<R>>,
    initial: Option<(CubeTensor<R>, CubeTensor<R>)>,
    chunk_size: usize,
    options: &RetentionOptions,
    keep: bool,
) -> (
    CubeTensor<R>,
    CubeTensor<R>,
    Option<ChunkContributions<Cube<R, F, I, BT>>>,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [b, t, h, d] = dims4(&k);
    let e = dims4(&v)[3];
    let Some(ChunkedTiles { state: tiles, .. }) = chunked_tiles(&k, e, &initial, options) else {
        let (s, z) =
            reference_chunked_state::<Cube<R, F, I, BT>>(k, v, log_g, initial, chunk_size, options);
        return (s, z, None);
    };
    // as `keeps_contributions`: the tiles planned, and one dtype for keys and values
    let keep = keep && k.dtype == v.dtype;
    let c = chunk_size;
    let n = t.div_ceil(c);
    let big_d = expanded_dim(d, 2);
    let sizes = Sizes {
        b,
        t,
        hq: h,
        h,
        d,
        e,
        c,
        n,
        big_d,
    };
    let (k, v) = (into_contiguous(k), into_contiguous(v));
    let gates = log_g.map(|g| chunk_gates::<R, F, I, BT>(g, c, n));
    let (states, sums) = chunk_contributions(&k, &v, &gates, k.dtype, tiles, c, n);
    let final_state = empty_f32(&k, &[b, h, big_d, e]);
    let final_sum = empty_f32(&k, &[b, h, big_d]);
    let (s0, z0) = initial
        .map(|(s, z)| {
            (
                to_f32_contiguous::<R, F, I, BT, 4>(s),
                to_f32_contiguous::<R, F, I, BT, 3>(z),
            )
        })
        .unzip();
    scan(
        &k.client,
        sizes,
        &gates,
        [
            (&states, s0, &final_state, big_d * e, None),
            (&sums, z0, &final_sum, big_d, None),
        ],
        false,
        ScanWrites::LastOnly,
    );
    let kept = keep.then_some(ChunkContributions { states, sums });
    (final_state, final_sum, kept)
}

/// Whether the kernels keep the chunk contributions for keys and values of `dtypes` (`k, v`)
/// and head dims `d`, `e`: where [`state_pass`] computes them on the kernels (degree 2, a
/// half or f32 dtype shared by keys and values, tiles that fit).
fn keeps_contributions<R: CubeRuntime>(
    client: &retention_kernels::cubecl::prelude::ComputeClient<R>,
    dtypes: &[DType],
    d: usize,
    e: usize,
    options: &RetentionOptions,
) -> bool {
    let [k, v] = dtypes else {
        return false;
    };
    options.degree == 2
        && k == v
        && kernel_dtype(*k)
        && ChunkedTiles::plan(client, (*k).into(), strategy(options), d, e).is_some()
}

/// Contributions handed to a forward (`given`) if they have the shapes of its chunks, in
/// buffers the scan may write (a copy of one shared with another tensor; `in_place`: the scan
/// writes the entering states over the states' slots, not only over the sums').
fn given_contributions<R: CubeRuntime>(
    given: (CubeTensor<R>, CubeTensor<R>),
    sizes: Sizes,
    in_place: bool,
) -> Option<(CubeTensor<R>, CubeTensor<R>)> {
    let Sizes {
        b, h, e, n, big_d, ..
    } = sizes;
    let (states, sums) = given;
    let fits = states.meta.shape().as_slice() == [b, h, n, big_d, e]
        && sums.meta.shape().as_slice() == [b, h, n, big_d]
        && states.dtype == DType::F32
        && sums.dtype == DType::F32;
    if !fits {
        return None;
    }
    let writable = |t: CubeTensor<R>| match t.can_mut() {
        true => into_contiguous(t),
        false => into_contiguous(t.copy()),
    };
    let states = match in_place {
        true => writable(states),
        false => into_contiguous(states),
    };
    Some((states, writable(sums)))
}

/// The chunked form's tiles for inputs like `x` (its dtype, client and head dim) with value
/// dim `e` and an initial state of `initial`'s dtypes, or `None` where the kernels do not take
/// them (degree ≠ 2, f64, tiles that do not fit): run the reference then.
fn chunked_tiles<R: CubeRuntime>(
    x: &CubeTensor<R>,
    e: usize,
    initial: &Option<(CubeTensor<R>, CubeTensor<R>)>,
    options: &RetentionOptions,
) -> Option<ChunkedTiles> {
    let initial_ok = initial
        .as_ref()
        .is_none_or(|(s, z)| s.dtype != DType::F64 && z.dtype != DType::F64);
    let d = dims4(x)[3];
    (options.degree == 2 && kernel_dtype(x.dtype) && initial_ok)
        .then(|| ChunkedTiles::plan(&x.client, x.dtype.into(), strategy(options), d, e))
        .flatten()
}

/// Steps 1 and 2 of the chunked forward for contiguous `k`, `v` and chunk gates: each chunk's
/// contribution (or the contributions `given`, kept by an earlier pass over these tokens,
/// where their shapes fit), then the scan that turns them into the states entering each chunk (also
/// written as f16 `S/γ` into `half_states` where given) and the final state. Returns
/// `[entering states, entering sums, final state, final sum]`, f32.
#[allow(clippy::too_many_arguments)]
fn entering_states<R, F, I, BT>(
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
    gates: &Option<CubeTensor<R>>,
    initial: Option<(CubeTensor<R>, CubeTensor<R>)>,
    given: Option<(CubeTensor<R>, CubeTensor<R>)>,
    tiles: retention_kernels::StateTiles,
    sizes: Sizes,
    half_states: Option<CubeTensor<R>>,
) -> [CubeTensor<R>; 4]
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let Sizes {
        b,
        h,
        e,
        c,
        n,
        big_d,
        ..
    } = sizes;
    let given = given.and_then(|g| given_contributions(g, sizes, half_states.is_none()));
    let (states, sums) =
        given.unwrap_or_else(|| chunk_contributions(k, v, gates, k.dtype, tiles, c, n));
    let final_state = empty_f32(k, &[b, h, big_d, e]);
    let final_sum = empty_f32(k, &[b, h, big_d]);
    let (s0, z0) = match initial {
        Some((s, z)) => (
            Some(to_f32_contiguous::<R, F, I, BT, 4>(s)),
            Some(to_f32_contiguous::<R, F, I, BT, 3>(z)),
        ),
        None => (None, None),
    };
    scan(
        &k.client,
        sizes,
        gates,
        [
            (&states, s0, &final_state, big_d * e, half_states),
            (&sums, z0, &final_sum, big_d, None),
        ],
        false,
        ScanWrites::Entering,
    );
    [states, sums, final_state, final_sum]
}

/// Each chunk's contribution `(ΔS [b, h, n, D, e], Δz [b, h, n, D])`, f32, for contiguous
/// `k [b, t, h, d]`, `v [b, t, h, e]` and cumulative gates `f32 [b, h, n·c]`: one launch.
pub(crate) fn chunk_contributions<R: CubeRuntime>(
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
    gates: &Option<CubeTensor<R>>,
    dtype: DType,
    tiles: retention_kernels::StateTiles,
    chunk: usize,
    n_chunks: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [b, t, h, d] = dims4(k);
    let e = dims4(v)[3];
    let big_d = expanded_dim(d, 2);
    let states = empty_f32(k, &[b, h, n_chunks, big_d, e]);
    let sums = empty_f32(k, &[b, h, n_chunks, big_d]);
    let dims = StateDims {
        batch: b,
        seq: t,
        kv_heads: h,
        chunk,
        n_chunks,
        expanded_dim: big_d,
    };
    let args = StateArgs {
        k: arg(k.clone()),
        v: arg(v.clone()),
        gates: gates.clone().map(arg),
        states: arg(states.clone()),
        sums: arg(sums.clone()),
    };
    // SAFETY: buffers are contiguous with the documented shapes and dtype.
    unsafe { launch_chunk_state(&k.client, dtype.into(), dims, tiles, args) };
    (states, sums)
}

/// The tokens a decode launch absorbs or reads beside the state: `[b, n, h, ·]`.
#[derive(Clone)]
struct Window<R: CubeRuntime> {
    keys: CubeTensor<R>,
    values: CubeTensor<R>,
    log_g: Option<CubeTensor<R>>,
}

/// [`decode`] as one exclusive task on the device's runtime thread ([`guarded`]).
fn decode_guarded<R, F, I, BT>(
    tiles: DecodeTiles,
    q: Option<CubeTensor<R>>,
    window: Window<R>,
    state: CubeTensor<R>,
    key_sum: CubeTensor<R>,
    options: &RetentionOptions,
) -> Decoded<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let device = state.device.clone();
    // the kernels' variant: their tiles, the shapes and dtypes they were built for
    let variant = {
        let mut h = DefaultHasher::new();
        tiles.hash(&mut h);
        q.as_ref().map(|q| (dims4(q), q.dtype)).hash(&mut h);
        (dims4(&window.keys), dims4(&window.values), dims4(&state)).hash(&mut h);
        (window.keys.dtype, state.dtype, window.log_g.is_some()).hash(&mut h);
        h.finish()
    };
    guarded_until_built::<R, _, _>(
        &device,
        "the decode step",
        variant,
        (q, window, state, key_sum),
        |(q, window, state, key_sum)| {
            decode::<R, F, I, BT>(tiles, q, window, state, key_sum, options)
        },
    )
}

/// What [`decode`] returns: the output (modes that read) and the new state (modes that
/// advance).
type Decoded<R> = (
    Option<CubeTensor<R>>,
    Option<(CubeTensor<R>, CubeTensor<R>)>,
);

/// Tiles of a decode launch of `mode` (queries `q`, or the keys when the mode reads none), or
/// `None` where the kernels do not take the inputs (degree ≠ 2, f64, `e` not a multiple of 4, a
/// window over the limit, tiles too large): run the reference then.
fn decode_tiles<R: CubeRuntime>(
    mode: DecodeMode,
    q: &CubeTensor<R>,
    keys: &CubeTensor<R>,
    values: &CubeTensor<R>,
    state: &CubeTensor<R>,
    key_sum: &CubeTensor<R>,
    options: &RetentionOptions,
) -> Option<DecodeTiles> {
    let [_, n, h, d] = dims4(keys);
    let e = dims4(values)[3];
    let hq = dims4(q)[2];
    let state_ok = state.dtype != DType::F64 && key_sum.dtype != DType::F64;
    (options.degree == 2 && kernel_dtype(keys.dtype) && state_ok)
        .then(|| DecodeTiles::plan(&keys.client, d, e, hq / h, mode, n))
        .flatten()
}

/// One decode launch with `tiles` (from [`decode_tiles`]).
fn decode<R, F, I, BT>(
    tiles: DecodeTiles,
    q: Option<CubeTensor<R>>,
    window: Window<R>,
    state: CubeTensor<R>,
    key_sum: CubeTensor<R>,
    options: &RetentionOptions,
) -> Decoded<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let mode = tiles.mode;
    let [b, n, h, d] = dims4(&window.keys);
    let e = dims4(&window.values)[3];
    let hq = q.as_ref().map_or(h, |q| dims4(q)[2]);
    let dtype = window.keys.dtype;
    let client = window.keys.client.clone();
    let big_d = expanded_dim(d, 2);
    let log_g = window.log_g.map(to_f32_contiguous::<R, F, I, BT, 3>);
    let state = to_f32_contiguous::<R, F, I, BT, 4>(state);
    let key_sum = to_f32_contiguous::<R, F, I, BT, 3>(key_sum);
    let like = window.keys.clone();
    let out = mode.reads().then(|| empty(&like, &[b, 1, hq, e], dtype));
    let new_state = mode.advances().then(|| {
        (
            empty_f32(&like, &[b, h, big_d, e]),
            empty_f32(&like, &[b, h, big_d]),
        )
    });
    let mut dims = DecodeDims {
        batch: b,
        q_heads: hq,
        kv_heads: h,
        expanded_dim: big_d,
        scale: options.scale_for(d) as f32,
        slices: 1,
        window: n,
    };
    let units = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(32);
    dims.slices = dims.slices_for(&tiles, units as usize);
    // the partial products exist only when the queries read the state
    let (partial_num, partial_den) = if mode.reads() {
        (
            empty_f32(&like, &[dims.slices, b, hq, e]),
            empty_f32(&like, &[dims.slices, b, hq]),
        )
    } else {
        (empty_f32(&like, &[4]), empty_f32(&like, &[1]))
    };
    let q = q.map_or_else(|| like.clone(), into_contiguous);
    let args = DecodeArgs {
        q: buffer(q),
        keys: buffer(into_contiguous(window.keys)),
        values: buffer(into_contiguous(window.values)),
        log_g: log_g.map(buffer),
        state: buffer(state),
        key_sum: buffer(key_sum),
        out: out.clone().map(buffer),
        new_state: new_state.clone().map(|(s, z)| (buffer(s), buffer(z))),
        partial_num: buffer(partial_num),
        partial_den: buffer(partial_den),
    };
    // SAFETY: buffers are contiguous with the documented shapes and dtype.
    unsafe { launch_decode(&client, dtype.into(), dims, tiles, args) };
    (out, new_state)
}

pub(crate) fn dims4<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 4] {
    let s = t.meta.shape();
    [s[0], s[1], s[2], s[3]]
}

/// The chunked form on the kernels; with `keep`, also the rows its backward pass takes
/// ([`ForwardRows`]) wherever [`keeps_rows`] says so: the output kernel then writes the rows
/// in f32 with their normalisers, and the output is their cast to the inputs' dtype. The
/// chunk `contributions` kept by an earlier state pass over these tokens replace their
/// computation where their shapes fit.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn chunked_forward<R, F, I, BT>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    log_g: Option<CubeTensor<R>>,
    initial: Option<(CubeTensor<R>, CubeTensor<R>)>,
    contributions: Option<ChunkContributions<Cube<R, F, I, BT>>>,
    chunk_size: usize,
    options: &RetentionOptions,
    keep: bool,
) -> (
    CubeTensor<R>,
    CubeTensor<R>,
    CubeTensor<R>,
    Option<ForwardRows<Cube<R, F, I, BT>>>,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [b, t, hq, d] = dims4(&q);
    let [_, _, h, e] = dims4(&v);
    let dtype = q.dtype;
    let client = q.client.clone();
    let plans = chunked_tiles(&q, e, &initial, options);
    let Some(ChunkedTiles {
        state: state_tiles,
        query: query_tiles,
        output: out_tiles,
    }) = plans
    else {
        let (y, s, z) =
            reference_chunked::<Cube<R, F, I, BT>>(q, k, v, log_g, initial, chunk_size, options);
        return (y, s, z, None);
    };
    let dtypes = input_dtypes::<Cube<R, F, I, BT>>([&q, &k, &v], initial.as_ref());
    let keep = keep && keeps_rows(&client, &dtypes, d, e, options);
    let c = chunk_size;
    let n = t.div_ceil(c);
    let big_d = expanded_dim(d, 2);
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let gates = log_g.map(|g| chunk_gates::<R, F, I, BT>(g, c, n));

    let sizes = Sizes {
        b,
        t,
        hq,
        h,
        d,
        e,
        c,
        n,
        big_d,
    };
    // 1–2. chunk contributions, then the states entering each chunk and the final state; the
    // query-state kernel reads the entering states as f16 `S/γ`
    let half_states = query_tiles.map(|_| empty(&q, &[b, h, n, big_d, e], DType::F16));
    let given = contributions.map(|c| (c.states, c.sums));
    let [states, sums, final_state, final_sum] = entering_states::<R, F, I, BT>(
        &k,
        &v,
        &gates,
        initial,
        given,
        state_tiles,
        sizes,
        half_states.clone(),
    );

    // 3. outputs (in f32 with their normalisers where the backward pass takes them)
    let out = match keep {
        true => empty_f32(&q, &[b, t, hq, e]),
        false => empty(&q, &[b, t, hq, e], dtype),
    };
    let stats = keep.then(|| empty_f32(&q, &[b, t, hq]));
    let dims = output_dims(sizes, options);
    let state_part = match (query_tiles, half_states) {
        (Some(tiles), Some(half_states)) => {
            let num = empty_f32(&q, &[b, t, hq, e]);
            let den = empty_f32(&q, &[b, t, hq]);
            let args = QueryStateArgs {
                q: arg(q.clone()),
                states: arg(half_states),
                sums: arg(sums),
                num: arg(num.clone()),
                den: arg(den.clone()),
            };
            // SAFETY: buffers are contiguous with the documented shapes and dtypes.
            unsafe { launch_query_state(&client, dtype.into(), dims, tiles, args) };
            (arg(num), arg(den))
        }
        _ => (arg(states), arg(sums)),
    };
    let args = OutputArgs {
        q: arg(q),
        k: arg(k),
        v: arg(v),
        gates: gates.map(arg),
        states: Some(state_part),
        out: arg(out.clone()),
        out_dtype: match keep {
            true => DType::F32.into(),
            false => dtype.into(),
        },
        stats: stats.clone().map(arg),
    };
    // SAFETY: buffers are contiguous with the documented shapes and dtype.
    unsafe { launch_output(&client, dtype.into(), dims, out_tiles, args) };
    let Some(normaliser) = stats else {
        return (out, final_state, final_sum, None);
    };
    let y = prim(float::<Cube<R, F, I, BT>, 4>(out.clone()).to_dtype(dtype));
    let rows = ForwardRows {
        output: out,
        normaliser,
    };
    (y, final_state, final_sum, Some(rows))
}
