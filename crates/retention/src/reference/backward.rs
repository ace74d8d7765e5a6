//! Gradients of the chunked form, written out (no `Autodiff`): the algorithm a backward
//! kernel follows, and the default backward of every backend.
//!
//! With `y_i = N_i / L_i`, `N_i = Σ_j w_ij v_j`, `L_i = Σ_j w_ij` (all terms scaled by the row's
//! `e^{−M_i}`) and the upstream gradient `dy`:
//! `dN_i = dy_i / L_i`, `dL_i = −(dy_i·y_i) / L_i`, and every weight gets
//! `dℓ_ij = w_ij (dN_i·v_j + dL_i)` on its log. Inside a chunk this is flash-attention's
//! backward with `∂ℓ/∂s = p/s` and `±dℓ` on the cumulative gates; across chunks the state path
//! reads `dS_u = Σ_i φ_Q(q̃_i) (e^{−M_i} dN_i)ᵀ`, scanned backwards with the chunk decays, and
//! each chunk's keys and values get theirs from the state gradient after their chunk. Gate
//! gradients are taken per position on the cumulative gates (query side minus key side) and
//! summed backwards once: no reduction runs over the `D·e` state elements, whose f32 sums lose
//! the gate gradient to cancellation.

use burn::tensor::{Tensor, backend::Backend};

use super::chunked::{ChunkedDims, ChunkedParts};
use super::{ToDtype, pad_seq};

/// Gradients of the chunked form's inputs.
pub struct ChunkedGrads<B: Backend> {
    /// `[b, t, hq, d]`, dtype of `q`.
    pub q: Tensor<B, 4>,
    /// `[b, t, h, d]`.
    pub k: Tensor<B, 4>,
    /// `[b, t, h, e]`.
    pub v: Tensor<B, 4>,
    /// `[b, t, h]`, present when gated.
    pub log_g: Option<Tensor<B, 3>>,
    /// Of the initial `(state, key_sum)`, present when given.
    pub initial: Option<(Tensor<B, 4>, Tensor<B, 3>)>,
}

