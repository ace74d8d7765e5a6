//! Gradients through the op's backward pass (`RetentionBackend::retention_*_backward`, the
//! written-out reference on ndarray) against `Autodiff` of the reference forward, and against
//! central finite differences, in f64.
#![cfg(feature = "ndarray")]

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{DType, Tensor, TensorData};
use common::{Gates, Problem, max_rel, randn, to_vec};
use rand::{SeedableRng, rngs::StdRng};
use retention::{
    RetentionOptions, RetentionState, expanded_dim, power_retention_with_state, reference,
};

type AD = Autodiff<NdArray<f64>>;

/// Inputs of one case, tracked.
struct Inputs {
    q: Tensor<AD, 4>,
    k: Tensor<AD, 4>,
    v: Tensor<AD, 4>,
    g: Option<Tensor<AD, 3>>,
    init: Option<(Tensor<AD, 4>, Tensor<AD, 3>)>,
}

/// Random weights the outputs are paired with: the loss `Σ y·wy + Σ S·ws + Σ z·wz`.
struct Weights {
    y: Tensor<AD, 4>,
    s: Tensor<AD, 4>,
    z: Tensor<AD, 3>,
}

fn data<const N: usize>(values: Vec<f64>, shape: [usize; N]) -> Tensor<AD, N> {
    Tensor::from_data(
        TensorData::new(values, shape),
        (&Default::default(), DType::F64),
    )
}

fn setup(p: &Problem, degree: usize, with_initial: bool, seed: u64) -> (Inputs, Weights) {
    let dev = Default::default();
    let (q, k, v, g) = p.tensors::<AD>(&dev, DType::F64);
    let big_d = expanded_dim(p.d, degree);
    let mut rng = StdRng::seed_from_u64(seed);
    let init = with_initial.then(|| {
        // a state some tokens could have left: S = Σ φ(k) vᵀ over 5 random tokens, z = Σ φ(k)
        let layout = retention::SympowLayout::new(p.d, degree);
        let keys = data(randn(&mut rng, p.b * p.h * 5 * p.d), [p.b, p.h, 5, p.d]);
        let vals = data(randn(&mut rng, p.b * p.h * 5 * p.e), [p.b, p.h, 5, p.e]);
        let phi = layout.expand_key(keys).mul_scalar(1.0 / p.d as f64);
        let s = phi.clone().swap_dims(2, 3).matmul(vals);
        let z = phi.sum_dim(2).reshape([p.b, p.h, big_d]);
        (s.require_grad(), z.require_grad())
    });
    let inputs = Inputs {
        q: q.require_grad(),
        k: k.require_grad(),
        v: v.require_grad(),
        g: g.map(|g| g.require_grad()),
        init,
    };
    let weights = Weights {
        y: data(
            randn(&mut rng, p.b * p.t * p.hq * p.e),
            [p.b, p.t, p.hq, p.e],
        ),
        s: data(
            randn(&mut rng, p.b * p.h * big_d * p.e),
            [p.b, p.h, big_d, p.e],
        ),
        z: data(randn(&mut rng, p.b * p.h * big_d), [p.b, p.h, big_d]),
    };
    (inputs, weights)
}

/// Flattened gradients `[dq, dk, dv, dlog_g, dS0, dz0]` (absent ones empty).
fn grads_of(x: &Inputs, loss: Tensor<AD, 1>) -> Vec<Vec<f64>> {
    let grads = loss.backward();
    let read4 = |t: &Tensor<AD, 4>| to_vec(t.grad(&grads).expect("gradient"));
    let read3 = |t: &Tensor<AD, 3>| to_vec(t.grad(&grads).expect("gradient"));
    vec![
        read4(&x.q),
        read4(&x.k),
        read4(&x.v),
        x.g.as_ref().map(read3).unwrap_or_default(),
        x.init.as_ref().map(|(s, _)| read4(s)).unwrap_or_default(),
        x.init.as_ref().map(|(_, z)| read3(z)).unwrap_or_default(),
    ]
}

