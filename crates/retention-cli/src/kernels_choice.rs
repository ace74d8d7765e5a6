//! Choosing the kernel family on the command line.

use clap::ValueEnum;
use retention::KernelChoice;

/// A kernel family selectable with `--kernels` (the same results whichever; for comparing and
/// testing them on one device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum KernelsChoice {
    /// The fastest the device runs (CUDA: manually managed `mma` for half inputs).
    #[default]
    Auto,
    /// Tensor cores through `cmma` only (the HIP and Vulkan kernels), also on CUDA.
    Cmma,
    /// FMA register tiles only.
    Fma,
}

impl KernelsChoice {
    /// The op's [`KernelChoice`].
    pub fn choice(self) -> KernelChoice {
        match self {
            Self::Auto => KernelChoice::Auto,
            Self::Cmma => KernelChoice::Cmma,
            Self::Fma => KernelChoice::Fma,
        }
    }
}