/// Gradients of [`chunked_form`](super::chunked_form)'s inputs for the gradients of its
/// output (`d_out [b, t, hq, e]`), final state (`[b, h, D, e]`) and final key-sum (`[b, h, D]`),
/// each optional; input shapes as [`chunked_form`](super::chunked_form). The forward pass is
/// recomputed; nothing of it needs to be kept.
///
/// Inputs must already be validated (see [`power_retention`](crate::power_retention)).
#[allow(clippy::too_many_arguments)]
pub fn chunked_backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    initial: Option<(Tensor<B, 4>, Tensor<B, 3>)>,
    d_out: Option<Tensor<B, 4>>,
    d_final: (Option<Tensor<B, 4>>, Option<Tensor<B, 3>>),
    chunk_size: usize,
    degree: usize,
    scale: f64,
) -> ChunkedGrads<B> {
    let dtypes = (
        q.dtype(),
        k.dtype(),
        v.dtype(),
        initial.as_ref().map(|(s, z)| (s.dtype(), z.dtype())),
    );
    let gate_dtype = log_g.as_ref().map(|g| g.dtype());
    // one chunk, no initial state and no final-state gradient: the state path is zero
    let one_chunk = q.dims()[1] <= chunk_size;
    let stateless = one_chunk && initial.is_none() && d_final.0.is_none() && d_final.1.is_none();
    let (x, state) = if stateless {
        let x = ChunkedParts::intra_only(q, k, v, log_g, chunk_size, degree, scale);
        (x, None)
    } else {
        let (x, state) = ChunkedParts::new(q, k, v, log_g, initial, chunk_size, degree, scale);
        (x, Some(state))
    };
    let ChunkedDims {
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
        ..
    } = x.dims;
    let device = x.y.device();
    let dt = x.y.dtype();

    // output rows: dN = dy / L, dL = −(dy·y) / L  ([b, h, n, r, c, ·])
    let dy = match d_out {
        Some(dy) => pad_seq(dy.to_dtype(dt), n * c - t)
            .reshape([b, n, c, h, r, e])
            .permute([0, 3, 1, 4, 2, 5]),
        None => x.y.zeros_like(),
    };
    let d_num = dy.clone() / x.denom.clone();
    let d_den = -(dy * x.y.clone()).sum_dim(5) / x.denom.clone();

    // intra-chunk weights
    let rc = r * c;
    let d_num_rows = d_num.clone().reshape([b, h, n, rc, e]);
    let dw = d_num_rows
        .clone()
        .matmul(x.v.clone().swap_dims(3, 4))
        .reshape([b, h, n, r, c, c])
        + d_den.clone();
    let d_logit = x.weights.clone() * dw; // [b, h, n, r, c, c]
    let mut dv = x
        .weights
        .clone()
        .reshape([b, h, n, rc, c])
        .swap_dims(3, 4)
        .matmul(d_num_rows.clone()); // [b, h, n, c, e]
    let safe_scores = x.scores.clone().mask_fill(x.hidden.clone(), 1.0);
    let d_scores = (d_logit.clone() * p / safe_scores)
        .mask_fill(x.hidden.clone(), 0.0)
        .reshape([b, h, n, rc, c]);
    let mut dq = d_scores.clone().matmul(x.k.clone()); // [b, h, n, r·c, d]
    let mut dk = d_scores.swap_dims(3, 4).matmul(x.q.clone()); // [b, h, n, c, d]
    // gate gradients by position, on the cumulative gates G: every weight carries
    // e^{G_i − G_j}, so dG_i = Σ_j dℓ_ij (as a query) − Σ_i' dℓ_i'i (as a key); each side is a
    // short sum per position (no reduction over the state)
    let mut d_g = d_logit.clone().sum_dim(5).sum_dim(3).reshape([b, h, n, c])
        - d_logit.sum_dim(4).sum_dim(3).reshape([b, h, n, c]);

    let mut final_term = None;
    let mut d_initial = None;
    if let Some(st) = &state {
        // state path, query side: the state terms enter N and L scaled by e^{−M} (where L_state > 0)
        let live = st.l_state.clone().greater_elem(0.0);
        let e_m = x
            .row_max
            .clone()
            .neg()
            .exp()
            .mask_fill(live.bool_not(), 0.0); // [b, h, n, r, c, 1]
        let u = (d_num * e_m.clone()).reshape([b, h, n, rc, e]);
        let lam = (d_den * e_m).reshape([b, h, n, rc, 1]);
        let ds_local = st.phi_q.clone().swap_dims(3, 4).matmul(u.clone()); // [b, h, n, D, e]
        let dz_local = st
            .phi_q
            .clone()
            .swap_dims(3, 4)
            .matmul(lam.clone())
            .reshape([b, h, n, big_d]);
        let d_phi_q = u.matmul(st.s_used.clone().swap_dims(3, 4))
            + lam.matmul(st.z_used.clone().unsqueeze_dim::<5>(3)); // [b, h, n, r·c, D]
        let d_q_gated = x.layout.expand_backward(st.q_gated.clone(), d_phi_q, false);
        let q_decay = x
            .a_in
            .clone()
            .div_scalar(p)
            .exp()
            .reshape([b, h, n, 1, c, 1]);
        dq = dq
            + (d_q_gated.clone().reshape([b, h, n, r, c, d]) * q_decay).reshape([b, h, n, rc, d]);
        // the state path of query i is ∝ e^{G_i}: φ_Q(q e^{ā/p}) = e^{ā} φ_Q(q), so its
        // Σ_j dℓ_ij = (1/p) q̃·∂/∂q̃
        d_g = d_g
            + (d_q_gated * st.q_gated.clone())
                .sum_dim(4)
                .reshape([b, h, n, r, c])
                .sum_dim(3)
                .reshape([b, h, n, c])
                .div_scalar(p);

        // the scan, backwards: states entering chunks 0..n−1, then the final state
        // ⟨dS_T, S_T⟩ + ⟨dz_T, z_T⟩ per head: the final state's own gate gradient
        final_term = (d_final.0.is_some() || d_final.1.is_some()).then(|| {
            let mut term = Tensor::<B, 3>::zeros([b, h, 1], (&device, dt));
            if let Some(ds) = &d_final.0 {
                term = term
                    + (ds.clone().to_dtype(dt) * st.final_state.clone())
                        .reshape([b, h, big_d * e])
                        .sum_dim(2);
            }
            if let Some(dz) = &d_final.1 {
                term = term + (dz.clone().to_dtype(dt) * st.final_key_sum.clone()).sum_dim(2);
            }
            term
        });
        let d_final_s = d_final
            .0
            .map(|s| s.to_dtype(dt))
            .unwrap_or_else(|| Tensor::zeros([b, h, big_d, e], (&device, dt)));
        let d_final_z = d_final
            .1
            .map(|z| z.to_dtype(dt))
            .unwrap_or_else(|| Tensor::zeros([b, h, big_d], (&device, dt)));
        let ds_in = Tensor::cat(
            vec![
                ds_local.reshape([b, h, n, big_d * e]),
                d_final_s.reshape([b, h, 1, big_d * e]),
            ],
            2,
        ); // [b, h, n+1, D·e]
        let dz_in = Tensor::cat(vec![dz_local, d_final_z.reshape([b, h, 1, big_d])], 2);
        // λ_{u+1} = Σ_{u' > u} e^{C_{u'−1} − C_u} dS_{u'}: the gradient of the state after chunk u,
        // and so of ΔS_u (a product over the n + 1 states only)
        let d_delta_s = st.decay.clone().swap_dims(2, 3).matmul(ds_in.clone()); // [b, h, n, D·e]
        let d_delta_z = st.decay.clone().swap_dims(2, 3).matmul(dz_in.clone()); // [b, h, n, D]
        // the initial state enters chunk u as e^{C_{u−1}} S_0
        d_initial = st.initial.as_ref().map(|_| {
            let carry = st.carry.clone().reshape([b, h, 1, n + 1]);
            let ds0 = carry
                .clone()
                .matmul(ds_in.clone())
                .reshape([b, h, big_d, e]);
            let dz0 = carry.matmul(dz_in.clone()).reshape([b, h, big_d]);
            (ds0, dz0)
        });

        // chunk contributions: ΔS_u = Σ_τ φ_K(k̃_τ) v_τᵀ, k̃ = k e^{(A_u − ā)/p}
        let d_delta_s = d_delta_s.reshape([b, h, n, big_d, e]);
        let d_phi_k =
            x.v.clone().matmul(d_delta_s.clone().swap_dims(3, 4)) + d_delta_z.unsqueeze_dim::<5>(3); // [b, h, n, c, D]
        dv = dv + st.phi_k.clone().matmul(d_delta_s);
        let k_gated = x.k.clone() * st.key_decay.clone();
        let d_k_gated = x.layout.expand_backward(k_gated.clone(), d_phi_k, true);
        dk = dk + d_k_gated.clone() * st.key_decay.clone();
        let g_key = (d_k_gated * k_gated)
            .sum_dim(4)
            .reshape([b, h, n, c])
            .div_scalar(p);
        // keys reach later chunks (and the final state) ∝ e^{−G_j}: their Σ_i dℓ_ij = (1/p) k̃·∂/∂k̃
        d_g = d_g - g_key;
    }

    // the final state is a query at the last position: its terms are ∝ e^{G_T}
    let mut d_g = d_g.reshape([b, h, n * c]);
    if let Some(term) = final_term {
        let at_end = Tensor::cat(
            vec![
                Tensor::zeros([b, h, n * c - 1], (&device, dt)),
                term.reshape([b, h, 1]),
            ],
            2,
        );
        d_g = d_g + at_end;
    }
    // G = cumsum(log_g): d log_g_t = Σ_{i ≥ t} dG_i
    let d_gates = reverse_cumsum(d_g, 2).swap_dims(1, 2).narrow(1, 0, t);

    let dq = dq
        .reshape([b, h, n, r, c, d])
        .permute([0, 1, 3, 2, 4, 5]) // [b, h, r, n, c, d]
        .reshape([b, h, r, n * c, d])
        .permute([0, 3, 1, 2, 4]) // [b, n·c, h, r, d]
        .reshape([b, n * c, h * r, d])
        .narrow(1, 0, t)
        .mul_scalar(scale)
        .to_dtype(dtypes.0);
    let per_token = |x: Tensor<B, 5>, width: usize| {
        x.reshape([b, h, n * c, width])
            .swap_dims(1, 2)
            .narrow(1, 0, t)
    };
    ChunkedGrads {
        q: dq,
        k: per_token(dk, d).to_dtype(dtypes.1),
        v: per_token(dv, e).to_dtype(dtypes.2),
        log_g: gate_dtype.map(|dtype| d_gates.to_dtype(dtype)),
        initial: d_initial
            .zip(dtypes.3)
            .map(|((ds0, dz0), (st, zt))| (ds0.to_dtype(st), dz0.to_dtype(zt))),
    }
}

/// `out_i = Σ_{j ≥ i} x_j` along `dim`.
fn reverse_cumsum<B: Backend, const N: usize>(x: Tensor<B, N>, dim: usize) -> Tensor<B, N> {
    // flipped, not `total − prefix`: no cancellation when the terms are large
    let axis = dim as isize;
    x.flip([axis]).cumsum(dim).flip([axis])
}
