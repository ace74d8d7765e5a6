//! The three forms of the op (attention, chunked, recurrent) agree with each other and with an
//! independent naive oracle, on randomized awkward shapes.

mod common;

use burn::tensor::{DType, Tensor};
use common::{Gates, Problem, max_rel, tensor, to_vec};
use rand::{Rng, SeedableRng, rngs::StdRng};
use retention::{
    DecodeState, RetentionBackend, RetentionOptions, RetentionState, SympowLayout, expanded_dim,
    power_retention, power_retention_decode, power_retention_step, power_retention_with_state,
    reference,
};

/// Number of randomized cases per dtype.
const CASES: u64 = 200;

struct Case {
    problem: Problem,
    chunk: usize,
    degree: usize,
}

fn case(i: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(0x5eed_0000 + i);
    let degree = if i % 10 == 9 { 4 } else { 2 };
    let dims = [8, 16, 24, 32, 48, 64, 96, 128];
    let d = if degree == 4 {
        8
    } else {
        dims[rng.random_range(0..dims.len())]
    };
    let e = if rng.random_bool(0.5) {
        d.min(32)
    } else {
        rng.random_range(1..=24)
    };
    let r = [1, 2, 4][(i % 3) as usize];
    let h = rng.random_range(1..=2);
    let b = if i % 7 == 0 {
        3
    } else {
        rng.random_range(1..=2)
    };
    let t: usize = rng.random_range(1..=33);
    let gates = [Gates::None, Gates::Typical, Gates::Strong, Gates::Weak][(i % 4) as usize];
    // keep the per-chunk states of the reference small: n·D·e·b·h ≲ 2M numbers
    let big_d = expanded_dim(d, degree);
    let max_chunks = (2_000_000 / (big_d * e * b * h)).max(1);
    let min_chunk = t.div_ceil(max_chunks).max(1);
    let chunk = rng.random_range(min_chunk..=(t + 4).max(min_chunk));
    Case {
        problem: Problem::random(i, b, t, h * r, h, d, e, gates),
        chunk,
        degree,
    }
}

fn recurrent<B: RetentionBackend>(
    p: &Problem,
    degree: usize,
    dev: &B::Device,
    dtype: DType,
) -> Vec<f64> {
    let opts = RetentionOptions::new().with_degree(degree);
    let mut state = RetentionState::<B>::zeros(p.b, p.h, p.d, p.e, degree, dtype, dev);
    let mut out = vec![Vec::new(); p.b];
    for i in 0..p.t {
        let (q, k, v, g) = p.slice(i, i + 1).tensors::<B>(dev, dtype);
        let (y, next) = power_retention_step(q, k, v, g, state, &opts).expect("valid step");
        state = next;
        let y = to_vec(y);
        let w = p.hq * p.e;
        for (bi, o) in out.iter_mut().enumerate() {
            o.extend_from_slice(&y[bi * w..(bi + 1) * w]);
        }
    }
    out.concat()
}

/// attention == chunked == recurrent == naive oracle, relative to the output scale.
///
/// For p = 4 in f32 the recurrent form gets 5× the tolerance: its past contributions go through
/// φ, whose sum is conditioned by `(Σ_a |q_a k_a|)^4 / (q·k)^4`.
pub fn forms_agree<B: RetentionBackend>(dev: &B::Device, dtype: DType, tol: f64) {
    // attention, chunked, recurrent p = 2, recurrent p = 4
    let mut worst = [0.0f64; 4];
    for i in 0..CASES {
        let Case {
            problem: p,
            chunk,
            degree,
        } = case(i);
        let scale = 1.0 / (p.d as f64).sqrt();
        let oracle = p.naive(degree, scale);
        let (q, k, v, g) = p.tensors::<B>(dev, dtype);
        let att =
            reference::attention_form(q.clone(), k.clone(), v.clone(), g.clone(), degree, scale);
        let (chk, _, _) = reference::chunked_form(q, k, v, g, None, chunk, degree, scale);
        let rec = recurrent::<B>(&p, degree, dev, dtype);
        let what = format!(
            "case {i}: b={} t={} hq={} h={} d={} e={} chunk={chunk} p={degree} gates={}",
            p.b,
            p.t,
            p.hq,
            p.h,
            p.d,
            p.e,
            p.log_g.is_some()
        );
        let e_att = max_rel(&to_vec(att), &oracle);
        let e_chk = max_rel(&to_vec(chk), &oracle);
        let e_rec = max_rel(&rec, &oracle);
        assert!(
            e_att <= tol,
            "attention form vs oracle {e_att:e} > {tol:e}; {what}"
        );
        assert!(
            e_chk <= tol,
            "chunked form vs oracle {e_chk:e} > {tol:e}; {what}"
        );
        let tol_rec = if degree == 4 && dtype != DType::F64 {
            5.0 * tol
        } else {
            tol
        };
        assert!(
            e_rec <= tol_rec,
            "recurrent form vs oracle {e_rec:e} > {tol_rec:e}; {what}"
        );
        let (rec2, rec4) = if degree == 4 {
            (0.0, e_rec)
        } else {
            (e_rec, 0.0)
        };
        for (w, e) in worst.iter_mut().zip([e_att, e_chk, rec2, rec4]) {
            *w = w.max(e);
        }
    }
    eprintln!(
        "{dtype:?}: worst max-rel error vs oracle over {CASES} cases: attention {:.2e}, chunked {:.2e}, recurrent {:.2e} (p=2) {:.2e} (p=4)",
        worst[0], worst[1], worst[2], worst[3]
    );
}

