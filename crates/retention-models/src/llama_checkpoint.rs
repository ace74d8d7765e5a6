//! A Llama-family model on disk in Burn's format, with what generation needs beside the
//! weights: the layout `retention convert` writes and every run directory of
//! `retention retrain` holds.
//!
//! ```text
//! <dir>/llama.json         LlamaConfig (its mixer: attention or power retention)
//! <dir>/generation.json    GenerationInfo: stop token, chat format
//! <dir>/tokenizer.json     the vocabulary
//! <dir>/checkpoint/model.mpk   the weights (full precision)
//! ```

use std::path::Path;

use burn::config::Config;
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use retention::RetentionBackend;

use crate::{GgufFile, LlamaConfig, LlamaModel, ModelError, TextTokenizer};

/// What generation needs to know of a checkpoint besides its weights and vocabulary.
#[derive(Config, Debug)]
pub struct GenerationInfo {
    /// The token that ends an answer.
    pub stop_token: Option<u32>,
    /// Whether prompts go in the ChatML format (`<|im_start|>user …`).
    pub chat: bool,
}

impl GenerationInfo {
    /// What a GGUF file's metadata says: `tokenizer.ggml.eos_token_id`, and a chat template
    /// in ChatML.
    pub fn from_gguf(file: &GgufFile) -> Self {
        let chat = file
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|t| t.as_str())
            .is_some_and(|t| t.contains("<|im_start|>"));
        let stop_token = file
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok());
        Self { stop_token, chat }
    }

    /// `prompt` as the model expects it (ChatML around it where the checkpoint chats).
    pub fn format_prompt(&self, prompt: &str) -> String {
        if self.chat {
            format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
        } else {
            prompt.to_string()
        }
    }
}

const CONFIG_FILE: &str = "llama.json";
const GENERATION_FILE: &str = "generation.json";
const TOKENIZER_FILE: &str = "tokenizer.json";
/// The weights, as the trainer's checkpoints keep them (`Trainer::save`).
const WEIGHTS: &str = "checkpoint/model";

fn config_error(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::io(path, std::io::Error::other(e.to_string()))
}

/// Writes `config`, `info` and `tokenizer` into `dir` (created if missing): everything of a
/// checkpoint but its weights (a retraining's trainer writes those).
///
/// # Errors
/// [`ModelError::Io`] when a file cannot be written.
pub fn save_llama_description(
    config: &LlamaConfig,
    info: &GenerationInfo,
    tokenizer: &TextTokenizer,
    dir: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let path = dir.join(CONFIG_FILE);
    config.save(&path).map_err(|e| ModelError::io(&path, e))?;
    let path = dir.join(GENERATION_FILE);
    info.save(&path).map_err(|e| ModelError::io(&path, e))?;
    tokenizer.save(dir.join(TOKENIZER_FILE))
}

/// Writes `model` (built from `config`) with `info` and `tokenizer` into `dir`. (Taken by
/// value: a copy of a model whose parameters were never drawn would draw its own.)
///
/// # Errors
/// [`ModelError::Io`] / [`ModelError::Checkpoint`] when a file cannot be written.
pub fn save_llama_checkpoint<B: RetentionBackend>(
    model: LlamaModel<B>,
    config: &LlamaConfig,
    info: &GenerationInfo,
    tokenizer: &TextTokenizer,
    dir: &Path,
) -> Result<(), ModelError> {
    save_llama_description(config, info, tokenizer, dir)?;
    let weights = dir.join(WEIGHTS);
    if let Some(parent) = weights.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    }
    model
        .clone()
        .save_file(
            &weights,
            &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
        )
        .map_err(|e| ModelError::Checkpoint {
            path: weights.display().to_string(),
            message: e.to_string(),
        })
}

/// A checkpoint [`save_llama_checkpoint`] (or a retraining) wrote into `dir`, on `device`.
///
/// # Errors
/// [`ModelError::Io`] when a description file is missing or malformed;
/// [`ModelError::Checkpoint`] when the weights are missing or do not fit the configuration.
pub fn load_llama_checkpoint<B: RetentionBackend>(
    dir: &Path,
    device: &B::Device,
) -> Result<Loaded<B>, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let config = LlamaConfig::load(&path).map_err(|e| config_error(&path, e))?;
    let path = dir.join(GENERATION_FILE);
    let info = GenerationInfo::load(&path).map_err(|e| config_error(&path, e))?;
    let tokenizer = TextTokenizer::load(dir.join(TOKENIZER_FILE))?;
    let weights = dir.join(WEIGHTS);
    let model = config
        .init::<B>(device)?
        .load_file(
            &weights,
            &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
            device,
        )
        .map_err(|e| ModelError::Checkpoint {
            path: weights.display().to_string(),
            message: e.to_string(),
        })?;
    Ok((model, config, info, tokenizer))
}

/// A model with its configuration, generation settings and vocabulary, as the loaders return
/// them.
pub type Loaded<B> = (LlamaModel<B>, LlamaConfig, GenerationInfo, TextTokenizer);

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;
    use crate::MixerKind;

    /// A converted model saved and loaded gives the same logits bit for bit, with its
    /// generation settings and vocabulary; a missing weight file is a checkpoint error.
    #[test]
    fn a_converted_model_round_trips() {
        let dev = Default::default();
        let text = "In the beginning God created the heaven and the earth. ".repeat(20);
        let tokenizer = TextTokenizer::train(&text, 300).expect("tokenizer");
        let config = LlamaConfig::new(300, 32, 2, 4, 2, 48).with_max_seq(32);
        let model = config
            .init::<NdArray>(&dev)
            .expect("builds")
            .into_retention(config.retention_chunk, config.retention_rotary, &dev)
            .expect("converts");
        let config = config.with_mixer(MixerKind::Retention);
        let ids =
            Tensor::<NdArray, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9], [1, 3]), &dev);
        // (the logits draw every lazily initialised parameter; the saved model is that one)
        let before = model.forward(ids.clone()).expect("runs");
        let info = GenerationInfo::new(false).with_stop_token(Some(7));
        let tmp = tempfile::tempdir().expect("tmp");
        save_llama_checkpoint(model, &config, &info, &tokenizer, tmp.path()).expect("saves");
        let (loaded, loaded_config, info, loaded_tokenizer) =
            load_llama_checkpoint::<NdArray>(tmp.path(), &dev).expect("loads");
        assert_eq!(info.stop_token, Some(7));
        assert_eq!(loaded_config.to_string(), config.to_string());
        assert_eq!(
            loaded_tokenizer.encode(&text).ok(),
            tokenizer.encode(&text).ok()
        );
        loaded
            .forward(ids)
            .expect("runs")
            .into_data()
            .assert_eq(&before.into_data(), true);
        std::fs::remove_file(tmp.path().join("checkpoint/model.mpk")).expect("removes");
        assert!(matches!(
            load_llama_checkpoint::<NdArray>(tmp.path(), &dev),
            Err(ModelError::Checkpoint { .. })
        ));
    }
}
