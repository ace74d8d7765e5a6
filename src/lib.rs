//! # power-retention
//!
//! Power retention for [Burn](https://burn.dev): a recurrent attention replacement whose
//! per-token cost and memory stay constant as the context grows.
//!
//! This facade re-exports the [`retention`] crate (op, backend trait, module, state) at its
//! root and [`retention_models`] (a decoder language model, its data pipeline and training
//! loop) as [`models`]; see their documentation, the README, `examples/swap_into_transformer.rs`
//! and `examples/train_lm.rs`.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use power_retention::{RetentionOptions, power_retention};
//!
//! let dev = Default::default();
//! let n = |s: [usize; 4]| Tensor::<NdArray, 4>::random(s, Distribution::Normal(0.0, 1.0), &dev);
//! let (q, k, v) = (n([2, 100, 8, 64]), n([2, 100, 2, 64]), n([2, 100, 2, 64]));
//! let y = power_retention(q, k, v, None, &RetentionOptions::new().with_chunk_size(Some(32)))?;
//! assert_eq!(y.dims(), [2, 100, 8, 64]);
//! # Ok::<(), power_retention::RetentionError>(())
//! ```
#![warn(missing_docs)]

pub use retention::*;

/// Models built on the layer: see [`retention_models`].
pub use retention_models as models;