/// φ_Q(q)·φ_K(k) == (q·k)^p.
pub fn feature_map_identity<B: RetentionBackend>(dev: &B::Device, dtype: DType, tol: f64) {
    let mut rng = StdRng::seed_from_u64(7);
    for degree in [2, 4] {
        for d in [1, 3, 16, 24, 40, 64] {
            let layout = SympowLayout::new(d, degree);
            assert_eq!(layout.dim(), expanded_dim(d, degree));
            let n = 3;
            let q = common::randn(&mut rng, n * d);
            let k = common::randn(&mut rng, n * d);
            let fq = layout.expand_query(tensor::<B, 2>(&q, [n, d], dev, dtype));
            let fk = layout.expand_key(tensor::<B, 2>(&k, [n, d], dev, dtype));
            let got = to_vec((fq * fk).sum_dim(1));
            for i in 0..n {
                let dot: f64 = (0..d).map(|a| q[i * d + a] * k[i * d + a]).sum();
                let want = dot.powi(degree as i32);
                // relative to (Σ_a |q_a k_a|)^p, the size of the terms being summed
                let mag: f64 = (0..d)
                    .map(|a| (q[i * d + a] * k[i * d + a]).abs())
                    .sum::<f64>()
                    .powi(degree as i32);
                let err = (got[i] - want).abs() / mag.max(f64::MIN_POSITIVE);
                assert!(
                    err <= tol,
                    "p={degree} d={d}: φ(q)·φ(k) = {} vs (q·k)^p = {want}",
                    got[i]
                );
            }
        }
    }
}

/// Prefill `t1` tokens, then step each next token: equals the full-sequence output.
pub fn prefill_then_step<B: RetentionBackend>(dev: &B::Device, dtype: DType, tol: f64) {
    for (i, gates) in [Gates::Typical, Gates::None, Gates::Strong]
        .into_iter()
        .enumerate()
    {
        let p = Problem::random(100 + i as u64, 2, 29, 4, 2, 16, 8, gates);
        let full = to_vec({
            let (q, k, v, g) = p.tensors::<B>(dev, dtype);
            power_retention(q, k, v, g, &RetentionOptions::new()).expect("valid")
        });
        let t1 = 19;
        let opts = RetentionOptions::new().with_chunk_size(Some(5));
        let (q, k, v, g) = p.slice(0, t1).tensors::<B>(dev, dtype);
        let (y, mut state) = power_retention_with_state(q, k, v, g, None, &opts).expect("valid");
        let w = p.hq * p.e;
        let mut got: Vec<Vec<f64>> = to_vec(y).chunks(t1 * w).map(|c| c.to_vec()).collect();
        for s in t1..p.t {
            let (q, k, v, g) = p.slice(s, s + 1).tensors::<B>(dev, dtype);
            let (y, next) = power_retention_step(q, k, v, g, state, &opts).expect("valid");
            state = next;
            for (bi, row) in to_vec(y).chunks(w).enumerate() {
                got[bi].extend_from_slice(row);
            }
        }
        let err = max_rel(&got.concat(), &full);
        assert!(err <= tol, "prefill+step vs full ({gates:?}): {err:e}");
    }
}

