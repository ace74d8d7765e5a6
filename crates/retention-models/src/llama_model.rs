//! A Llama-family decoder (SmolLM2, Llama 2/3): token embedding, pre-norm blocks of a
//! [`SequenceMixer`] (rotary grouped-query attention as pretrained, or power retention) and a
//! SwiGLU feed-forward, a final RMSNorm and an output head (tied to the embedding where the
//! checkpoint has none), loadable from a GGUF checkpoint and convertible to power retention.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, RmsNorm, RmsNormConfig};
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use retention::{
    ComputeDtype, PowerRetentionConfig, RetentionBackend, RetentionError, RotaryAttentionConfig,
    SequenceMixer, SequenceMixerConfig,
};

use crate::decoder_block::DecoderBlock;
use crate::feed_forward::FeedForwardConfig;
use crate::mixer_transfer::{MixerTrace, traces_through};
use crate::{GgufFile, GgufValue, LlamaCache, MixerKind, ModelError, TokenSampler};

/// Configuration of a [`LlamaModel`].
#[derive(Config, Debug)]
pub struct LlamaConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Decoder blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of the feed-forward's hidden layer.
    pub d_ff: usize,
    /// The rotary base `θ`.
    #[config(default = 10000.0)]
    pub rope_theta: f32,
    /// The RMSNorms' `ε`.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// The longest sequence the model takes.
    #[config(default = 8192)]
    pub max_seq: usize,
    /// Whether the output head is the embedding's transpose.
    #[config(default = true)]
    pub tied_embeddings: bool,
    /// The blocks' sequence mixer: rotary attention (as pretrained) or power retention (gated,
    /// degree 2, with the attention's head layout).
    #[config(default = "MixerKind::Attention")]
    pub mixer: MixerKind,
    /// Chunk of power retention's chunked form.
    #[config(default = 128)]
    pub retention_chunk: usize,
    /// Whether power retention blocks encode positions as the attention they replace does
    /// (rotary encoding of queries and keys with `rope_theta`). Off by default: SmolLM2
    /// converted with it starts from a held-out loss of 7.90 nats on the KJV, without it
    /// 6.84 (the original: 3.27).
    #[config(default = false)]
    pub retention_rotary: bool,
    /// The element type power retention blocks run the op in during whole-sequence passes
    /// (training, scoring): `Bf16` puts an `f32` model's retention on the tensor-core kernels
    /// (mixed precision, [`ComputeDtype`]).
    #[config(default = "ComputeDtype::Input")]
    pub retention_dtype: ComputeDtype,
}

