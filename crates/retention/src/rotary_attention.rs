//! Causal softmax attention as Llama-family models compute it: rotary position encoding on the
//! queries and keys (adjacent coordinate pairs, the layout GGUF checkpoints store), grouped
//! key/value heads, no biases. The attention side of [`SequenceMixer`](crate::SequenceMixer)
//! for pretrained Llama-family weights.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RotaryEncoding, RotaryEncodingConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Int, Tensor, backend::Backend};

use crate::RetentionError;
use crate::shapes::check_width;

/// Configuration of a [`RotaryAttention`].
#[derive(Config, Debug)]
pub struct RotaryAttentionConfig {
    /// Width of the input and output.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (dividing `n_heads`; each serves `n_heads / n_kv_heads` query heads).
    pub n_kv_heads: usize,
    /// The rotary base `θ`.
    #[config(default = 10000.0)]
    pub rope_theta: f32,
    /// The longest sequence the rotary table covers.
    #[config(default = 8192)]
    pub max_seq: usize,
}

impl RotaryAttentionConfig {
    /// Builds the layer.
    ///
    /// # Errors
    /// [`RetentionError::Config`] when the heads do not divide the width or each other, the
    /// head dim is odd or `θ` is not positive.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<RotaryAttention<B>, RetentionError> {
        let bad = |why: String| Err(RetentionError::Config(why));
        if self.n_heads == 0 || self.d_model % self.n_heads != 0 {
            return bad(format!(
                "d_model {} is not a multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        let head_dim = self.d_model / self.n_heads;
        if head_dim % 2 != 0 || !self.rope_theta.is_finite() || self.rope_theta <= 0.0 {
            return bad(format!(
                "rotary encoding needs an even head dim and θ > 0 (head dim {head_dim}, θ {})",
                self.rope_theta
            ));
        }
        let linear = |out: usize| {
            LinearConfig::new(self.d_model, out)
                .with_bias(false)
                .init(device)
        };
        Ok(RotaryAttention {
            query: linear(self.d_model),
            key: linear(self.n_kv_heads * head_dim),
            value: linear(self.n_kv_heads * head_dim),
            output: linear(self.d_model),
            rope: RotaryEncodingConfig::new(self.max_seq, head_dim)
                .with_theta(self.rope_theta)
                .init(device),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim,
            max_seq: self.max_seq,
            rope_theta: self.rope_theta,
        })
    }
}

/// Causal grouped-query attention with rotary position encoding.
#[derive(Module, Debug)]
pub struct RotaryAttention<B: Backend> {
    /// `W_q`, `[d_model, n_heads · head_dim]`.
    pub query: Linear<B>,
    /// `W_k`, `[d_model, n_kv_heads · head_dim]`.
    pub key: Linear<B>,
    /// `W_v`, `[d_model, n_kv_heads · head_dim]`.
    pub value: Linear<B>,
    /// `W_o`, `[n_heads · head_dim, d_model]`.
    pub output: Linear<B>,
    rope: RotaryEncoding<B>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    max_seq: usize,
    rope_theta: f32,
}

impl<B: Backend> RotaryAttention<B> {
    /// The longest sequence the rotary table covers.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// The same layer with a rotary table of `max_seq` positions (longer sequences than the
    /// weights were trained on give what extrapolation gives; timing needs no more).
    pub fn with_max_seq(self, max_seq: usize, device: &B::Device) -> Self {
        Self {
            rope: RotaryEncodingConfig::new(max_seq, self.head_dim)
                .with_theta(self.rope_theta)
                .init(device),
            max_seq,
            ..self
        }
    }

    /// The rotary base `θ`.
    pub fn rope_theta(&self) -> f32 {
        self.rope_theta
    }

    /// Query heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Key/value heads.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    ///
    /// # Errors
    /// [`RetentionError::Mismatch`] when `x`'s width is not `d_model`;
    /// [`RetentionError::Config`] when `seq` exceeds the configured `max_seq`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, RetentionError> {
        Ok(self.attend(x, None)?.0)
    }

    /// Mixes the next `seq` tokens after the `past` ones, whose rotated keys and values are
    /// given (`None`: none), and returns them with the new ones appended, the cache of
    /// [`MixerCache::KeysValues`](crate::MixerCache::KeysValues). Outputs equal
    /// [`forward`](Self::forward)'s over the whole sequence at the same positions.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    /// - `past` and the returned keys and values: `[batch, n_kv_heads, tokens, head_dim]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward) (`max_seq` bounds the past and new tokens together), plus
    /// [`RetentionError::StateShape`] when `past` does not fit `x`.
    pub fn attend(
        &self,
        x: Tensor<B, 3>,
        past: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Result<AttentionOutput<B>, RetentionError> {
        let [b, t, _] = x.dims();
        check_width(x.dims(), self.n_heads * self.head_dim)?;
        let (h, hk, dh) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let seen = match &past {
            None => 0,
            Some((keys, values)) => {
                let seen = keys.dims()[2];
                for (arg, tensor) in [("keys", keys), ("values", values)] {
                    if tensor.dims() != [b, hk, seen, dh] {
                        return Err(RetentionError::StateShape {
                            arg,
                            layout: "[batch, kv_heads, tokens, head_dim]",
                            expected: vec![b, hk, seen, dh],
                            got: tensor.dims().to_vec(),
                        });
                    }
                }
                seen
            }
        };
        let total = seen + t;
        if total > self.max_seq {
            return Err(RetentionError::Config(format!(
                "sequence of {total} tokens exceeds the rotary table's {}",
                self.max_seq
            )));
        }
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, dh]).swap_dims(1, 2);
        let q = self
            .rope
            .apply(heads(self.query.forward(x.clone()), h), seen);
        let k = self
            .rope
            .apply(heads(self.key.forward(x.clone()), hk), seen);
        let v = heads(self.value.forward(x), hk);
        let (keys, values) = match past {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
        };
        // query head i reads key/value head i / (h / hk)
        let group = |y: Tensor<B, 4>| {
            y.unsqueeze_dim::<5>(2)
                .expand([b, hk, h / hk, total, dh])
                .reshape([b, h, total, dh])
        };
        let scores = q.matmul(group(keys.clone()).swap_dims(2, 3)) / (dh as f64).sqrt();
        // new token i (position seen + i) sees the keys up to its own position
        let scores = if t > 1 {
            let device = scores.device();
            let key_pos = Tensor::<B, 1, Int>::arange(0..total as i64, &device)
                .reshape([1, total])
                .expand([t, total]);
            let query_pos = Tensor::<B, 1, Int>::arange(seen as i64..total as i64, &device)
                .reshape([t, 1])
                .expand([t, total]);
            let mask = key_pos
                .greater(query_pos)
                .reshape([1, 1, t, total])
                .expand([b, h, t, total]);
            scores.mask_fill(mask, f32::NEG_INFINITY)
        } else {
            scores
        };
        let weights = softmax(scores, 3);
        let out = weights
            .matmul(group(values.clone()))
            .swap_dims(1, 2)
            .reshape([b, t, h * dh]);
        Ok((self.output.forward(out), keys, values))
    }
}

