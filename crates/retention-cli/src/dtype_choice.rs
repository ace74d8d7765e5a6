//! Choosing an element type on the command line.

use burn::tensor::DType;
use clap::ValueEnum;
use retention::ComputeDtype;

/// A dtype selectable with `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeChoice {
    /// 64-bit float (CPU backends).
    F64,
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl DtypeChoice {
    /// The Burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F64 => DType::F64,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// The same dtype as a layer's [`ComputeDtype`].
    pub fn compute(self) -> ComputeDtype {
        match self {
            Self::F64 => ComputeDtype::F64,
            Self::F32 => ComputeDtype::F32,
            Self::F16 => ComputeDtype::F16,
            Self::Bf16 => ComputeDtype::Bf16,
        }
    }
}
