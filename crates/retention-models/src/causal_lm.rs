//! What the trainer needs of a model: next-token cross-entropy over a batch of token windows.

use burn::config::Config;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Int, Tensor, backend::Backend};
use retention::{RetentionBackend, SequenceMixer};

use crate::{LanguageModel, LlamaModel, MixerTrace, ModelError};

/// Which parameters a training run updates.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// Every parameter.
    All,
    /// The sequence mixers' parameters alone ([`CausalLm::frozen_but_mixers`]): a converted
    /// model's new mixers learn while the pretrained rest stays as it was.
    Mixers,
}

/// A causal language model the [`Trainer`](crate::Trainer) can train: the small
/// [`LanguageModel`] trained from scratch, or a pretrained [`LlamaModel`] retrained after its
/// conversion to power retention.
pub trait CausalLm<B: Backend>: Module<B> {
    /// Tokens in the vocabulary.
    fn vocab_size(&self) -> usize;

    /// Mean next-token cross-entropy (nats per token) of `targets` given `inputs`, ids already
    /// known to lie in the vocabulary.
    ///
    /// # Shapes
    /// - `inputs`, `targets`: `[batch, seq]` → `[1]`
    ///
    /// # Errors
    /// The model's errors.
    fn next_token_loss(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
    ) -> Result<Tensor<B, 1>, ModelError>;

    /// Next-token logits at every position of `inputs`, ids already known to lie in the
    /// vocabulary.
    ///
    /// # Shapes
    /// - `inputs`: `[batch, seq]` → `[batch, seq, vocab_size]`
    ///
    /// # Errors
    /// The model's errors.
    fn next_token_logits(&self, inputs: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, ModelError>;

    /// The model with every parameter outside its sequence mixers frozen (no gradient).
    fn frozen_but_mixers(self) -> Self;

    /// Every block's mixer input and output over `inputs`, in block order (a teacher's side
    /// of [mixer transfer](crate::mixer_transfer_loss)).
    ///
    /// # Shapes
    /// - `inputs`: `[batch, seq]` → per block `[batch, seq, d_model]` twice
    ///
    /// # Errors
    /// The model's errors.
    fn mixer_traces(&self, inputs: Tensor<B, 2, Int>) -> Result<Vec<MixerTrace<B>>, ModelError>;

    /// The blocks' sequence mixers, in block order.
    fn mixers(&self) -> Vec<&SequenceMixer<B>>;
}

impl<B: RetentionBackend> CausalLm<B> for LanguageModel<B> {
    fn vocab_size(&self) -> usize {
        LanguageModel::vocab_size(self)
    }

    fn next_token_loss(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
    ) -> Result<Tensor<B, 1>, ModelError> {
        self.loss_of_checked(inputs, targets)
    }

    fn next_token_logits(&self, inputs: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, ModelError> {
        self.logits(inputs)
    }

    fn frozen_but_mixers(self) -> Self {
        LanguageModel::frozen_but_mixers(self)
    }

    fn mixer_traces(&self, inputs: Tensor<B, 2, Int>) -> Result<Vec<MixerTrace<B>>, ModelError> {
        LanguageModel::mixer_traces(self, inputs)
    }

    fn mixers(&self) -> Vec<&SequenceMixer<B>> {
        LanguageModel::mixers(self)
    }
}

impl<B: RetentionBackend> CausalLm<B> for LlamaModel<B> {
    fn vocab_size(&self) -> usize {
        LlamaModel::vocab_size(self)
    }

    fn next_token_loss(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
    ) -> Result<Tensor<B, 1>, ModelError> {
        let [b, t] = targets.dims();
        let logits = self.next_token_logits(inputs)?;
        let vocab = logits.dims()[2];
        let ce = CrossEntropyLossConfig::new().init(&logits.device());
        Ok(ce.forward(logits.reshape([b * t, vocab]), targets.reshape([b * t])))
    }

    fn next_token_logits(&self, inputs: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, ModelError> {
        Ok(self.forward(inputs)?)
    }

    fn frozen_but_mixers(self) -> Self {
        LlamaModel::frozen_but_mixers(self)
    }

    fn mixer_traces(&self, inputs: Tensor<B, 2, Int>) -> Result<Vec<MixerTrace<B>>, ModelError> {
        Ok(LlamaModel::mixer_traces(self, inputs)?)
    }

    fn mixers(&self) -> Vec<&SequenceMixer<B>> {
        LlamaModel::mixers(self)
    }
}
