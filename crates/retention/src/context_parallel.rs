//! One long sequence split across devices (context parallelism): each device holds a slice of
//! the tokens, and needs from the devices before it only the state they end with (`D × e` per
//! head), not their keys and values.
//!
//! [`power_retention_context_parallel`] runs in two passes. The first finds every slice's own
//! final state from zero on every device at once: each chunk's contribution to the state and a
//! scan that writes only the end state, the contributions kept
//! ([`RetentionBackend::retention_chunked_state_keeping`], about a third of a forward at head
//! dim 64). A gated prefix scan over the slices, one state transfer per device, turns the own
//! states into the states the slices start from
//! (`S_in(i+1) = e^{Γ_i}·S_in(i) + S_own(i)`, `Γ_i` the slice's summed log-gates); the second
//! pass runs each slice's forward from its state, scanning the kept contributions instead of
//! computing them again ([`RetentionBackend::retention_chunked_from_contributions`]), so a
//! device does about one forward of its slice in all. Each device is flushed
//! ([`RetentionBackend::retention_flush`]) once a pass of its slice is queued (a backend may
//! start a device's queued work only when it is read, synced or flushed: queued from one thread
//! and synced in turn, two H200s ran one after the other), so the devices run their slices at
//! once; slice `i`'s second pass is queued right after the state it hands on, and the call
//! returns with the second passes still running. A handed-on state moves with its destination
//! synced before and after ([`to_device_synced`]: the host waits for the receiving slice's
//! first pass, which ran beside the sending one's): a plain move between two CUDA devices
//! races the work queued on either and gave wrong outputs on two H200s.

use burn::tensor::{Tensor, backend::Backend};

use crate::device_failure::checked;
use crate::op::{
    check_stateful, chunk_for, dims_of, float, in_given_dtype, initial_or_zeros, segment_chunk,
};
use crate::{
    ChunkContributions, RetentionBackend, RetentionError, RetentionOptions, RetentionState,
    power_retention_with_state, to_device_synced,
};

/// The tokens of one slice of a sequence, on the device that runs it.
///
/// # Shapes
/// - `q`: `[batch, seq, q_heads, head_dim]`
/// - `k`: `[batch, seq, kv_heads, head_dim]`
/// - `v`: `[batch, seq, kv_heads, value_dim]`
/// - `log_g`: `[batch, seq, kv_heads]`
#[derive(Debug, Clone)]
pub struct SequenceSlice<B: Backend> {
    /// Queries.
    pub q: Tensor<B, 4>,
    /// Keys.
    pub k: Tensor<B, 4>,
    /// Values.
    pub v: Tensor<B, 4>,
    /// Log-gates (`None`: no gating).
    pub log_g: Option<Tensor<B, 3>>,
}

impl<B: RetentionBackend> SequenceSlice<B> {
    /// Splits one sequence into slices of consecutive tokens, one per device (moved there
    /// with [`to_device_synced`]; a slice on the sequence's own device is a view of it),
    /// as equal as whole chunks of `chunk` tokens allow (the last slice ends with the partial
    /// chunk, if any): `devices.len()` slices, or one per chunk when the sequence has fewer
    /// chunks than devices (the first devices take them).
    ///
    /// # Shapes
    /// As [`SequenceSlice`]; every input has the whole sequence.
    ///
    /// # Errors
    /// As [`power_retention`](crate::power_retention) for inputs whose shapes do not agree;
    /// [`RetentionError::Device`] where a device fails while a slice moves to it.
    pub fn split(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        log_g: Option<Tensor<B, 3>>,
        chunk: usize,
        devices: &[B::Device],
    ) -> Result<Vec<Self>, RetentionError> {
        let seq = dims_of(&q, &k, &v, log_g.as_ref(), &RetentionOptions::new())?.seq;
        let chunk = chunk.max(1);
        let chunks = seq.div_ceil(chunk);
        let parts = devices.len().min(chunks);
        let mut start = 0;
        let mut slices = Vec::with_capacity(parts);
        for (i, device) in devices.iter().take(parts).enumerate() {
            // the first `chunks mod parts` slices take one chunk more
            let own = chunks / parts + usize::from(i < chunks % parts);
            let len = (own * chunk).min(seq - start);
            let part4 =
                |x: &Tensor<B, 4>| to_device_synced(x.clone().narrow(1, start, len), device);
            slices.push(Self {
                q: part4(&q)?,
                k: part4(&k)?,
                v: part4(&v)?,
                log_g: log_g
                    .as_ref()
                    .map(|g| to_device_synced(g.clone().narrow(1, start, len), device))
                    .transpose()?,
            });
            start += len;
        }
        Ok(slices)
    }
}