/// Prefill, then decode on a [`DecodeState`] whose window is absorbed every 1…5 tokens (steps
/// with and without gates mixed): outputs equal the full-sequence output, and the absorbed
/// state equals the prefill of the whole sequence.
pub fn windowed_decode<B: RetentionBackend>(dev: &B::Device, dtype: DType, tol: f64) {
    // (gates, window, sequence, prefill): the last case absorbs a window longer than one
    // backend call takes (in two pieces)
    for (i, (gates, fold_every, t, t1)) in [
        (Gates::Typical, 3, 31, 18),
        (Gates::None, 1, 31, 18),
        (Gates::Strong, 5, 31, 18),
        (Gates::Weak, 4, 31, 18),
        (Gates::Typical, 40, 60, 10),
    ]
    .into_iter()
    .enumerate()
    {
        let p = Problem::random(300 + i as u64, 2, t, 4, 2, 16, 8, gates);
        let full = to_vec({
            let (q, k, v, g) = p.tensors::<B>(dev, dtype);
            power_retention(q, k, v, g, &RetentionOptions::new()).expect("valid")
        });
        let opts = RetentionOptions::new().with_chunk_size(Some(5));
        let (q, k, v, g) = p.slice(0, t1).tensors::<B>(dev, dtype);
        let (y, prefix) = power_retention_with_state(q, k, v, g, None, &opts).expect("valid");
        let mut state = DecodeState::new(prefix, fold_every).expect("in range");
        let w = p.hq * p.e;
        let mut got: Vec<Vec<f64>> = to_vec(y).chunks(t1 * w).map(|c| c.to_vec()).collect();
        for s in t1..p.t {
            assert_eq!(state.pending(), (s - t1) % fold_every);
            let (q, k, v, g) = p.slice(s, s + 1).tensors::<B>(dev, dtype);
            let (y, next) = power_retention_decode(q, k, v, g, state, &opts).expect("valid");
            state = next;
            for (bi, row) in to_vec(y).chunks(w).enumerate() {
                got[bi].extend_from_slice(row);
            }
        }
        let err = max_rel(&got.concat(), &full);
        assert!(
            err <= tol,
            "windowed decode vs full ({gates:?}, every {fold_every}): {err:e}"
        );
        let (q, k, v, g) = p.tensors::<B>(dev, dtype);
        let (_, want) = power_retention_with_state(q, k, v, g, None, &opts).expect("valid");
        let have = state.into_state(&opts).expect("valid");
        let err = max_rel(&to_vec(have.state), &to_vec(want.state))
            .max(max_rel(&to_vec(have.key_sum), &to_vec(want.key_sum)));
        assert!(
            err <= tol,
            "windowed decode state ({gates:?}, every {fold_every}): {err:e}"
        );
    }
}

