//! Which kernel family the CubeCL backends run.

use serde::{Deserialize, Serialize};

/// Which kernels a CubeCL backend runs for the op ([`RetentionOptions::kernels`]); the
/// plain-tensor backends (ndarray, tch) ignore it. Every choice computes the same result to
/// within its dtype's rounding: the choice exists to compare and test the kernel families on
/// one device (`retention selftest --kernels`, `retention bench --kernels`).
///
/// [`RetentionOptions::kernels`]: crate::RetentionOptions::kernels
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum KernelChoice {
    /// The fastest kernels the device runs: for half-precision inputs, CUDA's manually managed
    /// `mma.sync`, elsewhere `cmma` where the device has it; FMA register tiles otherwise and
    /// for f32 inputs.
    #[default]
    Auto,
    /// Tensor cores through `cmma` only (the kernels HIP and Vulkan run), also on CUDA.
    Cmma,
    /// Register tiles on the FMA units only.
    Fma,
}
