//! The power retention layer as a Burn module.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{DType, Tensor, activation::log_sigmoid, backend::Backend};

use crate::rotary::RotaryAngles;
use crate::{
    ComputeDtype, DecodeState, RetentionBackend, RetentionError, RetentionOptions, RetentionState,
    power_retention, power_retention_decode, power_retention_step, power_retention_with_state,
};

/// Configuration of a [`PowerRetention`] layer.
///
/// ```
/// use retention::PowerRetentionConfig;
/// // Brumby-14B's heads: 40 query heads, 8 key/value heads, head_dim 128, no biases
/// let cfg = PowerRetentionConfig::new(5120, 40)
///     .with_n_kv_heads(Some(8))
///     .with_gate_bias(None)
///     .with_chunk_size(Some(1024));
/// assert_eq!(cfg.head_dim(), 128);
/// ```
#[derive(Config, Debug)]
pub struct PowerRetentionConfig {
    /// Width of the input and output, `d_model`.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query retention); `None` = `n_heads`.
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// Head dimension; `None` = `d_model / n_heads`.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    /// The power `p` (even).
    #[config(default = 2)]
    pub degree: usize,
    /// Chunk size of the linear-time form; `None` = quadratic attention form.
    #[config(default = "Some(128)")]
    pub chunk_size: Option<usize>,
    /// Scale σ of the scores; `None` = `1/√head_dim`.
    #[config(default = "None")]
    pub scale: Option<f64>,
    /// Data-dependent gating: `log_g = logsigmoid(gate(x))`, one gate per key/value head.
    #[config(default = true)]
    pub gating: bool,
    /// Initial bias of the gate projection (`6.906768` gives gates ≈ 0.999 at start);
    /// `None` = a gate projection without bias (as in Brumby-14B).
    #[config(default = "Some(6.906768)")]
    pub gate_bias: Option<f64>,
    /// Biases on the query, key, value and output projections.
    #[config(default = false)]
    pub bias: bool,
    /// Rotary position encoding of the queries and keys with this base `θ`
    /// ([`rotate_pairs`](crate::rotate_pairs), at absolute positions), as in the rotary
    /// attention a layer is converted from; `None`: none. A layer with it continues from a
    /// state only through the `_at` methods, which take the position.
    #[config(default = "None")]
    pub rotary_theta: Option<f64>,
    /// The element type [`forward`](PowerRetention::forward) runs the op in (mixed
    /// precision: [`ComputeDtype`]).
    #[config(default = "ComputeDtype::Input")]
    pub compute_dtype: ComputeDtype,
    /// Initializer of the projection weights (same default as Burn's `MultiHeadAttention`).
    #[config(
        default = "Initializer::KaimingUniform{gain:0.577_350_269_189_625_8, fan_out_only:false}"
    )]
    pub initializer: Initializer,
}

impl PowerRetentionConfig {
    /// Key/value heads actually used.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// Head dimension actually used.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Options passed to the op.
    pub fn options(&self) -> RetentionOptions {
        RetentionOptions::new()
            .with_degree(self.degree)
            .with_scale(self.scale)
            .with_chunk_size(self.chunk_size)
    }

    fn check(&self) -> Result<(), RetentionError> {
        let bad = |m: String| Err(RetentionError::Config(m));
        if self.d_model == 0 || self.n_heads == 0 {
            return bad(format!(
                "d_model ({}) and n_heads ({}) must be positive",
                self.d_model, self.n_heads
            ));
        }
        let (h, d) = (self.kv_heads(), self.head_dim());
        if h == 0 || self.n_heads % h != 0 {
            return Err(RetentionError::HeadRatio {
                query_heads: self.n_heads,
                kv_heads: h,
            });
        }
        if d == 0 {
            return bad(format!(
                "head_dim is 0 (d_model {} / n_heads {}); set head_dim",
                self.d_model, self.n_heads
            ));
        }
        if let Some(theta) = self.rotary_theta
            && (d % 2 != 0 || !theta.is_finite() || theta <= 0.0)
        {
            return bad(format!(
                "rotary encoding needs an even head dim and θ > 0 (head dim {d}, θ {theta})"
            ));
        }
        self.options().validate()?;
        crate::shapes::check_feature_count(d, self.degree)
    }

