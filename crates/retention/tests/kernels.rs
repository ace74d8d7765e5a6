//! The kernel-vs-oracle suite (`retention::validation`) on every CubeCL backend compiled in:
//! `Fusion<CubeBackend>` (what `burn::backend::Wgpu`/`Cuda` are), the bare `CubeBackend`, and
//! `Autodiff` over it. Run with `--features wgpu` (CI runs it on Mesa lavapipe) or `cuda`.
//!
//! Without a GPU adapter the tests print why and pass, unless `CI` is set: then they fail.
// the oracle of the gradient checks runs on ndarray
#![cfg(all(feature = "ndarray", any(feature = "wgpu", feature = "cuda")))]

mod common;

use burn::tensor::{DType, Tensor, backend::Backend};
use common::adapter;
use retention::validation::{run_grad_suite, run_suite};
use retention::{KernelChoice, RetentionBackend};

/// Cases per dtype on the backend users get (`Fusion<CubeBackend>`).
const CASES: u64 = 200;
/// Cases per dtype on the other stacks (same kernels, different dispatch).
const ROUTING_CASES: u64 = 10;
/// Gradient cases (f32): the backward pass of `Autodiff<Fusion<CubeBackend>>`.
const GRAD_CASES: u64 = 100;

fn grad_suite<B: RetentionBackend>(name: &str, cases: u64) {
    let Some(dev) = adapter::<B>(name) else {
        return;
    };
    let report = run_grad_suite::<B>(&dev, DType::F32, KernelChoice::Auto, cases, |_| {})
        .expect("every case is valid");
    eprintln!("{name} gradients\n{}", report.table());
    assert!(
        report.passed(),
        "{name}: gradients disagree with the oracle:\n{}",
        report.failures()
    );
}

/// Gradients through an initial state and out of the final state, which the randomized suite
/// does not exercise (its loss reads the output only): the backend's backward pass against the
/// f64 reference backward on ndarray, for `Σ y·w_y + Σ S_T·w_S + Σ z_T·w_z`.
fn state_gradients<B: RetentionBackend>(name: &str) {
    use burn::backend::{Autodiff, NdArray};
    use retention::validation::{Gates, Problem};
    use retention::{RetentionOptions, power_retention_with_state};
    let Some(dev) = adapter::<B>(name) else {
        return;
    };
    let opts = RetentionOptions::new().with_chunk_size(Some(16));
    // the initial state a model would carry: a prefill's
    let cpu = Default::default();
    let prefix = Problem::random(12, 2, 20, 4, 2, 32, 24, Gates::Typical);
    let (q, k, v, g) = prefix.tensors::<NdArray<f64>>(&cpu, DType::F64);
    let (_, s0) = power_retention_with_state(q, k, v, g, None, &opts).expect("valid");
    let s0 = (s0.state.into_data(), s0.key_sum.into_data());
    let p = Problem::random(11, 2, 37, 4, 2, 32, 24, Gates::Typical).rounded(DType::F32);
    let ours = state_loss_grads::<Autodiff<B>>(&p, &s0, &dev, DType::F32, &opts);
    let oracle = state_loss_grads::<Autodiff<NdArray<f64>>>(&p, &s0, &cpu, DType::F64, &opts);
    // the metric of the randomized gradient suite: each input's gradient error times the
    // input's size (the loss change it predicts), over the largest such change of the oracle
    let (q, k, v, g) = (&p.q, &p.k, &p.v, p.log_g.as_deref().unwrap_or(&[]));
    let (s_in, z_in) = (to_f64(&s0.0), to_f64(&s0.1));
    let sizes =
        [q, k, v, g, &s_in[..], &z_in[..]].map(|x| x.iter().fold(0.0f64, |m, v| m.max(v.abs())));
    let mut worst = 0.0f64;
    let mut scale = 0.0f64;
    for (i, (a, o)) in ours.iter().zip(&oracle).enumerate() {
        assert_eq!(a.len(), o.len(), "{name}: gradient {i} missing");
        let diff = a
            .iter()
            .zip(o)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        let peak = o.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        worst = worst.max(diff * sizes[i]);
        scale = scale.max(peak * sizes[i]);
    }
    let err = worst / scale;
    eprintln!("{name}: state gradients {err:e}");
    assert!(err <= 1e-4, "{name}: state gradients off by {err:e}");
}

