//! `Autodiff<B>`: inference (no input tracked) runs the inner backend's forms, so
//! `Autodiff<Cuda>` uses the kernels. With tracked inputs the attention and chunked forms are
//! single graph nodes: the forward pass runs the inner backend and keeps the inputs (and, for
//! the chunked form, the output rows where the backend keeps them: `O(t)` either way), the
//! backward pass calls the inner backend's `retention_*_backward` (kernels where the backend
//! has them, else the reference). The decode forms differentiate through the plain-tensor
//! reference.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;

use crate::backend::{
    RetentionBackend, reference_absorb, reference_chunked_state, reference_step, reference_window,
};
use crate::backward::{ChunkedUpstream, RetentionGrads, RetentionInputs};
use crate::{ChunkContributions, RetentionOptions};

type Ad<B, C> = Autodiff<B, C>;

fn untracked<B: RetentionBackend, C: CheckpointStrategy>(
    tensors: &[Option<&FloatTensor<Ad<B, C>>>],
) -> bool {
    tensors
        .iter()
        .flatten()
        .all(|t| t.node.requirement.is_none())
}

fn wrap<B: RetentionBackend, C: CheckpointStrategy>(t: FloatTensor<B>) -> FloatTensor<Ad<B, C>> {
    FloatTensor::<Ad<B, C>>::new(t)
}

impl<B: RetentionBackend, C: CheckpointStrategy> RetentionBackend for Autodiff<B, C> {
    fn retention_flush(device: &Self::Device) {
        B::retention_flush(device);
    }

    fn retention_direct_moves(device: &Self::Device) -> bool {
        B::retention_direct_moves(device)
    }

    fn retention_device_failure(device: &Self::Device) -> Option<String> {
        B::retention_device_failure(device)
    }

    fn retention_max_allocation(device: &Self::Device) -> Option<usize> {
        B::retention_max_allocation(device)
    }

