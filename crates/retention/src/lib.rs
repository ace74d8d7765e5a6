//! # retention
//!
//! Power retention for [Burn](https://burn.dev): the attention replacement whose per-token cost
//! and memory stay constant as the context grows.
//!
//! - [`power_retention`]: the op, `[batch, seq, heads, head_dim]` in and out, generic over
//!   [`RetentionBackend`] (every Burn backend; kernel backends override its methods).
//! - Three equivalent forms: attention (quadratic, `chunk_size: None`), chunked (linear), and the
//!   recurrent step ([`power_retention_step`] on a [`RetentionState`], or
//!   [`power_retention_decode`] on a [`DecodeState`], which rewrites the state only every few
//!   tokens).
//! - [`PowerRetention`]: a Burn module with `query`/`key`/`value`/`output`/`gate` projections,
//!   and [`SequenceMixer`] to swap it for attention with one config line.
//!
//! The math: for query `i`, `y_i = Σ_{j≤i} w_ij v_j / Σ_{j≤i} w_ij` with
//! `w_ij = (σ q_i·k_j)^p · e^{G_i − G_j}`, `G` the cumulative log-gate. Equivalently
//! `S_i = g_i S_{i−1} + φ(k_i) v_iᵀ`, `z_i = g_i z_{i−1} + φ(k_i)`, `y_i = Sᵀφ(q_i) / zᵀφ(q_i)`
//! with φ the symmetric power feature map ([`SympowLayout`]).
#![warn(missing_docs)]

mod autodiff_backend;
mod backend;
mod backward;
mod chunk_contributions;
mod compute_dtype;
mod context_parallel;
#[cfg(feature = "cube")]
mod cube_backend;
#[cfg(feature = "cube")]
mod cube_backward;
mod decode_state;
mod device_failure;
mod device_move;
mod error;
mod feature_map;
#[cfg(feature = "cube")]
mod fusion_backend;
mod kernel_choice;
mod mixer;
mod mixer_cache;
mod module;
mod op;
mod options;
pub mod reference;
mod rotary;
mod rotary_attention;
mod shapes;
mod state;
pub mod validation;

pub use backend::RetentionBackend;
pub use backward::{ChunkedUpstream, ForwardRows, RetentionGrads, RetentionInputs};
pub use chunk_contributions::ChunkContributions;
pub use compute_dtype::ComputeDtype;
pub use context_parallel::{
    SequenceSlice, power_retention_context_parallel, power_retention_state,
};
pub use decode_state::{DecodeState, MAX_FOLD_EVERY, power_retention_decode};
pub use device_failure::check_device;
pub use device_move::{DeviceTransfer, to_device_synced};
pub use error::RetentionError;
pub use feature_map::{SympowLayout, checked_expanded_dim, expanded_dim, pair_block};
pub use kernel_choice::KernelChoice;
pub use mixer::{SequenceMixer, SequenceMixerConfig};
pub use mixer_cache::MixerCache;
pub use module::{PowerRetention, PowerRetentionConfig};
pub use op::{power_retention, power_retention_step, power_retention_with_state};
pub use options::{DEFAULT_SEGMENT_ELEMENTS, MAX_TENSOR_ELEMENTS, RetentionOptions};
pub use rotary::rotate_pairs;
pub use rotary_attention::{AttentionOutput, RotaryAttention, RotaryAttentionConfig};
pub use shapes::{RetentionDims, check_shapes, check_state_shapes};
pub use state::RetentionState;
