//! A pretrained Llama-family model with what runs and retrains it, from any of the three
//! formats we read: a GGUF file, a Hugging Face directory, or a checkpoint directory of ours.

use std::path::Path;

use retention::RetentionBackend;

use crate::{
    GenerationInfo, GgufFile, LlamaConfig, LlamaModel, ModelError, TextTokenizer, load_hf_llama,
    load_llama_checkpoint,
};

/// A loaded model, its configuration, generation settings and vocabulary.
pub struct Pretrained<B: RetentionBackend> {
    /// The model.
    pub model: LlamaModel<B>,
    /// Its configuration (its mixer says whether it is still attention).
    pub config: LlamaConfig,
    /// Stop token and prompt format.
    pub info: GenerationInfo,
    /// The vocabulary.
    pub tokenizer: TextTokenizer,
    /// A short name for reports: the GGUF file's `general.name`, else the file or directory.
    pub name: String,
}

impl<B: RetentionBackend> Pretrained<B> {
    /// Opens `path` on `device`: a GGUF file; a directory with `config.json` (Hugging Face's
    /// layout, [`load_hf_llama`]); a directory with `llama.json` (written by
    /// [`save_llama_checkpoint`](crate::save_llama_checkpoint) or a retraining,
    /// [`load_llama_checkpoint`]).
    ///
    /// # Errors
    /// The loaders' errors; [`ModelError::Config`] for a directory of neither layout.
    pub fn open(path: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        if !path.is_dir() {
            let file = GgufFile::read(path)?;
            let name = file
                .metadata
                .get("general.name")
                .and_then(|n| n.as_str())
                .map_or(name, str::to_string);
            return Ok(Self {
                model: LlamaModel::from_gguf(&file, device)?,
                config: LlamaConfig::from_gguf(&file)?,
                info: GenerationInfo::from_gguf(&file),
                tokenizer: TextTokenizer::from_gguf(&file)?,
                name,
            });
        }
        let (model, config, info, tokenizer) = if path.join("config.json").exists() {
            load_hf_llama(path, device)?
        } else if path.join("llama.json").exists() {
            load_llama_checkpoint(path, device)?
        } else {
            return Err(ModelError::Config(format!(
                "{}: neither a Hugging Face checkpoint (config.json) nor one of ours (llama.json)",
                path.display()
            )));
        };
        Ok(Self {
            model,
            config,
            info,
            tokenizer,
            name,
        })
    }
}
