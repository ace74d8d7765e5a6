//! Context parallelism: a sequence split into slices (on one device, and on wgpu on two:
//! the adapter as Burn's default and as its CPU device) gives the outputs and final state of one pass over
//! the whole sequence, and the state-only pass gives the chunked form's final state, both
//! against the f64 reference on ndarray. Run on ndarray and, with `--features wgpu`, on the
//! CubeCL kernels (lavapipe in CI).
#![cfg(feature = "ndarray")]

mod common;

use burn::tensor::{DType, Tensor, backend::Backend};
use common::{Gates, Problem, max_rel, tensor, to_vec};
use retention::{
    RetentionBackend, RetentionError, RetentionOptions, RetentionState, SequenceSlice,
    power_retention_context_parallel, power_retention_state, power_retention_with_state,
    to_device_synced,
};

/// The state and key-sum of `s` as one vector.
fn state_vec<B: Backend>(s: RetentionState<B>) -> Vec<f64> {
    let mut v = to_vec(s.state);
    v.extend(to_vec(s.key_sum));
    v
}

/// The f64 reference.
type Oracle = burn::backend::NdArray<f64>;

/// The reference's output and final state of one pass over `p` from `initial`.
fn oracle(
    p: &Problem,
    initial: Option<RetentionState<Oracle>>,
    opts: &RetentionOptions,
) -> (Vec<f64>, Vec<f64>) {
    let (q, k, v, g) = p.tensors::<Oracle>(&Default::default(), DType::F64);
    let (y, state) =
        power_retention_with_state(q, k, v, g, initial, opts).expect("valid reference inputs");
    (to_vec(y), state_vec(state))
}

/// An initial state (the reference's final state of a random prefix), and the same in f32 on
/// `B`.
fn prefix_state<B: RetentionBackend>(
    p: &Problem,
    dev: &B::Device,
    opts: &RetentionOptions,
) -> (RetentionState<Oracle>, RetentionState<B>) {
    let (q, k, v, g) = p.tensors::<Oracle>(&Default::default(), DType::F64);
    let s = power_retention_with_state(q, k, v, g, None, opts)
        .expect("valid prefix")
        .1;
    let on_b = RetentionState {
        state: tensor::<B, 4>(&to_vec(s.state.clone()), s.state.dims(), dev, DType::F32),
        key_sum: tensor::<B, 3>(
            &to_vec(s.key_sum.clone()),
            s.key_sum.dims(),
            dev,
            DType::F32,
        ),
    };
    (s, on_b)
}

/// The slices on `devs` in turn (the inputs on the first).
fn splits_match_one_pass<B: RetentionBackend>(devs: &[B::Device], tol: f64) {
    let dev = &devs[0];
    let shapes = [
        // (seed, b, t, hq, h, d, e, chunk, gates)
        (1, 2, 77, 4, 2, 8, 8, 16, Gates::Typical),
        (2, 1, 130, 2, 2, 16, 8, 32, Gates::Strong),
        (3, 1, 45, 3, 1, 8, 16, 8, Gates::None),
        (4, 2, 64, 2, 1, 16, 16, 64, Gates::Weak),
        // slices longer than the 1024-token runs the slices' gates are summed in
        (5, 1, 2600, 2, 1, 8, 8, 256, Gates::Weak),
    ];
    for (seed, b, t, hq, h, d, e, chunk, gates) in shapes {
        let opts = RetentionOptions::new().with_chunk_size(Some(chunk));
        let p = Problem::random(seed, b, t, hq, h, d, e, gates);
        let prefix = Problem::random(seed + 100, b, 19, hq, h, d, e, gates);
        for with_initial in [false, true] {
            let (reference, initial) = with_initial
                .then(|| prefix_state::<B>(&prefix, dev, &opts))
                .unzip();
            let (y, state) = oracle(&p, reference, &opts);
            for parts in [1, 2, 3, 5] {
                let (q, k, v, g) = p.tensors::<B>(dev, DType::F32);
                let devices: Vec<B::Device> = devs.iter().cycle().take(parts).cloned().collect();
                let slices =
                    SequenceSlice::split(q, k, v, g, chunk, &devices).expect("valid inputs");
                assert_eq!(slices.len(), parts.min(t.div_ceil(chunk)));
                let lens: Vec<usize> = slices.iter().map(|s| s.q.dims()[1]).collect();
                assert_eq!(lens.iter().sum::<usize>(), t, "slices {lens:?}");
                let (ys, s) = power_retention_context_parallel(slices, initial.clone(), &opts)
                    .expect("valid slices");
                let ys: Vec<Tensor<B, 4>> = ys
                    .into_iter()
                    .map(|y| to_device_synced(y, dev).expect("readable output"))
                    .collect();
                let got = to_vec(Tensor::cat(ys, 1));
                let s = s.to_device(dev).expect("readable state");
                let what = format!(
                    "seed {seed} [{b}, {t}, {hq}/{h}, {d}, {e}] chunk {chunk} {gates:?} \
                     initial {with_initial} parts {parts} {lens:?}"
                );
                let err = max_rel(&got, &y);
                assert!(err <= tol, "{what}: output {err:e}");
                let err = max_rel(&state_vec(s), &state);
                assert!(err <= tol, "{what}: final state {err:e}");
            }
        }
    }
}