    fn retention_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        options: &RetentionOptions,
    ) -> FloatTensor<Self> {
        if !untracked::<B, C>(&[Some(&q), Some(&k), Some(&v), log_g.as_ref()]) {
            return tracked_attention::<B, C>(q, k, v, log_g, options);
        }
        wrap::<B, C>(B::retention_attention(
            q.primitive,
            k.primitive,
            v.primitive,
            log_g.map(|g| g.primitive),
            options,
        ))
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
        let tracked = !untracked::<B, C>(&[
            Some(&q),
            Some(&k),
            Some(&v),
            log_g.as_ref(),
            initial.as_ref().map(|(s, _)| s),
            initial.as_ref().map(|(_, z)| z),
        ]);
        if tracked {
            return tracked_chunked::<B, C>(q, k, v, log_g, initial, chunk_size, options);
        }
        let (y, s, z) = B::retention_chunked(
            q.primitive,
            k.primitive,
            v.primitive,
            log_g.map(|g| g.primitive),
            initial.map(|(s, z)| (s.primitive, z.primitive)),
            chunk_size,
            options,
        );
        (wrap::<B, C>(y), wrap::<B, C>(s), wrap::<B, C>(z))
    }

    fn retention_chunked_state(
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        initial: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        chunk_size: usize,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let tracked = !untracked::<B, C>(&[
            Some(&k),
            Some(&v),
            log_g.as_ref(),
            initial.as_ref().map(|(s, _)| s),
            initial.as_ref().map(|(_, z)| z),
        ]);
        if tracked {
            return reference_chunked_state::<Self>(k, v, log_g, initial, chunk_size, options);
        }
        let (s, z) = B::retention_chunked_state(
            k.primitive,
            v.primitive,
            log_g.map(|g| g.primitive),
            initial.map(|(s, z)| (s.primitive, z.primitive)),
            chunk_size,
            options,
        );
        (wrap::<B, C>(s), wrap::<B, C>(z))
    }

    fn retention_keeps_contributions(
        device: &Self::Device,
        dtypes: &[burn::tensor::DType],
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
        if !untracked::<B, C>(&[Some(&k), Some(&v), log_g.as_ref()]) {
            let (s, z) = Self::retention_chunked_state(k, v, log_g, None, chunk_size, options);
            return (s, z, None);
        }
        let (s, z, kept) = B::retention_chunked_state_keeping(
            k.primitive,
            v.primitive,
            log_g.map(|g| g.primitive),
            chunk_size,
            options,
        );
        let kept = kept.map(|c| ChunkContributions {
            states: wrap::<B, C>(c.states),
            sums: wrap::<B, C>(c.sums),
        });
        (wrap::<B, C>(s), wrap::<B, C>(z), kept)
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
        let tracked = !untracked::<B, C>(&[
            Some(&q),
            Some(&k),
            Some(&v),
            log_g.as_ref(),
            initial.as_ref().map(|(s, _)| s),
            initial.as_ref().map(|(_, z)| z),
        ]);
        if tracked {
            // a differentiated call keeps its inputs, not the contributions
            return Self::retention_chunked(q, k, v, log_g, initial, chunk_size, options);
        }
        let (y, s, z) = B::retention_chunked_from_contributions(
            q.primitive,
            k.primitive,
            v.primitive,
            log_g.map(|g| g.primitive),
            initial.map(|(s, z)| (s.primitive, z.primitive)),
            ChunkContributions {
                states: contributions.states.primitive,
                sums: contributions.sums.primitive,
            },
            chunk_size,
            options,
        );
        (wrap::<B, C>(y), wrap::<B, C>(s), wrap::<B, C>(z))
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
        let tracked = !untracked::<B, C>(&[
            Some(&q),
            Some(&k),
            Some(&v),
            log_g.as_ref(),
            Some(&state),
            Some(&key_sum),
        ]);
        if tracked {
            return reference_step::<Self>(q, k, v, log_g, state, key_sum, options);
        }
        let (y, s, z) = B::retention_step(
            q.primitive,
            k.primitive,
            v.primitive,
            log_g.map(|g| g.primitive),
            state.primitive,
            key_sum.primitive,
            options,
        );
        (wrap::<B, C>(y), wrap::<B, C>(s), wrap::<B, C>(z))
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
        let tracked = !untracked::<B, C>(&[
            Some(&q),
            Some(&keys),
            Some(&values),
            log_g.as_ref(),
            Some(&state),
            Some(&key_sum),
        ]);
        if tracked {
            return reference_window::<Self>(q, keys, values, log_g, state, key_sum, options);
        }
        wrap::<B, C>(B::retention_window(
            q.primitive,
            keys.primitive,
            values.primitive,
            log_g.map(|g| g.primitive),
            state.primitive,
            key_sum.primitive,
            options,
        ))
    }

    fn retention_absorb(
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        state: FloatTensor<Self>,
        key_sum: FloatTensor<Self>,
        options: &RetentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let tracked = !untracked::<B, C>(&[
            Some(&keys),
            Some(&values),
            log_g.as_ref(),
            Some(&state),
            Some(&key_sum),
        ]);
        if tracked {
            return reference_absorb::<Self>(keys, values, log_g, state, key_sum, options);
        }
        let (s, z) = B::retention_absorb(
            keys.primitive,
            values.primitive,
            log_g.map(|g| g.primitive),
            state.primitive,
            key_sum.primitive,
            options,
        );
        (wrap::<B, C>(s), wrap::<B, C>(z))
    }
}

/// Registers the gradients of the parents that are tracked. `parents` follow the order
/// `q, k, v, log_g, state, key_sum`; absent inputs stand in as `q`'s node and get nothing.
fn register<B: RetentionBackend, const N: usize>(
    parents: [Option<NodeId>; N],
    g: RetentionGrads<B>,
    grads: &mut Gradients,
) {
    let mut parents = parents.into_iter();
    let mut next = |value: Option<FloatTensor<B>>, grads: &mut Gradients| {
        if let (Some(Some(id)), Some(value)) = (parents.next(), value) {
            grads.register::<B>(id, value);
        }
    };
    next(Some(g.q), grads);
    next(Some(g.k), grads);
    next(Some(g.v), grads);
    next(g.log_g, grads);
    let (s, z) = g.initial.unzip();
    next(s, grads);
    next(z, grads);
}

/// The saved inputs of an attention node.
#[derive(Debug, Clone)]
struct AttentionSaved<B: RetentionBackend> {
    inputs: RetentionInputs<B>,
    options: RetentionOptions,
}

/// Backward step of the attention form (parents `q, k, v, log_g`).
#[derive(Debug)]
struct AttentionBackward;

impl<B: RetentionBackend> Backward<B, 4> for AttentionBackward {
    type State = AttentionSaved<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_output = grads.consume::<B>(&ops.node);
        let saved = ops.state;
        let g = B::retention_attention_backward(saved.inputs, d_output, &saved.options);
        register::<B, 4>(ops.parents.map(|p| p.map(|n| n.id)), g, grads);
    }
}

