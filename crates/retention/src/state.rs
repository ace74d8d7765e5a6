//! The recurrent state of power retention: what a decoder keeps between tokens.

use burn::tensor::{DType, Tensor, backend::Backend};

use crate::{RetentionDims, RetentionError, expanded_dim};

/// State of power retention after some tokens: `S = Σ_j e^{G_T − G_j} φ_K(k_j) v_jᵀ` and
/// `z = Σ_j e^{G_T − G_j} φ_K(k_j)`, per batch element and key/value head.
///
/// Its size does not depend on how many tokens it summarises; a decode step reads and updates
/// it in O(1) of the context. φ uses the layout of [`SympowLayout`](crate::SympowLayout): for
/// degree 2 the block layout `D = d(d+β)/2` ([`pair_block`](crate::pair_block)), otherwise
/// `D = C(d+p−1, p)`; [`expanded_dim`](crate::expanded_dim) gives `D`.
///
/// # Shapes
/// - `state`: `[batch, kv_heads, D, value_dim]`
/// - `key_sum`: `[batch, kv_heads, D]`
#[derive(Debug, Clone)]
pub struct RetentionState<B: Backend> {
    /// `S`, `[batch, kv_heads, D, value_dim]`.
    pub state: Tensor<B, 4>,
    /// `z`, `[batch, kv_heads, D]`.
    pub key_sum: Tensor<B, 3>,
}

impl<B: Backend> RetentionState<B> {
    /// The empty state (no token seen yet).
    ///
    /// # Arguments
    /// - `batch`, `kv_heads`, `head_dim`, `value_dim`: problem sizes
    /// - `degree`: the power `p` (sets `D`)
    /// - `dtype`: element type of the state (`F32` is a good choice for decoding half-precision models)
    pub fn zeros(
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        value_dim: usize,
        degree: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let big_d = expanded_dim(head_dim, degree);
        Self {
            state: Tensor::zeros([batch, kv_heads, big_d, value_dim], (device, dtype)),
            key_sum: Tensor::zeros([batch, kv_heads, big_d], (device, dtype)),
        }
    }

    /// Checks this state against the sizes of a problem.
    ///
    /// # Errors
    /// [`RetentionError::StateShape`] naming `state` or `key_sum`.
    pub fn check(&self, dims: &RetentionDims, degree: usize) -> Result<(), RetentionError> {
        crate::shapes::check_state_shapes(dims, degree, &self.state.dims(), &self.key_sum.dims())
    }

    /// This state in `dtype` (both tensors). Every call that advances a given state (a step,
    /// a decode step's absorption, a prefill from it) returns it in the dtype it came in, so a
    /// state cast to bf16 stays bf16 (half the memory, rounded after every step, as Manifest's
    /// library keeps it) and an f32 one f32.
    pub fn cast(self, dtype: DType) -> Self {
        fn to<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
            if x.dtype() == dtype { x } else { x.cast(dtype) }
        }
        Self {
            state: to(self.state, dtype),
            key_sum: to(self.key_sum, dtype),
        }
    }

    /// Element type of the state.
    pub fn dtype(&self) -> DType {
        self.state.dtype()
    }

    /// Batch size.
    pub fn batch(&self) -> usize {
        self.state.dims()[0]
    }

    /// Bytes held (state plus key-sum).
    pub fn size_bytes(&self) -> usize {
        self.state.shape().num_elements() * self.state.dtype().size()
            + self.key_sum.shape().num_elements() * self.key_sum.dtype().size()
    }
}

impl<B: crate::RetentionBackend> RetentionState<B> {
    /// This state on `device` (both tensors, one [`DeviceTransfer`](crate::DeviceTransfer):
    /// the destination synced before and after the moves, since a plain move between two CUDA
    /// devices can race the work queued on either).
    ///
    /// # Errors
    /// [`RetentionError::Device`](crate::RetentionError::Device) where syncing the destination
    /// fails.
    pub fn to_device(self, device: &B::Device) -> Result<Self, crate::RetentionError> {
        let mut transfer = crate::DeviceTransfer::<B>::begin(device)?;
        let moved = Self {
            state: transfer.move_tensor(self.state)?,
            key_sum: transfer.move_tensor(self.key_sum)?,
        };
        transfer.finish()?;
        Ok(moved)
    }
}
