#![cfg(feature = "ndarray")]
//! Every `RetentionError` variant is reachable and its message names the argument, the
//! expectation and what was given.

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor};
use retention::{
    PowerRetentionConfig, RetentionError, RetentionOptions, RetentionState, check_shapes,
    power_retention, power_retention_step, power_retention_with_state,
};

type B = NdArray;

fn t4(shape: [usize; 4]) -> Tensor<B, 4> {
    Tensor::ones(shape, &Default::default())
}

fn err_of(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    g: Option<&[usize]>,
    o: &RetentionOptions,
) -> RetentionError {
    match check_shapes(q, k, v, g, o) {
        Err(e) => e,
        Ok(d) => panic!("expected an error for q {q:?} k {k:?} v {v:?} g {g:?}, got {d:?}"),
    }
}

fn assert_msg(e: &RetentionError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

const OK: RetentionOptions = RetentionOptions {
    degree: 2,
    scale: None,
    chunk_size: None,
    segment_elements: retention::DEFAULT_SEGMENT_ELEMENTS,
    kernels: retention::KernelChoice::Auto,
};

#[test]
fn rank() {
    let e = err_of(&[2, 5, 4], &[2, 5, 4, 8], &[2, 5, 4, 8], None, &OK);
    assert!(
        matches!(
            e,
            RetentionError::Rank {
                arg: "q",
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{e:?}"
    );
    assert_msg(
        &e,
        &[
            "`q`",
            "rank 4",
            "[batch, seq, q_heads, head_dim]",
            "rank 3",
            "[2, 5, 4]",
        ],
    );
    let e = err_of(
        &[2, 5, 4, 8],
        &[2, 5, 4, 8],
        &[2, 5, 4, 8],
        Some(&[2, 5]),
        &OK,
    );
    assert_msg(&e, &["`log_g`", "rank 3", "got rank 2"]);
}

#[test]
fn batch_and_seq_mismatch() {
    let e = err_of(&[2, 5, 4, 8], &[3, 5, 4, 8], &[2, 5, 4, 8], None, &OK);
    assert!(matches!(
        e,
        RetentionError::Mismatch {
            arg: "k",
            dim: "batch",
            expected: 2,
            got: 3,
            ..
        }
    ));
    assert_msg(&e, &["`k` has batch 3", "`q` has 2", "[3, 5, 4, 8]"]);
    let e = err_of(&[2, 5, 4, 8], &[2, 5, 4, 8], &[2, 6, 4, 8], None, &OK);
    assert_msg(&e, &["`v` has seq 6", "`q` has 5"]);
    let e = err_of(&[2, 5, 4, 8], &[2, 5, 2, 8], &[2, 5, 4, 8], None, &OK);
    assert_msg(&e, &["`v` has heads 4", "`k` has 2"]);
}

#[test]
fn head_ratio() {
    let e = err_of(&[1, 5, 6, 8], &[1, 5, 4, 8], &[1, 5, 4, 8], None, &OK);
    assert_eq!(
        e,
        RetentionError::HeadRatio {
            query_heads: 6,
            kv_heads: 4
        }
    );
    assert_msg(&e, &["`q` heads (6)", "multiple of `k`/`v` heads (4)"]);
    // the same error through the tensor API: never a panic
    let r = power_retention(
        t4([1, 5, 6, 8]),
        t4([1, 5, 4, 8]),
        t4([1, 5, 4, 8]),
        None,
        &OK,
    );
    assert!(matches!(r, Err(RetentionError::HeadRatio { .. })));
}

#[test]
fn head_dim_and_empty() {
    let e = err_of(&[1, 5, 4, 8], &[1, 5, 4, 16], &[1, 5, 4, 8], None, &OK);
    assert_eq!(
        e,
        RetentionError::HeadDim {
            arg: "k",
            expected: 8,
            got: 16
        }
    );
    assert_msg(&e, &["`k` head_dim must be 8", "got 16"]);
    let e = err_of(&[1, 5, 4, 0], &[1, 5, 4, 0], &[1, 5, 4, 8], None, &OK);
    assert_msg(&e, &["`q` has an empty `head_dim`", "[1, 5, 4, 0]"]);
}

#[test]
fn degree_chunk_scale() {
    let shapes = ([1, 5, 4, 8], [1, 5, 4, 8], [1, 5, 4, 8]);
    let e = err_of(
        &shapes.0,
        &shapes.1,
        &shapes.2,
        None,
        &RetentionOptions::new().with_degree(3),
    );
    assert_eq!(e, RetentionError::Degree(3));
    assert_msg(&e, &["`degree` must be even", "got 3"]);
    let e = err_of(
        &shapes.0,
        &shapes.1,
        &shapes.2,
        None,
        &RetentionOptions::new().with_chunk_size(Some(0)),
    );
    assert_eq!(e, RetentionError::ChunkSize);
    assert_msg(&e, &["`chunk_size` must be at least 1"]);
    let e = err_of(
        &shapes.0,
        &shapes.1,
        &shapes.2,
        None,
        &RetentionOptions::new().with_scale(Some(-1.0)),
    );
    assert_msg(&e, &["`scale` must be finite and positive", "-1"]);
}

/// A degree whose feature count `D` no `usize` holds is refused, at once: the fuzzer's
/// input (`fuzz/`, target `op_shapes`) that made the count of `D` loop for ~10^18 steps.
#[test]
fn feature_count() {
    let q = [
        17_713_572_325_522_527_040,
        576_460_752_303_423_487,
        18_446_743_017_316_067_082,
        159_429_202_811_904,
    ];
    let v = [q[0], q[1], q[2], 281_474_960_591_370];
    let degree = 1_441_151_880_758_558_720;
    let e = err_of(
        &q,
        &q,
        &v,
        None,
        &RetentionOptions::new().with_degree(degree),
    );
    assert_eq!(
        e,
        RetentionError::FeatureCount {
            head_dim: q[3],
            degree
        }
    );
    assert_msg(
        &e,
        &["`degree` 1441151880758558720", "head_dim 159429202811904"],
    );
    // a layer with such a degree is refused when it is built, not at its first call
    let layer = PowerRetentionConfig::new(64, 1)
        .with_degree(1 << 40)
        .init::<B>(&Default::default());
    assert!(matches!(layer, Err(RetentionError::FeatureCount { .. })));
    // a large degree at head dim 1 has one feature, and is a valid problem
    let one = [1, 3, 1, 1];
    assert!(
        check_shapes(
            &one,
            &one,
            &one,
            None,
            &RetentionOptions::new().with_degree(1 << 60)
        )
        .is_ok()
    );
}

#[test]
fn gate_shape() {
    let e = err_of(
        &[2, 5, 4, 8],
        &[2, 5, 2, 8],
        &[2, 5, 2, 8],
        Some(&[2, 5, 4]),
        &OK,
    );
    assert_eq!(
        e,
        RetentionError::GateShape {
            expected: vec![2, 5, 2],
            got: vec![2, 5, 4]
        }
    );
    assert_msg(
        &e,
        &[
            "`log_g` must have shape [2, 5, 2]",
            "[batch, seq, kv_heads]",
            "got [2, 5, 4]",
        ],
    );
}

#[test]
fn state_shape() {
    let dev = Default::default();
    let opts = RetentionOptions::new().with_chunk_size(Some(2));
    // D for d = 8, p = 2 is 64; give a state built for d = 4 (D = 16)
    let wrong = RetentionState::<B>::zeros(1, 2, 4, 8, 2, DType::F32, &dev);
    let r = power_retention_with_state(
        t4([1, 5, 4, 8]),
        t4([1, 5, 2, 8]),
        t4([1, 5, 2, 8]),
        None,
        Some(wrong),
        &opts,
    );
    let e = r.expect_err("state of the wrong size must be rejected");
    assert!(
        matches!(e, RetentionError::StateShape { arg: "state", .. }),
        "{e:?}"
    );
    assert_msg(
        &e,
        &[
            "`state` must have shape [1, 2, 64, 8]",
            "[batch, kv_heads, D, value_dim]",
            "got [1, 2, 16, 8]",
        ],
    );
    let mut bad = RetentionState::<B>::zeros(1, 2, 8, 8, 2, DType::F32, &dev);
    bad.key_sum = Tensor::zeros([1, 2, 63], &dev);
    let r = power_retention_step(
        t4([1, 1, 4, 8]),
        t4([1, 1, 2, 8]),
        t4([1, 1, 2, 8]),
        None,
        bad,
        &opts,
    );
    assert_msg(
        &r.expect_err("bad key_sum"),
        &["`key_sum` must have shape [1, 2, 64]", "got [1, 2, 63]"],
    );
}

#[test]
fn step_length() {
    let dev = Default::default();
    let state = RetentionState::<B>::zeros(1, 2, 8, 8, 2, DType::F32, &dev);
    let r = power_retention_step(
        t4([1, 3, 4, 8]),
        t4([1, 3, 2, 8]),
        t4([1, 3, 2, 8]),
        None,
        state,
        &OK,
    );
    let e = r.expect_err("three tokens are not a step");
    assert_eq!(e, RetentionError::StepLength { arg: "q", got: 3 });
    assert_msg(&e, &["exactly one token", "seq = 3"]);
}

#[test]
fn config() {
    let dev = Default::default();
    let e = PowerRetentionConfig::new(64, 0)
        .init::<B>(&dev)
        .expect_err("zero heads");
    assert!(matches!(e, RetentionError::Config(_)), "{e:?}");
    assert_msg(&e, &["invalid configuration", "n_heads (0)"]);
    let e = PowerRetentionConfig::new(64, 4)
        .with_n_kv_heads(Some(3))
        .init::<B>(&dev)
        .expect_err("4 heads over 3 groups");
    assert_eq!(
        e,
        RetentionError::HeadRatio {
            query_heads: 4,
            kv_heads: 3
        }
    );
    let layer = PowerRetentionConfig::new(64, 4)
        .init::<B>(&dev)
        .expect("valid");
    let e = layer
        .forward(Tensor::zeros([1, 3, 32], &dev))
        .expect_err("wrong width");
    assert_msg(&e, &["`x` has width 32", "d_model of the layer", "64"]);
}

#[test]
fn too_large() {
    // 2^20 tokens of 64 heads of dim 128: 2^33 elements, beyond the kernels' 32-bit positions
    let t = 1 << 20;
    let e = retention::check_shapes(
        &[1, t, 64, 128],
        &[1, t, 8, 128],
        &[1, t, 8, 128],
        None,
        &OK,
    )
    .expect_err("too many elements");
    assert!(
        matches!(
            e,
            RetentionError::TooLarge {
                arg: "q",
                elements: 8_589_934_592,
                ..
            }
        ),
        "{e:?}"
    );
    assert_msg(&e, &["`q`", "8589934592", "power_retention_with_state"]);
    // the output counts too: few query heads but wide values
    let e = retention::check_shapes(&[1, t, 1, 8], &[1, t, 1, 8], &[1, t, 1, 4096], None, &OK)
        .expect_err("too many elements");
    assert!(
        matches!(e, RetentionError::TooLarge { arg: "v", .. }),
        "{e:?}"
    );
    // a zero segment budget is a configuration error
    let zero = RetentionOptions::new().with_segment_elements(0);
    let e = retention::check_shapes(&[1, 4, 1, 8], &[1, 4, 1, 8], &[1, 4, 1, 8], None, &zero)
        .expect_err("zero budget");
    assert_msg(&e, &["segment_elements"]);
}
