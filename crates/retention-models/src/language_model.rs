//! A decoder-only language model whose sequence mixer is chosen by one config value.

use burn::config::Config;
use burn::module::Module;
use burn::nn::attention::MultiHeadAttentionConfig;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{ElementConversion, Int, Tensor, backend::Backend};
use retention::{PowerRetentionConfig, RetentionBackend, SequenceMixer, SequenceMixerConfig};

use crate::ModelError;
use crate::decoder_block::DecoderBlock;
use crate::feed_forward::FeedForwardConfig;
use crate::mixer_transfer::{MixerTrace, traces_through};

/// Which sequence mixer every block uses.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MixerKind {
    /// Causal softmax attention (Burn's `MultiHeadAttention`, no positional encoding: the causal
    /// mask alone tells positions apart).
    Attention,
    /// Gated power retention (degree 2 by default).
    Retention,
}

impl MixerKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Attention => "attention",
            Self::Retention => "retention",
        }
    }
}

/// Configuration of a [`LanguageModel`].
///
/// ```
/// use retention_models::{LanguageModelConfig, MixerKind};
/// // the one line that picks the mixer
/// let config = LanguageModelConfig::small(4096).with_mixer(MixerKind::Attention);
/// assert_eq!(config.head_dim(), 64);
/// ```
#[derive(Config, Debug)]
pub struct LanguageModelConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Decoder blocks.
    pub n_layers: usize,
    /// Query heads of each mixer.
    pub n_heads: usize,
    /// The sequence mixer.
    #[config(default = "MixerKind::Retention")]
    pub mixer: MixerKind,
    /// Key/value heads of retention (grouped queries); `None` = `n_heads`.
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// Hidden width of the SwiGLU feed-forward; `None` = `8/3 · d_model` rounded up to 32.
    #[config(default = "None")]
    pub ffn_hidden: Option<usize>,
    /// Retention's power `p` (even).
    #[config(default = 2)]
    pub degree: usize,
    /// Retention's chunk size; `None` = the quadratic attention form.
    #[config(default = "Some(128)")]
    pub chunk_size: Option<usize>,
    /// Epsilon of the RMS norms.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
}

impl LanguageModelConfig {
    /// A model that trains in minutes on a CPU: 2 blocks of width 64, 2 heads of 32.
    pub fn tiny(vocab_size: usize) -> Self {
        Self::new(vocab_size, 64, 2, 2)
    }

    /// The default model: 6 blocks of width 384, 6 heads of 64 (≈ 14M parameters at a 4,096-token
    /// vocabulary).
    pub fn small(vocab_size: usize) -> Self {
        Self::new(vocab_size, 384, 6, 6)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Hidden width of the feed-forward.
    pub fn ffn_width(&self) -> usize {
        self.ffn_hidden
            .unwrap_or_else(|| (8 * self.d_model / 3).div_ceil(32) * 32)
    }

    /// The mixer configuration of every block.
    pub fn mixer_config(&self) -> SequenceMixerConfig {
        match self.mixer {
            MixerKind::Attention => SequenceMixerConfig::Attention(
                MultiHeadAttentionConfig::new(self.d_model, self.n_heads).with_dropout(0.0),
            ),
            MixerKind::Retention => SequenceMixerConfig::PowerRetention(
                PowerRetentionConfig::new(self.d_model, self.n_heads)
                    .with_n_kv_heads(self.n_kv_heads)
                    .with_degree(self.degree)
                    .with_chunk_size(self.chunk_size),
            ),
        }
    }

    /// Builds the model with freshly initialised weights.
    ///
    /// # Errors
    /// [`ModelError::Config`] for zero sizes or a width not divisible by the heads; the mixer's
    /// errors.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<LanguageModel<B>, ModelError> {
        if self.vocab_size == 0 || self.n_layers == 0 || self.n_heads == 0 {
            return Err(ModelError::Config(format!(
                "vocab_size ({}), n_layers ({}) and n_heads ({}) must be positive",
                self.vocab_size, self.n_layers, self.n_heads
            )));
        }
        if self.d_model % self.n_heads != 0 {
            return Err(ModelError::Config(format!(
                "d_model ({}) must be a multiple of n_heads ({})",
                self.d_model, self.n_heads
            )));
        }
        let mixer = self.mixer_config();
        let ffn = FeedForwardConfig::new(self.d_model, self.ffn_width());
        let blocks = (0..self.n_layers)
            .map(|_| DecoderBlock::new(&mixer, &ffn, self.norm_eps, device))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LanguageModel {
            embed: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
            blocks,
            norm: RmsNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device),
            head: LinearConfig::new(self.d_model, self.vocab_size)
                .with_bias(false)
                .init(device),
            vocab_size: self.vocab_size,
        })
    }
}

/// Embedding, pre-norm decoder blocks, final RMS norm, output projection.
#[derive(Module, Debug)]
pub struct LanguageModel<B: Backend> {
    embed: Embedding<B>,
    blocks: Vec<DecoderBlock<B>>,
    norm: RmsNorm<B>,
    head: Linear<B>,
    vocab_size: usize,
}

impl<B: RetentionBackend> LanguageModel<B> {
    /// The model with every parameter but its sequence mixers' frozen (no gradient):
    /// embedding, norms, feed-forward blocks, output head.
    pub fn frozen_but_mixers(self) -> Self {
        Self {
            embed: self.embed.no_grad(),
            blocks: self
                .blocks
                .into_iter()
                .map(DecoderBlock::frozen_but_mixer)
                .collect(),
            norm: self.norm.no_grad(),
            head: self.head.no_grad(),
            vocab_size: self.vocab_size,
        }
    }

