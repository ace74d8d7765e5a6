//! One long sequence split across devices (context parallelism): each device holds a slice of
//! the tokens, and needs from the devices before it only the state they end with (`D × e` per
//! head), not their keys and values.
//!
//! [`power_retention_context_parallel`] runs in two passes. The first finds every slice's own
//! final state from zero ([`power_retention_state`]: the chunk contributions and their scan, no
//! outputs) on every device at once; a gated prefix scan over the slices, one state transfer
//! per device, turns them into the states the slices start from
//! (`S_in(i+1) = e^{Γ_i}·S_in(i) + S_own(i)`, `Γ_i` the slice's summed log-gates); the second
//! pass is [`power_retention_with_state`] on each slice from its state, again on every device
//! at once. Each device is flushed ([`RetentionBackend::retention_flush`]) once its slice's
//! pass is queued (a backend may start a device's queued work only when it is read, synced or
//! flushed: queued from one thread and synced in turn, two H200s ran one after the other), so
//! the devices run their slices at once; a transfer waits for the first pass of the slice it
//! reads, and the call returns with the second passes still running.

use burn::tensor::{Tensor, backend::Backend};

use crate::op::{
    check_stateful, chunk_for, dims_of, float, in_given_dtype, initial_or_zeros, segment_chunk,
};
use crate::{
    RetentionBackend, RetentionError, RetentionOptions, RetentionState, power_retention_with_state,
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
    /// Splits one sequence into slices of consecutive tokens, one per device (moved there),
    /// as equal as whole chunks of `chunk` tokens allow (the last slice ends with the partial
    /// chunk, if any): `devices.len()` slices, or one per chunk when the sequence has fewer
    /// chunks than devices (the first devices take them).
    ///
    /// # Shapes
    /// As [`SequenceSlice`]; every input has the whole sequence.
    ///
    /// # Errors
    /// As [`power_retention`](crate::power_retention) for inputs whose shapes do not agree.
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
            let part4 = |x: &Tensor<B, 4>| x.clone().narrow(1, start, len).to_device(device);
            slices.push(Self {
                q: part4(&q),
                k: part4(&k),
                v: part4(&v),
                log_g: log_g
                    .as_ref()
                    .map(|g| g.clone().narrow(1, start, len).to_device(device)),
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
    let (chunk, segment) = chunk_for(&dims, options)?;
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
    Ok(in_given_dtype(state, dtype))
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
/// differ.
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
    // pass 1 on every device at once: each slice's own final state (the last one's is not
    // needed), and its summed log-gates per sequence and head
    let mut own = Vec::with_capacity(slices.len());
    for slice in &slices {
        let state = power_retention_state(
            slice.k.clone(),
            slice.v.clone(),
            slice.log_g.clone(),
            None,
            options,
        )?;
        // summed in the state's dtype: half-precision sums of many gates drift
        let decay = slice.log_g.as_ref().map(|g| {
            g.clone()
                .cast(state.dtype())
                .sum_dim(1)
                .squeeze_dim::<2>(1)
                .exp()
        });
        B::retention_flush(&slice.q.device());
        own.push((state, decay));
    }
    // the gated prefix scan over the slices: the state slice i + 1 starts from is formed on
    // slice i's device and moved (waiting for slice i's first pass, before anything else is
    // queued there)
    let dtype = initial_state.as_ref().map(RetentionState::dtype);
    let mut entering = vec![initial_state];
    for ((own_state, decay), next) in own.into_iter().zip(slices.iter().skip(1).chain([&last])) {
        let state = match entering.last().cloned().flatten() {
            None => own_state,
            Some(s) => {
                let s = s.cast(own_state.dtype());
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
                    state: state + own_state.state,
                    key_sum: key_sum + own_state.key_sum,
                }
            }
        };
        entering.push(Some(state.to_device(&next.q.device())));
    }
    // pass 2, the last slice first (its device has been idle the longest), each device
    // flushed once its slice is queued
    let last_entering = entering.pop().flatten();
    let last_device = last.q.device();
    let (y_last, state) =
        power_retention_with_state(last.q, last.k, last.v, last.log_g, last_entering, options)?;
    B::retention_flush(&last_device);
    let mut outputs = Vec::with_capacity(slices.len() + 1);
    for (slice, state) in slices.into_iter().zip(entering).rev() {
        let device = slice.q.device();
        let (y, _) =
            power_retention_with_state(slice.q, slice.k, slice.v, slice.log_g, state, options)?;
        B::retention_flush(&device);
        outputs.push(y);
    }
    outputs.reverse();
    outputs.push(y_last);
    // a given state comes back in its own dtype, as from one pass
    Ok((outputs, in_given_dtype(state, dtype)))
}
