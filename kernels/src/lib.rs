//! # retention-kernels
//!
//! CubeCL kernels for power retention, written once and compiled for CUDA, ROCm/HIP and wgpu.
//! Generic over `cubecl::Runtime`; no Burn types here (the `retention` crate adapts them).
//!
//! Planned kernels (each with a CPU reference and a register-tile fallback where `cmma` is
//! unavailable, e.g. lavapipe): chunk state update with φ built on chip, discounted
//! cumulative sum across chunks, fused query-state + intra-chunk attention + normalisation,
//! attention form, and a batched decode step. Until they land, every backend runs the
//! plain-tensor reference in `retention::reference`.
#![warn(missing_docs)]

pub use cubecl;