/// The state after the tokens `k`, `v` from `initial_state` (or from nothing), without the
/// outputs: the first pass of context parallelism, about a third of a forward pass at head
/// dim 64 on the kernels (the chunk contributions and their scan).
///
/// # Shapes
/// `k`, `v`, `log_g` as [`power_retention`](crate::power_retention); the state as
/// [`RetentionState`].
///
/// # Errors
/// As [`power_retention_with_state`].
pub fn power_retention_state<B: RetentionBackend>(
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    initial_state: Option<RetentionState<B>>,
    options: &RetentionOptions,
) -> Result<RetentionState<B>, RetentionError> {
    let dims = dims_of(&k, &k, &v, log_g.as_ref(), options)?;
    check_stateful(&dims, initial_state.as_ref(), options)?;
    let dtype = initial_state.as_ref().map(RetentionState::dtype);
    if dims.batch == 0 || dims.seq == 0 {
        return Ok(initial_or_zeros(initial_state, &dims, options, &k));
    }
    let (chunk, segment) = chunk_for::<B>(&dims, options, &k.device())?;
    let segment = segment.unwrap_or(dims.seq).max(1);
    let mut state = initial_state;
    for start in (0..dims.seq).step_by(segment) {
        let len = segment.min(dims.seq - start);
        let part = |x: &Tensor<B, 4>| x.clone().narrow(1, start, len).into_primitive().tensor();
        let (s, z) = B::retention_chunked_state(
            part(&k),
            part(&v),
            log_g
                .as_ref()
                .map(|g| g.clone().narrow(1, start, len).into_primitive().tensor()),
            state.map(|s| {
                (
                    s.state.into_primitive().tensor(),
                    s.key_sum.into_primitive().tensor(),
                )
            }),
            segment_chunk(chunk, len),
            options,
        );
        state = Some(RetentionState {
            state: float(s),
            key_sum: float(z),
        });
    }
    // dims.seq > 0: the loop ran
    let state = initial_or_zeros(state, &dims, options, &k);
    checked::<B, _>(&k.device(), in_given_dtype(state, dtype))
}

/// Power retention over one sequence whose tokens are split across devices: `slices[i]` holds
/// the `i`-th run of consecutive tokens on the device that runs it (see
/// [`SequenceSlice::split`]). Returns each slice's output on its device and the state after
/// the last token (on the last slice's device): the same as [`power_retention_with_state`] on
/// the whole sequence, computed on every device at once.
///
/// # Arguments
/// - `slices`: the sequence's slices in order, each with the same batch, heads and head dims
/// - `initial_state`: the state before the first slice (on the first slice's device), or none
/// - `options`: as [`power_retention`](crate::power_retention); the chunk size applies within
///   each slice
///
/// # Shapes
/// Each slice as [`SequenceSlice`]; outputs `[batch, slice_seq, q_heads, value_dim]`.
///
/// # Errors
/// As [`power_retention_with_state`] for any slice (the error names the argument), and
/// [`RetentionError::Config`] for no slices or slices whose batch, heads or head dims
/// differ; [`RetentionError::Device`] where reading a handed-on state back fails.
pub fn power_retention_context_parallel<B: RetentionBackend>(
    mut slices: Vec<SequenceSlice<B>>,
    initial_state: Option<RetentionState<B>>,
    options: &RetentionOptions,
) -> Result<(Vec<Tensor<B, 4>>, RetentionState<B>), RetentionError> {
    let Some(last) = slices.pop() else {
        return Err(RetentionError::Config(
            "context parallelism needs at least one slice".into(),
        ));
    };
    if slices.is_empty() {
        // no slice waits for this one's state: the plain forward
        let y_state =
            power_retention_with_state(last.q, last.k, last.v, last.log_g, initial_state, options)?;
        return Ok((vec![y_state.0], y_state.1));
    }
    // what every slice shares: batch, query and key/value heads, head and value dims
    let sizes = |s: &SequenceSlice<B>| {
        dims_of(&s.q, &s.k, &s.v, s.log_g.as_ref(), options)
            .map(|d| (d.batch, d.q_heads, d.kv_heads, d.head_dim, d.value_dim))
    };
    let reference = sizes(&last)?;
    for slice in &slices {
        let these = sizes(slice)?;
        if these != reference {
            return Err(RetentionError::Config(format!(
                "`slices` differ in (batch, q_heads, kv_heads, head_dim, value_dim): \
                 {these:?} and {reference:?} (the last)"
            )));
        }
    }
    // pass 1 on every device at once: each slice's own final state from zeros and its summed
    // log-gates, keeping the chunk contributions for pass 2
    let mut first = Vec::with_capacity(slices.len() + 1);
    for (i, slice) in slices.iter().chain([&last]).enumerate() {
        first.push(first_pass(slice, i < slices.len(), options)?);
        B::retention_flush(&slice.q.device());
    }
    // the gated prefix scan over the slices, and pass 2 on each slice as soon as the state it
    // starts from is known: the state slice i + 1 starts from is formed on slice i's device
    // and moved to slice i + 1's before slice i's pass 2 is queued (the move waits for the
    // work queued before it on slice i's device, and for slice i + 1's first pass)
    let dtype = initial_state.as_ref().map(RetentionState::dtype);
    let first_device = slices[0].q.device();
    let mut first = first.into_iter();
    let mut entering = initial_state;
    let mut outputs = Vec::with_capacity(slices.len() + 1);
    let next_devices: Vec<B::Device> = slices
        .iter()
        .skip(1)
        .chain([&last])
        .map(|s| s.q.device())
        .collect();
    for ((slice, own), next_device) in slices.into_iter().zip(&mut first).zip(&next_devices) {
        let device = slice.q.device();
        let next = handed_on(entering.clone(), own.state, own.decay).to_device(next_device)?;
        let (y, _) = second_pass(slice, entering, own.kept, options)?;
        B::retention_flush(&device);
        outputs.push(y);
        entering = Some(next);
    }
    let own = first
        .next()
        .ok_or_else(|| RetentionError::Config("pass 1 ran for every slice".into()))?;
    let last_device = last.q.device();
    let (y, state) = second_pass(last, entering, own.kept, options)?;
    B::retention_flush(&last_device);
    outputs.push(y);
    for device in [first_device].iter().chain(&next_devices) {
        checked::<B, _>(device, ())?;
    }
    // a given state comes back in its own dtype, as from one pass
    Ok((outputs, in_given_dtype(state, dtype)))
}

