//! Llama-family checkpoints in Hugging Face's layout: `config.json`, the weights in
//! safetensors (`model.safetensors`, or shards listed by `model.safetensors.index.json`) in
//! f32, f16 or bf16, and `tokenizer.json`.
//!
//! The queries' and keys' rows are reordered on loading from Hugging Face's rotary layout
//! (each head's first half rotates with its second half) to the adjacent-pair layout the
//! model computes in (GGUF's: llama.cpp's converter applies the same reordering).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use retention::RetentionBackend;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::{
    GenerationInfo, GgmlType, LlamaConfig, LlamaModel, Loaded, ModelError, TextTokenizer,
    dequantize,
};

/// The fields of a Hugging Face `config.json` a Llama model is built from.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    eos_token_id: Option<serde_json::Value>,
}

fn default_theta() -> f64 {
    10000.0
}

fn default_eps() -> f64 {
    1e-6
}

fn default_positions() -> usize {
    2048
}

fn checkpoint_error(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// A Llama-family model, its generation settings and vocabulary from a Hugging Face
/// checkpoint directory, on `device`.
///
/// # Errors
/// [`ModelError::Checkpoint`] naming the file when `config.json` is missing, malformed or not
/// of a Llama model, a weight is missing, of another shape or of an unsupported dtype;
/// [`ModelError::Tokenizer`] for `tokenizer.json`.
pub fn load_hf_llama<B: RetentionBackend>(
    dir: &Path,
    device: &B::Device,
) -> Result<Loaded<B>, ModelError> {
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let hf: HfConfig =
        serde_json::from_str(&text).map_err(|e| checkpoint_error(&config_path, e))?;
    if hf.model_type.as_deref().is_some_and(|t| t != "llama") {
        return Err(checkpoint_error(
            &config_path,
            format!("model_type {:?}; only llama is read", hf.model_type),
        ));
    }
    let n_kv = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
    let config = LlamaConfig::new(
        hf.vocab_size,
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.num_attention_heads,
        n_kv,
        hf.intermediate_size,
    )
    .with_rope_theta(hf.rope_theta as f32)
    .with_norm_eps(hf.rms_norm_eps)
    .with_max_seq(hf.max_position_embeddings)
    .with_tied_embeddings(hf.tie_word_embeddings);
    let files = SafetensorsFiles::open(dir)?;
    let head_dim = hf.hidden_size / hf.num_attention_heads.max(1);
    let model = LlamaModel::from_weights(
        &config,
        |gguf_name, shape| {
            let (name, heads) = hf_name(gguf_name, hf.num_attention_heads, n_kv)?;
            let values = files.values(&name, shape)?;
            Ok(match heads {
                Some(heads) => adjacent_pairs(&values, heads, head_dim, shape[1]),
                None => values,
            })
        },
        device,
    )?;
    let tokenizer = TextTokenizer::load(dir.join("tokenizer.json"))?;
    let stop_token = match hf.eos_token_id {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::Array(ids)) => ids.first().and_then(serde_json::Value::as_u64),
        _ => None,
    }
    .and_then(|id| u32::try_from(id).ok());
    let chat = std::fs::read_to_string(dir.join("chat_template.jinja"))
        .or_else(|_| std::fs::read_to_string(dir.join("tokenizer_config.json")))
        .is_ok_and(|t| t.contains("<|im_start|>"));
    Ok((
        model,
        config,
        GenerationInfo { stop_token, chat },
        tokenizer,
    ))
}

