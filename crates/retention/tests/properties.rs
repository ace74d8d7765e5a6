#![cfg(any(feature = "ndarray", feature = "wgpu"))]
//! Invariants of the op as property tests (proptest shrinks a failing case to a small one):
//! chunk-size invariance, batch independence, the GQA head mapping, prefill + decode and
//! continuation from a state against a single pass, and multi-token decoding with gates
//! against the attention form. On ndarray in f64 (every form exact up to rounding) and, with
//! the `wgpu` feature, on the kernels in f32 (Mesa lavapipe in CI).

mod common;

use burn::tensor::{DType, Tensor};
use common::{Gates, Problem, max_rel, to_vec};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use retention::{
    RetentionBackend, RetentionOptions, power_retention, power_retention_step,
    power_retention_with_state,
};

/// A random problem: batch 1–3, 1–2 key/value heads with 1–3 query heads each, head dims
/// 2–8, value dims 1–6, 1–40 tokens, every kind of gates.
fn problems() -> impl Strategy<Value = Problem> {
    (
        any::<u64>(),
        1usize..=3,
        1usize..=2,
        1usize..=3,
        prop::sample::select(vec![2usize, 4, 8]),
        1usize..=6,
        1usize..=40,
        prop::sample::select(vec![
            Gates::None,
            Gates::Typical,
            Gates::Strong,
            Gates::Weak,
        ]),
    )
        .prop_map(|(seed, b, h, r, d, e, t, gates)| {
            Problem::random(seed, b, t, h * r, h, d, e, gates)
        })
}

fn run<B: RetentionBackend>(
    dev: &B::Device,
    dtype: DType,
    p: &Problem,
    chunk: Option<usize>,
) -> Vec<f64> {
    let (q, k, v, g) = p.tensors::<B>(dev, dtype);
    let options = RetentionOptions::new().with_chunk_size(chunk);
    to_vec(power_retention(q, k, v, g, &options).expect("valid problem"))
}

/// Any chunk (1, 16, 64, the length, past it) gives the attention form's output.
fn chunk_size_does_not_change_the_output<B: RetentionBackend>(
    dev: &B::Device,
    dtype: DType,
    tol: f64,
    p: &Problem,
) -> Result<(), TestCaseError> {
    let want = run::<B>(dev, dtype, p, None);
    for chunk in [1, 16, 64, p.t, p.t + 5] {
        let err = max_rel(&run::<B>(dev, dtype, p, Some(chunk)), &want);
        prop_assert!(err <= tol, "chunk {}: {:e}", chunk, err);
    }
    Ok(())
}

/// A sequence's output does not depend on the other sequences of its batch.
fn sequences_of_a_batch_are_independent<B: RetentionBackend>(
    dev: &B::Device,
    dtype: DType,
    tol: f64,
    p: &Problem,
    chunk: usize,
) -> Result<(), TestCaseError> {
    let whole = run::<B>(dev, dtype, p, Some(chunk));
    let per_sequence = p.t * p.hq * p.e;
    for i in 0..p.b {
        let alone = run::<B>(dev, dtype, &p.sequence(i), Some(chunk));
        let err = max_rel(&alone, &whole[i * per_sequence..(i + 1) * per_sequence]);
        prop_assert!(err <= tol, "sequence {}: {:e}", i, err);
    }
    Ok(())
}

/// Query head `j` reads key/value head `j / r`: rotating the key/value heads, with their
/// groups of query heads, rotates the groups' outputs the same way.
fn rotating_kv_heads_rotates_their_query_groups<B: RetentionBackend>(
    dev: &B::Device,
    dtype: DType,
    tol: f64,
    p: &Problem,
    chunk: usize,
) -> Result<(), TestCaseError> {
    let a = run::<B>(dev, dtype, p, Some(chunk));
    let b = run::<B>(dev, dtype, &p.kv_heads_rotated(), Some(chunk));
    let r = p.hq / p.h;
    for row in 0..p.b * p.t {
        for j in 0..p.hq {
            let moved = (j + r) % p.hq;
            let x = &a[(row * p.hq + j) * p.e..][..p.e];
            let y = &b[(row * p.hq + moved) * p.e..][..p.e];
            prop_assert!(
                max_rel(y, x) <= tol,
                "row {} head {}: {:?} vs {:?}",
                row,
                j,
                x,
                y
            );
        }
    }
    Ok(())
}

/// A prefill of the first `s` tokens, then one step per token, gives the single pass's
/// outputs.
fn prefill_then_steps_equal_one_pass<B: RetentionBackend>(
    dev: &B::Device,
    dtype: DType,
    tol: f64,
    p: &Problem,
    s: usize,
    chunk: usize,
) -> Result<(), TestCaseError> {
    let options = RetentionOptions::new().with_chunk_size(Some(chunk));
    let want = run::<B>(dev, dtype, p, None);
    let mut got = Vec::new();
    let mut state = if s > 0 {
        let (q, k, v, g) = p.slice(0, s).tensors::<B>(dev, dtype);
        let (y, state) = power_retention_with_state(q, k, v, g, None, &options).expect("prefill");
        got.extend(rows_of(y));
        Some(state)
    } else {
        None
    };
    for i in s..p.t {
        let (q, k, v, g) = p.slice(i, i + 1).tensors::<B>(dev, dtype);
        let (y, next) = match state.take() {
            Some(state) => power_retention_step(q, k, v, g, state, &options).expect("step"),
            None => power_retention_with_state(q, k, v, g, None, &options).expect("first token"),
        };
        got.extend(rows_of(y));
        state = Some(next);
    }
    let err = max_rel(&batch_major(&got, p), &want);
    prop_assert!(err <= tol, "split {}: {:e}", s, err);
    Ok(())
}

