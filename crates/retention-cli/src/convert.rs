//! `retention convert`: a pretrained Llama-family GGUF checkpoint with power retention in
//! place of every attention layer, saved as a Burn checkpoint directory (before any
//! retraining: `retention retrain` does both steps and records the recovery).

use std::path::PathBuf;

use retention::RetentionBackend;
use retention_models::{
    GenerationInfo, GgufFile, LlamaConfig, LlamaModel, MixerKind, TextTokenizer,
    save_llama_checkpoint,
};

use crate::CliError;

/// Settings of `retention convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// The pretrained checkpoint: a GGUF file of architecture llama.
    #[arg(long)]
    pub model: PathBuf,
    /// The directory to write (`llama.json`, `generation.json`, `tokenizer.json`,
    /// `checkpoint/model.mpk`), which `retention generate --model` reads.
    #[arg(long)]
    pub out: PathBuf,
    /// Chunk size of the power retention layers.
    #[arg(long, default_value_t = 1024)]
    pub chunk: usize,
    /// Power retention layers keep the rotary encoding of the attention they replace (on
    /// SmolLM2 the conversion starts from a higher held-out loss with it).
    #[arg(long)]
    pub rotary: bool,
}

/// Converts and saves; returns the configuration written.
///
/// # Errors
/// [`CliError::Model`] when the checkpoint cannot be read, converted or written.
pub fn convert<B: RetentionBackend>(
    dev: &B::Device,
    args: &ConvertArgs,
) -> Result<LlamaConfig, CliError> {
    let file = GgufFile::read(&args.model)?;
    let config = LlamaConfig::from_gguf(&file)?
        .with_mixer(MixerKind::Retention)
        .with_retention_chunk(args.chunk)
        .with_retention_rotary(args.rotary);
    let info = GenerationInfo::from_gguf(&file);
    let tokenizer = TextTokenizer::from_gguf(&file)?;
    let model =
        LlamaModel::<B>::from_gguf(&file, dev)?.into_retention(args.chunk, args.rotary, dev)?;
    drop(file);
    save_llama_checkpoint(model, &config, &info, &tokenizer, &args.out)?;
    println!(
        "{}: {} blocks of power retention ({} query / {} key-value heads, chunk {}) in {}",
        args.model.display(),
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        config.retention_chunk,
        args.out.display()
    );
    Ok(config)
}