impl LlamaConfig {
    /// The configuration a GGUF checkpoint of architecture `llama` describes (`llama.*` keys).
    ///
    /// # Errors
    /// [`ModelError::Gguf`] when the architecture is not `llama` or a key is missing.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = file
            .value("general.architecture")?
            .as_str()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(ModelError::Gguf(format!(
                "architecture {arch:?}; only llama is read"
            )));
        }
        let count = |key: &str| -> Result<usize, ModelError> {
            file.value(key)?
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| ModelError::Gguf(format!("{key}: not a count")))
        };
        let number = |key: &str, default: f64| match file.metadata.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| ModelError::Gguf(format!("{key}: not a number"))),
        };
        let n_heads = count("llama.attention.head_count")?;
        let vocab_size = match file.metadata.get("llama.vocab_size") {
            Some(v) => v.as_u64().map(|v| v as usize),
            None => file
                .metadata
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(<[GgufValue]>::len),
        }
        .ok_or_else(|| ModelError::Gguf("llama.vocab_size: missing".into()))?;
        Ok(Self {
            vocab_size,
            d_model: count("llama.embedding_length")?,
            n_layers: count("llama.block_count")?,
            n_heads,
            n_kv_heads: match file.metadata.get("llama.attention.head_count_kv") {
                Some(_) => count("llama.attention.head_count_kv")?,
                None => n_heads,
            },
            d_ff: count("llama.feed_forward_length")?,
            rope_theta: number("llama.rope.freq_base", 10000.0)? as f32,
            norm_eps: number("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            max_seq: count("llama.context_length")?,
            tied_embeddings: file.tensor("output.weight").is_none(),
            mixer: MixerKind::Attention,
            retention_chunk: 128,
            retention_rotary: false,
            retention_dtype: ComputeDtype::Input,
        })
    }

    /// The blocks' mixer configuration.
    fn mixer_config(&self) -> Result<SequenceMixerConfig, ModelError> {
        Ok(match self.mixer {
            MixerKind::Attention => SequenceMixerConfig::RotaryAttention(
                RotaryAttentionConfig::new(self.d_model, self.n_heads, self.n_kv_heads)
                    .with_rope_theta(self.rope_theta)
                    .with_max_seq(self.max_seq),
            ),
            MixerKind::Retention => SequenceMixerConfig::PowerRetention(
                PowerRetentionConfig::new(self.d_model, self.n_heads)
                    .with_n_kv_heads(Some(self.n_kv_heads))
                    .with_chunk_size(Some(self.retention_chunk))
                    .with_rotary_theta(self.retention_rotary.then_some(f64::from(self.rope_theta)))
                    .with_compute_dtype(self.retention_dtype),
            ),
        })
    }

    /// Builds a model with fresh weights.
    ///
    /// # Errors
    /// [`ModelError::Retention`] when the heads do not fit the width (see
    /// [`RotaryAttentionConfig::init`], [`PowerRetentionConfig::init`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<LlamaModel<B>, ModelError> {
        let norm = || {
            RmsNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let mixer = self.mixer_config()?;
        let blocks = (0..self.n_layers)
            .map(|_| {
                Ok(DecoderBlock::new(
                    &mixer,
                    &FeedForwardConfig::new(self.d_model, self.d_ff),
                    self.norm_eps,
                    device,
                )?)
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(LlamaModel {
            embedding: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
            blocks,
            norm: norm(),
            head: (!self.tied_embeddings).then(|| {
                burn::nn::LinearConfig::new(self.d_model, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
        })
    }
}

/// One pre-norm block of a Llama model: `x + mixer(norm(x))`, then `x + ffn(norm(x))`.
pub type LlamaBlock<B> = DecoderBlock<B>;

/// A Llama-family decoder.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    embedding: Embedding<B>,
    blocks: Vec<LlamaBlock<B>>,
    norm: RmsNorm<B>,
    /// The output head; `None`: the embedding's transpose.
    head: Option<Linear<B>>,
}

impl<B: RetentionBackend> LlamaModel<B> {
    /// The next-token logits at every position.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` → `[batch, seq, vocab_size]`
    ///
    /// # Errors
    /// The mixers' errors (a sequence longer than the rotary table, …).
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, RetentionError> {
        let mut x = self.embedding.forward(tokens);
        for block in &self.blocks {
            x = block.forward(x)?;
        }
        Ok(self.logits(x))
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
    ) -> Result<Vec<MixerTrace<B>>, RetentionError> {
        traces_through(self.embedding.forward(tokens), &self.blocks)
    }

    /// The blocks' sequence mixers, in block order.
    pub fn mixers(&self) -> Vec<&SequenceMixer<B>> {
        self.blocks.iter().map(LlamaBlock::mixer).collect()
    }

    /// The final norm and the output head: hidden states to next-token logits.
    fn logits(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.norm.forward(x);
        match &self.head {
            Some(head) => head.forward(x),
            // `E xᵀ`, then transposed back: the embedding is read in its own row-major
            // order, never copied into a transposed one
            None => {
                let weight = self.embedding.weight.val().unsqueeze::<3>();
                weight.matmul(x.swap_dims(1, 2)).swap_dims(1, 2)
            }
        }
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.embedding.weight.dims()[0]
    }

    /// The empty cache for [`forward_cached`](Self::forward_cached).
    pub fn new_cache(&self) -> LlamaCache<B> {
        LlamaCache {
            layers: self.blocks.iter().map(|b| b.mixer.new_cache()).collect(),
            tokens: 0,
        }
    }

    /// The longest sequence the model takes: its attention layers' rotary tables (none for a
    /// model of power retention alone).
    pub fn max_seq(&self) -> Option<usize> {
        self.blocks
            .iter()
            .filter_map(|b| match &b.mixer {
                SequenceMixer::RotaryAttention(a) => Some(a.max_seq()),
                _ => None,
            })
            .min()
    }

    /// The same model with rotary tables of `max_seq` positions in its attention layers
    /// ([`RotaryAttention::with_max_seq`](retention::RotaryAttention::with_max_seq)).
    pub fn with_max_seq(self, max_seq: usize, device: &B::Device) -> Self {
        let blocks = self
            .blocks
            .into_iter()
            .map(|mut block| {
                if let SequenceMixer::RotaryAttention(a) = block.mixer {
                    block.mixer = SequenceMixer::RotaryAttention(a.with_max_seq(max_seq, device));
                }
                block
            })
            .collect();
        Self { blocks, ..self }
    }

    /// Query heads, key/value heads and head dim of the first block's mixer (`None` for Burn's
    /// `MultiHeadAttention`, which does not tell).
    pub fn heads(&self) -> Option<(usize, usize, usize)> {
        self.blocks.first().and_then(|b| match &b.mixer {
            SequenceMixer::RotaryAttention(a) => Some((a.n_heads(), a.n_kv_heads(), a.head_dim())),
            SequenceMixer::PowerRetention(r) => Some((r.n_heads, r.n_kv_heads, r.head_dim)),
            SequenceMixer::Attention(_) => None,
        })
    }

    /// The next-token logits at the positions of `tokens`, which follow those `cache` has
    /// read; `cache` then holds them too. Equal to [`forward`](Self::forward)'s over the
    /// whole sequence at the same positions, up to rounding, with each block doing only the
    /// new tokens' work (see [`SequenceMixer::forward_cached`]).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` → `[batch, seq, vocab_size]`
    ///
    /// # Errors
    /// As [`forward`](Self::forward), and for a cache of another model. On error `cache` is
    /// left as it was.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut LlamaCache<B>,
    ) -> Result<Tensor<B, 3>, RetentionError> {
        let x = self.hidden_cached(tokens, cache)?;
        Ok(self.logits(x))
    }

    fn hidden_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut LlamaCache<B>,
    ) -> Result<Tensor<B, 3>, RetentionError> {
        if cache.layers.len() != self.blocks.len() {
            return Err(RetentionError::Config(format!(
                "a cache of {} blocks given to a model of {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        let t = tokens.dims()[1];
        // tensors are shared handles: the copy costs no device memory
        let mut layers = cache.layers.clone();
        let mut x = self.embedding.forward(tokens);
        for (block, layer) in self.blocks.iter().zip(&mut layers) {
            x = block.forward_cached(x, layer)?;
        }
        *cache = LlamaCache {
            layers,
            tokens: cache.tokens + t,
        };
        Ok(x)
    }

    /// The same model with power retention in place of every attention layer: the queries',
    /// keys', values' and output projections move over as they are, and each block gains a
    /// gate projection whose weights are zero and bias large (`log_g ≈ −0.001`, gates start
    /// near 1: nothing is forgotten until retraining teaches it), as a conversion of a
    /// pretrained transformer starts. With `rotary`, the retention layers encode positions
    /// with the attention's rotary encoding, so `q·k` keeps the geometry the weights were
    /// trained for. Blocks already on power retention stay as they are.
    ///
    /// # Errors
    /// [`ModelError::Retention`] when the head layout does not suit power retention.
    pub fn into_retention(
        self,
        chunk: usize,
        rotary: bool,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for mut block in self.blocks {
            if let SequenceMixer::RotaryAttention(attention) = block.mixer {
                let [d_model, _] = attention.query.weight.dims();
                let mut retention = PowerRetentionConfig::new(d_model, attention.n_heads())
                    .with_n_kv_heads(Some(attention.n_kv_heads()))
                    .with_head_dim(Some(attention.head_dim()))
                    .with_chunk_size(Some(chunk))
                    .with_rotary_theta(rotary.then_some(f64::from(attention.rope_theta())))
                    .init::<B>(device)?;
                retention.query = attention.query;
                retention.key = attention.key;
                retention.value = attention.value;
                retention.output = attention.output;
                if let Some(gate) = &mut retention.gate {
                    gate.weight = Param::from_tensor(Tensor::zeros(gate.weight.dims(), device));
                }
                block.mixer = SequenceMixer::PowerRetention(retention);
            }
            blocks.push(block);
        }
        Ok(Self { blocks, ..self })
    }

    /// The model with its power retention blocks running the op in `dtype` during
    /// whole-sequence passes ([`ComputeDtype`]); attention blocks are left as they are.
    pub fn with_retention_dtype(self, dtype: ComputeDtype) -> Self {
        let blocks = self
            .blocks
            .into_iter()
            .map(|block| match block.mixer {
                SequenceMixer::PowerRetention(layer) => LlamaBlock {
                    mixer: SequenceMixer::PowerRetention(layer.with_compute_dtype(dtype)),
                    ..block
                },
                _ => block,
            })
            .collect();
        Self { blocks, ..self }
    }

    /// The model with every parameter but its sequence mixers' frozen (no gradient: the
    /// optimizer leaves them as they are): embeddings, norms, feed-forward blocks and the
    /// output head. Retraining a converted model this way keeps what the pretrained
    /// layers know while the new mixers learn, with a fifth of the parameters to fit.
    pub fn frozen_but_mixers(self) -> Self {
        Self {
            embedding: self.embedding.no_grad(),
            blocks: self
                .blocks
                .into_iter()
                .map(LlamaBlock::frozen_but_mixer)
                .collect(),
            norm: self.norm.no_grad(),
            head: self.head.map(Module::no_grad),
        }
    }

    /// The model a GGUF checkpoint holds (architecture `llama`), its block weights dequantized
    /// to f32: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
    /// ffn_gate, ffn_up, ffn_down}`, `output_norm` and, unless tied, `output`.
    ///
    /// # Errors
    /// [`ModelError::Gguf`] when the configuration or a tensor is missing or has the wrong
    /// shape.
    pub fn from_gguf(file: &GgufFile, device: &B::Device) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(file)?;
        Self::from_weights(
            &config,
            |name, shape| {
                let info = file
                    .tensor(name)
                    .ok_or_else(|| ModelError::Gguf(format!("no tensor {name}")))?;
                if info.shape() != shape {
                    return Err(ModelError::Gguf(format!(
                        "{name}: shape {:?}, expected {shape:?}",
                        info.shape()
                    )));
                }
                file.tensor_f32(name)
            },
            device,
        )
    }

    /// A model of `config` whose weights `values(name, shape)` gives in f32, row-major, under
    /// GGUF's names (`token_embd.weight`, `blk.N.attn_q.weight`, …; matrices `[out, in]`,
    /// queries and keys in GGUF's adjacent-pair rotary layout).
    ///
    /// # Errors
    /// Those of `values`; [`ModelError::Retention`] when the configuration does not build.
    pub fn from_weights(
        config: &LlamaConfig,
        values: impl Fn(&str, &[usize]) -> Result<Vec<f32>, ModelError>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let (d, ff, v) = (config.d_model, config.d_ff, config.vocab_size);
        let kv = config.n_kv_heads * (d / config.n_heads.max(1));
        let mut model = config.init::<B>(device)?;
        // matrices come `[out, in]` row-major (PyTorch's layout); Burn's `Linear` wants
        // `[in, out]`
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Tensor<B, 2>, ModelError> {
            let data = TensorData::new(values(name, &[rows, cols])?, [rows, cols]);
            Ok(Tensor::from_data(data, device))
        };
        // transposed on the host: a transposed view would be copied into row-major order by
        // every forward that reshapes it (Burn's `linear` does), a whole weight per call
        let linear =
            |name: &str, out: usize, inp: usize| -> Result<Param<Tensor<B, 2>>, ModelError> {
                let rows = values(name, &[out, inp])?;
                let mut data = vec![0.0f32; rows.len()];
                for (o, row) in rows.chunks_exact(inp).enumerate() {
                    for (i, &w) in row.iter().enumerate() {
                        data[i * out + o] = w;
                    }
                }
                let data = TensorData::new(data, [inp, out]);
                Ok(Param::from_tensor(Tensor::from_data(data, device)))
            };
        let gamma = |name: &str| -> Result<Param<Tensor<B, 1>>, ModelError> {
            let data = TensorData::new(values(name, &[d])?, [d]);
            Ok(Param::from_tensor(Tensor::from_data(data, device)))
        };
        model.embedding.weight = Param::from_tensor(matrix("token_embd.weight", v, d)?);
        for (i, block) in model.blocks.iter_mut().enumerate() {
            let name = |part: &str| format!("blk.{i}.{part}.weight");
            block.mixer_norm.gamma = gamma(&name("attn_norm"))?;
            let SequenceMixer::RotaryAttention(attention) = &mut block.mixer else {
                return Err(ModelError::Config(
                    "a checkpoint loads into attention blocks".into(),
                ));
            };
            attention.query.weight = linear(&name("attn_q"), d, d)?;
            attention.key.weight = linear(&name("attn_k"), kv, d)?;
            attention.value.weight = linear(&name("attn_v"), kv, d)?;
            attention.output.weight = linear(&name("attn_output"), d, d)?;
            block.ffn_norm.gamma = gamma(&name("ffn_norm"))?;
            block.ffn.set_weights(
                linear(&name("ffn_gate"), ff, d)?,
                linear(&name("ffn_up"), ff, d)?,
                linear(&name("ffn_down"), d, ff)?,
            );
        }
        model.norm.gamma = gamma("output_norm.weight")?;
        if let Some(head) = &mut model.head {
            head.weight = linear("output.weight", v, d)?;
        }
        Ok(model)
    }

    /// Continues `prompt` by up to `max_new` tokens, each picked by `sampler` from the logits
    /// after everything before it, stopping after `stop`; `on_token` sees each token as it is
    /// picked. Returns the new tokens. The prompt is read in pieces of at most
    /// [`PREFILL_PIECE`] tokens, then each new token is one cached step
    /// ([`forward_cached`](Self::forward_cached)).
    ///
    /// # Errors
    /// [`ModelError::Config`] when the prompt is empty or the sequence would exceed
    /// [`max_seq`](Self::max_seq).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: Option<u32>,
        sampler: &mut TokenSampler,
        device: &B::Device,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>, ModelError> {
        let max_seq = self.max_seq().unwrap_or(usize::MAX);
        if prompt.is_empty() || prompt.len() + max_new > max_seq {
            return Err(ModelError::Config(format!(
                "prompt of {} tokens + {max_new} new must be 1..={max_seq}",
                prompt.len()
            )));
        }
        let mut cache = self.new_cache();
        let mut logits = self.prefill(prompt, &mut cache, device)?;
        let mut out = Vec::with_capacity(max_new);
        for i in 0..max_new {
            let next = sampler.pick(&logits)?;
            on_token(next);
            out.push(next);
            if Some(next) == stop || i + 1 == max_new {
                break;
            }
            logits = self.step(next, &mut cache, device)?;
        }
        Ok(out)
    }

    /// Reads `tokens` (one sequence) into `cache` in pieces of at most [`PREFILL_PIECE`] and
    /// returns the next-token logits after the last one.
    ///
    /// # Errors
    /// As [`forward_cached`](Self::forward_cached); [`ModelError::Config`] when `tokens` is
    /// empty.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut LlamaCache<B>,
        device: &B::Device,
    ) -> Result<Vec<f32>, ModelError> {
        let mut last = None;
        for piece in tokens.chunks(PREFILL_PIECE) {
            last = Some(self.hidden_cached(token_row(piece, device), cache)?);
        }
        let x = last.ok_or_else(|| ModelError::Config("an empty prompt".into()))?;
        let t = x.dims()[1];
        row_values(self.logits(x.narrow(1, t - 1, 1)))
    }

    /// Reads one token into `cache` and returns the next-token logits after it.
    ///
    /// # Errors
    /// As [`forward_cached`](Self::forward_cached).
    pub fn step(
        &self,
        token: u32,
        cache: &mut LlamaCache<B>,
        device: &B::Device,
    ) -> Result<Vec<f32>, ModelError> {
        row_values(self.forward_cached(token_row(&[token], device), cache)?)
    }
}

/// Most tokens [`LlamaModel::prefill`] reads in one call: bounds attention's scores to
/// `heads × 512 × context` values per layer.
pub const PREFILL_PIECE: usize = 512;

fn token_row<B: Backend>(tokens: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    Tensor::from_data(TensorData::new(ids, [1, tokens.len()]), device)
}

/// The values of a `[1, 1, vocab]` logits row.
fn row_values<B: Backend>(logits: Tensor<B, 3>) -> Result<Vec<f32>, ModelError> {
    logits
        .reshape([-1])
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| ModelError::Config(format!("logits: {e:?}")))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;
    use crate::{SamplingConfig, TextTokenizer};

    #[test]
    fn shapes_and_grouped_heads() {
        let dev = Default::default();
        let config = LlamaConfig::new(50, 32, 2, 4, 2, 48).with_max_seq(16);
        let model = config.init::<NdArray>(&dev).expect("builds");
        let ids =
            Tensor::<NdArray, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 7], [1, 3]), &dev);
        assert_eq!(model.forward(ids.clone()).expect("runs").dims(), [1, 3, 50]);
        // the conversion keeps the projections and runs the same tokens through retention
        let query = match &model.blocks[0].mixer {
            SequenceMixer::RotaryAttention(a) => a.query.weight.val(),
            _ => panic!("attention blocks"),
        };
        let converted = model
            .clone()
            .into_retention(2, true, &dev)
            .expect("converts");
        match &converted.blocks[0].mixer {
            SequenceMixer::PowerRetention(r) => {
                r.query
                    .weight
                    .val()
                    .into_data()
                    .assert_eq(&query.into_data(), true);
                let gate = r.gate.as_ref().expect("gated");
                assert_eq!(gate.weight.val().abs().max().into_scalar(), 0.0);
            }
            _ => panic!("converted to retention"),
        }
        let logits = converted.forward(ids).expect("runs");
        assert_eq!(logits.dims(), [1, 3, 50]);
        assert!(!logits.is_nan().any().into_scalar());
        let bad = LlamaConfig::new(50, 32, 2, 4, 3, 48).init::<NdArray>(&dev);
        assert!(
            matches!(bad, Err(ModelError::Retention(RetentionError::Config(m))) if m.contains("n_kv_heads"))
        );
        let mut greedy = TokenSampler::new(SamplingConfig::default()).expect("valid");
        let past = model.generate(&[1; 10], 7, None, &mut greedy, &dev, |_| ());
        assert!(matches!(past, Err(ModelError::Config(_))), "past max_seq");
        let mut seen = Vec::new();
        let new = model
            .generate(&[1, 2], 4, None, &mut greedy, &dev, |t| seen.push(t))
            .expect("generates");
        assert_eq!((new.len(), &seen), (4, &new));
    }

    /// Reading a sequence in pieces through the cache gives the logits of reading it whole,
    /// for the pretrained attention layout and for its conversion to power retention; greedy
    /// generation then equals picking the argmax of the full forward token by token.
    #[test]
    fn cached_pieces_equal_the_whole_sequence() {
        let dev = Default::default();
        let model = LlamaConfig::new(50, 32, 3, 4, 2, 48)
            .with_max_seq(32)
            .init::<NdArray>(&dev)
            .expect("builds");
        let tokens: Vec<u32> = vec![3, 17, 4, 9, 41, 0, 22, 8, 15];
        let converted = |rotary| {
            model
                .clone()
                .into_retention(4, rotary, &dev)
                .expect("converts")
        };
        for model in [model.clone(), converted(false), converted(true)] {
            let whole = model.forward(token_row(&tokens, &dev)).expect("runs");
            let mut cache = model.new_cache();
            let mut pieces = Vec::new();
            for range in [0..3, 3..4, 4..5, 5..9] {
                let piece = token_row::<NdArray>(&tokens[range], &dev);
                pieces.push(model.forward_cached(piece, &mut cache).expect("runs"));
            }
            assert_eq!(cache.tokens(), tokens.len());
            assert!(cache.size_bytes() > 0);
            Tensor::cat(pieces, 1).into_data().assert_approx_eq::<f32>(
                &whole.into_data(),
                burn::tensor::Tolerance::rel_abs(1e-4, 1e-5),
            );
            // greedy generation = argmax of the full forward, token by token
            let mut greedy = TokenSampler::new(SamplingConfig::default()).expect("valid");
            let new = model
                .generate(&tokens[..4], 5, None, &mut greedy, &dev, |_| ())
                .expect("generates");
            let mut seq = tokens[..4].to_vec();
            for &next in &new {
                let logits = row_values(
                    model
                        .forward(token_row(&seq, &dev))
                        .expect("runs")
                        .narrow(1, seq.len() - 1, 1),
                )
                .expect("values");
                let argmax =
                    (0..logits.len()).fold(0, |a, i| if logits[i] > logits[a] { i } else { a });
                assert_eq!(next as usize, argmax);
                seq.push(next);
            }
        }
        // a cache of another model is refused, and left as it was
        let small = LlamaConfig::new(50, 32, 1, 4, 2, 48)
            .init::<NdArray>(&dev)
            .expect("builds");
        let mut cache = small.new_cache();
        let other = LlamaConfig::new(50, 32, 2, 4, 2, 48)
            .init::<NdArray>(&dev)
            .expect("builds");
        assert!(matches!(
            other.forward_cached(token_row(&[1, 2], &dev), &mut cache),
            Err(RetentionError::Config(m)) if m.contains("1 blocks")
        ));
        assert_eq!(cache.tokens(), 0);
    }

    /// Reference logits of one prompt, as `scripts/reference-logits.py` writes them.
    #[derive(serde::Deserialize)]
    struct ReferencePrompt {
        ids: Vec<u32>,
        positions: Vec<ReferenceRow>,
    }

    #[derive(serde::Deserialize)]
    struct ReferenceRow {
        top_ids: Vec<usize>,
        top_logits: Vec<f64>,
        fixed_logits: Vec<f64>,
        logsumexp: f64,
    }

    #[derive(serde::Deserialize)]
    struct ReferenceLogits {
        fixed_ids: Vec<usize>,
        prompts: Vec<ReferencePrompt>,
    }

    /// SmolLM2-135M-Instruct where `RETENTION_SMOLLM2_GGUF` names it: at every position of two
    /// prompts, the logits of the top 10 and of 32 fixed tokens and the row's logsumexp agree
    /// with Hugging Face `transformers` 4.57 running the same GGUF in f32
    /// (`tests/data/smollm2-reference-logits.json`, written by `scripts/reference-logits.py`)
    /// within 1e-4 of the row's largest logit (the bar is 1e-2; we measure 5e-6), and
    /// the most likely token is the same.
    #[test]
    fn smollm2_logits_match_transformers() {
        let Ok(path) = std::env::var("RETENTION_SMOLLM2_GGUF") else {
            eprintln!("skipped: set RETENTION_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf");
            return;
        };
        let file = GgufFile::read(&path).expect("reads");
        let model = LlamaModel::<NdArray>::from_gguf(&file, &Default::default()).expect("loads");
        let worst = differences_from_transformers(&model, 1e-4);
        eprintln!("worst relative difference from transformers: {worst:.2e}");
    }

    /// The same checkpoint as Hugging Face's layout where `RETENTION_SMOLLM2_HF` names a
    /// directory `transformers` wrote from it (`save_pretrained` of the GGUF model): the logits
    /// of `tests/data/smollm2-reference-logits.json` within 1e-4 from f32 weights, within 5e-2
    /// (their rounding) from bf16 ones, as Hugging Face ships checkpoints.
    #[test]
    fn smollm2_hf_checkpoint_matches_transformers() {
        let Ok(path) = std::env::var("RETENTION_SMOLLM2_HF") else {
            eprintln!("skipped: set RETENTION_SMOLLM2_HF to a Hugging Face SmolLM2 directory");
            return;
        };
        let (model, _, info, _) =
            crate::load_hf_llama::<NdArray>(std::path::Path::new(&path), &Default::default())
                .expect("loads");
        assert!(info.chat);
        assert_eq!(info.stop_token, Some(2));
        let config = std::fs::read_to_string(std::path::Path::new(&path).join("config.json"))
            .expect("reads");
        let tolerance = if config.contains("\"float32\"") {
            1e-4
        } else {
            5e-2
        };
        let worst = differences_from_transformers(&model, tolerance);
        eprintln!("worst relative difference from transformers: {worst:.2e}");
    }

    /// The largest difference of `model`'s logits from the reference's, relative to each row's
    /// largest logit (and of the rows' logsumexp), asserted within `tolerance`; the most likely
    /// token must be the reference's.
    fn differences_from_transformers(model: &LlamaModel<NdArray>, tolerance: f64) -> f64 {
        let reference: ReferenceLogits =
            serde_json::from_str(include_str!("../tests/data/smollm2-reference-logits.json"))
                .expect("parses");
        let dev = Default::default();
        let mut worst = 0.0f64;
        for prompt in &reference.prompts {
            let t = prompt.ids.len();
            let tokens: Vec<i64> = prompt.ids.iter().map(|&i| i64::from(i)).collect();
            let ids = Tensor::<NdArray, 2, Int>::from_data(TensorData::new(tokens, [1, t]), &dev);
            let logits = model.forward(ids).expect("runs");
            let vocab = logits.dims()[2];
            let ours: Vec<f64> = logits.into_data().convert::<f64>().into_vec().expect("f64");
            assert_eq!(prompt.positions.len(), t);
            for (pos, row) in prompt.positions.iter().enumerate() {
                let ours = &ours[pos * vocab..(pos + 1) * vocab];
                let scale = row.top_logits[0].abs().max(1.0);
                let ids = row.top_ids.iter().chain(&reference.fixed_ids);
                let values = row.top_logits.iter().chain(&row.fixed_logits);
                for (&id, &want) in ids.zip(values) {
                    let err = (ours[id] - want).abs() / scale;
                    worst = worst.max(err);
                    assert!(
                        err <= tolerance,
                        "position {pos}, token {id}: {} vs {want}",
                        ours[id]
                    );
                }
                let max = ours.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + ours.iter().map(|&l| (l - max).exp()).sum::<f64>().ln();
                let err = (lse - row.logsumexp).abs() / row.logsumexp.abs().max(1.0);
                worst = worst.max(err);
                assert!(
                    err <= tolerance,
                    "position {pos}: logsumexp {lse} vs {}",
                    row.logsumexp
                );
                let argmax = (0..vocab).fold(0, |a, i| if ours[i] > ours[a] { i } else { a });
                assert_eq!(argmax, row.top_ids[0], "position {pos}");
            }
        }
        worst
    }

    /// SmolLM2-135M-Instruct where `RETENTION_SMOLLM2_GGUF` names it: the greedy answer to a
    /// factual question, through the checkpoint's chat template.
    #[test]
    fn smollm2_answers_a_question() {
        let Ok(path) = std::env::var("RETENTION_SMOLLM2_GGUF") else {
            eprintln!("skipped: set RETENTION_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf");
            return;
        };
        let file = GgufFile::read(&path).expect("reads");
        let dev = Default::default();
        let model = LlamaModel::<NdArray>::from_gguf(&file, &dev).expect("loads");
        let tok = TextTokenizer::from_gguf(&file).expect("tokenizer");
        let prompt =
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
        let ids = tok.encode(prompt).expect("encodes");
        let mut greedy = TokenSampler::new(SamplingConfig::default()).expect("valid");
        let answer = model
            .generate(&ids, 12, Some(2), &mut greedy, &dev, |_| ())
            .expect("generates");
        let text = tok.decode(&answer).expect("decodes");
        eprintln!("answer: {text:?}");
        assert!(text.contains("Paris"), "{text:?}");
        // converted to power retention (before any retraining): it runs, logits stay finite
        let retention = model.into_retention(128, true, &dev).expect("converts");
        let t = ids.len();
        let tokens: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let ids = Tensor::<NdArray, 2, Int>::from_data(TensorData::new(tokens, [1, t]), &dev);
        let logits = retention.forward(ids).expect("runs");
        assert!(!logits.clone().is_nan().any().into_scalar());
        assert!(logits.abs().max().into_scalar() < 1e4);
    }
}