    /// Builds the layer.
    ///
    /// # Errors
    /// [`RetentionError::HeadRatio`] when `n_heads` is not a multiple of `n_kv_heads`,
    /// [`RetentionError::Degree`] / [`RetentionError::ChunkSize`] / [`RetentionError::Scale`]
    /// for bad options, [`RetentionError::FeatureCount`] for a degree whose feature count no
    /// `usize` holds, [`RetentionError::Config`] for zero sizes.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<PowerRetention<B>, RetentionError> {
        self.check()?;
        let (hq, h, d) = (self.n_heads, self.kv_heads(), self.head_dim());
        let linear = |d_in: usize, d_out: usize, bias: bool| {
            LinearConfig::new(d_in, d_out)
                .with_bias(bias)
                .with_initializer(self.initializer.clone())
                .init(device)
        };
        let gate = self.gating.then(|| {
            let mut gate = LinearConfig::new(self.d_model, h)
                .with_bias(self.gate_bias.is_some())
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device);
            if let Some(b) = self.gate_bias {
                gate.bias = Some(Param::from_tensor(Tensor::full([h], b, device)));
            }
            gate
        });
        Ok(PowerRetention {
            query: linear(self.d_model, hq * d, self.bias),
            key: linear(self.d_model, h * d, self.bias),
            value: linear(self.d_model, h * d, self.bias),
            output: linear(hq * d, self.d_model, self.bias),
            gate,
            d_model: self.d_model,
            n_heads: hq,
            n_kv_heads: h,
            head_dim: d,
            rotary_theta: self.rotary_theta,
            compute_dtype: self.compute_dtype,
            options: self.options(),
        })
    }
}

/// Power retention layer: projections to queries, keys, values and per-head log-gates, the
/// retention op, and an output projection. A drop-in for Burn's `MultiHeadAttention` (same
/// projection names) with constant per-token cost when decoding.
///
/// Created with [`PowerRetentionConfig::init`].
#[derive(Module, Debug)]
pub struct PowerRetention<B: Backend> {
    /// `d_model → n_heads · head_dim`.
    pub query: Linear<B>,
    /// `d_model → n_kv_heads · head_dim`.
    pub key: Linear<B>,
    /// `d_model → n_kv_heads · head_dim`.
    pub value: Linear<B>,
    /// `n_heads · head_dim → d_model`.
    pub output: Linear<B>,
    /// `d_model → n_kv_heads`; `log_g = logsigmoid(gate(x))`. `None` without gating.
    pub gate: Option<Linear<B>>,
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Base of the rotary encoding of queries and keys; `None`: none.
    pub rotary_theta: Option<f64>,
    /// The element type [`forward`](Self::forward) runs the op in.
    #[module(skip)]
    pub compute_dtype: ComputeDtype,
    /// Options of the op.
    #[module(skip)]
    pub options: RetentionOptions,
}

type Projected<B> = (
    Tensor<B, 4>,
    Tensor<B, 4>,
    Tensor<B, 4>,
    Option<Tensor<B, 3>>,
);

impl<B: RetentionBackend> PowerRetention<B> {
    /// Queries, keys, values and log-gates of the tokens of `x`, the first at position
    /// `start` (for the rotary encoding).
    fn project(&self, x: Tensor<B, 3>, start: usize) -> Result<Projected<B>, RetentionError> {
        let [b, t, _] = x.dims();
        crate::shapes::check_width(x.dims(), self.d_model)?;
        let (hq, h, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let mut q = self.query.forward(x.clone()).reshape([b, t, hq, d]);
        let mut k = self.key.forward(x.clone()).reshape([b, t, h, d]);
        if let Some(theta) = self.rotary_theta {
            // one table of angles for the queries and the keys
            let angles = RotaryAngles::new(start, t, d, theta, &q.device());
            q = angles.rotate(q);
            k = angles.rotate(k);
        }
        let v = self.value.forward(x.clone()).reshape([b, t, h, d]);
        let log_g = self.gate.as_ref().map(|g| log_sigmoid(g.forward(x)));
        Ok((q, k, v, log_g))
    }

    /// [`project`](Self::project) for one new token (`x` of one position, else
    /// [`RetentionError::StepLength`]).
    fn project_token(
        &self,
        x: Tensor<B, 3>,
        position: usize,
    ) -> Result<Projected<B>, RetentionError> {
        let [_, t, _] = x.dims();
        if t != 1 {
            return Err(RetentionError::StepLength { arg: "x", got: t });
        }
        self.project(x, position)
    }

    /// [`RetentionError::Config`] for a layer with a rotary encoding continued through a
    /// method that does not take the position.
    fn positions_unknown(&self, method: &str) -> Result<(), RetentionError> {
        match self.rotary_theta {
            Some(_) => Err(RetentionError::Config(format!(
                "a layer with a rotary encoding continues from a state with {method}_at, which \
                 takes the position"
            ))),
            None => Ok(()),
        }
    }

    fn merge(&self, y: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, t, hq, d] = y.dims();
        self.output.forward(y.reshape([b, t, hq * d]))
    }

