//! A whole training run on disk: the tokenized corpus shared by the runs it compares, a run
//! directory per model (configs, checkpoint, `losses.csv`), resumption from the checkpoint.
//!
//! ```text
//! <out>/tokenizer.json          the BPE vocabulary every run of <out> uses
//! <out>/<name>/model.json       LanguageModelConfig
//! <out>/<name>/training.json    TrainingConfig
//! <out>/<name>/checkpoint/      model, optimizer state, loss log (see Trainer::save)
//! <out>/<name>/losses.csv       step, train_loss, valid_loss
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use burn::config::Config;
use burn::tensor::backend::AutodiffBackend;
use retention::RetentionBackend;

use crate::{
    Corpus, LanguageModelConfig, LossLog, ModelError, StepReport, TextTokenizer, TokenWindows,
    Trainer, TrainingConfig,
};

/// A tokenized corpus, split into training and validation streams.
#[derive(Debug)]
pub struct TrainingData {
    /// Where the text came from.
    pub source: String,
    /// The tokenizer that produced the streams.
    pub tokenizer: TextTokenizer,
    /// Training tokens.
    pub train: Vec<u32>,
    /// Held-out tokens (the corpus's tail).
    pub valid: Vec<u32>,
}

impl TrainingData {
    /// Tokenizes `corpus` with the tokenizer saved at `tokenizer_path`, or trains one of
    /// `vocab_size` tokens on the training part and saves it there (so runs that share the path
    /// share the vocabulary, and a resumed run gets the same tokens).
    ///
    /// # Errors
    /// The tokenizer's errors; [`ModelError::Corpus`] when a part is empty.
    pub fn prepare(
        corpus: &Corpus,
        vocab_size: usize,
        valid_fraction: f64,
        tokenizer_path: &Path,
    ) -> Result<Self, ModelError> {
        let (train_text, _) = corpus.split(valid_fraction);
        let tokenizer = if tokenizer_path.exists() {
            TextTokenizer::load(tokenizer_path)?
        } else {
            let tokenizer = TextTokenizer::train(train_text, vocab_size)?;
            if let Some(dir) = tokenizer_path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
            }
            tokenizer.save(tokenizer_path)?;
            tokenizer
        };
        Self::with_tokenizer(corpus, tokenizer, valid_fraction)
    }

    /// Tokenizes `corpus` with `tokenizer` (a pretrained model's), its last `valid_fraction`
    /// held out.
    ///
    /// # Errors
    /// The tokenizer's errors; [`ModelError::Corpus`] when a part is empty.
    pub fn with_tokenizer(
        corpus: &Corpus,
        tokenizer: TextTokenizer,
        valid_fraction: f64,
    ) -> Result<Self, ModelError> {
        let (train_text, valid_text) = corpus.split(valid_fraction);
        let train = tokenizer.encode(train_text)?;
        let valid = tokenizer.encode(valid_text)?;
        if train.is_empty() || valid.is_empty() {
            return Err(ModelError::Corpus(format!(
                "{}: the training or validation part is empty",
                corpus.source
            )));
        }
        Ok(Self {
            source: corpus.source.clone(),
            tokenizer,
            train,
            valid,
        })
    }
}

/// One model's run directory.
#[derive(Debug, Clone)]
pub struct RunDirectory {
    root: PathBuf,
}

impl RunDirectory {
    /// The directory `root` (created when the run starts).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The checkpoint's directory.
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }

    /// Whether a checkpoint has been written.
    pub fn has_checkpoint(&self) -> bool {
        self.checkpoint().join("losses.json").exists()
    }

    /// The loss table.
    pub fn losses_csv(&self) -> PathBuf {
        self.root.join("losses.csv")
    }
}

/// Trains `model` for `training.steps` steps in `dir`, from its checkpoint when `resume` is set
/// and one exists; checkpoints every `checkpoint_every` steps (0: only at the end) and at the
/// end, writes `losses.csv`, and calls `on_step` after every step. The model and the optimizer
/// live on `devices[0]`; with more devices each step's batch is split across them
/// ([`Trainer::with_devices`]).
///
/// # Errors
/// [`ModelError::Config`] when resuming with configurations other than the saved ones, for no
/// devices, or a batch the devices do not divide; the model's, the trainer's and I/O errors.
#[allow(clippy::too_many_arguments)]
pub fn train_in_directory<B>(
    model: &LanguageModelConfig,
    training: &TrainingConfig,
    data: &TrainingData,
    dir: &RunDirectory,
    checkpoint_every: usize,
    resume: bool,
    devices: &[B::Device],
    on_step: impl FnMut(&StepReport),
) -> Result<Trainer<B>, ModelError>
where
    B: AutodiffBackend + RetentionBackend,
    B::InnerBackend: RetentionBackend,
{
    let Some(device) = devices.first() else {
        return Err(ModelError::Config("train_in_directory: no devices".into()));
    };
    let root = dir.root();
    std::fs::create_dir_all(root).map_err(|e| ModelError::io(root, e))?;
    let (model_path, training_path) = (root.join("model.json"), root.join("training.json"));
    let resuming = resume && dir.has_checkpoint();
    if resuming {
        let saved_model = LanguageModelConfig::load(&model_path)
            .map_err(|e| ModelError::io(&model_path, std::io::Error::other(e.to_string())))?;
        check_same_run(root, saved_model.to_string() == model.to_string(), training)?;
    }
    model
        .save(&model_path)
        .map_err(|e| ModelError::io(&model_path, e))?;
    training
        .save(&training_path)
        .map_err(|e| ModelError::io(&training_path, e))?;

    B::seed(device, training.seed);
    let net = model.init::<B>(device)?;
    let train = TokenWindows::new(data.train.clone(), training.seq_len)?;
    let valid = TokenWindows::new(data.valid.clone(), training.seq_len)?;
    let mut trainer = Trainer::new(training.clone(), net, train, &valid, device)?;
    if devices.len() > 1 {
        trainer = trainer.with_devices(devices.to_vec())?;
    }
    if resuming {
        trainer = trainer.resume(dir.checkpoint())?;
    }
    trainer.run_to_end(dir, checkpoint_every, on_step, LossLog::clone)?;
    Ok(trainer)
}

