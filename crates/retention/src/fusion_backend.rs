//! `Fusion<B>`: each form is one opaque operation in the fusion stream that runs the inner
//! backend's form (the kernels, for `Fusion<CubeBackend>`); the ops around it still fuse.

use std::marker::PhantomData;

use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use burn::tensor::{DType, Shape, ops::FloatTensor};
use burn_fusion::{
    Fusion, FusionBackend, FusionRuntime, FusionTensor,
    client::GlobalFusionClient,
    stream::{Operation, OperationStreams},
};

use crate::backend::{RetentionBackend, input_dtypes};
use crate::backward::{ChunkedUpstream, ForwardRows, RetentionGrads, RetentionInputs};
use crate::feature_map::expanded_dim;
use crate::reference::compute_dtype;
use crate::{ChunkContributions, RetentionOptions};

/// Which form an operation runs, with what it needs besides its tensors.
#[derive(Debug, Clone)]
enum Form {
    Attention,
    /// `keep_rows`: two more outputs, the rows kept for the backward pass; `contributions`:
    /// two more inputs (after the initial state), kept chunk contributions to read.
    Chunked {
        chunk: usize,
        initial: bool,
        keep_rows: bool,
        contributions: bool,
    },
    /// The state after the tokens, no outputs (`k, v` first: no queries).
    ChunkedState {
        chunk: usize,
        initial: bool,
    },
    /// The state from zeros, and (`keep`) two more outputs: the chunk contributions.
    ChunkedStateKeeping {
        chunk: usize,
        keep: bool,
    },
    Step,
    Window,
    Absorb,
    /// The backward pass of the attention form (`chunk: None`) or of the chunked form; which
    /// optional inputs (initial state, kept rows) and upstream gradients follow q, k, v (and
    /// the log-gates).
    Backward {
        chunk: Option<usize>,
        initial: bool,
        rows: bool,
        d_output: bool,
        d_state: bool,
        d_key_sum: bool,
    },
}

#[derive(Debug, Clone)]
struct RetentionOp<B> {
    desc: CustomOpIr,
    form: Form,
    gated: bool,
    options: RetentionOptions,
    _backend: PhantomData<B>,
}

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