/// The loss through the op (`power_retention_with_state`: the backend's backward).
fn op_loss(x: &Inputs, w: &Weights, opts: &RetentionOptions, with_state: bool) -> Tensor<AD, 1> {
    let init = x
        .init
        .clone()
        .map(|(state, key_sum)| RetentionState { state, key_sum });
    let (y, s) = power_retention_with_state(
        x.q.clone(),
        x.k.clone(),
        x.v.clone(),
        x.g.clone(),
        init,
        opts,
    )
    .expect("valid");
    let loss = (y * w.y.clone()).sum();
    if with_state {
        loss + (s.state * w.s.clone()).sum() + (s.key_sum * w.z.clone()).sum()
    } else {
        loss
    }
}

/// The loss through the reference forward, differentiated by `Autodiff`.
fn reference_loss(
    x: &Inputs,
    w: &Weights,
    chunk: usize,
    degree: usize,
    with_state: bool,
) -> Tensor<AD, 1> {
    let scale = 1.0 / (x.q.dims()[3] as f64).sqrt();
    let (y, s, z) = reference::chunked_form(
        x.q.clone(),
        x.k.clone(),
        x.v.clone(),
        x.g.clone(),
        x.init.clone(),
        chunk,
        degree,
        scale,
    );
    let loss = (y * w.y.clone()).sum();
    if with_state {
        loss + (s * w.s.clone()).sum() + (z * w.z.clone()).sum()
    } else {
        loss
    }
}

const NAMES: [&str; 6] = ["dq", "dk", "dv", "dlog_g", "dS0", "dz0"];

/// The op's backward equals `Autodiff` of the reference forward: chunked (t not a multiple of
/// the chunk, t < chunk, chunk 1), GQA, gates none/typical/strong, initial state, gradients
/// arriving at the final state, degree 2 and 4.
#[test]
fn backward_matches_autodiff_of_the_reference() {
    let cases = [
        // (seed, b, t, hq, h, d, e, gates, chunk, degree, initial, state loss)
        (1, 2, 23, 4, 2, 8, 6, Gates::Typical, 5, 2, false, false),
        (2, 1, 17, 3, 1, 16, 8, Gates::None, 4, 2, true, true),
        (3, 3, 9, 2, 2, 8, 4, Gates::Strong, 4, 2, true, false),
        (4, 2, 12, 4, 1, 4, 5, Gates::Typical, 16, 2, false, true),
        (5, 1, 7, 2, 2, 8, 3, Gates::Weak, 1, 2, true, true),
        (6, 2, 10, 2, 1, 4, 4, Gates::Typical, 3, 4, true, true),
        (7, 1, 33, 8, 2, 32, 16, Gates::Typical, 8, 2, false, false),
    ];
    for (seed, b, t, hq, h, d, e, gates, chunk, degree, initial, state_loss) in cases {
        let p = Problem::random(seed, b, t, hq, h, d, e, gates);
        let (x, w) = setup(&p, degree, initial, seed + 100);
        let opts = RetentionOptions::new()
            .with_degree(degree)
            .with_chunk_size(Some(chunk));
        let ours = grads_of(&x, op_loss(&x, &w, &opts, state_loss));
        let (x2, _) = setup(&p, degree, initial, seed + 100);
        let oracle = grads_of(&x2, reference_loss(&x2, &w, chunk, degree, state_loss));
        for (i, name) in NAMES.iter().enumerate() {
            assert_eq!(ours[i].len(), oracle[i].len(), "{name}: presence");
            if ours[i].is_empty() {
                continue;
            }
            let err = max_rel(&ours[i], &oracle[i]);
            assert!(
                err <= 1e-9,
                "case {seed} ({gates:?}, chunk {chunk}, p {degree}): {name} error {err:e}"
            );
        }
    }
}

