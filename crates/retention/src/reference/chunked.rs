//! Chunked (linear-cost) form: per-chunk states, a discounted scan across chunks, and
//! query-state plus intra-chunk attention.

use burn::tensor::{Bool, Tensor, TensorData, backend::Backend};

use super::{
    NEG_LARGE, ToDtype, compute_dtype, gate_or_zeros, log_nonneg, log_power, normalise, pad_seq,
};
use crate::feature_map::SympowLayout;

/// Power retention in its chunked form, with an optional initial state; returns the output
/// and the state after the last token.
///
/// Algorithm (per key/value head, chunk length `c`, `n = ⌈t/c⌉` chunks, zero padding):
/// 1. `ā` = cumulative log-gates inside each chunk, `A_u` = the chunk total.
/// 2. `ΔS_u = Σ_τ φ_K(k_τ e^{(A_u − ā_τ)/p}) v_τᵀ`, `Δz_u = Σ_τ φ_K(…)`: each chunk's keys
///    discounted to the chunk end.
/// 3. `S_u = e^{A_{u−1}} S_{u−1} + ΔS_{u−1}` (state entering chunk `u`, `S_0` = initial state),
///    computed for all chunks at once as one product with the `[n+1, n]` decay matrix.
/// 4. Output = normalised merge of `φ_Q(q_τ e^{ā_τ/p})ᵀ S_u` and causal gated power attention
///    inside the chunk, stabilised in log space.
///
/// # Shapes
/// - `q`: `[batch, seq, q_heads, head_dim]`, `k`: `[batch, seq, kv_heads, head_dim]`,
///   `v`: `[batch, seq, kv_heads, value_dim]`, `log_g`: `[batch, seq, kv_heads]`
/// - `initial`: `(state [batch, kv_heads, D, value_dim], key_sum [batch, kv_heads, D])`
/// - returns `(output [batch, seq, q_heads, value_dim], state, key_sum)`
///
/// Inputs must already be validated (see [`power_retention`](crate::power_retention)).
#[allow(clippy::too_many_arguments)]
pub fn chunked_form<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    initial: Option<(Tensor<B, 4>, Tensor<B, 3>)>,
    chunk_size: usize,
    degree: usize,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 3>) {
    let out_dtype = q.dtype();
    let dt = compute_dtype(out_dtype);
    let device = q.device();
    let [b, t, hq, d] = q.dims();
    let [_, _, h, e] = v.dims();
    let r = hq / h;
    let c = chunk_size;
    let n = t.div_ceil(c).max(1);
    let pad = n * c - t;
    let layout = SympowLayout::cached(d, degree);
    let big_d = layout.dim();
    let p = degree as f64;

    let q = pad_seq(q.to_dtype(dt).mul_scalar(scale), pad)
        .reshape([b, n * c, h, r, d])
        .permute([0, 2, 3, 1, 4])
        .reshape([b, h, r, n, c, d]);
    let k = pad_seq(k.to_dtype(dt), pad)
        .swap_dims(1, 2)
        .reshape([b, h, n, c, d]);
    let v = pad_seq(v.to_dtype(dt), pad)
        .swap_dims(1, 2)
        .reshape([b, h, n, c, e]);
    let a = pad_seq(gate_or_zeros(log_g, [b, t, h], dt, &device), pad)
        .swap_dims(1, 2)
        .reshape([b, h, n, c]);

    // 1. gates inside chunks
    let a_in = a.cumsum(3); // ā, [b, h, n, c]
    let a_tot = a_in.clone().narrow(3, c - 1, 1); // A_u, [b, h, n, 1]

    // 2. chunk contributions, keys discounted to the end of their chunk
    let key_decay = (a_tot.clone() - a_in.clone()).div_scalar(p).exp();
    let phi_k = layout.expand_key(k.clone() * key_decay.unsqueeze_dim::<5>(4)); // [b,h,n,c,D]
    let delta_s = phi_k.clone().swap_dims(3, 4).matmul(v.clone()); // [b, h, n, D, e]
    let delta_z = phi_k.sum_dim(3).reshape([b, h, n, big_d]);

    // 3. discounted scan across chunks as a product with the decay matrix
    //    decay[u, u'] = exp(C_{u-1} - C_{u'}) for u' < u, C = cumulative chunk totals
    let cum = a_tot.reshape([b, h, n]).cumsum(2);
    let prev = Tensor::cat(
        vec![Tensor::zeros([b, h, 1], (&device, dt)), cum.clone()],
        2,
    );
    let lower: Vec<f64> = (0..=n)
        .flat_map(|u| (0..n).map(move |u2| if u2 < u { 1.0 } else { 0.0 }))
        .collect();
    let lower = Tensor::<B, 2>::from_data(TensorData::new(lower, [n + 1, n]), (&device, dt))
        .reshape([1, 1, n + 1, n]);
    let decay = (prev.clone().reshape([b, h, n + 1, 1]) - cum.reshape([b, h, 1, n]))
        .clamp_max(0.0)
        .exp()
        * lower;
    let mut s_in = decay
        .clone()
        .matmul(delta_s.reshape([b, h, n, big_d * e]))
        .reshape([b, h, n + 1, big_d, e]);
    let mut z_in = decay.matmul(delta_z); // [b, h, n+1, D]
    if let Some((s0, z0)) = initial {
        let carry = prev.exp(); // e^{C_{u-1}}: the initial state's decay on entering chunk u
        s_in = s_in
            + s0.to_dtype(dt).unsqueeze_dim::<5>(2) * carry.clone().reshape([b, h, n + 1, 1, 1]);
        z_in = z_in + z0.to_dtype(dt).unsqueeze_dim::<4>(2) * carry.reshape([b, h, n + 1, 1]);
    }
    let final_state = s_in.clone().narrow(2, n, 1).reshape([b, h, big_d, e]);
    let final_key_sum = z_in.clone().narrow(2, n, 1).reshape([b, h, big_d]);
    let s_used = s_in.narrow(2, 0, n); // [b, h, n, D, e]
    let z_used = z_in.narrow(2, 0, n).unsqueeze_dim::<5>(4); // [b, h, n, D, 1]

    // 4a. query-state products, queries decayed from the chunk start
    let q_decay = a_in.clone().div_scalar(p).exp().reshape([b, h, 1, n, c, 1]);
    let phi_q = layout
        .expand_query(q.clone() * q_decay)
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b, h, n, r * c, big_d]);
    let y_state = phi_q.clone().matmul(s_used).reshape([b, h, n, r, c, e]);
    let l_state = phi_q
        .matmul(z_used)
        .reshape([b, h, n, r, c, 1])
        .clamp_min(0.0);

    // 4b. intra-chunk causal gated power scores, in log space
    let qc = q.permute([0, 1, 3, 2, 4, 5]).reshape([b, h, n, r * c, d]);
    let scores = qc.matmul(k.swap_dims(3, 4)).reshape([b, h, n, r, c, c]);
    let future = Tensor::<B, 2, Bool>::tril_mask([c, c], 0, &device)
        .reshape([1, 1, 1, 1, c, c])
        .expand([b, h, n, r, c, c]);
    let logits = log_power(scores, future, degree) + a_in.clone().reshape([b, h, n, 1, c, 1])
        - a_in.reshape([b, h, n, 1, 1, c]);

    // 4c. merge: y = (Σ w v + β ŷ_state) / (Σ w + β), every term scaled by the row maximum
    let y_state = normalise(y_state, l_state.clone());
    let log_l_state = log_nonneg(l_state);
    // the stabiliser cancels analytically: no gradient through it
    let row_max = logits
        .clone()
        .max_dim(5)
        .max_pair(log_l_state.clone())
        .clamp_min(NEG_LARGE)
        .detach();
    let weights = (logits - row_max.clone()).exp();
    let beta = (log_l_state - row_max).exp();
    let num = weights
        .clone()
        .reshape([b, h, n, r * c, c])
        .matmul(v)
        .reshape([b, h, n, r, c, e])
        + y_state * beta.clone();
    let denom = (weights.sum_dim(5) + beta).clamp_min(1.0);
    let y = (num / denom)
        .permute([0, 2, 4, 1, 3, 5]) // [b, n, c, h, r, e]
        .reshape([b, n * c, hq, e])
        .narrow(1, 0, t)
        .to_dtype(out_dtype);
    (y, final_state, final_key_sum)
}