fn to_f64(data: &burn::tensor::TensorData) -> Vec<f64> {
    data.clone()
        .convert::<f64>()
        .to_vec::<f64>()
        .unwrap_or_default()
}

/// Fixed weights that vary by element: sin of the flat index, computed in f64 on the host (an
/// f32 argument in the tens of thousands would change them by 1e-3 between backends).
fn weights<A: Backend, const N: usize>(
    dims: [usize; N],
    dev: &A::Device,
    dtype: DType,
) -> Tensor<A, N> {
    let n: usize = dims.iter().product();
    let values: Vec<f64> = (0..n).map(|i| (0.37 * i as f64).sin()).collect();
    Tensor::from_data(burn::tensor::TensorData::new(values, dims), (dev, dtype))
}

/// `[∂q, ∂k, ∂v, ∂log_g, ∂S_0, ∂z_0]` of the loss of [`state_gradients`].
fn state_loss_grads<A>(
    p: &retention::validation::Problem,
    s0: &(burn::tensor::TensorData, burn::tensor::TensorData),
    dev: &A::Device,
    dtype: DType,
    opts: &retention::RetentionOptions,
) -> Vec<Vec<f64>>
where
    A: burn::tensor::backend::AutodiffBackend + RetentionBackend,
{
    use retention::validation::to_vec;
    use retention::{RetentionState, power_retention_with_state};
    let (q, k, v, g) = p.tensors::<A>(dev, dtype);
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let g = g.map(|g| g.require_grad());
    let s = Tensor::<A, 4>::from_data(s0.0.clone(), (dev, dtype)).require_grad();
    let z = Tensor::<A, 3>::from_data(s0.1.clone(), (dev, dtype)).require_grad();
    let initial = RetentionState {
        state: s.clone(),
        key_sum: z.clone(),
    };
    let (y, last) = power_retention_with_state(
        q.clone(),
        k.clone(),
        v.clone(),
        g.clone(),
        Some(initial),
        opts,
    )
    .expect("valid");
    let (yd, sd, zd) = (y.dims(), last.state.dims(), last.key_sum.dims());
    let loss = (y * weights::<A, 4>(yd, dev, dtype)).sum()
        + (last.state * weights::<A, 4>(sd, dev, dtype)).sum()
        + (last.key_sum * weights::<A, 3>(zd, dev, dtype)).sum();
    let grads = loss.backward();
    let read4 = |t: &Tensor<A, 4>| t.grad(&grads).map(to_vec).unwrap_or_default();
    vec![
        read4(&q),
        read4(&k),
        read4(&v),
        g.and_then(|g| g.grad(&grads))
            .map(to_vec)
            .unwrap_or_default(),
        read4(&s),
        z.grad(&grads).map(to_vec).unwrap_or_default(),
    ]
}

