//! Choosing a Burn backend at run time among those compiled in.

use clap::ValueEnum;

/// A backend selectable with `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CPU, pure Rust (the default).
    Ndarray,
    /// wgpu: Vulkan, Metal, DX12, or Mesa's lavapipe on CPU.
    Wgpu,
    /// NVIDIA CUDA.
    Cuda,
    /// AMD ROCm/HIP.
    Rocm,
    /// LibTorch (CPU).
    Tch,
}

impl BackendChoice {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
            Self::Rocm => "rocm",
            Self::Tch => "tch",
        }
    }
}

/// Runs `$body` with `$B` bound to the chosen backend type and `$dev` to its default device;
/// evaluates to `Err(CliError::BackendMissing)` for a backend not compiled in.
#[macro_export]
macro_rules! with_backend {
    ($choice:expr, |$B:ident, $dev:ident| $body:expr) => {{
        use $crate::BackendChoice as __C;
        match $choice {
            __C::Ndarray => {
                #[cfg(feature = "ndarray")]
                {
                    type $B = burn::backend::NdArray;
                    let $dev = <burn::backend::ndarray::NdArrayDevice as Default>::default();
                    $body
                }
                #[cfg(not(feature = "ndarray"))]
                {
                    Err($crate::CliError::BackendMissing("ndarray".into()))
                }
            }
            __C::Wgpu => {
                #[cfg(feature = "wgpu")]
                {
                    type $B = burn::backend::Wgpu;
                    let $dev = <burn::backend::wgpu::WgpuDevice as Default>::default();
                    $body
                }
                #[cfg(not(feature = "wgpu"))]
                {
                    Err($crate::CliError::BackendMissing("wgpu".into()))
                }
            }
            __C::Cuda => {
                #[cfg(feature = "cuda")]
                {
                    type $B = burn::backend::Cuda;
                    let $dev = <burn::backend::cuda::CudaDevice as Default>::default();
                    $body
                }
                #[cfg(not(feature = "cuda"))]
                {
                    Err($crate::CliError::BackendMissing("cuda".into()))
                }
            }
            __C::Rocm => {
                #[cfg(feature = "rocm")]
                {
                    type $B = burn::backend::Rocm;
                    let $dev = <burn::backend::rocm::RocmDevice as Default>::default();
                    $body
                }
                #[cfg(not(feature = "rocm"))]
                {
                    Err($crate::CliError::BackendMissing("rocm".into()))
                }
            }
            __C::Tch => {
                #[cfg(feature = "tch")]
                {
                    type $B = burn::backend::LibTorch;
                    let $dev = <burn::backend::libtorch::LibTorchDevice as Default>::default();
                    $body
                }
                #[cfg(not(feature = "tch"))]
                {
                    Err($crate::CliError::BackendMissing("tch".into()))
                }
            }
        }
    }};
}
