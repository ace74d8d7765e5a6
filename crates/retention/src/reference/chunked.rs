//! Chunked (linear-cost) form: per-chunk states, a discounted scan across chunks, and
//! query-state plus intra-chunk attention.

use std::sync::Arc;

use burn::tensor::{Bool, DType, Tensor, TensorData, backend::Backend};

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
///    scanned in order (the backward pass uses the equivalent `[n+1, n]` decay matrix).
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
    let (parts, state) = ChunkedParts::new(q, k, v, log_g, initial, chunk_size, degree, scale);
    let ChunkedDims {
        b,
        t,
        h,
        r,
        e,
        c,
        n,
        out_dtype,
        ..
    } = parts.dims;
    let y = parts
        .y
        .permute([0, 2, 4, 1, 3, 5]) // [b, n, c, h, r, e]
        .reshape([b, n * c, h * r, e])
        .narrow(1, 0, t)
        .to_dtype(out_dtype);
    (y, state.final_state, state.final_key_sum)
}

/// Sizes of a chunked call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkedDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub r: usize,
    pub d: usize,
    pub e: usize,
    pub c: usize,
    pub n: usize,
    pub big_d: usize,
    pub p: f64,
    pub out_dtype: DType,
}

/// The chunked forward pass with the intermediates its backward pass reads (computed in the
/// compute dtype, chunk-major layouts `[b, h, n, …]`): the intra-chunk part here, the state
/// path in [`StateParts`].
pub(crate) struct ChunkedParts<B: Backend> {
    pub dims: ChunkedDims,
    pub layout: Arc<SympowLayout>,
    /// `σ q`, `[b, h, n, r·c, d]`.
    pub q: Tensor<B, 5>,
    /// `[b, h, n, c, d]`.
    pub k: Tensor<B, 5>,
    /// `[b, h, n, c, e]`.
    pub v: Tensor<B, 5>,
    /// Cumulative log-gates inside chunks `ā`, `[b, h, n, c]`.
    pub a_in: Tensor<B, 4>,
    /// Scores `σ q·k` inside chunks, `[b, h, n, r, c, c]`, and where they are hidden.
    pub scores: Tensor<B, 6>,
    pub hidden: Tensor<B, 6, Bool>,
    /// Row maxima of the log-weights, `[b, h, n, r, c, 1]`.
    pub row_max: Tensor<B, 6>,
    /// Intra-chunk weights `e^{ℓ − M}`, `[b, h, n, r, c, c]`.
    pub weights: Tensor<B, 6>,
    /// Denominators (scaled by `e^{−M}`), `[b, h, n, r, c, 1]`.
    pub denom: Tensor<B, 6>,
    /// Output rows, `[b, h, n, r, c, e]`.
    pub y: Tensor<B, 6>,
}

/// The state path of a chunked forward pass (`D`-wide: the feature maps, the states).
pub(crate) struct StateParts<B: Backend> {
    /// `σ q e^{ā/p}`, the argument of `φ_Q`, `[b, h, n, r·c, d]`.
    pub q_gated: Tensor<B, 5>,
    /// `e^{(A_u − ā)/p}`, `[b, h, n, c, 1]`.
    pub key_decay: Tensor<B, 5>,
    /// `φ_K(k e^{(A_u − ā)/p})`, `[b, h, n, c, D]`.
    pub phi_k: Tensor<B, 5>,
    /// The scan as a matrix, `[b, h, n+1, n]`.
    pub decay: Tensor<B, 4>,
    /// `e^{C_{u−1}}`, the initial state's decay on entering chunk `u`, `[b, h, n+1]`.
    pub carry: Tensor<B, 3>,
    /// The initial state in the compute dtype, if any.
    pub initial: Option<(Tensor<B, 4>, Tensor<B, 3>)>,
    /// States entering each chunk, `[b, h, n, D, e]` and `[b, h, n, D]`.
    pub s_used: Tensor<B, 5>,
    pub z_used: Tensor<B, 4>,
    /// `φ_Q(q_gated)`, `[b, h, n, r·c, D]`.
    pub phi_q: Tensor<B, 5>,
    /// `φ_Q(q_gated)ᵀ S`, `[b, h, n, r, c, e]`.
    pub y_state: Tensor<B, 6>,
    /// `φ_Q(q_gated)·z`, clamped at 0, `[b, h, n, r, c, 1]`.
    pub l_state: Tensor<B, 6>,
    /// The state after the last chunk, `[b, h, D, e]` and `[b, h, D]`.
    pub final_state: Tensor<B, 4>,
    pub final_key_sum: Tensor<B, 3>,
}