/// [`ModelError::Config`] unless the run saved in `root` is the same run as the one about to
/// resume (`same_model`, and the training settings of `root/training.json` but for the number
/// of steps).
pub(crate) fn check_same_run(
    root: &Path,
    same_model: bool,
    training: &TrainingConfig,
) -> Result<(), ModelError> {
    let training_path = root.join("training.json");
    let saved = TrainingConfig::load(&training_path)
        .map_err(|e| ModelError::io(&training_path, std::io::Error::other(e.to_string())))?;
    let same_training = {
        let mut t = saved;
        t.steps = training.steps;
        t.to_string() == training.to_string()
    };
    if !same_model || !same_training {
        return Err(ModelError::Config(format!(
            "{} holds a run with other settings; resume with the same ones (or start afresh \
             in another directory)",
            root.display()
        )));
    }
    Ok(())
}

/// Reads the rows [`write_losses_csv`] writes back into a [`LossLog`] (a run cut short keeps
/// the rows of its last checkpoint).
///
/// # Errors
/// [`ModelError::Io`] when the file cannot be read; [`ModelError::Config`] for a row that is
/// not `step,train_loss,valid_loss` with steps in order.
pub fn read_losses_csv(path: &Path) -> Result<LossLog, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let bad = |line: &str| {
        ModelError::Config(format!(
            "{}: `{line}` is not a `step,train_loss,valid_loss` row in order",
            path.display()
        ))
    };
    let number = |field: &str, line: &str| -> Result<Option<f64>, ModelError> {
        match field.trim() {
            "" => Ok(None),
            x => x.parse().map(Some).map_err(|_| bad(line)),
        }
    };
    let mut log = LossLog::new(Vec::new(), Vec::new());
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').collect();
        let [step, train, valid] = fields[..] else {
            return Err(bad(line));
        };
        let step: usize = step.trim().parse().map_err(|_| bad(line))?;
        match number(train, line)? {
            Some(loss) if step == log.train.len() + 1 => log.train.push(loss),
            None if step == 0 => {}
            _ => return Err(bad(line)),
        }
        if let Some(v) = number(valid, line)? {
            log.valid.push((step, v));
        }
    }
    Ok(log)
}

/// Writes `step,train_loss,valid_loss` rows (validation empty where none was measured).
///
/// # Errors
/// [`ModelError::Io`] when writing fails.
pub fn write_losses_csv(log: &LossLog, path: &Path) -> Result<(), ModelError> {
    let mut csv = String::from("step,train_loss,valid_loss\n");
    // a validation before any step (a retraining's start) has no training loss
    if let Some((_, v)) = log.valid.iter().find(|(s, _)| *s == 0) {
        let _ = writeln!(csv, "0,,{v:.6}");
    }
    for (i, loss) in log.train.iter().enumerate() {
        let step = i + 1;
        let valid = log
            .valid
            .iter()
            .find(|(s, _)| *s == step)
            .map(|(_, v)| format!("{v:.6}"))
            .unwrap_or_default();
        let _ = writeln!(csv, "{step},{loss:.6},{valid}");
    }
    std::fs::write(path, csv).map_err(|e| ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CSV reads back as written (to its six decimals), the start row included, and a
    /// row out of order is refused.
    #[test]
    fn losses_csv_round_trips() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("losses.csv");
        let log = LossLog::new(
            vec![4.25, 3.5, 3.125],
            vec![(0, 6.75), (2, 3.875), (3, 3.0625)],
        );
        write_losses_csv(&log, &path).expect("writes");
        let back = read_losses_csv(&path).expect("reads");
        assert_eq!(back.train, log.train);
        assert_eq!(back.valid, log.valid);
        std::fs::write(&path, "step,train_loss,valid_loss\n1,4.0,\n3,3.0,\n").expect("writes");
        assert!(matches!(read_losses_csv(&path), Err(ModelError::Config(_))));
    }
}
