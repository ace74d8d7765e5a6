//! The backend extension trait: one method per form of the op, each with the plain-tensor
//! reference as its default body. Kernel backends override what they accelerate.

use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend, ops::FloatTensor};

use crate::backward::{
    ChunkedUpstream, ForwardRows, RetentionGrads, RetentionInputs, reference_attention_backward,
    reference_chunked_backward,
};
use crate::{ChunkContributions, RetentionOptions, reference};

/// A backend that can run power retention.
///
/// Every method has a default body, the plain-tensor [`reference`](mod@crate::reference), so any Burn backend gets a
/// correct implementation by an empty `impl`; `Autodiff<B>` differentiates through those
/// default bodies. Inputs reach these methods already validated by the public functions
/// ([`power_retention`](crate::power_retention), …); implementations may rely on the shapes
/// documented here.
///
/// Shapes (`b` batch, `t` sequence, `hq` query heads, `h` key/value heads, `d` head dim,
/// `e` value dim, `D` = [`expanded_dim`](crate::expanded_dim)`(d, degree)`):
/// `q [b, t, hq, d]`, `k [b, t, h, d]`, `v [b, t, h, e]`, `log_g [b, t, h]`,
/// state `[b, h, D, e]`, key-sum `[b, h, D]`, output `[b, t, hq, e]`.
pub trait RetentionBackend: Backend {
    /// Attention (quadratic) form, no state.
    fn retention_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        options: &RetentionOptions,
    ) -> FloatTensor<Self> {
        reference_attention::<Self>(q, k, v, log_g, options)
    }

    /// Chunked (linear) form with chunk length `chunk_size`, optional initial
    /// `(state, key_sum)`; returns `(output, state, key_sum)` after the last token.
    fn retention_chunked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        initial: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        chunk_size: usize,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference_chunked::<Self>(q, k, v, log_g, initial, chunk_size, options)
    }

    /// The `(state, key_sum)` after the tokens of `k`, `v` (chunk length `chunk_size`) from
    /// `initial` (zeros when `None`): [`Self::retention_chunked`]'s last two results without
    /// the outputs. Context parallelism runs it on every slice of a sequence but the last to
    /// find the states the slices start from.
    fn retention_chunked_state(
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        initial: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        chunk_size: usize,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference_chunked_state::<Self>(k, v, log_g, initial, chunk_size, options)
    }

    /// Whether [`Self::retention_chunked_state_keeping`] keeps the chunk contributions for
    /// keys and values of these dtypes (`k, v`) and head dims `d`, `e` on `device`. The
    /// default keeps none. `Fusion<B>` asks before it registers the call, so the answer must
    /// not depend on anything else.
    fn retention_keeps_contributions(
        device: &Self::Device,
        dtypes: &[DType],
        head_dim: usize,
        value_dim: usize,
        options: &RetentionOptions,
    ) -> bool {
        let _ = (device, dtypes, head_dim, value_dim, options);
        false
    }

    /// [`Self::retention_chunked_state`] from zeros, also returning each chunk's contribution
    /// ([`ChunkContributions`]) exactly when [`Self::retention_keeps_contributions`] says so:
    /// the first pass of context parallelism, whose second pass over the same tokens
    /// ([`Self::retention_chunked_from_contributions`]) then only scans them from the state the
    /// slice starts from. The default keeps none.
    #[allow(clippy::type_complexity)]
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
        let (s, z) = Self::retention_chunked_state(k, v, log_g, None, chunk_size, options);
        (s, z, None)
    }

    /// [`Self::retention_chunked`] on tokens whose chunk contributions (same `k`, `v`,
    /// `log_g` and `chunk_size`) [`Self::retention_chunked_state_keeping`] kept: the same
    /// results without computing the contributions again. The default (and a backend handed
    /// contributions of another shape) runs [`Self::retention_chunked`].
    #[allow(clippy::too_many_arguments)]
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
        let _ = contributions;
        Self::retention_chunked(q, k, v, log_g, initial, chunk_size, options)
    }

    /// The largest buffer, in bytes, one allocation on `device` may take (`None`: no limit
    /// known). The chunked form's chunk states (`[batch, kv_heads, chunks, D, value_dim]`, f32)
    /// are bounded by it as by [`RetentionOptions::segment_elements`]: the sequence runs in
    /// segments whose states fit. The default knows none.
    fn retention_max_allocation(device: &Self::Device) -> Option<usize> {
        let _ = device;
        None
    }

    /// Starts the work queued for `device` without waiting for it. Backends that queue device
    /// work (`Fusion`, the CubeCL runtimes) may start it only when the device is read, synced
    /// or flushed: context parallelism flushes each device once its slice is queued, so the
    /// devices run their slices at once. The default does nothing (backends that run eagerly).
    fn retention_flush(device: &Self::Device) {
        let _ = device;
    }

    /// Whether tensors move onto `device` by the backend's own transfer between its devices,
    /// safe once the destination is synced before and after (see
    /// [`to_device_synced`](crate::to_device_synced)): CUDA. The default, and wgpu and HIP
    /// (whose move between devices panics inside cubecl 0.10), copy through host memory.
    fn retention_direct_moves(device: &Self::Device) -> bool {
        let _ = device;
        false
    }

    /// Takes the failure of this backend's kernels on `device` not yet reported (what failed,
    /// in words): a launch or an allocation that failed on the device's runtime thread, which
    /// left outputs unwritten. The ops call it after the backend returns and answer
    /// [`RetentionError::Device`](crate::RetentionError::Device); see
    /// [`check_device`](crate::check_device). It must not block. The default has none (backends
    /// whose failures reach the caller).
    fn retention_device_failure(device: &Self::Device) -> Option<String> {
        let _ = device;
        None
    }

    /// Whether [`Self::retention_chunked_keeping_rows`] keeps the rows ([`ForwardRows`]) for
    /// inputs of these dtypes (`q, k, v`, then the initial state and key-sum if given) and
    /// head dims `d`, `e` on `device`. The default keeps none. `Fusion<B>` asks before it
    /// registers the call, so the answer must not depend on anything else.
    fn retention_keeps_rows(
        device: &Self::Device,
        dtypes: &[DType],
        head_dim: usize,
        value_dim: usize,
        options: &RetentionOptions,
    ) -> bool {
        let _ = (device, dtypes, head_dim, value_dim, options);
        false
    }

    /// [`Self::retention_chunked`] for a call whose backward pass will follow: also returns the
    /// rows the backward pass would otherwise compute again, exactly when
    /// [`Self::retention_keeps_rows`] says so. `Autodiff<Self>` calls it for tracked inputs and
    /// hands the rows to [`Self::retention_chunked_backward`] with the inputs.
    #[allow(clippy::type_complexity)]
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
        let (y, s, z) = Self::retention_chunked(q, k, v, log_g, initial, chunk_size, options);
        (y, s, z, None)
    }

    /// One recurrent step (`t = 1`) from `(state, key_sum)`; returns `(output, state, key_sum)`.
    fn retention_step(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        state: FloatTensor<Self>,
        key_sum: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference_step::<Self>(q, k, v, log_g, state, key_sum, options)
    }

    /// The output of the last token of a window of `n` recent tokens (`keys [b, n, h, d]`,
    /// `values [b, n, h, e]`, `log_g [b, n, h]`), read with `q [b, 1, hq, d]` from
    /// `(state, key_sum)` before the window; the state is not changed. Returns `[b, 1, hq, e]`.
    ///
    /// A decoder that keeps its last tokens beside the state reads the state once per step
    /// this way and rewrites it only when it absorbs the window ([`Self::retention_absorb`]).
    fn retention_window(
        q: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        state: FloatTensor<Self>,
        key_sum: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> FloatTensor<Self> {
        reference_window::<Self>(q, keys, values, log_g, state, key_sum, options)
    }

    /// `(state, key_sum)` after the `n` tokens of a window (shapes as
    /// [`Self::retention_window`]).
    fn retention_absorb(
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        state: FloatTensor<Self>,
        key_sum: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference_absorb::<Self>(keys, values, log_g, state, key_sum, options)
    }

    /// Gradients of [`Self::retention_attention`]'s inputs for the output gradient
    /// `d_output [b, t, hq, e]`. `Autodiff<Self>` calls it in its backward pass with the inputs
    /// it kept (nothing else of the forward pass is kept).
    fn retention_attention_backward(
        inputs: RetentionInputs<Self>,
        d_output: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> RetentionGrads<Self> {
        reference_attention_backward::<Self>(inputs, d_output, options)
    }

    /// Gradients of [`Self::retention_chunked`]'s inputs for the gradients arriving at its
    /// outputs. `Autodiff<Self>` calls it once per output that received a gradient (the
    /// gradients add up), with the inputs it kept: the chunk states are recomputed, never
    /// kept between the passes.
    fn retention_chunked_backward(
        inputs: RetentionInputs<Self>,
        chunk_size: usize,
        upstream: ChunkedUpstream<Self>,
        options: &RetentionOptions,
    ) -> RetentionGrads<Self> {
        reference_chunked_backward::<Self>(inputs, chunk_size, upstream, options)
    }
}

/// The plain-tensor window read (the trait's default body): the chunked form over the window
/// from the state, with `q` at every window position, keeping the last row.
pub(crate) fn reference_window<B: Backend>(
    q: FloatTensor<B>,
    keys: FloatTensor<B>,
    values: FloatTensor<B>,
    log_g: Option<FloatTensor<B>>,
    state: FloatTensor<B>,
    key_sum: FloatTensor<B>,
    options: &RetentionOptions,
) -> FloatTensor<B> {
    let keys = float::<B, 4>(keys);
    let n = keys.dims()[1];
    let q = float::<B, 4>(q).repeat_dim(1, n);
    let scale = options.scale_for(q.dims()[3]);
    let (y, _, _) = reference::chunked_form(
        q,
        keys,
        float(values),
        log_g.map(float),
        Some((float(state), float(key_sum))),
        n,
        options.degree,
        scale,
    );
    prim(y.narrow(1, n - 1, 1))
}

/// The plain-tensor window absorption (the trait's default body): the final state of the
/// chunked form over the window from the state.
pub(crate) fn reference_absorb<B: Backend>(
    keys: FloatTensor<B>,
    values: FloatTensor<B>,
    log_g: Option<FloatTensor<B>>,
    state: FloatTensor<B>,
    key_sum: FloatTensor<B>,
    options: &RetentionOptions,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let keys = float::<B, 4>(keys);
    let n = keys.dims()[1];
    let scale = options.scale_for(keys.dims()[3]);
    let (_, s, z) = reference::chunked_form(
        keys.zeros_like(),
        keys,
        float(values),
        log_g.map(float),
        Some((float(state), float(key_sum))),
        n,
        options.degree,
        scale,
    );
    (prim(s), prim(z))
}

/// The plain-tensor attention form on primitives (the trait's default body).
pub(crate) fn reference_attention<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    log_g: Option<FloatTensor<B>>,
    options: &RetentionOptions,
) -> FloatTensor<B> {
    let q = float::<B, 4>(q);
    let scale = options.scale_for(q.dims()[3]);
    reference::attention_form(
        q,
        float(k),
        float(v),
        log_g.map(float),
        options.degree,
        scale,
    )
    .into_primitive()
    .tensor()
}

