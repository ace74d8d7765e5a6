//! `Autodiff<B>`: inference (no input tracked) runs the inner backend's forms, so
//! `Autodiff<Cuda>` uses the kernels; tracked inputs differentiate through the plain-tensor
//! reference.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::ops::FloatTensor;

use crate::RetentionOptions;
use crate::backend::{
    RetentionBackend, reference_absorb, reference_attention, reference_chunked, reference_step,
    reference_window,
};

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
    fn retention_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_g: Option<FloatTensor<Self>>,
        options: &RetentionOptions,
    ) -> FloatTensor<Self> {
        if !untracked::<B, C>(&[Some(&q), Some(&k), Some(&v), log_g.as_ref()]) {
            return reference_attention::<Self>(q, k, v, log_g, options);
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
            return reference_chunked::<Self>(q, k, v, log_g, initial, chunk_size, options);
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