/// Output on `[t1, t)` from the state of `[0, t1)` equals the single pass; final states agree,
/// and the final state is `Σ_j e^{G_T − G_j} φ_K(k_j) v_jᵀ` (layout check).
pub fn state_continuation<B: RetentionBackend>(dev: &B::Device, dtype: DType, tol: f64) {
    let p = Problem::random(200, 2, 37, 6, 3, 8, 5, Gates::Typical);
    for chunk in [Some(1), Some(4), Some(16), Some(64), None] {
        let opts = RetentionOptions::new().with_chunk_size(chunk);
        let (q, k, v, g) = p.tensors::<B>(dev, dtype);
        let (y_full, s_full) = power_retention_with_state(q, k, v, g, None, &opts).expect("valid");
        let t1 = 13;
        let (q, k, v, g) = p.slice(0, t1).tensors::<B>(dev, dtype);
        let (_, s1) = power_retention_with_state(q, k, v, g, None, &opts).expect("valid");
        let (q, k, v, g) = p.slice(t1, p.t).tensors::<B>(dev, dtype);
        let (y2, s2) = power_retention_with_state(q, k, v, g, Some(s1), &opts).expect("valid");
        let y_full = to_vec(y_full.narrow(1, t1, p.t - t1));
        let err = max_rel(&to_vec(y2), &y_full);
        assert!(err <= tol, "continued output, chunk {chunk:?}: {err:e}");
        let err = max_rel(&to_vec(s2.state.clone()), &to_vec(s_full.state.clone()));
        assert!(err <= tol, "continued state, chunk {chunk:?}: {err:e}");

        // direct sum over tokens, in f64 on the host
        let layout = SympowLayout::new(p.d, 2);
        let big_d = layout.dim();
        let mut s_want = vec![0.0; p.b * p.h * big_d * p.e];
        let mut z_want = vec![0.0; p.b * p.h * big_d];
        let g = p.log_g.as_ref().expect("gated problem");
        for bi in 0..p.b {
            for kv in 0..p.h {
                let mut decay = 0.0; // G_T − G_j, accumulated backwards
                for j in (0..p.t).rev() {
                    let kj = &p.k[((bi * p.t + j) * p.h + kv) * p.d..][..p.d];
                    let vj = &p.v[((bi * p.t + j) * p.h + kv) * p.e..][..p.e];
                    for f in 0..big_d {
                        let a = layout.indices(0)[f] as usize;
                        let c = layout.indices(1)[f] as usize;
                        let phi = layout.key_weights()[f] * kj[a] * kj[c] * f64::exp(decay);
                        z_want[(bi * p.h + kv) * big_d + f] += phi;
                        for (x, vx) in vj.iter().enumerate() {
                            s_want[((bi * p.h + kv) * big_d + f) * p.e + x] += phi * vx;
                        }
                    }
                    decay += g[(bi * p.t + j) * p.h + kv];
                }
            }
        }
        let err = max_rel(&to_vec(s_full.state), &s_want);
        assert!(
            err <= tol,
            "final state vs direct sum, chunk {chunk:?}: {err:e}"
        );
        let err = max_rel(&to_vec(s_full.key_sum), &z_want);
        assert!(
            err <= tol,
            "final key-sum vs direct sum, chunk {chunk:?}: {err:e}"
        );
    }
}

/// A sequence whose chunk states exceed `segment_elements` runs in segments that pass their
/// state on: output and final state equal one call's; a chunk whose state alone exceeds the
/// budget is refused.
pub fn segments_match_one_call<B: RetentionBackend>(dev: &B::Device, dtype: DType, tol: f64) {
    let p = Problem::random(500, 2, 45, 4, 2, 8, 5, Gates::Typical);
    let per_chunk = 2 * 2 * expanded_dim(8, 2) * 5;
    for (chunk, chunks_per_segment) in [(4, 1), (4, 3), (7, 2), (16, 1), (16, 2)] {
        let opts = RetentionOptions::new().with_chunk_size(Some(chunk));
        let segmented = opts
            .clone()
            .with_segment_elements(per_chunk * chunks_per_segment);
        let (q, k, v, g) = p.tensors::<B>(dev, dtype);
        let (y1, s1) =
            power_retention_with_state(q.clone(), k.clone(), v.clone(), g.clone(), None, &opts)
                .expect("valid");
        let (y2, s2) = power_retention_with_state(
            q.clone(),
            k.clone(),
            v.clone(),
            g.clone(),
            None,
            &segmented,
        )
        .expect("valid");
        let y3 = power_retention(q, k, v, g, &segmented).expect("valid");
        let y1 = to_vec(y1);
        let case = format!("chunk {chunk}, {chunks_per_segment} chunks per segment");
        let err = max_rel(&to_vec(y2), &y1);
        assert!(err <= tol, "segmented prefill output ({case}): {err:e}");
        let err = max_rel(&to_vec(y3), &y1);
        assert!(err <= tol, "segmented output ({case}): {err:e}");
        let err = max_rel(&to_vec(s2.state), &to_vec(s1.state))
            .max(max_rel(&to_vec(s2.key_sum), &to_vec(s1.key_sum)));
        assert!(err <= tol, "segmented final state ({case}): {err:e}");
    }
    let (q, k, v, g) = p.tensors::<B>(dev, dtype);
    let small = RetentionOptions::new()
        .with_chunk_size(Some(4))
        .with_segment_elements(per_chunk - 1);
    let e = power_retention(q, k, v, g, &small).expect_err("a chunk over the budget");
    assert!(
        matches!(
            e,
            retention::RetentionError::TooLarge {
                arg: "chunk state",
                ..
            }
        ),
        "{e}"
    );
}

