//! Each chunk's contribution to the state, kept between the two passes of context parallelism.

use burn::tensor::{backend::Backend, ops::FloatTensor};

/// What each chunk of a sequence adds to the state, before the scan across chunks:
/// `ΔS_u = Σ_{j in u} e^{G_end(u) − G_j} φ(k_j) v_jᵀ` and `Δz_u = Σ_{j in u} e^{G_end(u) − G_j} φ(k_j)`.
///
/// [`RetentionBackend::retention_chunked_state_keeping`](crate::RetentionBackend::retention_chunked_state_keeping)
/// returns them beside a slice's own final state; the second pass over the same tokens
/// ([`RetentionBackend::retention_chunked_from_contributions`](crate::RetentionBackend::retention_chunked_from_contributions))
/// then scans them from the state the slice starts from instead of computing them again.
/// The layout is the backend's own (`D` as its kernels lay the features out); only the backend
/// that made them reads them.
#[derive(Debug, Clone)]
pub struct ChunkContributions<B: Backend> {
    /// `ΔS`, `f32 [b, h, n, D, e]` (`n` chunks).
    pub states: FloatTensor<B>,
    /// `Δz`, `f32 [b, h, n, D]`.
    pub sums: FloatTensor<B>,
}
