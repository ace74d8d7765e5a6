//! One-line swap between softmax attention and power retention inside a model.

use burn::config::Config;
use burn::module::Module;
use burn::nn::attention::{
    MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, generate_autoregressive_mask,
};
use burn::tensor::{Tensor, backend::Backend};

use crate::{
    PowerRetention, PowerRetentionConfig, RetentionBackend, RetentionError, RotaryAttention,
    RotaryAttentionConfig,
};

/// Which sequence mixer a block uses. Changing this one value swaps causal softmax attention
/// for power retention (or back) without touching the rest of the model.
///
/// ```
/// use burn::nn::attention::MultiHeadAttentionConfig;
/// use retention::{PowerRetentionConfig, SequenceMixerConfig};
/// let attention = SequenceMixerConfig::Attention(MultiHeadAttentionConfig::new(256, 4));
/// let retention = SequenceMixerConfig::PowerRetention(PowerRetentionConfig::new(256, 4));
/// # let _ = (attention, retention);
/// ```
#[derive(Config, Debug)]
pub enum SequenceMixerConfig {
    /// Causal multi-head softmax attention (Burn's `MultiHeadAttention`).
    Attention(MultiHeadAttentionConfig),
    /// Power retention.
    PowerRetention(PowerRetentionConfig),
    /// Causal grouped-query softmax attention with rotary position encoding, as Llama-family
    /// checkpoints compute it ([`RotaryAttention`]).
    RotaryAttention(RotaryAttentionConfig),
}

impl SequenceMixerConfig {
    /// Builds the mixer.
    ///
    /// # Errors
    /// The errors of [`PowerRetentionConfig::init`] and [`RotaryAttentionConfig::init`].
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<SequenceMixer<B>, RetentionError> {
        Ok(match self {
            Self::Attention(c) => SequenceMixer::Attention(c.init(device)),
            Self::PowerRetention(c) => SequenceMixer::PowerRetention(c.init(device)?),
            Self::RotaryAttention(c) => SequenceMixer::RotaryAttention(c.init(device)?),
        })
    }
}

/// A causal sequence mixer: softmax attention or power retention.
// Both variants are large parameter structs of similar size; boxing one would only add an
// indirection to every forward.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum SequenceMixer<B: Backend> {
    /// Causal multi-head softmax attention.
    Attention(MultiHeadAttention<B>),
    /// Power retention.
    PowerRetention(PowerRetention<B>),
    /// Causal grouped-query attention with rotary position encoding.
    RotaryAttention(RotaryAttention<B>),
}

impl<B: RetentionBackend> SequenceMixer<B> {
    /// Mixes a sequence causally.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    ///
    /// # Errors
    /// The errors of [`PowerRetention::forward`]; attention reports a width mismatch the same way.
    pub fn forward(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, RetentionError> {
        match self {
            Self::Attention(mha) => {
                let [b, t, _] = x.dims();
                crate::shapes::check_width(x.dims(), mha.d_model)?;
                let mask = generate_autoregressive_mask::<B>(b, t, &x.device());
                Ok(mha.forward(MhaInput::self_attn(x).mask_attn(mask)).context)
            }
            Self::PowerRetention(pr) => pr.forward(x),
            Self::RotaryAttention(attention) => attention.forward(x),
        }
    }
}