/// The state the slice after one starts from: `e^{Γ}·entering + own` (`own` alone after the
/// first slice with no initial state), in `own`'s dtype.
fn handed_on<B: RetentionBackend>(
    entering: Option<RetentionState<B>>,
    own: RetentionState<B>,
    decay: Option<Tensor<B, 2>>,
) -> RetentionState<B> {
    let Some(s) = entering else {
        return own;
    };
    let s = s.cast(own.dtype());
    let (state, key_sum) = match decay {
        Some(a) => {
            let [b, h] = a.dims();
            (
                s.state * a.clone().reshape([b, h, 1, 1]),
                s.key_sum * a.reshape([b, h, 1]),
            )
        }
        None => (s.state, s.key_sum),
    };
    RetentionState {
        state: state + own.state,
        key_sum: key_sum + own.key_sum,
    }
}

/// What pass 1 keeps of a slice.
struct FirstPass<B: RetentionBackend> {
    /// The slice's own final state, from zeros.
    state: RetentionState<B>,
    /// `e^{Γ}`, the slice's summed log-gates exponentiated, `[batch, kv_heads]` (`None`: no
    /// gating, or the last slice, whose state no slice starts from).
    decay: Option<Tensor<B, 2>>,
    /// The chunk contributions of the slice's first segment, where the backend keeps them.
    kept: Option<KeptSegment<B>>,
}

/// The chunk contributions of a slice's first `len` tokens (chunks of `chunk` tokens).
struct KeptSegment<B: RetentionBackend> {
    len: usize,
    chunk: usize,
    contributions: ChunkContributions<B>,
}

