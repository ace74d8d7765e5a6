//! `retention retrain`: converts a pretrained Llama-family GGUF checkpoint to power retention
//! and retrains it on a public-domain corpus, recording the held-out loss before the
//! conversion, right after it and during the retraining (the recovery curve); optionally the
//! same fine-tuning of the unconverted model as a control.

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use retention::{ComputeDtype, RetentionBackend};
use retention_models::{
    Corpus, LossLog, MixerKind, Pretrained, RecoveryStart, RunDirectory, Trainable, TrainingConfig,
    TrainingData, plot_losses, retrain_in_directory,
};

use crate::train::{MixerChoice, StepProgress};
use crate::{CliError, DtypeChoice};

/// Settings of `retention retrain`.
#[derive(Debug, Clone, clap::Args)]
pub struct RetrainArgs {
    /// The pretrained checkpoint: a GGUF file of architecture llama or a Hugging Face
    /// directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Which models to retrain: the conversion to power retention, the unconverted attention
    /// model fine-tuned the same way (the control), or both.
    #[arg(long, value_enum, default_value = "retention")]
    pub mixer: MixerChoice,
    /// `kjv` (Debian's bible-kjv) or a text file.
    #[arg(long, default_value = "kjv")]
    pub corpus: String,
    /// Use only the corpus's first bytes.
    #[arg(long)]
    pub max_corpus_bytes: Option<usize>,
    /// Fraction of the corpus (its end) held out for the validation loss.
    #[arg(long, default_value_t = 0.05)]
    pub valid_fraction: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Steps of linear warm-up.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// AdamW's weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Chunk size of the power retention layers.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Power retention layers keep the rotary encoding of the attention they replace (on
    /// SmolLM2 the conversion starts from a higher held-out loss with it).
    #[arg(long)]
    pub rotary: bool,
    /// The element type the retention layers run the op in (the model, its weights and the
    /// optimizer stay in f32): `bf16` puts them on the tensor-core kernels on GPUs. Default:
    /// the model's own.
    #[arg(long, value_enum)]
    pub retention_dtype: Option<DtypeChoice>,
    /// Train the sequence mixers alone: embeddings, norms, feed-forward blocks and the head
    /// keep their pretrained values.
    #[arg(long)]
    pub mixers_only: bool,
    /// Weight of the pretrained model's next-token distribution in the training targets (0:
    /// the corpus's tokens alone; 1: the pretrained model's predictions alone). The original
    /// then runs forward beside the model being trained; held-out losses stay the corpus's
    /// cross-entropy.
    #[arg(long, default_value_t = 0.0)]
    pub distill: f64,
    /// The converted model's first steps train its mixers alone to reproduce, block by block,
    /// the pretrained attention's outputs on the pretrained model's own mixer inputs (mixer
    /// transfer) before it trains on tokens; their training loss is the mean relative squared
    /// error of the mixers' outputs, not a cross-entropy. The attention control skips them.
    #[arg(long, default_value_t = 0)]
    pub transfer_steps: usize,
    /// Steps between validation passes.
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Batches in a validation pass.
    #[arg(long, default_value_t = 8)]
    pub eval_batches: usize,
    /// Steps between checkpoints (0: only at the end).
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: usize,
    /// Continue from the checkpoints in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Seed of the batch order (and of the new gate weights' draw).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory: one run directory per model (`retention/`, `attention/`: each a
    /// checkpoint `retention generate --model` reads), `recovery.svg`.
    #[arg(long, default_value = "runs/retrain")]
    pub out: PathBuf,
}

/// What one model's retraining ended with.
#[derive(Debug, Clone)]
pub struct RetrainSummary {
    /// The mixer trained.
    pub mixer: MixerKind,
    /// Held-out losses before the first step.
    pub start: RecoveryStart,
    /// The losses, the start as the validation point of step 0.
    pub log: LossLog,
    /// Training tokens per second over the steps this invocation ran.
    pub tokens_per_s: f64,
    /// Seconds this invocation trained.
    pub seconds: f64,
}