impl<B: FusionBackend + RetentionBackend> Operation<B::FusionRuntime> for RetentionOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let mut inputs = self
            .desc
            .inputs
            .iter()
            .map(|t| handles.get_float_tensor::<B>(t))
            .collect::<Vec<_>>()
            .into_iter();
        let mut next = || inputs.next().expect("input count fixed at registration");
        if let Form::ChunkedState { chunk, initial } = self.form {
            let (k, v) = (next(), next());
            let log_g = self.gated.then(&mut next);
            let initial = initial.then(|| (next(), next()));
            let (s, z) = B::retention_chunked_state(k, v, log_g, initial, chunk, &self.options);
            for (ir, tensor) in self.desc.outputs.iter().zip([s, z]) {
                handles.register_float_tensor::<B>(&ir.id, tensor);
            }
            return;
        }
        if let Form::ChunkedStateKeeping { chunk, keep } = self.form {
            let (k, v) = (next(), next());
            let log_g = self.gated.then(&mut next);
            let (s, z, kept) =
                B::retention_chunked_state_keeping(k, v, log_g, chunk, &self.options);
            let mut outputs = vec![s, z];
            if keep {
                // registered only where the inner backend said it keeps them
                let kept =
                    kept.expect("the inner backend keeps the contributions it said it keeps");
                outputs.extend([kept.states, kept.sums]);
            }
            for (ir, tensor) in self.desc.outputs.iter().zip(outputs) {
                handles.register_float_tensor::<B>(&ir.id, tensor);
            }
            return;
        }
        if let Form::Absorb = self.form {
            let (keys, values) = (next(), next());
            let log_g = self.gated.then(&mut next);
            let (s0, z0) = (next(), next());
            let (s, z) = B::retention_absorb(keys, values, log_g, s0, z0, &self.options);
            for (ir, tensor) in self.desc.outputs.iter().zip([s, z]) {
                handles.register_float_tensor::<B>(&ir.id, tensor);
            }
            return;
        }
        let (q, k, v) = (next(), next(), next());
        let log_g = self.gated.then(&mut next);
        if let Form::Backward {
            chunk,
            initial,
            rows,
            d_output,
            d_state,
            d_key_sum,
        } = self.form
        {
            let initial = initial.then(|| (next(), next()));
            let rows = rows.then(|| ForwardRows {
                output: next(),
                normaliser: next(),
            });
            let inputs = RetentionInputs {
                q,
                k,
                v,
                log_g,
                initial,
                rows,
            };
            let upstream = ChunkedUpstream {
                output: d_output.then(&mut next),
                state: d_state.then(&mut next),
                key_sum: d_key_sum.then(&mut next),
            };
            let grads = match (chunk, upstream) {
                (Some(chunk), upstream) => {
                    B::retention_chunked_backward(inputs, chunk, upstream, &self.options)
                }
                (
                    None,
                    ChunkedUpstream {
                        output: Some(d_out),
                        ..
                    },
                ) => B::retention_attention_backward(inputs, d_out, &self.options),
                (None, _) => unreachable!("the attention form's backward has an output gradient"),
            };
            let RetentionGrads {
                q,
                k,
                v,
                log_g,
                initial,
            } = grads;
            let (s0, z0) = initial.unzip();
            let outputs = [Some(q), Some(k), Some(v), log_g, s0, z0]
                .into_iter()
                .flatten();
            for (ir, tensor) in self.desc.outputs.iter().zip(outputs) {
                handles.register_float_tensor::<B>(&ir.id, tensor);
            }
            return;
        }
        let outputs: Vec<FloatTensor<B>> = match self.form {
            Form::Attention => vec![B::retention_attention(q, k, v, log_g, &self.options)],
            Form::Chunked {
                chunk,
                initial,
                keep_rows: false,
                contributions,
            } => {
                let initial = initial.then(|| (next(), next()));
                let (y, s, z) = match contributions {
                    true => {
                        let kept = ChunkContributions {
                            states: next(),
                            sums: next(),
                        };
                        B::retention_chunked_from_contributions(
                            q,
                            k,
                            v,
                            log_g,
                            initial,
                            kept,
                            chunk,
                            &self.options,
                        )
                    }
                    false => B::retention_chunked(q, k, v, log_g, initial, chunk, &self.options),
                };
                vec![y, s, z]
            }
            Form::Chunked {
                chunk,
                initial,
                keep_rows: true,
                ..
            } => {
                let initial = initial.then(|| (next(), next()));
                let (y, s, z, rows) = B::retention_chunked_keeping_rows(
                    q,
                    k,
                    v,
                    log_g,
                    initial,
                    chunk,
                    &self.options,
                );
                // registered only where the inner backend said it keeps them
                let rows = rows.expect("the inner backend keeps the rows it said it keeps");
                vec![y, s, z, rows.output, rows.normaliser]
            }
            Form::Step => {
                let (s, z) = (next(), next());
                let (y, s, z) = B::retention_step(q, k, v, log_g, s, z, &self.options);
                vec![y, s, z]
            }
            Form::Window => {
                let (s, z) = (next(), next());
                vec![B::retention_window(q, k, v, log_g, s, z, &self.options)]
            }
            Form::Absorb
            | Form::ChunkedState { .. }
            | Form::ChunkedStateKeeping { .. }
            | Form::Backward { .. } => {
                unreachable!("handled above")
            }
        };
        for (ir, tensor) in self.desc.outputs.iter().zip(outputs) {
            handles.register_float_tensor::<B>(&ir.id, tensor);
        }
    }
}

/// Registers one form as a custom operation and returns its outputs.
fn register<B: FusionBackend + RetentionBackend>(
    name: &'static str,
    form: Form,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    gated: bool,
    outputs: Vec<(Shape, DType)>,
    options: &RetentionOptions,
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs: Vec<TensorIr> = outputs
        .into_iter()
        .map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype))
        .collect();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let op = RetentionOp::<B> {
        desc: desc.clone(),
        form,
        gated,
        options: options.clone(),
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op)
}