/// Pass 1 on one slice: its own final state from zeros; the contributions of its first segment
/// (all its tokens unless the chunk states of the whole slice exceed
/// [`RetentionOptions::segment_elements`]) are kept, the memory bound of one call.
fn first_pass<B: RetentionBackend>(
    slice: &SequenceSlice<B>,
    with_decay: bool,
    options: &RetentionOptions,
) -> Result<FirstPass<B>, RetentionError> {
    let SequenceSlice { k, v, log_g, .. } = slice;
    let dims = dims_of(k, k, v, log_g.as_ref(), options)?;
    check_stateful::<B>(&dims, None, options)?;
    // summed in the state's dtype: half-precision sums of many gates drift
    let decay = |state: &RetentionState<B>| {
        log_g
            .as_ref()
            .filter(|_| with_decay)
            .map(|g| summed_gates(g.clone().cast(state.dtype())).exp())
    };
    if dims.batch == 0 || dims.seq == 0 {
        let state = initial_or_zeros(None, &dims, options, k);
        return Ok(FirstPass {
            decay: decay(&state),
            state,
            kept: None,
        });
    }
    let (chunk, segment) = chunk_for::<B>(&dims, options, &k.device())?;
    let len = segment.unwrap_or(dims.seq).min(dims.seq);
    let chunk = segment_chunk(chunk, len);
    let part = |x: &Tensor<B, 4>| x.clone().narrow(1, 0, len).into_primitive().tensor();
    let (s, z, kept) = B::retention_chunked_state_keeping(
        part(k),
        part(v),
        log_g
            .as_ref()
            .map(|g| g.clone().narrow(1, 0, len).into_primitive().tensor()),
        chunk,
        options,
    );
    let mut state = RetentionState {
        state: float(s),
        key_sum: float(z),
    };
    if len < dims.seq {
        let rest = dims.seq - len;
        let part = |x: &Tensor<B, 4>| x.clone().narrow(1, len, rest);
        state = power_retention_state(
            part(k),
            part(v),
            log_g.as_ref().map(|g| g.clone().narrow(1, len, rest)),
            Some(state),
            options,
        )?;
    }
    let kept = kept.map(|contributions| KeptSegment {
        len,
        chunk,
        contributions,
    });
    Ok(FirstPass {
        decay: decay(&state),
        state,
        kept,
    })
}

/// `Σ_t log_g[b, t, h]`, `[batch, kv_heads]`, in two rounds of sums (runs of `RUN` tokens,
/// then the runs' sums): one sum over a whole long slice runs as a few long serial loops on
/// the device (milliseconds at 131k tokens), each round here as many short ones.
fn summed_gates<B: RetentionBackend>(log_g: Tensor<B, 3>) -> Tensor<B, 2> {
    const RUN: usize = 1024;
    let [b, t, h] = log_g.dims();
    let whole = t / RUN * RUN;
    let runs = (whole > 0).then(|| {
        log_g
            .clone()
            .narrow(1, 0, whole)
            .reshape([b, whole / RUN, RUN, h])
            .sum_dim(2)
            .sum_dim(1)
            .reshape([b, h])
    });
    let tail = (whole < t).then(|| {
        log_g
            .clone()
            .narrow(1, whole, t - whole)
            .sum_dim(1)
            .reshape([b, h])
    });
    match (runs, tail) {
        (Some(runs), Some(tail)) => runs + tail,
        (Some(sum), None) | (None, Some(sum)) => sum,
        (None, None) => Tensor::zeros([b, h], (&log_g.device(), log_g.dtype())),
    }
}

/// Pass 2 on one slice from the state it starts from: the outputs and the state after it,
/// its first segment from the contributions pass 1 kept (if any).
fn second_pass<B: RetentionBackend>(
    slice: SequenceSlice<B>,
    initial: Option<RetentionState<B>>,
    kept: Option<KeptSegment<B>>,
    options: &RetentionOptions,
) -> Result<(Tensor<B, 4>, RetentionState<B>), RetentionError> {
    let SequenceSlice { q, k, v, log_g } = slice;
    let Some(KeptSegment {
        len,
        chunk,
        contributions,
    }) = kept
    else {
        return power_retention_with_state(q, k, v, log_g, initial, options);
    };
    let dims = dims_of(&q, &k, &v, log_g.as_ref(), options)?;
    check_stateful(&dims, initial.as_ref(), options)?;
    let dtype = initial.as_ref().map(RetentionState::dtype);
    let part = |x: &Tensor<B, 4>| x.clone().narrow(1, 0, len).into_primitive().tensor();
    let (y, s, z) = B::retention_chunked_from_contributions(
        part(&q),
        part(&k),
        part(&v),
        log_g
            .as_ref()
            .map(|g| g.clone().narrow(1, 0, len).into_primitive().tensor()),
        initial.map(|s| {
            (
                s.state.into_primitive().tensor(),
                s.key_sum.into_primitive().tensor(),
            )
        }),
        contributions,
        chunk,
        options,
    );
    let (y, state) = (
        float::<B, 4>(y),
        RetentionState {
            state: float(s),
            key_sum: float(z),
        },
    );
    if len == dims.seq {
        return Ok((y, in_given_dtype(state, dtype)));
    }
    let rest = dims.seq - len;
    let part = |x: &Tensor<B, 4>| x.clone().narrow(1, len, rest);
    let (y_rest, state) = power_retention_with_state(
        part(&q),
        part(&k),
        part(&v),
        log_g.map(|g| g.narrow(1, len, rest)),
        Some(state),
        options,
    )?;
    Ok((
        Tensor::cat(vec![y, y_rest], 1),
        in_given_dtype(state, dtype),
    ))
}