/// Zero gates are the same as no gates; the scale cancels; a query of zeros gives zeros, not NaN;
/// strong gates keep only the current token.
pub fn gate_and_scale_properties<B: RetentionBackend>(dev: &B::Device, dtype: DType, tol: f64) {
    let p = Problem::random(300, 1, 21, 2, 1, 16, 16, Gates::None);
    for chunk in [None, Some(4)] {
        let opts = RetentionOptions::new().with_chunk_size(chunk);
        let (q, k, v, _) = p.tensors::<B>(dev, dtype);
        let zeros = Tensor::<B, 3>::zeros([1, 21, 1], (dev, dtype));
        let a =
            to_vec(power_retention(q.clone(), k.clone(), v.clone(), None, &opts).expect("valid"));
        let b = to_vec(
            power_retention(q.clone(), k.clone(), v.clone(), Some(zeros), &opts).expect("valid"),
        );
        assert!(max_rel(&a, &b) <= tol, "zero gates differ from no gates");
        let c = to_vec(
            power_retention(
                q.clone(),
                k.clone(),
                v.clone(),
                None,
                &opts.clone().with_scale(Some(0.02)),
            )
            .expect("valid"),
        );
        assert!(max_rel(&c, &a) <= tol, "scale does not cancel");
        let y = to_vec(
            power_retention(q.zeros_like(), k.clone(), v.clone(), None, &opts).expect("valid"),
        );
        assert!(
            y.iter().all(|x| *x == 0.0),
            "zero queries must give zeros, got {y:?}"
        );
        let strong = Tensor::<B, 3>::full([1, 21, 1], -60.0, (dev, dtype));
        let y = to_vec(power_retention(q, k, v.clone(), Some(strong), &opts).expect("valid"));
        let v = to_vec(v);
        let want: Vec<f64> = (0..21)
            .flat_map(|i| v[i * 16..(i + 1) * 16].repeat(2))
            .collect();
        assert!(
            max_rel(&y, &want) <= tol,
            "gates of e^-60 must keep only the current token"
        );
    }
}

#[allow(unused_macros)] // used only when a CPU backend feature is on
macro_rules! backend_suite {
    ($name:ident, $backend:ty, [$($dtype:ident => $tol:expr),+]) => {
        mod $name {
            use super::*;
            type B = $backend;
            fn each(f: fn(&burn::tensor::Device<B>, DType, f64)) {
                let dev = Default::default();
                $( f(&dev, DType::$dtype, $tol); )+
            }
            #[test] fn forms_agree_with_oracle() { each(super::forms_agree::<B>) }
            #[test] fn feature_map_inner_product_is_power_of_dot() { each(super::feature_map_identity::<B>) }
            #[test] fn prefill_then_step_matches_full_sequence() { each(super::prefill_then_step::<B>) }
            #[test] fn state_continuation_and_layout() { each(super::state_continuation::<B>) }
            #[test] fn windowed_decode_matches_full_sequence() { each(super::windowed_decode::<B>) }
            #[test] fn gates_scale_and_degenerate_rows() { each(super::gate_and_scale_properties::<B>) }
            #[test] fn segments_match_one_call() { each(super::segments_match_one_call::<B>) }
        }
    };
}

#[cfg(feature = "ndarray")]
backend_suite!(ndarray, burn::backend::NdArray, [F64 => 1e-10, F32 => 1e-4]);

#[cfg(feature = "tch")]
backend_suite!(tch, burn::backend::LibTorch, [F64 => 1e-10, F32 => 1e-4]);

