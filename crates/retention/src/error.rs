//! Typed errors for bad input to the retention op, its state and its module.

use thiserror::Error;

/// What went wrong with the arguments of [`power_retention`](crate::power_retention) and
/// friends. Every variant names the argument, what was expected and what was given.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RetentionError {
    /// A tensor has the wrong number of dimensions.
    #[error("`{arg}` must have rank {expected} ({layout}), got rank {got} with shape {shape:?}")]
    Rank {
        /// Argument name.
        arg: &'static str,
        /// Expected rank.
        expected: usize,
        /// Expected layout, in words.
        layout: &'static str,
        /// Rank given.
        got: usize,
        /// Shape given.
        shape: Vec<usize>,
    },
    /// Two tensors disagree on the batch size or on the sequence length.
    #[error(
        "`{arg}` has {dim} {got} but `{reference}` has {expected} (shape of `{arg}`: {shape:?})"
    )]
    Mismatch {
        /// Argument whose dimension is wrong.
        arg: &'static str,
        /// The argument it is compared with.
        reference: &'static str,
        /// Which dimension (`batch`, `seq`, `heads`, ...).
        dim: &'static str,
        /// The value of that dimension in `reference`.
        expected: usize,
        /// The value in `arg`.
        got: usize,
        /// Full shape of `arg`.
        shape: Vec<usize>,
    },
    /// Query heads are not a positive multiple of key/value heads (grouped-query attention).
    #[error(
        "`q` heads ({query_heads}) must be a positive multiple of `k`/`v` heads ({kv_heads}) for grouped-query attention"
    )]
    HeadRatio {
        /// Heads of `q`.
        query_heads: usize,
        /// Heads of `k` and `v`.
        kv_heads: usize,
    },
    /// `q` and `k` have different head dimensions (or one of them is zero).
    #[error("`{arg}` head_dim must be {expected} (the head_dim of `q`), got {got}")]
    HeadDim {
        /// Argument name.
        arg: &'static str,
        /// Expected head dimension.
        expected: usize,
        /// Given head dimension.
        got: usize,
    },
    /// A dimension that must be at least 1 is zero.
    #[error("`{arg}` has an empty `{dim}` dimension (shape {shape:?}); it must be at least 1")]
    Empty {
        /// Argument name.
        arg: &'static str,
        /// Which dimension.
        dim: &'static str,
        /// Full shape of `arg`.
        shape: Vec<usize>,
    },
    /// The degree is odd or zero: power weights `(q·k)^p` are only non-negative for even `p`.
    #[error(
        "`degree` must be even and at least 2 (the weights (q·k)^p must be non-negative), got {0}"
    )]
    Degree(usize),
    /// The feature count `D = C(d + p − 1, p)` does not fit in a `usize`.
    #[error(
        "`degree` {degree} at head_dim {head_dim} needs more features (D = C(d + p − 1, p)) than a usize can count"
    )]
    FeatureCount {
        /// `head_dim` of `q`.
        head_dim: usize,
        /// The degree `p`.
        degree: usize,
    },
    /// Chunk size zero.
    #[error("`chunk_size` must be at least 1, got 0")]
    ChunkSize,
    /// A tensor with more elements than the kernels index (32-bit positions) or than one
    /// allocation on its device holds as f32 (the runtime's page limit: 128 MiB on wgpu's
    /// lavapipe), or a chunk whose state alone is larger than `segment_elements`.
    #[error(
        "`{arg}` has {elements} elements (shape {shape:?}); at most {limit} are supported: split the sequence and pass the state on (`power_retention_with_state`), or use a smaller batch"
    )]
    TooLarge {
        /// The argument (or `chunk state` for one chunk's state).
        arg: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// Its element count.
        elements: usize,
        /// The largest count allowed.
        limit: usize,
    },
    /// The scale is not a finite positive number.
    #[error("`scale` must be finite and positive, got {0}")]
    Scale(f64),
    /// The gate tensor does not have the shape `[batch, seq, kv_heads]`.
    #[error("`log_g` must have shape {expected:?} ([batch, seq, kv_heads]), got {got:?}")]
    GateShape {
        /// Expected shape.
        expected: Vec<usize>,
        /// Given shape.
        got: Vec<usize>,
    },
    /// A state tensor does not match the inputs.
    #[error("`{arg}` must have shape {expected:?} ({layout}), got {got:?}")]
    StateShape {
        /// Which state tensor (`state`, `key_sum`, a cache's `keys` or `values`).
        arg: &'static str,
        /// Expected layout, in words.
        layout: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Given shape.
        got: Vec<usize>,
    },
    /// The recurrent step takes exactly one token.
    #[error("`{arg}` must hold exactly one token for a recurrent step, got seq = {got}")]
    StepLength {
        /// Argument name.
        arg: &'static str,
        /// Sequence length given.
        got: usize,
    },
    /// A decode state's window length is out of range.
    #[error("`fold_every` must be in 1..={max}, got {got}")]
    FoldEvery {
        /// Given value.
        got: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A module configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A device failed to run or return the work asked of it: a kernel that did not build, an
    /// allocation it refused, a transfer or a read that failed (see
    /// [`check_device`](crate::check_device)).
    #[error("device error: {0}")]
    Device(String),
}