    /// Next-token logits.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` ids `< vocab_size` → `[batch, seq, vocab_size]`
    ///
    /// # Errors
    /// [`ModelError::TokenIds`] when an id lies outside the vocabulary (counted on the device:
    /// one read of a count per call); the mixers' errors.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, ModelError> {
        self.check_ids(&[&tokens])?;
        self.logits(tokens)
    }

    /// Mean next-token cross-entropy (nats per token) of `inputs` predicting `targets`.
    ///
    /// # Shapes
    /// - `inputs`, `targets`: `[batch, seq]` ids `< vocab_size` → a one-element tensor
    ///
    /// # Errors
    /// [`ModelError::Config`] when the two shapes differ; [`ModelError::TokenIds`] when an id
    /// of either lies outside the vocabulary; the mixers' errors.
    pub fn loss(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
    ) -> Result<Tensor<B, 1>, ModelError> {
        if inputs.dims() != targets.dims() {
            return Err(ModelError::Config(format!(
                "targets must have the inputs' shape {:?}, got {:?}",
                inputs.dims(),
                targets.dims()
            )));
        }
        self.check_ids(&[&inputs, &targets])?;
        self.loss_of_checked(inputs, targets)
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// [`loss`](Self::loss) for ids already known to be in range (the trainer checks its token
    /// streams once, on the host, instead of reading a count back every step).
    pub(crate) fn loss_of_checked(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
    ) -> Result<Tensor<B, 1>, ModelError> {
        let [b, t] = targets.dims();
        let logits = self.logits(inputs)?.reshape([b * t, self.vocab_size]);
        let ce = CrossEntropyLossConfig::new().init(&logits.device());
        Ok(ce.forward(logits, targets.reshape([b * t])))
    }

    /// Every block's mixer input and output over `tokens`, in block order (the teacher's
    /// side of [mixer transfer](crate::mixer_transfer_loss)).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` → per block `[batch, seq, d_model]` twice
    ///
    /// # Errors
    /// The mixers' errors.
    pub fn mixer_traces(
        &self,
        tokens: Tensor<B, 2, Int>,
    ) -> Result<Vec<MixerTrace<B>>, ModelError> {
        Ok(traces_through(self.embed.forward(tokens), &self.blocks)?)
    }

    /// The blocks' sequence mixers, in block order.
    pub fn mixers(&self) -> Vec<&SequenceMixer<B>> {
        self.blocks.iter().map(DecoderBlock::mixer).collect()
    }

    pub(crate) fn logits(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, ModelError> {
        let mut x = self.embed.forward(tokens);
        for block in &self.blocks {
            x = block.forward(x)?;
        }
        Ok(self.head.forward(self.norm.forward(x)))
    }

    /// [`ModelError::TokenIds`] unless every id of `tensors` lies in `0..vocab_size`.
    fn check_ids(&self, tensors: &[&Tensor<B, 2, Int>]) -> Result<(), ModelError> {
        let vocab = self.vocab_size as i64;
        let outside = tensors
            .iter()
            .map(|t| {
                let t = (*t).clone();
                t.clone().greater_equal_elem(vocab).int().sum() + t.lower_elem(0).int().sum()
            })
            .reduce(|a, b| a + b);
        let count: i64 = outside.map_or(0, |c| c.into_scalar().elem());
        if count > 0 {
            return Err(ModelError::TokenIds {
                vocab_size: self.vocab_size,
                count: count as usize,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    #[test]
    fn both_mixers_give_logits_of_the_right_shape() {
        let dev = Default::default();
        for mixer in [MixerKind::Attention, MixerKind::Retention] {
            let model = LanguageModelConfig::tiny(300)
                .with_mixer(mixer)
                .init::<NdArray>(&dev)
                .unwrap();
            let tokens =
                Tensor::<NdArray, 2, Int>::from_data(TensorData::new(vec![1i64; 10], [2, 5]), &dev);
            assert_eq!(model.forward(tokens).unwrap().dims(), [2, 5, 300]);
        }
    }

    #[test]
    fn the_small_preset_has_about_14m_parameters() {
        let model = LanguageModelConfig::small(4096)
            .init::<NdArray>(&Default::default())
            .unwrap();
        let n = model.num_params();
        assert!((12_000_000..16_000_000).contains(&n), "{n}");
    }

    #[test]
    fn token_ids_outside_the_vocabulary_are_refused() {
        let dev = Default::default();
        let model = LanguageModelConfig::tiny(300)
            .init::<NdArray>(&dev)
            .unwrap();
        for (ids, count) in [(vec![1i64, 300, 2, 301], 2), (vec![-1i64, 0, 5, 7], 1)] {
            let tokens = Tensor::<NdArray, 2, Int>::from_data(TensorData::new(ids, [2, 2]), &dev);
            match model.forward(tokens) {
                Err(ModelError::TokenIds {
                    vocab_size,
                    count: n,
                }) => {
                    assert_eq!((vocab_size, n), (300, count))
                }
                other => panic!(
                    "expected a token-id error, got {:?}",
                    other.map(|t| t.dims())
                ),
            }
        }
    }

    #[test]
    fn targets_outside_the_vocabulary_are_refused() {
        let dev = Default::default();
        let model = LanguageModelConfig::tiny(300)
            .init::<NdArray>(&dev)
            .unwrap();
        let ids =
            |v: Vec<i64>| Tensor::<NdArray, 2, Int>::from_data(TensorData::new(v, [1, 3]), &dev);
        let err = model.loss(ids(vec![1, 2, 3]), ids(vec![2, 3, 300]));
        assert!(matches!(
            err,
            Err(ModelError::TokenIds {
                vocab_size: 300,
                count: 1
            })
        ));
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dev = Default::default();
        let err = LanguageModelConfig::new(300, 60, 1, 7).init::<NdArray>(&dev);
        assert!(matches!(err, Err(ModelError::Config(_))));
    }
}
