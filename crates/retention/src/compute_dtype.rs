//! The element type a [`PowerRetention`](crate::PowerRetention) layer runs the op in.

use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// The element type a layer's whole-sequence op runs in: its queries, keys, values and
/// log-gates are cast to it before the op and the output back after it, so an `f32` model
/// can train its retention layers on the tensor-core kernels (`Bf16`, `F16`) while its
/// projections, weights and optimizer stay in `f32`: mixed precision for the op alone, as
/// flash attention is used in `f32` models. Gradients flow through both casts.
///
/// The state-carrying methods (prefill, decoding) keep the model's dtype, whose `f32` state
/// the decoded tokens accumulate into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ComputeDtype {
    /// The dtype the projections produce (no cast).
    #[default]
    Input,
    /// `f64` (checks against a wider op).
    F64,
    /// `f32`.
    F32,
    /// `f16`, f32 accumulation.
    F16,
    /// `bf16`, f32 accumulation.
    Bf16,
}

impl ComputeDtype {
    /// The dtype to cast to; `None` for [`Input`](Self::Input).
    pub fn dtype(self) -> Option<DType> {
        match self {
            Self::Input => None,
            Self::F64 => Some(DType::F64),
            Self::F32 => Some(DType::F32),
            Self::F16 => Some(DType::F16),
            Self::Bf16 => Some(DType::BF16),
        }
    }

    /// `x` in this dtype (as it is for [`Input`](Self::Input) or when it already is).
    pub(crate) fn cast<B: burn::tensor::backend::Backend, const D: usize>(
        self,
        x: Tensor<B, D>,
    ) -> Tensor<B, D> {
        match self.dtype() {
            Some(dtype) if x.dtype() != dtype => x.cast(dtype),
            _ => x,
        }
    }
}