/// Hugging Face's name of a GGUF weight name, and the head count whose rotary rows it reorders
/// (queries: the query heads, keys: the key/value heads).
fn hf_name(
    gguf: &str,
    heads: usize,
    kv_heads: usize,
) -> Result<(String, Option<usize>), ModelError> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Ok((name.to_string(), None));
    }
    let unknown = || ModelError::Config(format!("no Hugging Face name for {gguf}"));
    let rest = gguf.strip_prefix("blk.").ok_or_else(unknown)?;
    let (layer, part) = rest.split_once('.').ok_or_else(unknown)?;
    let part = part.strip_suffix(".weight").ok_or_else(unknown)?;
    let (hf, rows) = match part {
        "attn_norm" => ("input_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(heads)),
        "attn_k" => ("self_attn.k_proj", Some(kv_heads)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return Err(unknown()),
    };
    Ok((format!("model.layers.{layer}.{hf}.weight"), rows))
}

/// Reorders the rows of a `[heads · head_dim, cols]` projection from Hugging Face's rotary
/// layout (row `j · head_dim/2 + r` of a head pairs with row `(1 − j) · head_dim/2 + r`) to
/// adjacent pairs (rows `2r + j`).
fn adjacent_pairs(values: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(values.len());
    for h in 0..heads {
        for r in 0..half {
            for j in 0..2 {
                let row = h * head_dim + j * half + r;
                out.extend_from_slice(&values[row * cols..(row + 1) * cols]);
            }
        }
    }
    out
}

/// The safetensors files of a checkpoint, read whole, and which holds each tensor.
struct SafetensorsFiles {
    files: Vec<(PathBuf, Vec<u8>)>,
    index: HashMap<String, usize>,
}

impl SafetensorsFiles {
    fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let paths = if single.exists() {
            vec![single]
        } else {
            let index_path = dir.join("model.safetensors.index.json");
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| checkpoint_error(&index_path, e))?;
            let map = index
                .get("weight_map")
                .and_then(serde_json::Value::as_object)
                .ok_or_else(|| checkpoint_error(&index_path, "no weight_map"))?;
            let mut shards: Vec<&str> =
                map.values().filter_map(serde_json::Value::as_str).collect();
            shards.sort_unstable();
            shards.dedup();
            shards.iter().map(|s| dir.join(s)).collect()
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
            let names = SafeTensors::deserialize(&bytes)
                .map_err(|e| checkpoint_error(&path, e))?
                .names()
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>();
            for name in names {
                index.insert(name, files.len());
            }
            files.push((path, bytes));
        }
        Ok(Self { files, index })
    }

    /// The tensor `name` as f32, checked to have `shape`.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let Some(&at) = self.index.get(name) else {
            let (path, _) = &self.files[0];
            return Err(checkpoint_error(path, format!("no tensor {name}")));
        };
        let (path, bytes) = &self.files[at];
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| checkpoint_error(path, e))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| checkpoint_error(path, e))?;
        if view.shape() != shape {
            return Err(checkpoint_error(
                path,
                format!("{name}: shape {:?}, expected {shape:?}", view.shape()),
            ));
        }
        let ty = match view.dtype() {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::Bf16,
            other => {
                return Err(checkpoint_error(
                    path,
                    format!("{name}: dtype {other:?}; f32, f16 and bf16 are read"),
                ));
            }
        };
        let count = shape.iter().product();
        dequantize(ty, view.data(), count)
            .ok_or_else(|| checkpoint_error(path, format!("{name}: wrong byte count")))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData, Tolerance};
    use safetensors::tensor::TensorView;

    use super::*;

    /// A small model written in Hugging Face's layout (names, `[out, in]` bf16 matrices,
    /// half-split rotary rows) loads to the logits of the same weights given in GGUF's layout.
    #[test]
    fn loads_the_weights_of_the_same_model_in_gguf_layout() {
        let dev = Default::default();
        let (v, d, layers, heads, kv, ff) = (300, 32, 2, 4, 2, 48);
        let config = LlamaConfig::new(v, d, layers, heads, kv, ff)
            .with_max_seq(32)
            .with_rope_theta(500.0);
        // deterministic weights, rounded to bf16 so both layouts hold the same values
        let weight = |name: &str, shape: &[usize]| -> Vec<f32> {
            let seed = name
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
            (0..shape.iter().product::<usize>())
                .map(|i| {
                    let x = ((seed.wrapping_add(i as u64 * 2654435761) % 2001) as f32 - 1000.0)
                        / 4000.0;
                    burn::tensor::bf16::from_f32(x).to_f32()
                })
                .collect()
        };
        let gguf = LlamaModel::<NdArray>::from_weights(&config, |n, s| Ok(weight(n, s)), &dev)
            .expect("builds");
        // the same tensors under Hugging Face's names and layout
        let head_dim = d / heads;
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        let mut add = |gguf_name: &str, shape: Vec<usize>| {
            let (name, rows) = hf_name(gguf_name, heads, kv).expect("named");
            let mut values = weight(gguf_name, &shape);
            if let Some(h) = rows {
                // inverse of `adjacent_pairs`: HF row (head, j, r) = GGUF row (head, 2r + j)
                let cols = shape[1];
                let mut hf = vec![0.0; values.len()];
                for head in 0..h {
                    for r in 0..head_dim / 2 {
                        for j in 0..2 {
                            let from = head * head_dim + 2 * r + j;
                            let to = head * head_dim + j * head_dim / 2 + r;
                            hf[to * cols..(to + 1) * cols]
                                .copy_from_slice(&values[from * cols..(from + 1) * cols]);
                        }
                    }
                }
                values = hf;
            }
            let bytes = values
                .iter()
                .flat_map(|&x| burn::tensor::bf16::from_f32(x).to_le_bytes())
                .collect();
            tensors.push((name, bytes, shape));
        };
        add("token_embd.weight", vec![v, d]);
        add("output_norm.weight", vec![d]);
        for i in 0..layers {
            for (part, shape) in [
                ("attn_norm", vec![d]),
                ("attn_q", vec![d, d]),
                ("attn_k", vec![kv * head_dim, d]),
                ("attn_v", vec![kv * head_dim, d]),
                ("attn_output", vec![d, d]),
                ("ffn_norm", vec![d]),
                ("ffn_gate", vec![ff, d]),
                ("ffn_up", vec![ff, d]),
                ("ffn_down", vec![d, ff]),
            ] {
                add(&format!("blk.{i}.{part}.weight"), shape);
            }
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, bytes, shape)| {
                let view = TensorView::new(Dtype::BF16, shape.clone(), bytes).expect("view");
                (name.clone(), view)
            })
            .collect();
        let tmp = tempfile::tempdir().expect("tmp");
        safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors"))
            .expect("writes");
        let json = format!(
            r#"{{"model_type": "llama", "vocab_size": {v}, "hidden_size": {d},
               "num_hidden_layers": {layers}, "num_attention_heads": {heads},
               "num_key_value_heads": {kv}, "intermediate_size": {ff}, "rope_theta": 500.0,
               "rms_norm_eps": 1e-5, "max_position_embeddings": 32,
               "tie_word_embeddings": true, "eos_token_id": 2}}"#
        );
        std::fs::write(tmp.path().join("config.json"), json).expect("writes");
        let text = "In the beginning God created the heaven and the earth. ".repeat(20);
        TextTokenizer::train(&text, 300)
            .expect("tokenizer")
            .save(tmp.path().join("tokenizer.json"))
            .expect("saves");
        let (hf, _, info, _) = load_hf_llama::<NdArray>(tmp.path(), &dev).expect("loads");
        assert_eq!(info.stop_token, Some(2));
        let ids = Tensor::<NdArray, 2, Int>::from_data(
            TensorData::new(vec![1i64, 17, 4, 250, 9], [1, 5]),
            &dev,
        );
        hf.forward(ids.clone())
            .expect("runs")
            .into_data()
            .assert_approx_eq::<f32>(
                &gguf.forward(ids).expect("runs").into_data(),
                Tolerance::rel_abs(1e-5, 1e-6),
            );
        // a missing tensor is named
        std::fs::write(
            tmp.path().join("config.json"),
            std::fs::read_to_string(tmp.path().join("config.json"))
                .expect("reads")
                .replace(
                    "\"tie_word_embeddings\": true",
                    "\"tie_word_embeddings\": false",
                ),
        )
        .expect("writes");
        assert!(matches!(
            load_hf_llama::<NdArray>(tmp.path(), &dev),
            Err(ModelError::Checkpoint { message, .. }) if message.contains("lm_head.weight")
        ));
    }
}
