//! The public functional op: validation, then dispatch to the backend's form.

use burn::tensor::{Tensor, TensorPrimitive, ops::FloatTensor};

use crate::device_failure::checked;
use crate::shapes::check_allocations;
use crate::{
    RetentionBackend, RetentionDims, RetentionError, RetentionOptions, RetentionState, check_shapes,
};

pub(crate) fn dims_of<B: RetentionBackend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    log_g: Option<&Tensor<B, 3>>,
    options: &RetentionOptions,
) -> Result<RetentionDims, RetentionError> {
    let g = log_g.map(|g| g.dims());
    let dims = check_shapes(
        &q.dims(),
        &k.dims(),
        &v.dims(),
        g.as_ref().map(|g| g.as_slice()),
        options,
    )?;
    check_allocations(&dims, B::retention_max_allocation(&q.device()))?;
    Ok(dims)
}

/// Checks the inputs of one recurrent step: the shapes as the op's, one token, and a state that
/// matches them.
pub(crate) fn check_step<B: RetentionBackend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    log_g: Option<&Tensor<B, 3>>,
    state: &RetentionState<B>,
    options: &RetentionOptions,
) -> Result<(), RetentionError> {
    let dims = dims_of(q, k, v, log_g, options)?;
    if dims.seq != 1 {
        return Err(RetentionError::StepLength {
            arg: "q",
            got: dims.seq,
        });
    }
    state.check(&dims, options.degree)
}

pub(crate) fn float<B: RetentionBackend, const N: usize>(
    t: burn::tensor::ops::FloatTensor<B>,
) -> Tensor<B, N> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn from_parts<B: RetentionBackend>(
    (y, s, z): (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
) -> (Tensor<B, 4>, RetentionState<B>) {
    (
        float(y),
        RetentionState {
            state: float(s),
            key_sum: float(z),
        },
    )
}

fn empty_output<B: RetentionBackend>(dims: &RetentionDims, q: &Tensor<B, 4>) -> Tensor<B, 4> {
    Tensor::zeros(
        [dims.batch, dims.seq, dims.q_heads, dims.value_dim],
        (&q.device(), q.dtype()),
    )
}

/// Power retention: causal attention with weights `(σ q_i·k_j)^p · e^{G_i − G_j}`, normalised
/// by their row sum, computed in linear time when `options.chunk_size` is set.
///
/// Same semantics as Manifest's `power_retention(Q, K, V, log_G, deg=p, scale=σ,
/// chunk_size=c)`: `y_i = Σ_{j≤i} w_ij v_j / Σ_{j≤i} w_ij`, `G` the inclusive cumulative sum
/// of `log_g`, query head `j` reading key/value head `⌊j / (q_heads / kv_heads)⌋`. A row with no
/// positive weight (e.g. `q_i = 0`) gives 0.
///
/// # Arguments
/// - `q`, `k`, `v`: queries, keys, values (any float dtype; f16/bf16 accumulate in f32)
/// - `log_g`: per-token log-gates `ln g ≤ 0` per key/value head; `None` = no gating
/// - `options`: degree `p` (even), scale `σ` (default `1/√head_dim`), chunk size
///   (`None` = quadratic attention form; sequences no longer than one chunk use it too)
///
/// # Shapes
/// - `q`: `[batch, seq, q_heads, head_dim]`
/// - `k`: `[batch, seq, kv_heads, head_dim]`
/// - `v`: `[batch, seq, kv_heads, value_dim]`
/// - `log_g`: `[batch, seq, kv_heads]`
/// - output: `[batch, seq, q_heads, value_dim]`, dtype of `q`
///
/// # Errors
/// A [`RetentionError`] naming the argument for wrong ranks, mismatched batch/seq/heads, a head
/// count that is not a multiple, mismatched head dims, an odd degree, a zero chunk size, a bad
/// scale or a gate of the wrong shape; [`RetentionError::TooLarge`] for a tensor beyond the
/// kernels' 32-bit positions or beyond one allocation on the device (as f32);
/// [`RetentionError::Device`] where the kernels failed on the device's runtime thread (a
/// kernel that did not build, an allocation refused), which would otherwise leave the output
/// unwritten: see [`check_device`](crate::check_device) for failures reported later.
///
/// # Precision
/// Gradients take the inputs' dtype. Under gates near `e^{−20}`, a row whose own weight
/// `(σ q_i·k_i)^p` is ≈ 0 has `∂y/∂q` of order `1/(q_i·k_i)`: exact gradients beyond f16's
/// 65,504 occur (2.1·10⁵ at 4,096 tokens in `docs/reliability.md`), so train such models in
/// bf16 (f32's exponent range) or scale the loss down. Outputs and states stay finite.
///
/// # Example
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use retention::{RetentionOptions, power_retention};
///
/// let dev = Default::default();
/// let q = Tensor::<NdArray, 4>::random([1, 10, 4, 8], Distribution::Normal(0.0, 1.0), &dev);
/// let k = Tensor::<NdArray, 4>::random([1, 10, 2, 8], Distribution::Normal(0.0, 1.0), &dev);
/// let v = Tensor::<NdArray, 4>::random([1, 10, 2, 8], Distribution::Normal(0.0, 1.0), &dev);
/// let opts = RetentionOptions::new().with_chunk_size(Some(4));
/// let y = power_retention(q, k, v, None, &opts)?;
/// assert_eq!(y.dims(), [1, 10, 4, 8]);
/// # Ok::<(), retention::RetentionError>(())
/// ```
pub fn power_retention<B: RetentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    options: &RetentionOptions,
) -> Result<Tensor<B, 4>, RetentionError> {
    let dims = dims_of(&q, &k, &v, log_g.as_ref(), options)?;
    if dims.batch == 0 || dims.seq == 0 {
        return Ok(empty_output(&dims, &q));
    }
    let device = q.device();
    let y = if let Some(c) = options.chunk_size.filter(|&c| dims.seq > c) {
        let segment = dims.segment_tokens(c, options, state_budget::<B>(options, &device))?;
        chunked::<B>(q, k, v, log_g, None, c, segment, options).0
    } else {
        let g = log_g.map(|g| g.into_primitive().tensor());
        float(B::retention_attention(
            q.into_primitive().tensor(),
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
            g,
            options,
        ))
    };
    checked::<B, _>(&device, y)
}

