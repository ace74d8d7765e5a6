//! Recurrent form: one token in, O(1) work in the context length.

use burn::tensor::{DType, Tensor, backend::Backend};

use super::{ToDtype, compute_dtype, normalise};
use crate::feature_map::SympowLayout;

/// Advances the state by one token and reads it with the query:
/// `S ← g S + φ_K(k) vᵀ`, `z ← g z + φ_K(k)`, `y = φ_Q(σq)ᵀ S / φ_Q(σq)·z`, evaluated as
/// `y = (g φ_Q(σq)ᵀS_prev + (σq·k)^p v) / (g φ_Q(σq)·z_prev + (σq·k)^p)`.
///
/// # Shapes
/// - `q`: `[batch, 1, q_heads, head_dim]`, `k`: `[batch, 1, kv_heads, head_dim]`,
///   `v`: `[batch, 1, kv_heads, value_dim]`, `log_g`: `[batch, 1, kv_heads]`
/// - `state`: `[batch, kv_heads, D, value_dim]`, `key_sum`: `[batch, kv_heads, D]`
/// - returns `(output [batch, 1, q_heads, value_dim], state, key_sum)`
///
/// Inputs must already be validated (see [`power_retention_step`](crate::power_retention_step)).
#[allow(clippy::too_many_arguments)]
pub fn step<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    state: Tensor<B, 4>,
    key_sum: Tensor<B, 3>,
    degree: usize,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 3>) {
    let out_dtype = q.dtype();
    let dt = match state.dtype() {
        DType::F64 => DType::F64,
        _ => compute_dtype(out_dtype),
    };
    let [b, _, hq, d] = q.dims();
    let [_, _, h, e] = v.dims();
    let r = hq / h;
    let layout = SympowLayout::cached(d, degree);
    let big_d = layout.dim();

    let k = k.to_dtype(dt);
    let v = v.to_dtype(dt).reshape([b, h, 1, e]);
    let (mut state, mut key_sum) = (state.to_dtype(dt), key_sum.to_dtype(dt));
    if let Some(a) = log_g {
        let g = a.to_dtype(dt).reshape([b, h]).exp();
        state = state * g.clone().reshape([b, h, 1, 1]);
        key_sum = key_sum * g.reshape([b, h, 1]);
    }
    // Read before write: the state before this token goes through φ, the token itself through
    // its exact score (σ q·k)^p, which avoids φ's cancellation when q ⟂ k and the gate has
    // erased the past.
    let q = q.to_dtype(dt).mul_scalar(scale).reshape([b, h, r, d]);
    let phi_q = layout.expand_query(q.clone());
    let num_past = phi_q.clone().matmul(state.clone()); // [b, h, r, e]
    let den_past = phi_q
        .matmul(key_sum.clone().reshape([b, h, big_d, 1]))
        .clamp_min(0.0); // [b, h, r, 1]
    let k = k.reshape([b, h, 1, d]);
    let w_now = (q * k.clone()).sum_dim(3).powi_scalar(degree as i32); // [b, h, r, 1]
    let num = num_past + w_now.clone() * v.clone();
    let den = den_past + w_now;
    let y = normalise(num, den);

    let phi_k = layout.expand_key(k.reshape([b, h, d])); // [b, h, D]
    let state = state + phi_k.clone().reshape([b, h, big_d, 1]) * v;
    let key_sum = key_sum + phi_k;
    (y.reshape([b, 1, hq, e]).to_dtype(out_dtype), state, key_sum)
}
