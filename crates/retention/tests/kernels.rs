//! The kernel-vs-oracle suite (`retention::validation`) on every CubeCL backend compiled in:
//! `Fusion<CubeBackend>` (what `burn::backend::Wgpu`/`Cuda` are), the bare `CubeBackend`, and
//! `Autodiff` over it. Run with `--features wgpu` (CI runs it on Mesa lavapipe) or `cuda`.
//!
//! Without a GPU adapter the tests print why and pass, unless `CI` is set: then they fail.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::tensor::{DType, Tensor, backend::Backend};
use retention::RetentionBackend;
use retention::validation::{run_grad_suite, run_suite};

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
    let report = run_grad_suite::<B>(&dev, DType::F32, cases, |_| {}).expect("every case is valid");
    eprintln!("{name} gradients\n{}", report.table());
    assert!(
        report.passed(),
        "{name}: gradients disagree with the oracle:\n{}",
        report.failures()
    );
}

/// Whether `B` has a usable device; without one, skip loudly (or fail under CI).
fn adapter<B: Backend>(name: &str) -> Option<B::Device> {
    let probe = std::panic::catch_unwind(|| {
        let dev = B::Device::default();
        let _ = Tensor::<B, 1>::zeros([1], &dev).into_data();
        dev
    });
    match probe {
        Ok(dev) => Some(dev),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("{name}: no GPU adapter, and CI is set: the kernel suite must run in CI")
        }
        Err(_) => {
            eprintln!("SKIPPED {name}: no GPU adapter found (set CI=1 to make this a failure)");
            None
        }
    }
}

fn suite<B: RetentionBackend>(name: &str, dtypes: &[DType], cases: u64) {
    let Some(dev) = adapter::<B>(name) else {
        return;
    };
    for &dtype in dtypes {
        let report = run_suite::<B>(&dev, dtype, cases, |_| {}).expect("every case is valid");
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
}