fn state_pass_matches_final_state<B: RetentionBackend>(dev: &B::Device, tol: f64) {
    for (seed, t, chunk, gates) in [
        (11, 70, 16, Gates::Typical),
        (12, 33, 64, Gates::Strong),
        (13, 300, 32, Gates::None),
    ] {
        let opts = RetentionOptions::new().with_chunk_size(Some(chunk));
        let p = Problem::random(seed, 2, t, 4, 2, 16, 8, gates);
        let prefix = Problem::random(seed + 1, 2, 21, 4, 2, 16, 8, gates);
        for with_initial in [false, true] {
            let (reference, initial) = with_initial
                .then(|| prefix_state::<B>(&prefix, dev, &opts))
                .unzip();
            let (_, want) = oracle(&p, reference, &opts);
            let (_, k, v, g) = p.tensors::<B>(dev, DType::F32);
            let got = power_retention_state(k, v, g, initial, &opts).expect("valid");
            let err = max_rel(&state_vec(got), &want);
            assert!(
                err <= tol,
                "seed {seed} t {t} chunk {chunk} {gates:?} initial {with_initial}: {err:e}"
            );
        }
    }
}

/// The contributions a state pass keeps, read back by the forward that follows: the same
/// output and state as one pass (twice from the same kept tensors: the scan must not consume
/// them), a different one from zeroed contributions (they are read, not recomputed), and a
/// forward handed contributions of the wrong shape computes its own.
fn kept_contributions_are_read<B: RetentionBackend>(dev: &B::Device, tol: f64, kernels: bool) {
    use burn::tensor::TensorPrimitive;
    let prim = |x: &Tensor<B, 4>| x.clone().into_primitive().tensor();
    let chunk = 32;
    let opts = RetentionOptions::new().with_chunk_size(Some(chunk));
    let p = Problem::random(21, 2, 100, 4, 2, 16, 8, Gates::Typical);
    let prefix = Problem::random(22, 2, 19, 4, 2, 16, 8, Gates::Typical);
    let keeps = B::retention_keeps_contributions(dev, &[DType::F32, DType::F32], 16, 8, &opts);
    assert_eq!(keeps, kernels, "keeps contributions");
    let (q, k, v, g) = p.tensors::<B>(dev, DType::F32);
    let g_prim = || g.clone().map(|g| g.into_primitive().tensor());
    let (s, z, kept) =
        B::retention_chunked_state_keeping(prim(&k), prim(&v), g_prim(), chunk, &opts);
    assert_eq!(kept.is_some(), keeps, "kept contributions");
    let own = RetentionState::<B> {
        state: Tensor::from_primitive(TensorPrimitive::Float(s)),
        key_sum: Tensor::from_primitive(TensorPrimitive::Float(z)),
    };
    let (_, want_own) = oracle(&p, None, &opts);
    let err = max_rel(&state_vec(own), &want_own);
    assert!(err <= tol, "own state: {err:e}");
    let Some(kept) = kept else {
        return;
    };
    let (reference, initial) = prefix_state::<B>(&prefix, dev, &opts);
    let (want_y, want_state) = oracle(&p, Some(reference), &opts);
    let run = |contributions: retention::ChunkContributions<B>| {
        let initial = initial.clone();
        let (y, s, z) = B::retention_chunked_from_contributions(
            prim(&q),
            prim(&k),
            prim(&v),
            g_prim(),
            Some((
                initial.state.into_primitive().tensor(),
                initial.key_sum.into_primitive().tensor(),
            )),
            contributions,
            chunk,
            &opts,
        );
        let y: Tensor<B, 4> = Tensor::from_primitive(TensorPrimitive::Float(y));
        let state = RetentionState::<B> {
            state: Tensor::from_primitive(TensorPrimitive::Float(s)),
            key_sum: Tensor::from_primitive(TensorPrimitive::Float(z)),
        };
        (
            max_rel(&to_vec(y), &want_y),
            max_rel(&state_vec(state), &want_state),
        )
    };
    for round in 0..2 {
        let (y, state) = run(kept.clone());
        assert!(
            y <= tol && state <= tol,
            "round {round}: output {y:e}, state {state:e}"
        );
    }
    let five = |t: &burn::tensor::ops::FloatTensor<B>| {
        Tensor::<B, 5>::from_primitive(TensorPrimitive::Float(t.clone()))
    };
    let four = |t: &burn::tensor::ops::FloatTensor<B>| {
        Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t.clone()))
    };
    let zeroed = retention::ChunkContributions {
        states: five(&kept.states).zeros_like().into_primitive().tensor(),
        sums: four(&kept.sums).zeros_like().into_primitive().tensor(),
    };
    let (y, _) = run(zeroed);
    assert!(
        y > 1e-2,
        "zeroed contributions gave the one-pass output ({y:e}): not read"
    );
    let wrong = retention::ChunkContributions {
        states: five(&kept.states).narrow(2, 0, 1).into_primitive().tensor(),
        sums: four(&kept.sums).narrow(2, 0, 1).into_primitive().tensor(),
    };
    let (y, state) = run(wrong);
    assert!(
        y <= tol && state <= tol,
        "wrong-shaped contributions: output {y:e}, state {state:e}"
    );
}