/// What [`RotaryAttention::attend`] returns: the output `[batch, seq, d_model]`, then the
/// rotated keys and the values of every token so far, `[batch, n_kv_heads, tokens, head_dim]`.
pub type AttentionOutput<B> = (Tensor<B, 3>, Tensor<B, 4>, Tensor<B, 4>);

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::backend::NdArray;
    use burn::module::Param;
    use burn::tensor::{Distribution, Tolerance};

    use super::*;

    type B = NdArray;

    #[test]
    fn wrong_width_and_long_sequences_are_refused() {
        let dev = Default::default();
        let attention = RotaryAttentionConfig::new(32, 4, 2)
            .with_max_seq(8)
            .init::<B>(&dev)
            .expect("builds");
        let wide = Tensor::<B, 3>::zeros([1, 4, 33], &dev);
        assert!(matches!(
            attention.forward(wide),
            Err(RetentionError::Mismatch { .. })
        ));
        let long = Tensor::<B, 3>::zeros([1, 9, 32], &dev);
        assert!(
            matches!(attention.forward(long), Err(RetentionError::Config(m)) if m.contains("9"))
        );
        let odd = RotaryAttentionConfig::new(12, 4, 2).init::<B>(&dev);
        assert!(matches!(odd, Err(RetentionError::Config(m)) if m.contains("even")));
    }

    #[test]
    fn grouped_heads_equal_repeated_full_heads() {
        let dev = Default::default();
        let (d, h, hk, dh) = (32, 4, 2, 8);
        let grouped = RotaryAttentionConfig::new(d, h, hk)
            .with_max_seq(16)
            .init::<B>(&dev)
            .expect("builds");
        let mut full = RotaryAttentionConfig::new(d, h, h)
            .with_max_seq(16)
            .init::<B>(&dev)
            .expect("builds");
        // full head i carries grouped key/value head i / 2
        let repeat = |w: Tensor<B, 2>| {
            w.reshape([d, hk, 1, dh])
                .expand([d, hk, h / hk, dh])
                .reshape([d, h * dh])
        };
        // (values, not clones: a clone of a parameter not yet drawn would draw its own)
        full.query.weight = Param::from_tensor(grouped.query.weight.val());
        full.output.weight = Param::from_tensor(grouped.output.weight.val());
        full.key.weight = Param::from_tensor(repeat(grouped.key.weight.val()));
        full.value.weight = Param::from_tensor(repeat(grouped.value.weight.val()));
        let x = Tensor::<B, 3>::random([2, 7, d], Distribution::Normal(0.0, 1.0), &dev);
        let forward = |a: &RotaryAttention<B>, x: Tensor<B, 3>| a.forward(x).expect("runs");
        forward(&grouped, x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&forward(&full, x).into_data(), Tolerance::default());
    }

    #[test]
    fn later_tokens_do_not_change_earlier_outputs() {
        let dev = Default::default();
        let attention = RotaryAttentionConfig::new(32, 4, 2)
            .with_max_seq(16)
            .init::<B>(&dev)
            .expect("builds");
        let x = Tensor::<B, 3>::random([1, 9, 32], Distribution::Normal(0.0, 1.0), &dev);
        let changed = x.clone().slice_assign(
            [0..1, 5..9, 0..32],
            Tensor::random([1, 4, 32], Distribution::Normal(0.0, 1.0), &dev),
        );
        let (a, b) = (
            attention.forward(x).expect("runs"),
            attention.forward(changed).expect("runs"),
        );
        a.clone()
            .narrow(1, 0, 5)
            .into_data()
            .assert_approx_eq::<f32>(&b.clone().narrow(1, 0, 5).into_data(), Tolerance::default());
        let moved = (a.narrow(1, 5, 4) - b.narrow(1, 5, 4))
            .abs()
            .max()
            .into_scalar();
        assert!(moved > 1e-3, "the changed positions must change ({moved})");
    }
}
