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
            __C::Ndarray => $crate::__backend_arm!(
                "ndarray",
                burn::backend::NdArray,
                burn::backend::ndarray::NdArrayDevice,
                |$B, $dev| $body
            ),
            __C::Wgpu => $crate::__backend_arm!(
                "wgpu",
                burn::backend::Wgpu,
                burn::backend::wgpu::WgpuDevice,
                |$B, $dev| $body
            ),
            __C::Cuda => $crate::__backend_arm!(
                "cuda",
                burn::backend::Cuda,
                burn::backend::cuda::CudaDevice,
                |$B, $dev| $body
            ),
            __C::Rocm => $crate::__backend_arm!(
                "rocm",
                burn::backend::Rocm,
                burn::backend::rocm::RocmDevice,
                |$B, $dev| $body
            ),
            __C::Tch => $crate::__backend_arm!(
                "tch",
                burn::backend::LibTorch,
                burn::backend::libtorch::LibTorchDevice,
                |$B, $dev| $body
            ),
        }
    }};
}

/// One arm of [`with_backend!`]: the body when `$feature` is compiled in, else an error.
#[doc(hidden)]
#[macro_export]
macro_rules! __backend_arm {
    ($feature:literal, $backend:ty, $device:ty, |$B:ident, $dev:ident| $body:expr) => {{
        #[cfg(feature = $feature)]
        {
            type $B = $backend;
            let $dev = <$device as Default>::default();
            $body
        }
        #[cfg(not(feature = $feature))]
        {
            Err($crate::CliError::BackendMissing($feature.into()))
        }
    }};
}

/// Devices `indices` of the backend and kind of `dev` (`--devices 0,1`, `--gpus 2`).
///
/// # Errors
/// [`crate::CliError::Device`] for no indices or an index the backend does not have.
pub fn devices_of<B: burn::tensor::backend::Backend>(
    dev: &B::Device,
    indices: &[usize],
    flag: &str,
) -> Result<Vec<B::Device>, crate::CliError> {
    use burn::prelude::DeviceOps as _;
    use burn::tensor::backend::{DeviceId, DeviceOps};
    let type_id = dev.id().type_id;
    let available = B::device_count(type_id);
    if indices.is_empty() {
        return Err(crate::CliError::Device(format!("{flag}: no devices named")));
    }
    indices
        .iter()
        .map(|&i| match u16::try_from(i) {
            Ok(index) if i < available => Ok(B::Device::from_id(DeviceId::new(type_id, index))),
            _ => Err(crate::CliError::Device(format!(
                "{flag}: device {i}, but this backend has {available}"
            ))),
        })
        .collect()
}
