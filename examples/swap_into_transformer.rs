//! A small pre-norm decoder stack whose sequence mixer is chosen by one config value:
//! softmax attention or power retention. Trains both for a few steps on a toy copy task and
//! decodes with the retention state.
//!
//! ```sh
//! cargo run --release --example swap_into_transformer
//! ```

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::nn::attention::MultiHeadAttentionConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::{activation::gelu, loss::cross_entropy_with_logits};
use power_retention::{
    PowerRetentionConfig, RetentionBackend, RetentionError, SequenceMixer, SequenceMixerConfig,
};

/// One pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)).
#[derive(Module, Debug)]
struct Block<B: Backend> {
    norm_mix: LayerNorm<B>,
    mixer: SequenceMixer<B>,
    norm_mlp: LayerNorm<B>,
    up: Linear<B>,
    down: Linear<B>,
}

impl<B: RetentionBackend> Block<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, RetentionError> {
        let x = x.clone() + self.mixer.forward(self.norm_mix.forward(x))?;
        Ok(x.clone()
            + self
                .down
                .forward(gelu(self.up.forward(self.norm_mlp.forward(x)))))
    }
}

#[derive(Config, Debug)]
struct DecoderConfig {
    vocab: usize,
    d_model: usize,
    layers: usize,
    /// The one line that decides attention vs retention.
    mixer: SequenceMixerConfig,
}

#[derive(Module, Debug)]
struct Decoder<B: Backend> {
    embed: Embedding<B>,
    blocks: Vec<Block<B>>,
    norm: LayerNorm<B>,
    head: Linear<B>,
}

impl DecoderConfig {
    fn init<B: Backend>(&self, device: &B::Device) -> Result<Decoder<B>, RetentionError> {
        let d = self.d_model;
        let blocks = (0..self.layers)
            .map(|_| {
                Ok(Block {
                    norm_mix: LayerNormConfig::new(d).init(device),
                    mixer: self.mixer.init(device)?,
                    norm_mlp: LayerNormConfig::new(d).init(device),
                    up: LinearConfig::new(d, 4 * d).init(device),
                    down: LinearConfig::new(4 * d, d).init(device),
                })
            })
            .collect::<Result<_, RetentionError>>()?;
        Ok(Decoder {
            embed: EmbeddingConfig::new(self.vocab, d).init(device),
            blocks,
            norm: LayerNormConfig::new(d).init(device),
            head: LinearConfig::new(d, self.vocab).init(device),
        })
    }
}

impl<B: RetentionBackend> Decoder<B> {
    fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, RetentionError> {
        let mut x = self.embed.forward(tokens);
        for block in &self.blocks {
            x = block.forward(x)?;
        }
        Ok(self.head.forward(self.norm.forward(x)))
    }
}

type Train = Autodiff<NdArray>;

/// Toy task: predict the token seen 3 positions earlier.
fn batch(
    step: usize,
    device: &burn::tensor::Device<Train>,
) -> (Tensor<Train, 2, Int>, Tensor<Train, 1, Int>) {
    let (b, t, vocab) = (8, 32, 16);
    let seq: Vec<i64> = (0..b * t)
        .map(|i| ((i * 7 + step * 13 + (i / t) * 5) % vocab) as i64 ^ ((i / 3) % 2) as i64)
        .collect();
    let tokens = Tensor::<Train, 1, Int>::from_data(TensorData::new(seq.clone(), [b * t]), device)
        .reshape([b, t]);
    let target: Vec<i64> = (0..b * t)
        .map(|i| if i % t >= 3 { seq[i - 3] } else { 0 })
        .collect();
    (
        tokens,
        Tensor::from_data(TensorData::new(target, [b * t]), device),
    )
}

fn train(name: &str, mixer: SequenceMixerConfig) -> Result<Decoder<Train>, RetentionError> {
    let device = Default::default();
    let config = DecoderConfig::new(16, 64, 2, mixer);
    let mut model = config.init::<Train>(&device)?;
    let mut optim = AdamConfig::new().init();
    for step in 0..60 {
        let (tokens, target) = batch(step, &device);
        let logits = model.forward(tokens)?;
        let [b, t, v] = logits.dims();
        let loss = cross_entropy_with_logits(logits.reshape([b * t, v]), target.one_hot(v).float());
        if step % 20 == 0 || step == 59 {
            println!(
                "{name:>15} step {step:>2}: loss {:.3}",
                loss.clone().into_scalar()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    Ok(model)
}

fn main() -> Result<(), RetentionError> {
    // The only difference between the two models is this one value:
    let attention =
        SequenceMixerConfig::Attention(MultiHeadAttentionConfig::new(64, 4).with_dropout(0.0));
    let retention = SequenceMixerConfig::PowerRetention(
        PowerRetentionConfig::new(64, 4).with_chunk_size(Some(16)),
    );
    train("attention", attention)?;
    let model = train("power retention", retention)?.valid();

    // Decode with the retention layers' recurrent state: O(1) per token.
    let device = Default::default();
    let (tokens, _) = batch(0, &device);
    let tokens = tokens.inner().narrow(0, 0, 1);
    let block = &model.blocks[0];
    if let SequenceMixer::PowerRetention(layer) = &block.mixer {
        let x = block.norm_mix.forward(model.embed.forward(tokens));
        let (prefix, mut state) = layer.prefill(x.clone().narrow(1, 0, 24), None)?;
        let mut steps = vec![prefix];
        for i in 24..32 {
            steps.push(layer.forward_step(x.clone().narrow(1, i, 1), &mut state)?);
        }
        let stepped = Tensor::cat(steps, 1);
        let full = layer.forward(x)?;
        let diff = (stepped - full).abs().max().into_scalar();
        println!(
            "first block: prefill 24 tokens + 8 steps vs full forward, max |diff| = {diff:.2e}; state {} KB",
            state.size_bytes() / 1024
        );
    }
    Ok(())
}