fn suite<B: RetentionBackend>(name: &str, dtypes: &[DType], cases: u64) {
    let Some(dev) = adapter::<B>(name) else {
        return;
    };
    for &dtype in dtypes {
        let report = run_suite::<B>(&dev, dtype, KernelChoice::Auto, cases, |_| {})
            .expect("every case is valid");
        eprintln!("{name}\n{}", report.table());
        assert!(
            report.passed(),
            "{name} {dtype:?}: kernels disagree with the oracle:\n{}",
            report.failures()
        );
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use burn::backend::Autodiff;
    use burn::backend::wgpu::{CubeBackend, WgpuRuntime};

    const DTYPES: &[DType] = &[DType::F32, DType::F16];

    #[test]
    fn fusion_cube_backend_matches_oracle() {
        suite::<burn::backend::Wgpu>("wgpu (fusion)", DTYPES, CASES);
    }

    #[test]
    fn bare_cube_backend_matches_oracle() {
        suite::<CubeBackend<WgpuRuntime, f32, i32, u32>>("wgpu (cube)", DTYPES, ROUTING_CASES);
    }

    #[test]
    fn autodiff_inference_matches_oracle() {
        suite::<Autodiff<burn::backend::Wgpu>>("wgpu (autodiff)", DTYPES, ROUTING_CASES);
    }

    #[test]
    fn gradients_match_oracle() {
        grad_suite::<burn::backend::Wgpu>("wgpu (fusion)", GRAD_CASES);
    }

    #[test]
    fn state_gradients_match_reference() {
        state_gradients::<burn::backend::Wgpu>("wgpu (fusion)");
    }

    /// Head dims whose tiles exceed shared memory run the reference instead of failing at
    /// launch: every form still matches the oracle.
    #[test]
    fn head_dims_beyond_shared_memory_fall_back() {
        use retention::validation::{Gates, Problem, max_rel, to_vec};
        use retention::{RetentionOptions, power_retention, power_retention_with_state};
        type B = burn::backend::Wgpu;
        let Some(dev) = adapter::<B>("wgpu (large head dims)") else {
            return;
        };
        let p = Problem::random(7, 1, 6, 2, 1, 512, 8, Gates::Typical);
        let oracle = p.naive(2, 1.0 / (512f64).sqrt());
        for chunk in [None, Some(4)] {
            let opts = RetentionOptions::new().with_chunk_size(chunk);
            let (q, k, v, g) = p.tensors::<B>(&dev, DType::F32);
            let y = to_vec(power_retention(q, k, v, g, &opts).expect("valid"));
            let err = max_rel(&y, &oracle);
            assert!(err <= 1e-4, "chunk {chunk:?}: {err:e}");
        }
        let (q, k, v, g) = p.tensors::<B>(&dev, DType::F32);
        let opts = RetentionOptions::new().with_chunk_size(Some(4));
        let (y, _) = power_retention_with_state(q, k, v, g, None, &opts).expect("valid");
        assert!(max_rel(&to_vec(y), &oracle) <= 1e-4);
    }

    /// Chunk states beyond one allocation of the device (128 MiB on lavapipe; here
    /// `[8, 8, 4, 2080, 64]` in f32, 136 MB) run in segments that fit: an allocation above the
    /// limit fails inside the runtime and left the output unwritten.
    #[test]
    fn chunk_states_beyond_one_allocation_run_in_segments() {
        use retention::validation::{Gates, Problem, max_rel, to_vec};
        use retention::{RetentionOptions, expanded_dim, power_retention};
        type B = burn::backend::Wgpu;
        let name = "wgpu (chunk states beyond one allocation)";
        let Some(dev) = adapter::<B>(name) else {
            return;
        };
        let (b, t, h, d, chunk) = (8, 512, 8, 64, 128);
        let bytes = b * h * (t / chunk) * expanded_dim(d, 2) * d * 4;
        let limit = B::retention_max_allocation(&dev).expect("wgpu reports its page limit");
        if bytes <= limit {
            eprintln!("SKIPPED {name}: one allocation takes {limit} bytes, the states {bytes}");
            return;
        }
        let p = Problem::random(11, b, t, h, h, d, d, Gates::Typical);
        let opts = RetentionOptions::new().with_chunk_size(Some(chunk));
        let (q, k, v, g) = p.tensors::<B>(&dev, DType::F32);
        let y = to_vec(power_retention(q, k, v, g, &opts).expect("valid"));
        type R = burn::backend::NdArray;
        let (q, k, v, g) = p.tensors::<R>(&Default::default(), DType::F32);
        let want = to_vec(power_retention(q, k, v, g, &opts).expect("valid"));
        let err = max_rel(&y, &want);
        assert!(err <= 1e-4, "{name}: {err:e} against the reference");
    }

    /// Tokens of an output one allocation does not hold: four query heads of 64 value columns
    /// per token over one key/value head, so the inputs fit and the output does not.
    fn beyond_one_allocation<B: RetentionBackend>(
        dev: &B::Device,
        limit: usize,
    ) -> [Tensor<B, 4>; 3] {
        let t = (limit / (4 * 64 * 4) + 1).next_multiple_of(64);
        let zeros = |heads, dim| Tensor::<B, 4>::zeros([1, t, heads, dim], (dev, DType::F32));
        [zeros(4, 8), zeros(1, 8), zeros(1, 64)]
    }

    /// An output beyond one allocation of the device is refused before anything is launched,
    /// naming it: its allocation would fail on the runtime's thread.
    #[test]
    fn outputs_beyond_one_allocation_are_refused() {
        use retention::{RetentionError, RetentionOptions, power_retention};
        type B = burn::backend::Wgpu;
        let name = "wgpu (output beyond one allocation)";
        let Some(dev) = adapter::<B>(name) else {
            return;
        };
        let limit = B::retention_max_allocation(&dev).expect("wgpu reports its page limit");
        let [q, k, v] = beyond_one_allocation::<B>(&dev, limit);
        let opts = RetentionOptions::new().with_chunk_size(Some(64));
        match power_retention(q, k, v, None, &opts) {
            Err(RetentionError::TooLarge { arg: "output", .. }) => {}
            other => panic!(
                "{name}: expected `output` too large, got {:?}",
                other.map(|y| y.dims())
            ),
        }
    }

    /// A launch whose allocation the device refuses on its runtime thread (the backend called
    /// past the op's checks) is recorded, not lost: the runtime only logs it, and its output
    /// would be an unwritten buffer. Fusion may run the launch after the call returns:
    /// `check_device` runs it, reports the failure once, and clears it.
    #[test]
    fn failures_on_the_runtime_thread_are_reported() {
        use burn::tensor::TensorPrimitive;
        use retention::{RetentionError, RetentionOptions, check_device};
        type B = burn::backend::Wgpu;
        let name = "wgpu (failure on the runtime thread)";
        let Some(dev) = adapter::<B>(name) else {
            return;
        };
        let limit = B::retention_max_allocation(&dev).expect("wgpu reports its page limit");
        check_device::<B>(&dev).expect("no failure before");
        let [q, k, v] = beyond_one_allocation::<B>(&dev, limit);
        let opts = RetentionOptions::new();
        let y = B::retention_chunked(
            q.into_primitive().tensor(),
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
            None,
            None,
            64,
            &opts,
        )
        .0;
        drop(Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(y)));
        match check_device::<B>(&dev) {
            Err(RetentionError::Device(what)) => {
                assert!(what.contains("chunked form"), "{name}: {what}")
            }
            other => panic!("{name}: expected a device failure, got {other:?}"),
        }
        check_device::<B>(&dev).expect("reported once");
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use burn::backend::Autodiff;
    use burn_cubecl::CubeBackend;
    use retention_kernels::cubecl::cuda::CudaRuntime;

    const DTYPES: &[DType] = &[DType::F32, DType::F16, DType::BF16];

    #[test]
    fn fusion_cube_backend_matches_oracle() {
        suite::<burn::backend::Cuda>("cuda (fusion)", DTYPES, CASES);
    }

    #[test]
    fn bare_cube_backend_matches_oracle() {
        suite::<CubeBackend<CudaRuntime, f32, i32, u8>>("cuda (cube)", DTYPES, ROUTING_CASES);
    }

    #[test]
    fn autodiff_inference_matches_oracle() {
        suite::<Autodiff<burn::backend::Cuda>>("cuda (autodiff)", DTYPES, ROUTING_CASES);
    }

    #[test]
    fn gradients_match_oracle() {
        grad_suite::<burn::backend::Cuda>("cuda (fusion)", GRAD_CASES);
    }

    #[test]
    fn state_gradients_match_reference() {
        state_gradients::<burn::backend::Cuda>("cuda (fusion)");
    }
}