/// The plain-tensor chunked form on primitives (the trait's default body).
pub(crate) fn reference_chunked<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    log_g: Option<FloatTensor<B>>,
    initial: Option<(FloatTensor<B>, FloatTensor<B>)>,
    chunk_size: usize,
    options: &RetentionOptions,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let q = float::<B, 4>(q);
    let scale = options.scale_for(q.dims()[3]);
    let (y, s, z) = reference::chunked_form(
        q,
        float(k),
        float(v),
        log_g.map(float),
        initial.map(|(s, z)| (float(s), float(z))),
        chunk_size,
        options.degree,
        scale,
    );
    (prim(y), prim(s), prim(z))
}

/// The plain-tensor chunked state (the trait's default body): the chunked form with zero
/// queries (one per key/value head), its output dropped.
pub(crate) fn reference_chunked_state<B: Backend>(
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    log_g: Option<FloatTensor<B>>,
    initial: Option<(FloatTensor<B>, FloatTensor<B>)>,
    chunk_size: usize,
    options: &RetentionOptions,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let k = float::<B, 4>(k);
    let (_, s, z) = reference_chunked::<B>(
        prim(k.zeros_like()),
        prim(k),
        v,
        log_g,
        initial,
        chunk_size,
        options,
    );
    (s, z)
}

