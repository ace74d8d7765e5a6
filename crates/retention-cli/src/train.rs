//! `retention train`: trains the decoder language model on a real corpus with retention,
//! attention, or both, checkpointing as it goes, and draws their loss curves in one SVG.

use std::path::PathBuf;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use retention::RetentionBackend;
use retention_models::{
    Corpus, LanguageModelConfig, LossLog, MixerKind, RunDirectory, TrainingConfig, TrainingData,
    plot_losses, train_in_directory,
};

use crate::CliError;
use crate::backend_choice::devices_of;

/// Which mixers to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MixerChoice {
    /// Power retention only.
    Retention,
    /// Softmax attention only.
    Attention,
    /// Both, one after the other, on the same data (for the comparison plot).
    Both,
}

impl MixerChoice {
    /// The mixers chosen, retention first.
    pub fn kinds(self) -> Vec<MixerKind> {
        match self {
            Self::Retention => vec![MixerKind::Retention],
            Self::Attention => vec![MixerKind::Attention],
            Self::Both => vec![MixerKind::Retention, MixerKind::Attention],
        }
    }
}

/// Settings of `retention train` (absent values take the preset's).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Sequence mixers to train.
    #[arg(long, value_enum, default_value = "both")]
    pub mixer: MixerChoice,
    /// The tiny preset: 2 blocks of width 64, 300 steps; minutes on a CPU.
    #[arg(long)]
    pub tiny: bool,
    /// `kjv` (Debian's bible-kjv: `apt-get install -y bible-kjv`) or a text file.
    #[arg(long, default_value = "kjv")]
    pub corpus: String,
    /// Use only the corpus's first bytes.
    #[arg(long)]
    pub max_corpus_bytes: Option<usize>,
    /// BPE vocabulary size (preset: 512 tiny, 4096 otherwise).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Optimizer steps (preset: 300 tiny, 3000 otherwise).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Sequences per step (preset: 16 tiny, 32 otherwise).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence (preset: 128 tiny, 512 otherwise).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Peak learning rate (preset: 1e-2 tiny, 2e-3 otherwise).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Retention's chunk size (0: the quadratic attention form; default 128).
    #[arg(long)]
    pub chunk: Option<usize>,
    /// Seed of the weights and the batch order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory (tokenizer, one run directory per mixer, loss.svg).
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue from the checkpoints in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Steps between checkpoints (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Steps between validation passes (preset: 50 tiny, 250 otherwise).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Data parallelism: device indices of the backend, comma-separated (`0,1` or
    /// `cuda:0,cuda:1`); each step's batch is split evenly across them and the gradients are
    /// summed on the first. Default: the backend's default device alone.
    #[arg(long, value_delimiter = ',', value_parser = parse_device)]
    pub devices: Vec<DeviceIndex>,
}

/// One `--devices` entry: an index, with the backend it names if it names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIndex {
    /// `cuda` in `cuda:1`.
    pub backend: Option<String>,
    /// The device's index among the backend's devices.
    pub index: usize,
}

impl TrainArgs {
    /// The `--devices` indices, after checking that every entry naming a backend names
    /// `backend` (`rocm:1` under `--backend cuda` is an error, not device 1).
    ///
    /// # Errors
    /// [`CliError::Device`] for an entry naming another backend.
    pub fn device_indices(&self, backend: &str) -> Result<Vec<usize>, CliError> {
        self.devices
            .iter()
            .map(|d| match &d.backend {
                Some(name) if name != backend => Err(CliError::Device(format!(
                    "--devices {name}:{}: the backend is {backend}",
                    d.index
                ))),
                _ => Ok(d.index),
            })
            .collect()
    }
}

/// What one mixer's run ended with.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The mixer.
    pub mixer: MixerKind,
    /// Trainable parameters.
    pub params: usize,
    /// The losses.
    pub log: LossLog,
    /// Training tokens per second over the steps this invocation ran.
    pub tokens_per_s: f64,
}

struct Preset {
    vocab: usize,
    steps: usize,
    batch: usize,
    seq: usize,
    lr: f64,
    eval_every: usize,
}

fn preset(tiny: bool) -> Preset {
    if tiny {
        Preset {
            vocab: 512,
            steps: 300,
            batch: 16,
            seq: 128,
            lr: 1e-2,
            eval_every: 50,
        }
    } else {
        Preset {
            vocab: 4096,
            steps: 3000,
            batch: 32,
            seq: 512,
            lr: 2e-3,
            eval_every: 250,
        }
    }
}