fn bad_slices_are_errors<B: RetentionBackend>(dev: &B::Device) {
    let opts = RetentionOptions::new().with_chunk_size(Some(16));
    let none: Vec<SequenceSlice<B>> = Vec::new();
    assert!(matches!(
        power_retention_context_parallel(none, None, &opts),
        Err(RetentionError::Config(_))
    ));
    let a = Problem::random(1, 1, 20, 2, 2, 8, 8, Gates::Typical);
    let b = Problem::random(2, 1, 20, 2, 1, 8, 8, Gates::Typical);
    let slice = |p: &Problem| {
        let (q, k, v, log_g) = p.tensors::<B>(dev, DType::F32);
        SequenceSlice { q, k, v, log_g }
    };
    match power_retention_context_parallel(vec![slice(&a), slice(&b)], None, &opts) {
        Err(RetentionError::Config(msg)) => assert!(msg.contains("slices"), "{msg}"),
        other => panic!("slices with different head counts: {:?}", other.map(|_| ())),
    }
    // a malformed slice is named like any call's argument
    let (q, k, v, _) = a.tensors::<B>(dev, DType::F32);
    let bad = SequenceSlice {
        q,
        k: k.narrow(1, 0, 10),
        v,
        log_g: None,
    };
    assert!(matches!(
        power_retention_context_parallel(vec![slice(&a), bad], None, &opts),
        Err(RetentionError::Mismatch { .. })
    ));
    // and so is a sequence to split whose inputs disagree
    let (q, k, v, g) = a.tensors::<B>(dev, DType::F32);
    assert!(matches!(
        SequenceSlice::split(q, k.narrow(1, 0, 10), v, g, 16, std::slice::from_ref(dev)),
        Err(RetentionError::Mismatch { arg: "k", .. })
    ));
}

mod ndarray {
    type B = burn::backend::NdArray;

    #[test]
    fn splits_match_one_pass() {
        super::splits_match_one_pass::<B>(&[Default::default()], 1e-5);
    }

    #[test]
    fn state_pass_matches_final_state() {
        super::state_pass_matches_final_state::<B>(&Default::default(), 1e-5);
    }

    #[test]
    fn bad_slices_are_errors() {
        super::bad_slices_are_errors::<B>(&Default::default());
    }

    #[test]
    fn kept_contributions_are_read() {
        // the reference keeps none: the state pass alone is compared
        super::kept_contributions_are_read::<B>(&Default::default(), 1e-5, false);
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::common::adapter;
    use super::{DType, to_device_synced, to_vec};
    type B = burn::backend::Wgpu;

    #[test]
    fn splits_match_one_pass() {
        if let Some(dev) = adapter::<B>("context parallel (wgpu)") {
            super::splits_match_one_pass::<B>(&[dev], 1e-4);
        }
    }

    /// Slices on two devices in turn: the adapter as the default device and as the CPU
    /// device are two devices to Burn (each its own client and memory), so the slices and the
    /// states they hand on cross between them.
    #[test]
    fn splits_across_two_devices_match_one_pass() {
        let name = "context parallel, two devices (wgpu)";
        let Some(dev) = adapter::<B>(name) else {
            return;
        };
        let cpu = burn::backend::wgpu::WgpuDevice::Cpu;
        let probe = std::panic::catch_unwind(|| {
            let _ = burn::tensor::Tensor::<B, 1>::zeros([1], &cpu).into_data();
        });
        match probe {
            Ok(()) => {
                // a half-precision tensor keeps its dtype on the other device
                let x = burn::tensor::Tensor::<B, 2>::ones([3, 5], &dev).cast(DType::F16);
                let moved = to_device_synced(x, &cpu).expect("readable tensor");
                assert_eq!(moved.dtype(), DType::F16);
                assert_eq!(to_vec(moved), vec![1.0; 15]);
                super::splits_match_one_pass::<B>(&[dev, cpu], 1e-4)
            }
            Err(_) if std::env::var_os("CI").is_some() => {
                panic!("{name}: no CPU adapter (lavapipe), and CI is set")
            }
            Err(_) => eprintln!("SKIPPED {name}: no CPU adapter (lavapipe) found"),
        }
    }

    #[test]
    fn state_pass_matches_final_state() {
        if let Some(dev) = adapter::<B>("state pass (wgpu)") {
            super::state_pass_matches_final_state::<B>(&dev, 1e-4);
        }
    }

    #[test]
    fn kept_contributions_are_read() {
        if let Some(dev) = adapter::<B>("kept contributions (wgpu)") {
            super::kept_contributions_are_read::<B>(&dev, 1e-4, true);
        }
    }
}