/// The chunked form, in segments of `segment` tokens (each from the state the previous one
/// ended with) when the chunk states of the whole sequence exceed the options' budget.
#[allow(clippy::too_many_arguments)]
fn chunked<B: RetentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    initial: Option<RetentionState<B>>,
    chunk: usize,
    segment: Option<usize>,
    options: &RetentionOptions,
) -> (Tensor<B, 4>, RetentionState<B>) {
    let seq = q.dims()[1];
    let Some(segment) = segment.filter(|&s| s < seq) else {
        let g = log_g.map(|g| g.into_primitive().tensor());
        let init = initial.map(|s| {
            (
                s.state.into_primitive().tensor(),
                s.key_sum.into_primitive().tensor(),
            )
        });
        return from_parts(B::retention_chunked(
            q.into_primitive().tensor(),
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
            g,
            init,
            chunk,
            options,
        ));
    };
    let run = |start: usize, state: Option<RetentionState<B>>| {
        let len = segment.min(seq - start);
        let part = |x: &Tensor<B, 4>| x.clone().narrow(1, start, len);
        chunked::<B>(
            part(&q),
            part(&k),
            part(&v),
            log_g.as_ref().map(|g| g.clone().narrow(1, start, len)),
            state,
            segment_chunk(chunk, len),
            None,
            options,
        )
    };
    let (first, mut state) = run(0, initial);
    let mut outputs = vec![first];
    for start in (segment..seq).step_by(segment) {
        let (y, next) = run(start, Some(state));
        outputs.push(y);
        state = next;
    }
    (Tensor::cat(outputs, 1), state)
}

/// Power retention that starts from `initial_state` (or from nothing) and also returns the
/// state after the last token: the prefill of a decoder.
///
/// The output equals [`power_retention`] on the concatenation of the tokens behind
/// `initial_state` and these. With `options.chunk_size = None` the whole sequence is one
/// chunk (quadratic in `seq`).
///
/// # Shapes
/// As [`power_retention`]; `initial_state` as [`RetentionState`] (`[batch, kv_heads, D,
/// value_dim]` and `[batch, kv_heads, D]`).
///
/// # Errors
/// As [`power_retention`], plus [`RetentionError::StateShape`] for a state that does not match.
pub fn power_retention_with_state<B: RetentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    initial_state: Option<RetentionState<B>>,
    options: &RetentionOptions,
) -> Result<(Tensor<B, 4>, RetentionState<B>), RetentionError> {
    let dims = dims_of(&q, &k, &v, log_g.as_ref(), options)?;
    check_stateful(&dims, initial_state.as_ref(), options)?;
    if dims.batch == 0 || dims.seq == 0 {
        let state = initial_or_zeros(initial_state, &dims, options, &q);
        return Ok((empty_output(&dims, &q), state));
    }
    let device = q.device();
    let (chunk, segment) = chunk_for::<B>(&dims, options, &device)?;
    let dtype = initial_state.as_ref().map(RetentionState::dtype);
    let (y, state) = chunked::<B>(q, k, v, log_g, initial_state, chunk, segment, options);
    checked::<B, _>(&device, (y, in_given_dtype(state, dtype)))
}