/// Output shapes and dtypes of the stateful forms: `y` in q's dtype, states as the reference
/// and the kernels return them (`f32` for half inputs, else the input dtype).
fn stateful_outputs(
    q: &FusionTensor<impl FusionRuntime>,
    v: &FusionTensor<impl FusionRuntime>,
    degree: usize,
    state_dtype: DType,
) -> Vec<(Shape, DType)> {
    let (b, t, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (h, e) = (v.shape[2], v.shape[3]);
    let big_d = expanded_dim(d, degree);
    vec![
        (Shape::from(vec![b, t, hq, e]), q.dtype),
        (Shape::from(vec![b, h, big_d, e]), state_dtype),
        (Shape::from(vec![b, h, big_d]), state_dtype),
    ]
}

impl<B: FusionBackend + RetentionBackend> RetentionBackend for Fusion<B> {
    fn retention_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        options: &RetentionOptions,
    ) -> FloatTensor<Self> {
        let (b, t, hq) = (q.shape[0], q.shape[1], q.shape[2]);
        let out = (Shape::from(vec![b, t, hq, v.shape[3]]), q.dtype);
        let gated = log_g.is_some();
        let inputs = [Some(q), Some(k), Some(v), log_g]
            .into_iter()
            .flatten()
            .collect();
        let mut outs = register::<B>(
            "power_retention_attention",
            Form::Attention,
            inputs,
            gated,
            vec![out],
            options,
        );
        outs.remove(0)
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
        let (y, s, z, _) = chunked::<B>(
            q,
            k,
            v,
            log_g,
            initial,
            chunk_size,
            options,
            ChunkedExtra::Plain,
        );
        (y, s, z)
    }

    fn retention_max_allocation(device: &Self::Device) -> Option<usize> {
        B::retention_max_allocation(device)
    }

    fn retention_direct_moves(device: &Self::Device) -> bool {
        B::retention_direct_moves(device)
    }

    fn retention_device_failure(device: &Self::Device) -> Option<String> {
        // what the inner backend recorded for the operations run so far; those still queued
        // report at a later call (`check_device` flushes first)
        B::retention_device_failure(device)
    }

    fn retention_flush(device: &Self::Device) {
        // runs this stream's queued operations (their kernels queued on the inner backend),
        // then flushes the inner backend, without waiting for the device
        let client = GlobalFusionClient::<B::FusionRuntime>::load(device);
        let device = device.clone();
        client.sync(move || B::retention_flush(&device));
    }

    fn retention_chunked_state(
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        initial: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        chunk_size: usize,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let state_dtype = match &initial {
            Some((s, _)) if s.dtype == DType::F64 => DType::F64,
            _ => compute_dtype(k.dtype),
        };
        let (b, h, d) = (k.shape[0], k.shape[2], k.shape[3]);
        let big_d = expanded_dim(d, options.degree);
        let outputs = vec![
            (Shape::from(vec![b, h, big_d, v.shape[3]]), state_dtype),
            (Shape::from(vec![b, h, big_d]), state_dtype),
        ];
        let gated = log_g.is_some();
        let form = Form::ChunkedState {
            chunk: chunk_size,
            initial: initial.is_some(),
        };
        let (s0, z0) = initial.unzip();
        let inputs = [Some(k), Some(v), log_g, s0, z0]
            .into_iter()
            .flatten()
            .collect();
        let outs = register::<B>(
            "power_retention_chunked_state",
            form,
            inputs,
            gated,
            outputs,
            options,
        );
        two(outs)
    }

    fn retention_keeps_contributions(
        device: &Self::Device,
        dtypes: &[DType],
        head_dim: usize,
        value_dim: usize,
        options: &RetentionOptions,
    ) -> bool {
        B::retention_keeps_contributions(device, dtypes, head_dim, value_dim, options)
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
        let (b, t, h, d) = (k.shape[0], k.shape[1], k.shape[2], k.shape[3]);
        let e = v.shape[3];
        let big_d = expanded_dim(d, options.degree);
        let state_dtype = compute_dtype(k.dtype);
        let keep =
            B::retention_keeps_contributions(k.client.device(), &[k.dtype, v.dtype], d, e, options);
        let mut outputs = vec![
            (Shape::from(vec![b, h, big_d, e]), state_dtype),
            (Shape::from(vec![b, h, big_d]), state_dtype),
        ];
        if keep {
            let n = t.div_ceil(chunk_size.max(1));
            outputs.push((Shape::from(vec![b, h, n, big_d, e]), DType::F32));
            outputs.push((Shape::from(vec![b, h, n, big_d]), DType::F32));
        }
        let gated = log_g.is_some();
        let form = Form::ChunkedStateKeeping {
            chunk: chunk_size,
            keep,
        };
        let inputs = [Some(k), Some(v), log_g].into_iter().flatten().collect();
        let mut outs = register::<B>(
            "power_retention_chunked_state_keeping",
            form,
            inputs,
            gated,
            outputs,
            options,
        )
        .into_iter();
        let mut next = || outs.next().expect("the outputs registered above");
        let (s, z) = (next(), next());
        let kept = keep.then(|| ChunkContributions {
            states: next(),
            sums: next(),
        });
        (s, z, kept)
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
        let extra = ChunkedExtra::FromContributions(contributions);
        let (y, s, z, _) = chunked::<B>(q, k, v, log_g, initial, chunk_size, options, extra);
        (y, s, z)
    }

    fn retention_keeps_rows(
        device: &Self::Device,
        dtypes: &[DType],
        head_dim: usize,
        value_dim: usize,
        options: &RetentionOptions,
    ) -> bool {
        B::retention_keeps_rows(device, dtypes, head_dim, value_dim, options)
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
        chunked::<B>(
            q,
            k,
            v,
            log_g,
            initial,
            chunk_size,
            options,
            ChunkedExtra::KeepRows,
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
        let state_dtype = if state.dtype == DType::F64 {
            DType::F64
        } else {
            compute_dtype(q.dtype)
        };
        let outputs = stateful_outputs(&q, &v, options.degree, state_dtype);
        let gated = log_g.is_some();
        let inputs = [Some(q), Some(k), Some(v), log_g, Some(state), Some(key_sum)]
            .into_iter()
            .flatten()
            .collect();
        let outs = register::<B>(
            "power_retention_step",
            Form::Step,
            inputs,
            gated,
            outputs,
            options,
        );
        three(outs)
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
        let (b, hq) = (q.shape[0], q.shape[2]);
        let out = (Shape::from(vec![b, 1, hq, values.shape[3]]), q.dtype);
        let gated = log_g.is_some();
        let inputs = [
            Some(q),
            Some(keys),
            Some(values),
            log_g,
            Some(state),
            Some(key_sum),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut outs = register::<B>(
            "power_retention_window",
            Form::Window,
            inputs,
            gated,
            vec![out],
            options,
        );
        outs.remove(0)
    }

    fn retention_absorb(
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        state: FloatTensor<Self>,
        key_sum: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let state_dtype = if state.dtype == DType::F64 {
            DType::F64
        } else {
            compute_dtype(keys.dtype)
        };
        let outputs = vec![
            (state.shape.clone(), state_dtype),
            (key_sum.shape.clone(), state_dtype),
        ];
        let gated = log_g.is_some();
        let inputs = [Some(keys), Some(values), log_g, Some(state), Some(key_sum)]
            .into_iter()
            .flatten()
            .collect();
        let outs = register::<B>(
            "power_retention_absorb",
            Form::Absorb,
            inputs,
            gated,
            outputs,
            options,
        );
        two(outs)
    }

    fn retention_attention_backward(
        inputs: RetentionInputs<Self>,
        d_output: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> RetentionGrads<Self> {
        let upstream = ChunkedUpstream {
            output: Some(d_output),
            state: None,
            key_sum: None,
        };
        backward::<B>(inputs, None, upstream, options)
    }

    fn retention_chunked_backward(
        inputs: RetentionInputs<Self>,
        chunk_size: usize,
        upstream: ChunkedUpstream<Self>,
        options: &RetentionOptions,
    ) -> RetentionGrads<Self> {
        backward::<B>(inputs, Some(chunk_size), upstream, options)
    }
}

/// Registers the chunked form; with [`ChunkedExtra::KeepRows`], also the rows its backward
/// pass takes, where the inner backend keeps them; with [`ChunkedExtra::FromContributions`],
/// reading kept chunk contributions.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn chunked<B: FusionBackend + RetentionBackend>(
    q: FloatTensor<Fusion<B>>,
    k: FloatTensor<Fusion<B>>,
    v: FloatTensor<Fusion<B>>,
    log_g: Option<FloatTensor<Fusion<B>>>,
    initial: Option<(FloatTensor<Fusion<B>>, FloatTensor<Fusion<B>>)>,
    chunk_size: usize,
    options: &RetentionOptions,
    extra: ChunkedExtra<B>,
) -> (
    FloatTensor<Fusion<B>>,
    FloatTensor<Fusion<B>>,
    FloatTensor<Fusion<B>>,
    Option<ForwardRows<Fusion<B>>>,
) {
    let state_dtype = match &initial {
        Some((s, _)) if s.dtype == DType::F64 => DType::F64,
        _ => compute_dtype(q.dtype),
    };
    let mut outputs = stateful_outputs(&q, &v, options.degree, state_dtype);
    let dtypes = input_dtypes::<Fusion<B>>([&q, &k, &v], initial.as_ref());
    let (d, e) = (q.shape[3], v.shape[3]);
    let keep_rows = matches!(extra, ChunkedExtra::KeepRows)
        && B::retention_keeps_rows(q.client.device(), &dtypes, d, e, options);
    if keep_rows {
        let (b, t, hq) = (q.shape[0], q.shape[1], q.shape[2]);
        outputs.push((Shape::from(vec![b, t, hq, e]), DType::F32));
        outputs.push((Shape::from(vec![b, t, hq]), DType::F32));
    }
    let gated = log_g.is_some();
    let has_initial = initial.is_some();
    let (s0, z0) = initial.unzip();
    let (states, sums) = match extra {
        ChunkedExtra::FromContributions(c) => (Some(c.states), Some(c.sums)),
        _ => (None, None),
    };
    let contributions = states.is_some();
    let inputs = [Some(q), Some(k), Some(v), log_g, s0, z0, states, sums]
        .into_iter()
        .flatten()
        .collect();
    let form = Form::Chunked {
        chunk: chunk_size,
        initial: has_initial,
        keep_rows,
        contributions,
    };
    let mut outs = register::<B>(
        "power_retention_chunked",
        form,
        inputs,
        gated,
        outputs,
        options,
    )
    .into_iter();
    let mut next = || outs.next().expect("the outputs registered above");
    let (y, s, z) = (next(), next(), next());
    let rows = keep_rows.then(|| ForwardRows {
        output: next(),
        normaliser: next(),
    });
    (y, s, z, rows)
}

/// What a chunked-form call does besides the form: nothing, keep the rows for the backward
/// pass, or read kept chunk contributions.
enum ChunkedExtra<B: FusionBackend> {
    Plain,
    KeepRows,
    FromContributions(ChunkContributions<Fusion<B>>),
}

/// Registers a backward pass: inputs q, k, v, log-gates, initial state, then the upstream
/// gradients present; outputs the gradients of the inputs present, in their shapes and dtypes.
fn backward<B: FusionBackend + RetentionBackend>(
    inputs: RetentionInputs<Fusion<B>>,
    chunk: Option<usize>,
    upstream: ChunkedUpstream<Fusion<B>>,
    options: &RetentionOptions,
) -> RetentionGrads<Fusion<B>> {
    let RetentionInputs {
        q,
        k,
        v,
        log_g,
        initial,
        rows,
    } = inputs;
    let form = Form::Backward {
        chunk,
        initial: initial.is_some(),
        rows: rows.is_some(),
        d_output: upstream.output.is_some(),
        d_state: upstream.state.is_some(),
        d_key_sum: upstream.key_sum.is_some(),
    };
    let gated = log_g.is_some();
    let has_initial = initial.is_some();
    let (s0, z0) = initial.unzip();
    let grads: Vec<_> = [
        Some(&q),
        Some(&k),
        Some(&v),
        log_g.as_ref(),
        s0.as_ref(),
        z0.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|t| (t.shape.clone(), t.dtype))
    .collect();
    let (y, normaliser) = rows.map(|r| (r.output, r.normaliser)).unzip();
    let inputs = [Some(q), Some(k), Some(v), log_g, s0, z0, y, normaliser]
        .into_iter()
        .chain([upstream.output, upstream.state, upstream.key_sum])
        .flatten()
        .collect();
    let mut outs = register::<B>(
        "power_retention_backward",
        form,
        inputs,
        gated,
        grads,
        options,
    )
    .into_iter();
    let mut next = || outs.next().expect("one gradient per input");
    let (dq, dk, dv) = (next(), next(), next());
    let log_g = gated.then(&mut next);
    let initial = has_initial.then(|| (next(), next()));
    RetentionGrads {
        q: dq,
        k: dk,
        v: dv,
        log_g,
        initial,
    }
}

fn two<T>(v: Vec<T>) -> (T, T) {
    let mut it = v.into_iter();
    match (it.next(), it.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("two outputs were registered"),
    }
}

fn three<T>(v: Vec<T>) -> (T, T, T) {
    let mut it = v.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => unreachable!("three outputs were registered"),
    }
}