fn tracked_attention<B: RetentionBackend, C: CheckpointStrategy>(
    q: FloatTensor<Ad<B, C>>,
    k: FloatTensor<Ad<B, C>>,
    v: FloatTensor<Ad<B, C>>,
    log_g: Option<FloatTensor<Ad<B, C>>>,
    options: &RetentionOptions,
) -> FloatTensor<Ad<B, C>> {
    let dummy = q.node.clone();
    let nodes = [
        q.node.clone(),
        k.node.clone(),
        v.node.clone(),
        log_g.as_ref().map_or(dummy, |g| g.node.clone()),
    ];
    let inputs: RetentionInputs<B> = RetentionInputs {
        q: q.primitive,
        k: k.primitive,
        v: v.primitive,
        log_g: log_g.map(|g| g.primitive),
        initial: None,
        rows: None,
    };
    let y = <B as RetentionBackend>::retention_attention(
        inputs.q.clone(),
        inputs.k.clone(),
        inputs.v.clone(),
        inputs.log_g.clone(),
        options,
    );
    match AttentionBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            AttentionSaved {
                inputs,
                options: options.clone(),
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// Which output of the chunked form a backward step belongs to.
#[derive(Debug, Clone, Copy)]
enum ChunkedOutput {
    Output,
    State,
    KeySum,
}

/// The saved inputs of a chunked node.
#[derive(Debug, Clone)]
struct ChunkedSaved<B: RetentionBackend> {
    inputs: RetentionInputs<B>,
    chunk_size: usize,
    options: RetentionOptions,
}

/// Backward step of one output of the chunked form (parents `q, k, v, log_g, state,
/// key_sum`): each output that receives a gradient runs its own backward call, and the
/// gradients add up.
#[derive(Debug)]
struct ChunkedBackward(ChunkedOutput);

impl<B: RetentionBackend> Backward<B, 6> for ChunkedBackward {
    type State = ChunkedSaved<B>;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = Some(grads.consume::<B>(&ops.node));
        let upstream = match self.0 {
            ChunkedOutput::Output => ChunkedUpstream {
                output: grad,
                state: None,
                key_sum: None,
            },
            ChunkedOutput::State => ChunkedUpstream {
                output: None,
                state: grad,
                key_sum: None,
            },
            ChunkedOutput::KeySum => ChunkedUpstream {
                output: None,
                state: None,
                key_sum: grad,
            },
        };
        let saved = ops.state;
        let g =
            B::retention_chunked_backward(saved.inputs, saved.chunk_size, upstream, &saved.options);
        register::<B, 6>(ops.parents.map(|p| p.map(|n| n.id)), g, grads);
    }
}

#[allow(clippy::type_complexity)]
fn tracked_chunked<B: RetentionBackend, C: CheckpointStrategy>(
    q: FloatTensor<Ad<B, C>>,
    k: FloatTensor<Ad<B, C>>,
    v: FloatTensor<Ad<B, C>>,
    log_g: Option<FloatTensor<Ad<B, C>>>,
    initial: Option<(FloatTensor<Ad<B, C>>, FloatTensor<Ad<B, C>>)>,
    chunk_size: usize,
    options: &RetentionOptions,
) -> (
    FloatTensor<Ad<B, C>>,
    FloatTensor<Ad<B, C>>,
    FloatTensor<Ad<B, C>>,
) {
    let dummy = q.node.clone();
    let nodes = [
        q.node.clone(),
        k.node.clone(),
        v.node.clone(),
        log_g.as_ref().map_or(dummy.clone(), |g| g.node.clone()),
        initial
            .as_ref()
            .map_or(dummy.clone(), |(s, _)| s.node.clone()),
        initial.as_ref().map_or(dummy, |(_, z)| z.node.clone()),
    ];
    let mut inputs: RetentionInputs<B> = RetentionInputs {
        q: q.primitive,
        k: k.primitive,
        v: v.primitive,
        log_g: log_g.map(|g| g.primitive),
        initial: initial.map(|(s, z)| (s.primitive, z.primitive)),
        rows: None,
    };
    let (y, s, z, rows) = B::retention_chunked_keeping_rows(
        inputs.q.clone(),
        inputs.k.clone(),
        inputs.v.clone(),
        inputs.log_g.clone(),
        inputs.initial.clone(),
        chunk_size,
        options,
    );
    inputs.rows = rows;
    let saved = ChunkedSaved {
        inputs,
        chunk_size,
        options: options.clone(),
    };
    let node = |which: ChunkedOutput, out: FloatTensor<B>| match ChunkedBackward(which)
        .prepare::<C>(nodes.clone())
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(saved.clone(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    (
        node(ChunkedOutput::Output, y),
        node(ChunkedOutput::State, s),
        node(ChunkedOutput::KeySum, z),
    )
}