/// `state` in `dtype` where a state was given in it: a given state comes back in its own
/// dtype (see [`RetentionState::cast`]); a new one in the kernels' (f32 for half inputs).
pub(crate) fn in_given_dtype<B: RetentionBackend>(
    state: RetentionState<B>,
    dtype: Option<burn::tensor::DType>,
) -> RetentionState<B> {
    match dtype {
        Some(d) => state.cast(d),
        None => state,
    }
}

/// The chunk length of a segment of `len` tokens: a last segment shorter than a chunk is one
/// chunk of its own length (rounded up to 16, a tile's height).
pub(crate) fn segment_chunk(chunk: usize, len: usize) -> usize {
    chunk.min(len.next_multiple_of(16))
}

/// Checks a stateful call: the state's size, and `initial` against `dims`.
pub(crate) fn check_stateful<B: RetentionBackend>(
    dims: &RetentionDims,
    initial: Option<&RetentionState<B>>,
    options: &RetentionOptions,
) -> Result<(), RetentionError> {
    crate::shapes::check_elements("state", &dims.state_shape(options.degree))?;
    match initial {
        Some(s) => s.check(dims, options.degree),
        None => Ok(()),
    }
}

/// `initial`, or the empty state of `dims` in the compute dtype of `like`, on its device.
pub(crate) fn initial_or_zeros<B: RetentionBackend>(
    initial: Option<RetentionState<B>>,
    dims: &RetentionDims,
    options: &RetentionOptions,
    like: &Tensor<B, 4>,
) -> RetentionState<B> {
    initial.unwrap_or_else(|| {
        RetentionState::zeros(
            dims.batch,
            dims.kv_heads,
            dims.head_dim,
            dims.value_dim,
            options.degree,
            crate::reference::compute_dtype(like.dtype()),
            &like.device(),
        )
    })
}

/// The chunk-state elements one call may hold on `device`: the options' budget, and no more
/// f32 elements than one allocation there takes.
fn state_budget<B: RetentionBackend>(options: &RetentionOptions, device: &B::Device) -> usize {
    let fits = B::retention_max_allocation(device).map_or(usize::MAX, |bytes| bytes / 4);
    options.segment_elements.min(fits)
}

/// The chunk length and segment length (`None`: one segment) of a stateful call on `dims` on
/// `device`.
pub(crate) fn chunk_for<B: RetentionBackend>(
    dims: &RetentionDims,
    options: &RetentionOptions,
    device: &B::Device,
) -> Result<(usize, Option<usize>), RetentionError> {
    // a sequence shorter than a chunk is one chunk of its own length (rounded up to 16, a
    // tile's height), not one padded to the configured size: a short prompt after a state
    // would otherwise cost a whole chunk
    let chunk = options
        .chunk_size
        .unwrap_or(dims.seq)
        .min(dims.seq.next_multiple_of(16));
    let segment = match options.chunk_size {
        Some(_) => dims.segment_tokens(chunk, options, state_budget::<B>(options, device))?,
        // the attention form (one chunk of the whole sequence) is what the caller asked for
        None => None,
    };
    Ok((chunk, segment))
}

/// One recurrent step: advances `state` by one token and returns that token's output. Costs
/// O(1) in the number of tokens behind the state. The new state has the dtype of `state`
/// (see [`RetentionState::cast`]): the kernels advance it in f32 and round it back.
///
/// # Shapes
/// - `q`: `[batch, 1, q_heads, head_dim]`, `k`: `[batch, 1, kv_heads, head_dim]`,
///   `v`: `[batch, 1, kv_heads, value_dim]`, `log_g`: `[batch, 1, kv_heads]`
/// - output: `[batch, 1, q_heads, value_dim]`
///
/// # Errors
/// As [`power_retention`], plus [`RetentionError::StepLength`] when `seq ≠ 1` and
/// [`RetentionError::StateShape`] for a state that does not match.
pub fn power_retention_step<B: RetentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    state: RetentionState<B>,
    options: &RetentionOptions,
) -> Result<(Tensor<B, 4>, RetentionState<B>), RetentionError> {
    check_step(&q, &k, &v, log_g.as_ref(), &state, options)?;
    let dtype = state.dtype();
    let device = q.device();
    let g = log_g.map(|g| g.into_primitive().tensor());
    let (y, next) = from_parts(B::retention_step(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        g,
        state.state.into_primitive().tensor(),
        state.key_sum.into_primitive().tensor(),
        options,
    ));
    // the state comes back in the dtype it came in (the kernels advance it in f32)
    checked::<B, _>(&device, (y, next.cast(dtype)))
}