/// Runs `retention train` on backend `B` (trained under `Autodiff<B>`).
///
/// # Errors
/// Corpus, tokenizer, model, checkpoint and plot errors.
pub fn train<B>(device: &B::Device, args: &TrainArgs) -> Result<Vec<TrainSummary>, CliError>
where
    B: Backend + RetentionBackend,
{
    let p = preset(args.tiny);
    let mut corpus = Corpus::open(&args.corpus)?;
    if let Some(max) = args.max_corpus_bytes {
        corpus = corpus.truncated(max);
    }
    let vocab = args.vocab.unwrap_or(p.vocab);
    println!("corpus: {} ({} bytes)", corpus.source, corpus.text.len());
    let data = TrainingData::prepare(&corpus, vocab, 0.05, &args.out.join("tokenizer.json"))?;
    println!(
        "tokens: {} train, {} validation (BPE vocabulary {})",
        data.train.len(),
        data.valid.len(),
        data.tokenizer.vocab_size()
    );
    let base = if args.tiny {
        LanguageModelConfig::tiny(data.tokenizer.vocab_size())
    } else {
        LanguageModelConfig::small(data.tokenizer.vocab_size())
    };
    let base = match args.chunk {
        Some(0) => base.with_chunk_size(None),
        Some(c) => base.with_chunk_size(Some(c)),
        None => base,
    };
    let training = TrainingConfig::new(
        args.steps.unwrap_or(p.steps),
        args.batch.unwrap_or(p.batch),
        args.seq.unwrap_or(p.seq),
    )
    .with_learning_rate(args.lr.unwrap_or(p.lr))
    .with_seed(args.seed)
    .with_eval_every(args.eval_every.unwrap_or(p.eval_every));

    let devices = if args.devices.is_empty() {
        vec![device.clone()]
    } else {
        let indices: Vec<usize> = args.devices.iter().map(|d| d.index).collect();
        devices_of::<B>(device, &indices, "--devices")?
    };
    if devices.len() > 1 {
        println!("data parallel over {} devices: {devices:?}", devices.len());
    }
    let mut summaries = Vec::new();
    for kind in args.mixer.kinds() {
        let model = base.clone().with_mixer(kind);
        let dir = RunDirectory::new(args.out.join(kind.name()));
        let tokens_per_step = (training.batch_size * training.seq_len) as f64;
        let mut progress = StepProgress::new(kind.name(), training.steps, tokens_per_step)?;
        let trainer = train_in_directory::<Autodiff<B>>(
            &model,
            &training,
            &data,
            &dir,
            args.checkpoint_every,
            args.resume,
            &devices,
            |r| progress.show(r),
        )?;
        let (ran, seconds) = progress.finish();
        summaries.push(TrainSummary {
            mixer: kind,
            params: burn::module::Module::num_params(trainer.model()),
            log: trainer.log().clone(),
            tokens_per_s: ran as f64 * tokens_per_step / seconds.max(1e-9),
        });
    }
    let runs: Vec<(&str, &LossLog)> = summaries.iter().map(|s| (s.mixer.name(), &s.log)).collect();
    let svg = args.out.join("loss.svg");
    let title = format!(
        "{} · {} params · batch {} × {} tokens",
        corpus.source,
        summaries.first().map_or(0, |s| s.params),
        training.batch_size,
        training.seq_len
    );
    plot_losses(&runs, &[], &title, &svg)?;
    print_summary(&summaries);
    println!("loss curves: {}", svg.display());
    Ok(summaries)
}

/// A run's progress bar: the step, the last training and validation losses, the learning
/// rate and the tokens per second since the run (or its resumption) began.
pub(crate) struct StepProgress {
    bar: ProgressBar,
    start: Instant,
    ran: usize,
    last_valid: Option<f64>,
    tokens_per_step: f64,
}

impl StepProgress {
    /// A bar of `steps` steps, `name` before it.
    pub(crate) fn new(name: &str, steps: usize, tokens_per_step: f64) -> Result<Self, CliError> {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .map_err(|e| CliError::Device(e.to_string()))?,
        );
        bar.set_prefix(name.to_string());
        Ok(Self {
            bar,
            start: Instant::now(),
            ran: 0,
            last_valid: None,
            tokens_per_step,
        })
    }

    /// Shows the step just done.
    pub(crate) fn show(&mut self, r: &retention_models::StepReport) {
        self.ran += 1;
        self.last_valid = r.valid_loss.or(self.last_valid);
        self.bar.set_position(r.step as u64);
        let message = format!(
            "loss {:.3}  valid {}  lr {:.1e}  {:.0} tok/s",
            r.loss,
            self.last_valid
                .map_or("-".into(), |v: f64| format!("{v:.3}")),
            r.learning_rate,
            self.ran as f64 * self.tokens_per_step / self.start.elapsed().as_secs_f64()
        );
        // Without a terminal (a log file, a batch job) the bar draws nothing: a line per
        // validation pass and every 50 steps says how the run goes instead.
        if self.bar.is_hidden() && (r.valid_loss.is_some() || r.step % 50 == 0) {
            eprintln!(
                "{} step {} [{:.0} s] {message}",
                self.bar.prefix(),
                r.step,
                self.start.elapsed().as_secs_f64()
            );
        }
        self.bar.set_message(message);
    }

    /// Ends the bar; returns the steps this invocation ran and its seconds.
    pub(crate) fn finish(self) -> (usize, f64) {
        self.bar.finish();
        (self.ran, self.start.elapsed().as_secs_f64())
    }
}

fn print_summary(summaries: &[TrainSummary]) {
    println!(
        "\n| mixer | params | steps | train loss (last 10) | valid loss | tokens/s |\n|---|---|---|---|---|---|"
    );
    for s in summaries {
        let n = s.log.train.len();
        let tail = &s.log.train[n.saturating_sub(10)..];
        let train = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
        let valid = s
            .log
            .valid
            .last()
            .map_or("-".to_string(), |(_, v)| format!("{v:.3}"));
        println!(
            "| {} | {} | {} | {:.3} | {} | {:.0} |",
            s.mixer.name(),
            s.params,
            n,
            train,
            valid,
            s.tokens_per_s
        );
    }
}

/// A `--devices` entry: an index (`1`) or a backend-qualified one (`cuda:1`).
fn parse_device(text: &str) -> Result<DeviceIndex, String> {
    let (backend, index) = match text.split_once(':') {
        Some((name, index)) => (Some(name.trim().to_string()), index),
        None => (None, text),
    };
    let index = index.trim().parse().map_err(|_| {
        format!("`{text}`: a device is an index (`1`) or `backend:index` (`cuda:1`)")
    })?;
    Ok(DeviceIndex { backend, index })
}
