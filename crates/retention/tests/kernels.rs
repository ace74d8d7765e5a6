//! The kernel-vs-oracle suite (`retention::validation`) on every CubeCL backend compiled in:
//! `Fusion<CubeBackend>` (what `burn::backend::Wgpu`/`Cuda` are), the bare `CubeBackend`, and
//! `Autodiff` over it. Run with `--features wgpu` (CI runs it on Mesa lavapipe) or `cuda`.
//!
//! Without a GPU adapter the tests print why and pass, unless `CI` is set: then they fail.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::tensor::{DType, Tensor, backend::Backend};
use retention::RetentionBackend;
use retention::validation::run_suite;

/// Cases per dtype on the backend users get (`Fusion<CubeBackend>`).
const CASES: u64 = 200;
/// Cases per dtype on the other stacks (same kernels, different dispatch).
const ROUTING_CASES: u64 = 10;

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
}
