//! `retention convert`: a pretrained Llama-family GGUF checkpoint with power retention in
//! place of every attention layer, saved as a Burn checkpoint directory (before any
//! retraining: `retention retrain` does both steps and records the recovery).

use std::path::PathBuf;

use retention::RetentionBackend;
use retention_models::{LlamaConfig, MixerKind, Pretrained, save_llama_checkpoint};

use crate::CliError;

/// Settings of `retention convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// The pretrained checkpoint: a GGUF file of architecture llama or a Hugging Face
    /// directory.
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
    let Pretrained {
        model,
        config,
        info,
        tokenizer,
        ..
    } = Pretrained::<B>::open(&args.model, dev)?;
    if config.mixer != MixerKind::Attention {
        return Err(CliError::Input(format!(
            "{}: already power retention",
            args.model.display()
        )));
    }
    let config = config
        .with_mixer(MixerKind::Retention)
        .with_retention_chunk(args.chunk)
        .with_retention_rotary(args.rotary);
    let model = model.into_retention(args.chunk, args.rotary, dev)?;
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