/// The attention form (no chunk) has its own graph node: its gradients equal `Autodiff` of
/// the reference attention form.
#[test]
fn attention_backward_matches_autodiff_of_the_reference() {
    for (seed, gates) in [(11, Gates::Typical), (12, Gates::None), (13, Gates::Strong)] {
        let p = Problem::random(seed, 2, 13, 4, 2, 8, 5, gates);
        let (x, w) = setup(&p, 2, false, seed);
        let opts = RetentionOptions::new();
        let ours = grads_of(&x, op_loss(&x, &w, &opts, false));
        let (x2, _) = setup(&p, 2, false, seed);
        let y = reference::attention_form(
            x2.q.clone(),
            x2.k.clone(),
            x2.v.clone(),
            x2.g.clone(),
            2,
            1.0 / 8f64.sqrt(),
        );
        let oracle = grads_of(&x2, (y * w.y.clone()).sum());
        for (i, name) in NAMES.iter().enumerate().take(4) {
            if ours[i].is_empty() {
                continue;
            }
            let err = max_rel(&ours[i], &oracle[i]);
            assert!(err <= 1e-9, "{gates:?}: {name} error {err:e}");
        }
    }
}

/// Central finite differences of the loss agree with the op's gradients (f64, ≤ 1e-6).
#[test]
fn backward_matches_finite_differences() {
    let p = Problem::random(21, 1, 7, 2, 1, 4, 3, Gates::Typical);
    let opts = RetentionOptions::new().with_chunk_size(Some(3));
    let (x, w) = setup(&p, 2, true, 22);
    let ours = grads_of(&x, op_loss(&x, &w, &opts, true));
    let eps = 1e-6;
    // the loss as a function of one perturbed input
    let loss_at = |which: usize, index: usize, delta: f64| -> f64 {
        let (x, _) = setup(&p, 2, true, 22);
        let bump4 = |t: Tensor<AD, 4>| {
            let mut v = to_vec(t.clone().inner());
            v[index] += delta;
            data(v, t.dims())
        };
        let bump3 = |t: Tensor<AD, 3>| {
            let mut v = to_vec(t.clone().inner());
            v[index] += delta;
            data(v, t.dims())
        };
        let x = match which {
            0 => Inputs {
                q: bump4(x.q.clone()),
                ..x
            },
            1 => Inputs {
                k: bump4(x.k.clone()),
                ..x
            },
            2 => Inputs {
                v: bump4(x.v.clone()),
                ..x
            },
            3 => Inputs {
                g: x.g.clone().map(bump3),
                ..x
            },
            4 => Inputs {
                init: x.init.clone().map(|(s, z)| (bump4(s), z)),
                ..x
            },
            _ => Inputs {
                init: x.init.clone().map(|(s, z)| (s, bump3(z))),
                ..x
            },
        };
        to_vec(op_loss(&x, &w, &opts, true).inner())[0]
    };
    for (which, name) in NAMES.iter().enumerate() {
        let analytic = &ours[which];
        let numeric: Vec<f64> = (0..analytic.len())
            .map(|i| (loss_at(which, i, eps) - loss_at(which, i, -eps)) / (2.0 * eps))
            .collect();
        let err = max_rel(analytic, &numeric);
        assert!(err <= 1e-6, "{name}: finite differences {err:e}");
    }
}

/// The randomized gradient suite of `retention selftest --grad` on ndarray in f32 (the
/// backward in f32 against `Autodiff` of the reference in f64).
#[test]
fn grad_suite_on_ndarray() {
    let dev = Default::default();
    let report = retention::validation::run_grad_suite::<NdArray<f32>>(
        &dev,
        DType::F32,
        retention::KernelChoice::Auto,
        100,
        |_| {},
    )
    .expect("every case is valid");
    eprintln!("{}", report.table());
    assert!(report.passed(), "{}", report.failures());
}
