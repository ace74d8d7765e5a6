//! The plain-tensor reference: power retention written with Burn tensor ops only.
//!
//! It runs on every backend, is the default body of every
//! [`RetentionBackend`](crate::RetentionBackend) method, gets gradients through `Autodiff`, and
//! is the oracle the kernels are tested against. Half-precision inputs are computed in `f32`
//! (outputs are cast back; states stay in `f32`); `f32` and `f64` inputs are computed as given.
//!
//! All three forms compute, for query head `j` with key/value head `⌊j/r⌋`,
//! `y_i = Σ_{j≤i} w_ij v_j / Σ_{j≤i} w_ij` with `w_ij = (σ q_i·k_j)^p · exp(G_i − G_j)`,
//! `G` the inclusive cumulative sum of the log-gates. A row whose weights are all zero (for
//! example `q_i = 0`) gives `y_i = 0`.

mod attention;
mod backward;
mod chunked;
mod step;

pub use attention::attention_form;
pub use backward::{ChunkedGrads, chunked_backward};
pub use chunked::chunked_form;
pub use step::step;

use burn::tensor::{Bool, DType, Tensor, backend::Backend};

/// Stand-in for `−∞` that stays finite in `f32`; used to clamp row maxima so that a row with no
/// positive weight yields `0 / 0 → 0` instead of NaN.
pub(crate) const NEG_LARGE: f64 = -1.0e30;

/// `degree · ln|scores|`, with `−∞` where `hidden` is set or the score is exactly 0. Zero scores
/// are replaced by 1 before the logarithm, so the backward pass sees finite derivatives (and
/// zero gradient) there instead of `0 · ∞`.
pub(crate) fn log_power<B: Backend, const N: usize>(
    scores: Tensor<B, N>,
    hidden: Tensor<B, N, Bool>,
    degree: usize,
) -> Tensor<B, N> {
    let magnitude = scores.abs();
    let hidden = hidden.bool_or(magnitude.clone().equal_elem(0.0));
    magnitude
        .mask_fill(hidden.clone(), 1.0)
        .log()
        .mul_scalar(degree as f64)
        .mask_fill(hidden, f64::NEG_INFINITY)
}

/// `ln x` for `x ≥ 0`, `−∞` where `x ≤ 0`, with finite derivatives everywhere.
pub(crate) fn log_nonneg<B: Backend, const N: usize>(x: Tensor<B, N>) -> Tensor<B, N> {
    let empty = x.clone().lower_equal_elem(0.0);
    x.mask_fill(empty.clone(), 1.0)
        .log()
        .mask_fill(empty, f64::NEG_INFINITY)
}

/// `num / den` over the last axis, with 0 where `den ≤ 0` (no positive weight) instead of
/// `0/0`. `den` has size 1 in the last axis and broadcasts over `num`'s.
pub(crate) fn normalise<B: Backend, const N: usize>(
    num: Tensor<B, N>,
    den: Tensor<B, N>,
) -> Tensor<B, N> {
    let empty = den.clone().lower_equal_elem(0.0);
    let shape = num.dims();
    (num / den.mask_fill(empty.clone(), 1.0)).mask_fill(empty.expand(shape), 0.0)
}

/// Casting that skips the no-op case (a same-dtype `cast` copies the whole tensor on some
/// backends).
pub(crate) trait ToDtype {
    /// `self` in `dtype`.
    fn to_dtype(self, dtype: DType) -> Self;
}

impl<B: Backend, const N: usize> ToDtype for Tensor<B, N> {
    fn to_dtype(self, dtype: DType) -> Self {
        if self.dtype() == dtype {
            self
        } else {
            self.cast(dtype)
        }
    }
}

/// The dtype the reference computes in for inputs of dtype `dtype`.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Appends `pad` zero rows along dimension 1 (the sequence).
pub(crate) fn pad_seq<B: Backend, const N: usize>(x: Tensor<B, N>, pad: usize) -> Tensor<B, N> {
    if pad == 0 {
        return x;
    }
    let mut shape = x.dims();
    shape[1] = pad;
    let zeros = Tensor::<B, N>::zeros(shape, (&x.device(), x.dtype()));
    Tensor::cat(vec![x, zeros], 1)
}

/// Inclusive cumulative log-gates per key/value head, `[b, t, h]` → `[b, h, t]`, or zeros.
pub(crate) fn gate_or_zeros<B: Backend>(
    log_g: Option<Tensor<B, 3>>,
    shape: [usize; 3],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, 3> {
    match log_g {
        Some(a) => a.to_dtype(dtype),
        None => Tensor::zeros(shape, (device, dtype)),
    }
}