/// A step, a prefill from a state and a decode state's absorption return the state in the
/// dtype it was given: an f64 model decoding on an f32 state keeps an f32 state, whose outputs
/// stay within f32 rounding of the f64 ones.
#[cfg(feature = "ndarray")]
#[test]
fn advancing_a_state_keeps_its_dtype() {
    type B = burn::backend::NdArray<f64>;
    let dev = Default::default();
    let p = Problem::random(600, 1, 24, 2, 1, 8, 4, Gates::Typical);
    let opts = RetentionOptions::new().with_chunk_size(Some(8));
    let (q, k, v, g) = p.slice(0, 16).tensors::<B>(&dev, DType::F64);
    let (_, wide) = power_retention_with_state(q, k, v, g, None, &opts).expect("valid");
    assert_eq!(wide.dtype(), DType::F64);
    let mut narrow = wide.clone().cast(DType::F32);
    let mut wide = wide;
    for s in 16..p.t {
        let (q, k, v, g) = p.slice(s, s + 1).tensors::<B>(&dev, DType::F64);
        let (y64, next64) =
            power_retention_step(q.clone(), k.clone(), v.clone(), g.clone(), wide, &opts)
                .expect("valid");
        let (y32, next32) = power_retention_step(q, k, v, g, narrow, &opts).expect("valid");
        assert_eq!(next64.dtype(), DType::F64, "an f64 state stays f64");
        assert_eq!(next32.dtype(), DType::F32, "an f32 state stays f32");
        assert_eq!(next32.key_sum.dtype(), DType::F32);
        let err = max_rel(&to_vec(y32), &to_vec(y64));
        assert!(err <= 1e-5, "f32 state, step {s}: {err:e}");
        assert!(err > 0.0, "the f32 state must round (step {s})");
        (wide, narrow) = (next64, next32);
    }
    // a prefill from a given state and a decode state's absorption keep its dtype too
    let (q, k, v, g) = p.slice(16, p.t).tensors::<B>(&dev, DType::F64);
    let (_, prefilled) =
        power_retention_with_state(q, k, v, g, Some(narrow.clone()), &opts).expect("valid");
    assert_eq!(
        prefilled.dtype(),
        DType::F32,
        "a prefill keeps its state's dtype"
    );
    let mut decoding = DecodeState::new(narrow, 2).expect("valid");
    for s in 16..p.t {
        let (q, k, v, g) = p.slice(s, s + 1).tensors::<B>(&dev, DType::F64);
        decoding = power_retention_decode(q, k, v, g, decoding, &opts)
            .expect("valid")
            .1;
        assert_eq!(decoding.base().dtype(), DType::F32, "absorption, step {s}");
    }
}

/// Gradients (dq, dk, dv, dlog_g) of the chunked form equal those of the attention form.
#[cfg(feature = "ndarray")]
#[test]
fn chunked_gradients_match_attention_gradients() {
    use burn::backend::{Autodiff, NdArray};
    type AD = Autodiff<NdArray>;
    let dev = Default::default();
    for (seed, gates) in [
        (400, Gates::Typical),
        (401, Gates::None),
        (402, Gates::Strong),
    ] {
        let p = Problem::random(seed, 2, 23, 4, 2, 8, 6, gates);
        let grads_of = |chunk: Option<usize>, segment_elements: usize| {
            let (q, k, v, g) = p.tensors::<AD>(&dev, DType::F64);
            let g = g.unwrap_or_else(|| Tensor::zeros([2, 23, 2], (&dev, DType::F64)));
            let (q, k, v, g) = (
                q.require_grad(),
                k.require_grad(),
                v.require_grad(),
                g.require_grad(),
            );
            let w = Tensor::<AD, 4>::from_data(
                burn::tensor::TensorData::new(
                    common::randn(&mut StdRng::seed_from_u64(seed), 2 * 23 * 4 * 6),
                    [2, 23, 4, 6],
                ),
                (&dev, DType::F64),
            );
            let opts = RetentionOptions::new()
                .with_chunk_size(chunk)
                .with_segment_elements(segment_elements);
            let y = power_retention(q.clone(), k.clone(), v.clone(), Some(g.clone()), &opts)
                .expect("valid");
            let grads = (y * w).sum().backward();
            let read = |x: &Tensor<AD, 4>| to_vec(x.grad(&grads).expect("gradient"));
            (
                read(&q),
                read(&k),
                read(&v),
                to_vec(g.grad(&grads).expect("gate gradient")),
            )
        };
        let a = grads_of(None, retention::DEFAULT_SEGMENT_ELEMENTS);
        let c = grads_of(Some(5), retention::DEFAULT_SEGMENT_ELEMENTS);
        // segments of two chunks (2 · b · h · D · e chunk-state elements): five segments,
        // gradients flowing back through the states passed between them
        let s = grads_of(Some(5), 2 * (2 * 2 * expanded_dim(8, 2) * 6));
        for (form, grads) in [("chunked", &c), ("segmented", &s)] {
            for (name, x, y) in [
                ("dq", &grads.0, &a.0),
                ("dk", &grads.1, &a.1),
                ("dv", &grads.2, &a.2),
                ("dlog_g", &grads.3, &a.3),
            ] {
                let err = max_rel(x, y);
                assert!(
                    err <= 1e-9,
                    "{name} ({gates:?}): {form} vs attention {err:e}"
                );
            }
        }
    }
}