/// Runs `retention retrain` on backend `B` (trained under `Autodiff<B>`).
///
/// # Errors
/// Checkpoint, corpus, tokenizer, model and plot errors.
pub fn retrain<B>(device: &B::Device, args: &RetrainArgs) -> Result<Vec<RetrainSummary>, CliError>
where
    B: Backend + RetentionBackend,
{
    let Pretrained {
        model: original,
        config,
        info,
        tokenizer,
        ..
    } = Pretrained::<Autodiff<B>>::open(&args.model, device)?;
    if config.mixer != MixerKind::Attention {
        return Err(CliError::Input(format!(
            "{}: retraining starts from a pretrained attention model",
            args.model.display()
        )));
    }
    let config = config
        .with_retention_chunk(args.chunk)
        .with_retention_rotary(args.rotary)
        .with_retention_dtype(
            args.retention_dtype
                .map_or(ComputeDtype::Input, DtypeChoice::compute),
        );
    let mut corpus = Corpus::open(&args.corpus)?;
    if let Some(max) = args.max_corpus_bytes {
        corpus = corpus.truncated(max);
    }
    let data = TrainingData::with_tokenizer(&corpus, tokenizer, args.valid_fraction)?;
    println!(
        "{}: {} training tokens, {} held out",
        corpus.source,
        data.train.len(),
        data.valid.len()
    );
    let training = TrainingConfig::new(args.steps, args.batch, args.seq)
        .with_learning_rate(args.lr)
        .with_warmup_steps(args.warmup)
        .with_weight_decay(args.weight_decay)
        .with_seed(args.seed)
        .with_eval_every(args.eval_every)
        .with_eval_batches(args.eval_batches)
        .with_distill(args.distill)
        .with_trainable(if args.mixers_only {
            Trainable::Mixers
        } else {
            Trainable::All
        });
    let tokens_per_step = (training.batch_size * training.seq_len) as f64;
    let mut summaries = Vec::new();
    for kind in args.mixer.kinds() {
        let training = match kind {
            MixerKind::Attention => training.clone().with_transfer_steps(0),
            _ => training.clone().with_transfer_steps(args.transfer_steps),
        };
        let mut progress = StepProgress::new(kind.name(), training.steps, tokens_per_step)?;
        let retrained = retrain_in_directory::<Autodiff<B>>(
            original.clone(),
            &config,
            &info,
            kind,
            &training,
            &data,
            &RunDirectory::new(args.out.join(kind.name())),
            args.checkpoint_every,
            args.resume,
            device,
            |r| progress.show(r),
        )?;
        let (ran, seconds) = progress.finish();
        summaries.push(RetrainSummary {
            mixer: kind,
            log: retrained.start.with_start(retrained.trainer.log()),
            start: retrained.start,
            tokens_per_s: ran as f64 * tokens_per_step / seconds.max(1e-9),
            seconds,
        });
    }
    let original_loss = summaries.first().map_or(f64::NAN, |s| s.start.original);
    let runs: Vec<(&str, &LossLog)> = summaries.iter().map(|s| (s.mixer.name(), &s.log)).collect();
    let svg = args.out.join("recovery.svg");
    let title = format!(
        "{} on {} · batch {} × {} tokens",
        args.model
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy()),
        corpus.source,
        training.batch_size,
        training.seq_len
    );
    plot_losses(
        &runs,
        &[
            ("pretrained attention, held out", original_loss),
            ("+5 %", original_loss * 1.05),
        ],
        &title,
        &svg,
    )?;
    print_summary(&summaries);
    println!("recovery curve: {}", svg.display());
    Ok(summaries)
}

fn print_summary(summaries: &[RetrainSummary]) {
    println!(
        "\n| model | steps | held-out loss: original | converted, step 0 | last | last / original | tokens/s | seconds |\n|---|---|---|---|---|---|---|---|"
    );
    for s in summaries {
        let last = s.log.valid.last().map_or(f64::NAN, |&(_, v)| v);
        println!(
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.3} | {:.0} | {:.0} |",
            s.mixer.name(),
            s.log.train.len(),
            s.start.original,
            s.start.converted,
            last,
            last / s.start.original,
            s.tokens_per_s,
            s.seconds
        );
    }
}
