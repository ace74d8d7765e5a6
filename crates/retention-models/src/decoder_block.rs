//! One pre-norm decoder block: `x + mixer(norm(x))`, then `x + ffn(norm(x))`.

use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{Tensor, backend::Backend};
use retention::{MixerCache, RetentionBackend, RetentionError, SequenceMixer, SequenceMixerConfig};

use crate::feed_forward::{FeedForward, FeedForwardConfig};
use crate::mixer_transfer::MixerTrace;

/// A pre-norm block whose sequence mixer is attention or power retention.
#[derive(Module, Debug)]
pub struct DecoderBlock<B: Backend> {
    pub(crate) mixer_norm: RmsNorm<B>,
    pub(crate) mixer: SequenceMixer<B>,
    pub(crate) ffn_norm: RmsNorm<B>,
    pub(crate) ffn: FeedForward<B>,
}

impl<B: Backend> DecoderBlock<B> {
    /// The block with its norms and feed-forward frozen, its mixer as it is.
    pub(crate) fn frozen_but_mixer(self) -> Self {
        Self {
            mixer_norm: self.mixer_norm.no_grad(),
            mixer: self.mixer,
            ffn_norm: self.ffn_norm.no_grad(),
            ffn: self.ffn.no_grad(),
        }
    }

    /// Builds a block.
    ///
    /// # Errors
    /// The errors of [`SequenceMixerConfig::init`].
    pub fn new(
        mixer: &SequenceMixerConfig,
        ffn: &FeedForwardConfig,
        norm_eps: f64,
        device: &B::Device,
    ) -> Result<Self, RetentionError> {
        let norm = || {
            RmsNormConfig::new(ffn.d_model)
                .with_epsilon(norm_eps)
                .init(device)
        };
        Ok(Self {
            mixer_norm: norm(),
            mixer: mixer.init(device)?,
            ffn_norm: norm(),
            ffn: ffn.init(device),
        })
    }
}

impl<B: RetentionBackend> DecoderBlock<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    ///
    /// # Errors
    /// The mixer's errors.
    pub fn forward(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, RetentionError> {
        let x = x.clone() + self.mixer.forward(self.mixer_norm.forward(x))?;
        Ok(x.clone() + self.ffn.forward(self.ffn_norm.forward(x)))
    }

    /// [`forward`](Self::forward), also returning what the mixer read and wrote.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]` (and the trace's two tensors)
    ///
    /// # Errors
    /// The mixer's errors.
    pub fn forward_traced(
        &self,
        x: Tensor<B, 3>,
    ) -> Result<(Tensor<B, 3>, MixerTrace<B>), RetentionError> {
        let input = self.mixer_norm.forward(x.clone());
        let output = self.mixer.forward(input.clone())?;
        let x = x + output.clone();
        let x = x.clone() + self.ffn.forward(self.ffn_norm.forward(x));
        Ok((x, MixerTrace { input, output }))
    }

    /// The block's sequence mixer.
    pub fn mixer(&self) -> &SequenceMixer<B> {
        &self.mixer
    }

    /// [`forward`](Self::forward) for the next tokens after those `cache` holds
    /// ([`SequenceMixer::forward_cached`]).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    ///
    /// # Errors
    /// The mixer's errors.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        cache: &mut MixerCache<B>,
    ) -> Result<Tensor<B, 3>, RetentionError> {
        let mixed = self
            .mixer
            .forward_cached(self.mixer_norm.forward(x.clone()), cache)?;
        let x = x + mixed;
        Ok(x.clone() + self.ffn.forward(self.ffn_norm.forward(x)))
    }
}