/// Continuing from the state of the first `s` tokens with the next `extra` tokens at once (a
/// multi-token decode, gated) or with all the rest gives the attention form's outputs.
fn continuing_from_a_state_equals_one_pass<B: RetentionBackend>(
    dev: &B::Device,
    dtype: DType,
    tol: f64,
    p: &Problem,
    s: usize,
    chunk: usize,
    extra: usize,
) -> Result<(), TestCaseError> {
    let options = RetentionOptions::new().with_chunk_size(Some(chunk));
    let want = run::<B>(dev, dtype, p, None);
    let (q, k, v, g) = p.slice(0, s).tensors::<B>(dev, dtype);
    let (_, state) = power_retention_with_state(q, k, v, g, None, &options).expect("prefill");
    for end in [(s + extra).min(p.t), p.t] {
        let (q, k, v, g) = p.slice(s, end).tensors::<B>(dev, dtype);
        let (y, _) = power_retention_with_state(q, k, v, g, Some(state.clone()), &options)
            .expect("continues");
        let err = max_rel(&to_vec(y), &p.rows(&want, p.hq * p.e, s, end));
        prop_assert!(err <= tol, "tokens {}..{}: {:e}", s, end, err);
    }
    Ok(())
}

/// The properties as proptest tests on one backend: `$device` is `Some(device)`, or `None`
/// to skip (no GPU adapter).
macro_rules! property_suite {
    ($name:ident, $backend:ty, $dtype:expr, $tol:expr, $cases:expr, $device:expr) => {
        mod $name {
            use super::*;
            type B = $backend;

            proptest! {
                #![proptest_config(ProptestConfig { cases: $cases, ..ProptestConfig::default() })]

                #[test]
                fn chunk_size_does_not_change_the_output(p in problems()) {
                    let Some(dev) = $device else { return Ok(()) };
                    super::chunk_size_does_not_change_the_output::<B>(&dev, $dtype, $tol, &p)?;
                }

                #[test]
                fn sequences_of_a_batch_are_independent(p in problems(), chunk in 1usize..=24) {
                    let Some(dev) = $device else { return Ok(()) };
                    super::sequences_of_a_batch_are_independent::<B>(&dev, $dtype, $tol, &p, chunk)?;
                }

                #[test]
                fn rotating_kv_heads_rotates_their_query_groups(p in problems(), chunk in 1usize..=24) {
                    let Some(dev) = $device else { return Ok(()) };
                    super::rotating_kv_heads_rotates_their_query_groups::<B>(&dev, $dtype, $tol, &p, chunk)?;
                }

                #[test]
                fn prefill_then_steps_equal_one_pass(p in problems(), split in 0.0f64..1.0, chunk in 1usize..=24) {
                    let Some(dev) = $device else { return Ok(()) };
                    let s = ((p.t as f64) * split) as usize;
                    super::prefill_then_steps_equal_one_pass::<B>(&dev, $dtype, $tol, &p, s, chunk)?;
                }

                #[test]
                fn continuing_from_a_state_equals_one_pass(p in problems(), split in 0.0f64..1.0, chunk in 1usize..=24, extra in 1usize..=4) {
                    let s = ((p.t as f64) * split) as usize;
                    prop_assume!(s >= 1 && s < p.t);
                    let Some(dev) = $device else { return Ok(()) };
                    super::continuing_from_a_state_equals_one_pass::<B>(&dev, $dtype, $tol, &p, s, chunk, extra)?;
                }
            }
        }
    };
}

// every form is exact up to f64 rounding on the reference
#[cfg(feature = "ndarray")]
property_suite!(
    ndarray,
    burn::backend::NdArray<f64>,
    DType::F64,
    1e-9,
    48,
    Some(Default::default())
);

// the kernels in f32 (Mesa lavapipe in CI): the forward suite's tolerance
#[cfg(feature = "wgpu")]
property_suite!(
    wgpu,
    burn::backend::Wgpu,
    DType::F32,
    1e-4,
    12,
    common::adapter::<burn::backend::Wgpu>("wgpu properties")
);

/// A step's or prefill's output `[b, n, hq, e]` as its rows, sequence by sequence, in the
/// order the tokens came (gathered per call, put back batch-major by [`batch_major`]).
fn rows_of<B: RetentionBackend>(y: Tensor<B, 4>) -> Vec<(usize, Vec<f64>)> {
    let [b, n, hq, e] = y.dims();
    let data = to_vec(y);
    (0..b)
        .map(|i| (i, data[i * n * hq * e..(i + 1) * n * hq * e].to_vec()))
        .collect()
}

/// The per-call rows of [`rows_of`] as one `[b, t, hq, e]` output.
fn batch_major(calls: &[(usize, Vec<f64>)], p: &Problem) -> Vec<f64> {
    let mut per_sequence = vec![Vec::new(); p.b];
    for (i, rows) in calls {
        per_sequence[*i].extend_from_slice(rows);
    }
    per_sequence.concat()
}