impl<B: Backend> ChunkedParts<B> {
    /// The whole forward pass: the intra-chunk part and the state path.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        log_g: Option<Tensor<B, 3>>,
        initial: Option<(Tensor<B, 4>, Tensor<B, 3>)>,
        chunk_size: usize,
        degree: usize,
        scale: f64,
    ) -> (Self, StateParts<B>) {
        let prep = Prepared::new(q, k, v, log_g, chunk_size, degree, scale);
        let state = StateParts::new(&prep, initial);
        (Self::assemble(prep, Some(&state)), state)
    }

    /// The forward pass without a state path, for a call whose state path is zero: one chunk,
    /// no initial state (and no use of the final state).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn intra_only(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        log_g: Option<Tensor<B, 3>>,
        chunk_size: usize,
        degree: usize,
        scale: f64,
    ) -> Self {
        Self::assemble(
            Prepared::new(q, k, v, log_g, chunk_size, degree, scale),
            None,
        )
    }

    fn assemble(prep: Prepared<B>, state: Option<&StateParts<B>>) -> Self {
        let Prepared {
            dims,
            layout,
            q,
            k,
            v,
            a_in,
            ..
        } = prep;
        let ChunkedDims {
            b,
            h,
            r,
            c,
            n,
            e,
            d,
            p,
            ..
        } = dims;
        let degree = p as usize;
        let device = q.device();
        let qc = q.permute([0, 1, 3, 2, 4, 5]); // [b, h, n, r, c, d]
        // 4b. intra-chunk causal gated power scores, in log space
        let qc = qc.reshape([b, h, n, r * c, d]);
        let scores = qc
            .clone()
            .matmul(k.clone().swap_dims(3, 4))
            .reshape([b, h, n, r, c, c]);
        let hidden = Tensor::<B, 2, Bool>::tril_mask([c, c], 0, &device)
            .reshape([1, 1, 1, 1, c, c])
            .expand([b, h, n, r, c, c]);
        // zero scores are hidden too (weight 0, as `log_power` makes them)
        let hidden = hidden.bool_or(scores.clone().equal_elem(0.0));
        let logits = log_power(scores.clone(), hidden.clone(), degree)
            + a_in.clone().reshape([b, h, n, 1, c, 1])
            - a_in.clone().reshape([b, h, n, 1, 1, c]);

        // 4c. merge: y = (Σ w v + β ŷ_state) / (Σ w + β), every term scaled by the row maximum
        let row_max = logits.clone().max_dim(5);
        let state_terms = state.map(|st| {
            let y_state = normalise(st.y_state.clone(), st.l_state.clone());
            (y_state, log_nonneg(st.l_state.clone()))
        });
        let row_max = match &state_terms {
            Some((_, log_l_state)) => row_max.max_pair(log_l_state.clone()),
            None => row_max,
        };
        // the stabiliser cancels analytically: no gradient through it
        let row_max = row_max.clamp_min(NEG_LARGE).detach();
        let weights = (logits - row_max.clone()).exp();
        let mut num = weights
            .clone()
            .reshape([b, h, n, r * c, c])
            .matmul(v.clone())
            .reshape([b, h, n, r, c, e]);
        let mut denom = weights.clone().sum_dim(5);
        if let Some((y_state, log_l_state)) = state_terms {
            let beta = (log_l_state - row_max.clone()).exp();
            num = num + y_state * beta.clone();
            denom = denom + beta;
        }
        let denom = denom.clamp_min(1.0);
        let y = num / denom.clone();
        Self {
            dims,
            layout,
            q: qc,
            k,
            v,
            a_in,
            scores,
            hidden,
            row_max,
            weights,
            denom,
            y,
        }
    }
}

/// The inputs in the compute dtype and chunk-major layouts, and the gates inside chunks.
struct Prepared<B: Backend> {
    dims: ChunkedDims,
    layout: Arc<SympowLayout>,
    /// `σ q`, `[b, h, r, n, c, d]`.
    q: Tensor<B, 6>,
    k: Tensor<B, 5>,
    v: Tensor<B, 5>,
    /// `ā`, `[b, h, n, c]`.
    a_in: Tensor<B, 4>,
    /// `A_u`, `[b, h, n, 1]`.
    a_tot: Tensor<B, 4>,
}

impl<B: Backend> Prepared<B> {
    fn new(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        log_g: Option<Tensor<B, 3>>,
        chunk_size: usize,
        degree: usize,
        scale: f64,
    ) -> Self {
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

        Self {
            dims: ChunkedDims {
                b,
                t,
                h,
                r,
                d,
                e,
                c,
                n,
                big_d,
                p,
                out_dtype,
            },
            layout,
            q,
            k,
            v,
            a_in,
            a_tot,
        }
    }
}

