//! Gradients of the attention and chunked forms: the inputs a backward pass keeps, the
//! upstream gradients it receives, the gradients it returns, and the plain-tensor reference
//! (the default bodies of [`RetentionBackend`](crate::RetentionBackend)'s backward methods).
//!
//! A backward pass keeps only the op's inputs (`O(t)` memory) and recomputes what it needs:
//! the chunk states are never saved between the forward and the backward pass. The reference
//! is [`reference::chunked_backward`], the gradient written out in tensor ops (a backward pass
//! cannot run `Autodiff` inside itself); kernel backends override the methods.

use burn::tensor::{backend::Backend, ops::FloatTensor};

use crate::backend::{float, prim};
use crate::{RetentionOptions, reference};

/// What a forward call computed anyway and its backward pass would otherwise compute again:
/// the output rows before rounding to the inputs' dtype and each row's normaliser. `O(t·e)`
/// memory, like the inputs (flash attention keeps its output and log-sum-exp the same way);
/// the chunk states are never kept.
#[derive(Debug, Clone)]
pub struct ForwardRows<B: Backend> {
    /// The output rows `y`, `f32 [b, t, hq, e]`.
    pub output: FloatTensor<B>,
    /// Each row's normaliser `L` (`y = N / L`), `f32 [b, t, hq]`.
    pub normaliser: FloatTensor<B>,
}

/// The inputs of a forward call, kept for its backward pass.
///
/// Shapes as in [`RetentionBackend`](crate::RetentionBackend): `q [b, t, hq, d]`,
/// `k [b, t, h, d]`, `v [b, t, h, e]`, `log_g [b, t, h]`, initial
/// `(state [b, h, D, e], key_sum [b, h, D])`.
#[derive(Debug, Clone)]
pub struct RetentionInputs<B: Backend> {
    /// Queries.
    pub q: FloatTensor<B>,
    /// Keys.
    pub k: FloatTensor<B>,
    /// Values.
    pub v: FloatTensor<B>,
    /// Log-gates, if gated.
    pub log_g: Option<FloatTensor<B>>,
    /// Initial `(state, key_sum)` of the chunked form, if any.
    pub initial: Option<(FloatTensor<B>, FloatTensor<B>)>,
    /// The rows the forward call kept
    /// ([`retention_chunked_keeping_rows`](crate::RetentionBackend::retention_chunked_keeping_rows)),
    /// if it kept them; the backward pass computes them again otherwise.
    pub rows: Option<ForwardRows<B>>,
}

/// Gradients arriving at the outputs of a chunked call; `None` where an output received none.
#[derive(Debug, Clone)]
pub struct ChunkedUpstream<B: Backend> {
    /// Gradient of the output, `[b, t, hq, e]`.
    pub output: Option<FloatTensor<B>>,
    /// Gradient of the final state, `[b, h, D, e]`.
    pub state: Option<FloatTensor<B>>,
    /// Gradient of the final key-sum, `[b, h, D]`.
    pub key_sum: Option<FloatTensor<B>>,
}

/// Gradients of a call's inputs, in the shapes and dtypes of [`RetentionInputs`]; `log_g` and
/// `initial` are present exactly when the inputs had them.
#[derive(Debug, Clone)]
pub struct RetentionGrads<B: Backend> {
    /// `∂/∂q`.
    pub q: FloatTensor<B>,
    /// `∂/∂k`.
    pub k: FloatTensor<B>,
    /// `∂/∂v`.
    pub v: FloatTensor<B>,
    /// `∂/∂log_g`.
    pub log_g: Option<FloatTensor<B>>,
    /// `(∂/∂state, ∂/∂key_sum)` of the initial state.
    pub initial: Option<(FloatTensor<B>, FloatTensor<B>)>,
}

/// The reference gradient of the attention form (the trait's default body): the chunked
/// backward with one chunk holding the whole sequence.
pub(crate) fn reference_attention_backward<B: Backend>(
    inputs: RetentionInputs<B>,
    d_output: FloatTensor<B>,
    options: &RetentionOptions,
) -> RetentionGrads<B> {
    let t = float::<B, 4>(inputs.q.clone()).dims()[1];
    let upstream = ChunkedUpstream {
        output: Some(d_output),
        state: None,
        key_sum: None,
    };
    reference_chunked_backward(inputs, t, upstream, options)
}

/// The reference gradient of the chunked form (the trait's default body).
pub(crate) fn reference_chunked_backward<B: Backend>(
    inputs: RetentionInputs<B>,
    chunk_size: usize,
    upstream: ChunkedUpstream<B>,
    options: &RetentionOptions,
) -> RetentionGrads<B> {
    let q = float::<B, 4>(inputs.q);
    let scale = options.scale_for(q.dims()[3]);
    let g = reference::chunked_backward(
        q,
        float(inputs.k),
        float(inputs.v),
        inputs.log_g.map(float),
        inputs.initial.map(|(s, z)| (float(s), float(z))),
        upstream.output.map(float),
        (upstream.state.map(float), upstream.key_sum.map(float)),
        chunk_size,
        options.degree,
        scale,
    );
    RetentionGrads {
        q: prim(g.q),
        k: prim(g.k),
        v: prim(g.v),
        log_g: g.log_g.map(prim),
        initial: g.initial.map(|(s, z)| (prim(s), prim(z))),
    }
}
