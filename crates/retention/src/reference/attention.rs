//! Attention (quadratic) form with log-space stabilisation.

use burn::tensor::{Bool, Tensor, backend::Backend};

use super::{NEG_LARGE, ToDtype, compute_dtype, log_power};

/// Power retention in its attention form: materialises the `[t, t]` score matrix per head.
///
/// Scores are taken in log space, `ℓ_ij = p·ln|σ q_i·k_j| + G_i − G_j`, and each row is
/// shifted by its maximum before exponentiation, so neither large scores nor strong gates
/// overflow.
///
/// # Shapes
/// - `q`: `[batch, seq, q_heads, head_dim]`
/// - `k`: `[batch, seq, kv_heads, head_dim]`
/// - `v`: `[batch, seq, kv_heads, value_dim]`
/// - `log_g`: `[batch, seq, kv_heads]`
/// - output: `[batch, seq, q_heads, value_dim]`, dtype of `q`
///
/// Inputs must already be validated (see [`power_retention`](crate::power_retention)).
pub fn attention_form<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    degree: usize,
    scale: f64,
) -> Tensor<B, 4> {
    let out_dtype = q.dtype();
    let dt = compute_dtype(out_dtype);
    let device = q.device();
    let [b, t, hq, d] = q.dims();
    let [_, _, h, e] = v.dims();
    let r = hq / h;

    // [b, t, h, r, d] -> [b, h, r*t, d]; GQA: query head j reads kv head j / r
    let q = q
        .to_dtype(dt)
        .mul_scalar(scale)
        .reshape([b, t, h, r, d])
        .permute([0, 2, 3, 1, 4])
        .reshape([b, h, r * t, d]);
    let k = k.to_dtype(dt).permute([0, 2, 3, 1]); // [b, h, d, t]
    let v = v.to_dtype(dt).swap_dims(1, 2); // [b, h, t, e]

    let scores = q.matmul(k).reshape([b, h, r, t, t]);
    let future = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &device)
        .reshape([1, 1, 1, t, t])
        .expand([b, h, r, t, t]);
    let mut logits = log_power(scores, future, degree);
    if let Some(a) = log_g {
        let g = a.to_dtype(dt).swap_dims(1, 2).cumsum(2); // [b, h, t]
        logits = logits + g.clone().reshape([b, h, 1, t, 1]) - g.reshape([b, h, 1, 1, t]);
    }
    // the stabiliser cancels analytically: no gradient through it
    let row_max = logits.clone().max_dim(4).clamp_min(NEG_LARGE).detach();
    let weights = (logits - row_max).exp();
    // every non-empty row holds a weight of exactly 1, so the sum is 0 or >= 1
    let denom = weights
        .clone()
        .sum_dim(4)
        .clamp_min(1.0)
        .reshape([b, h, r * t, 1]);
    let num = weights.reshape([b, h, r * t, t]).matmul(v);
    (num / denom)
        .reshape([b, h, r, t, e])
        .permute([0, 3, 1, 2, 4])
        .reshape([b, t, hq, e])
        .to_dtype(out_dtype)
}