impl<B: Backend> StateParts<B> {
    /// Steps 2, 3 and 4a of [`chunked_form`].
    fn new(prep: &Prepared<B>, initial: Option<(Tensor<B, 4>, Tensor<B, 3>)>) -> Self {
        let ChunkedDims {
            b,
            h,
            r,
            d,
            e,
            c,
            n,
            big_d,
            p,
            ..
        } = prep.dims;
        let layout = &prep.layout;
        let (k, v, a_in, a_tot) = (
            prep.k.clone(),
            prep.v.clone(),
            prep.a_in.clone(),
            prep.a_tot.clone(),
        );
        let device = k.device();
        let dt = k.dtype();
        let q = prep.q.clone();
        // 2. chunk contributions, keys discounted to the end of their chunk
        let key_decay = (a_tot.clone() - a_in.clone())
            .div_scalar(p)
            .exp()
            .unsqueeze_dim::<5>(4);
        let phi_k = layout.expand_key(k.clone() * key_decay.clone()); // [b, h, n, c, D]
        let delta_s = phi_k
            .clone()
            .swap_dims(3, 4)
            .matmul(v.clone())
            .reshape([b, h, n, big_d * e]);
        let delta_z = phi_k.clone().sum_dim(3).reshape([b, h, n, big_d]);

        // 3. the states entering each chunk, scanned in order (below); the backward pass takes
        //    the same scan as a product with the decay matrix
        //    decay[u, u'] = exp(C_{u-1} - C_{u'}) for u' < u, C = cumulative chunk totals,
        //    and the initial state's decay `carry`, both built here
        let cum = a_tot.clone().reshape([b, h, n]).cumsum(2);
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
        // scanned in order, a non-finite value in a chunk reaches later chunks only (in the
        // product, the zeros above the diagonal would carry it to earlier ones as 0·NaN)
        let carry = prev.exp(); // e^{C_{u-1}}
        let initial = initial.map(|(s0, z0)| (s0.to_dtype(dt), z0.to_dtype(dt)));
        let (mut s, mut z) = match &initial {
            Some((s0, z0)) => (
                s0.clone().reshape([b, h, big_d * e]),
                z0.clone().reshape([b, h, big_d]),
            ),
            None => (
                Tensor::zeros([b, h, big_d * e], (&device, dt)),
                Tensor::zeros([b, h, big_d], (&device, dt)),
            ),
        };
        let chunk_decay = a_tot.clone().reshape([b, h, n]).exp();
        let (mut s_seq, mut z_seq) = (vec![s.clone()], vec![z.clone()]);
        for u in 0..n {
            let g = chunk_decay.clone().narrow(2, u, 1);
            s = s * g.clone() + delta_s.clone().narrow(2, u, 1).reshape([b, h, big_d * e]);
            z = z * g + delta_z.clone().narrow(2, u, 1).reshape([b, h, big_d]);
            s_seq.push(s.clone());
            z_seq.push(z.clone());
        }
        let s_in = Tensor::stack::<4>(s_seq, 2).reshape([b, h, n + 1, big_d, e]);
        let z_in = Tensor::stack::<4>(z_seq, 2); // [b, h, n+1, D]
        let final_state = s_in.clone().narrow(2, n, 1).reshape([b, h, big_d, e]);
        let final_key_sum = z_in.clone().narrow(2, n, 1).reshape([b, h, big_d]);
        let s_used = s_in.narrow(2, 0, n); // [b, h, n, D, e]
        let z_used = z_in.narrow(2, 0, n); // [b, h, n, D]

        // 4a. query-state products, queries decayed from the chunk start
        let qc = q.permute([0, 1, 3, 2, 4, 5]); // [b, h, n, r, c, d]
        let q_decay = a_in.clone().div_scalar(p).exp().reshape([b, h, n, 1, c, 1]);
        let q_gated = (qc.clone() * q_decay).reshape([b, h, n, r * c, d]);
        let phi_q = layout.expand_query(q_gated.clone()); // [b, h, n, r·c, D]
        let y_state = phi_q
            .clone()
            .matmul(s_used.clone())
            .reshape([b, h, n, r, c, e]);
        let l_state = phi_q
            .clone()
            .matmul(z_used.clone().unsqueeze_dim::<5>(4))
            .reshape([b, h, n, r, c, 1])
            .clamp_min(0.0);

        Self {
            q_gated,
            key_decay,
            phi_k,
            decay,
            carry,
            initial,
            s_used,
            z_used,
            phi_q,
            y_state,
            l_state,
            final_state,
            final_key_sum,
        }
    }
}