/// The plain-tensor recurrent step on primitives (the trait's default body).
pub(crate) fn reference_step<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    log_g: Option<FloatTensor<B>>,
    state: FloatTensor<B>,
    key_sum: FloatTensor<B>,
    options: &RetentionOptions,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let q = float::<B, 4>(q);
    let scale = options.scale_for(q.dims()[3]);
    let (y, s, z) = reference::step(
        q,
        float(k),
        float(v),
        log_g.map(float),
        float(state),
        float(key_sum),
        options.degree,
        scale,
    );
    (prim(y), prim(s), prim(z))
}

/// The dtypes [`RetentionBackend::retention_keeps_rows`] takes: `q, k, v`, then the initial
/// state and key-sum if given.
#[cfg(feature = "cube")]
pub(crate) fn input_dtypes<B: Backend>(
    [q, k, v]: [&FloatTensor<B>; 3],
    initial: Option<&(FloatTensor<B>, FloatTensor<B>)>,
) -> Vec<DType> {
    use burn::tensor::TensorMetadata;
    let mut dtypes = vec![q.dtype(), k.dtype(), v.dtype()];
    if let Some((s, z)) = initial {
        dtypes.extend([s.dtype(), z.dtype()]);
    }
    dtypes
}

pub(crate) fn float<B: Backend, const N: usize>(t: FloatTensor<B>) -> Tensor<B, N> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

pub(crate) fn prim<B: Backend, const N: usize>(t: Tensor<B, N>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

#[cfg(feature = "ndarray")]
mod ndarray_impl {
    use burn::backend::ndarray::{
        FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
    };

    impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> super::RetentionBackend
        for NdArray<E, I, Q>
    where
        NdArrayTensor: From<SharedArray<E>>,
        NdArrayTensor: From<SharedArray<I>>,
    {
    }
}

#[cfg(feature = "tch")]
impl<E: burn::backend::libtorch::TchElement> RetentionBackend for burn::backend::LibTorch<E> {}