    /// Mixes a whole sequence (training, scoring), the op in the layer's
    /// [`ComputeDtype`].
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    ///
    /// # Errors
    /// [`RetentionError::Mismatch`] when the width of `x` is not `d_model`;
    /// [`RetentionError::Config`] when the backend has no tensors of the layer's
    /// [`ComputeDtype`] (bf16 on ndarray).
    pub fn forward(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, RetentionError> {
        let dtype = x.dtype();
        let c = self.compute_dtype;
        // the half types are the ones a backend may lack (ndarray has none); ndarray's report
        // for f64, which it casts to, was seen to vary with the build's features
        if let Some(wanted @ (DType::F16 | DType::BF16)) = c.dtype()
            && !B::supports_dtype(&x.device(), wanted)
        {
            return Err(RetentionError::Config(format!(
                "compute_dtype {c:?}: the backend has no {wanted:?} tensors on this device"
            )));
        }
        let (q, k, v, log_g) = self.project(x, 0)?;
        let y = power_retention(
            c.cast(q),
            c.cast(k),
            c.cast(v),
            log_g.map(|g| c.cast(g)),
            &self.options,
        )?;
        Ok(self.merge(if y.dtype() == dtype { y } else { y.cast(dtype) }))
    }

    /// The layer with [`forward`](Self::forward) running the op in `dtype`.
    pub fn with_compute_dtype(self, dtype: ComputeDtype) -> Self {
        Self {
            compute_dtype: dtype,
            ..self
        }
    }

    /// Mixes a prompt, continuing from `state` if given, and returns the state after it
    /// (prefill before decoding with [`forward_step`](Self::forward_step)).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward), plus [`RetentionError::StateShape`];
    /// [`RetentionError::Config`] for a state given to a layer with a rotary encoding (use
    /// [`prefill_at`](Self::prefill_at)).
    pub fn prefill(
        &self,
        x: Tensor<B, 3>,
        state: Option<RetentionState<B>>,
    ) -> Result<(Tensor<B, 3>, RetentionState<B>), RetentionError> {
        if state.is_some() {
            self.positions_unknown("prefill")?;
        }
        self.prefill_at(x, state, 0)
    }

    /// [`prefill`](Self::prefill) of tokens whose first is at position `start` (the tokens
    /// `state` summarises), for the rotary encoding.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward), plus [`RetentionError::StateShape`].
    pub fn prefill_at(
        &self,
        x: Tensor<B, 3>,
        state: Option<RetentionState<B>>,
        start: usize,
    ) -> Result<(Tensor<B, 3>, RetentionState<B>), RetentionError> {
        let (q, k, v, log_g) = self.project(x, start)?;
        let (y, state) = power_retention_with_state(q, k, v, log_g, state, &self.options)?;
        Ok((self.merge(y), state))
    }

    /// Mixes one new token, updating `state` in place; O(1) in the context length.
    ///
    /// # Shapes
    /// - `x`: `[batch, 1, d_model]` → `[batch, 1, d_model]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward), plus [`RetentionError::StepLength`] and
    /// [`RetentionError::StateShape`]; [`RetentionError::Config`] for a layer with a rotary
    /// encoding (use [`forward_step_at`](Self::forward_step_at)). On error `state` is left
    /// unchanged.
    pub fn forward_step(
        &self,
        x: Tensor<B, 3>,
        state: &mut RetentionState<B>,
    ) -> Result<Tensor<B, 3>, RetentionError> {
        self.positions_unknown("forward_step")?;
        self.forward_step_at(x, state, 0)
    }

    /// [`forward_step`](Self::forward_step) of the token at `position` (the number of tokens
    /// `state` summarises), for the rotary encoding.
    ///
    /// # Shapes
    /// - `x`: `[batch, 1, d_model]` → `[batch, 1, d_model]`
    ///
    /// # Errors
    /// As [`forward_step`](Self::forward_step) but for the rotary encoding. On error `state`
    /// is left unchanged.
    pub fn forward_step_at(
        &self,
        x: Tensor<B, 3>,
        state: &mut RetentionState<B>,
        position: usize,
    ) -> Result<Tensor<B, 3>, RetentionError> {
        let (q, k, v, log_g) = self.project_token(x, position)?;
        let (y, next) = power_retention_step(q, k, v, log_g, state.clone(), &self.options)?;
        *state = next;
        Ok(self.merge(y))
    }

    /// Mixes one new token on a [`DecodeState`], which keeps the last tokens beside the state
    /// and rewrites it only every [`DecodeState::fold_every`] tokens (a step then reads the
    /// state once instead of reading and writing it); outputs equal
    /// [`forward_step`](Self::forward_step)'s up to rounding.
    ///
    /// # Shapes
    /// - `x`: `[batch, 1, d_model]` → `[batch, 1, d_model]`
    ///
    /// # Errors
    /// As [`forward_step`](Self::forward_step) (a layer with a rotary encoding decodes with
    /// [`forward_step_at`](Self::forward_step_at)). On error `state` is left unchanged.
    pub fn forward_decode(
        &self,
        x: Tensor<B, 3>,
        state: &mut DecodeState<B>,
    ) -> Result<Tensor<B, 3>, RetentionError> {
        self.positions_unknown("forward_step")?;
        let (q, k, v, log_g) = self.project_token(x, 0)?;
        let (y, next) = power_retention_decode(q, k, v, log_g, state.clone(), &self.options)?;
        *state = next;
        Ok(self.merge(y))
    }

    /// The empty state for `batch` sequences, in `f32`.
    pub fn init_state(&self, batch: usize, device: &B::Device) -> RetentionState<B> {
        RetentionState::zeros(
            batch,
            self.n_kv_heads,
            self.head_dim,
            self.head_dim,
            self.options.degree,
            DType::F32,
            device,
        )
    }
}
