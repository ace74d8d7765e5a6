//! Retraining a pretrained Llama-family model after its conversion to power retention, with
//! the record of its recovery: the held-out loss of the original, of the conversion before
//! any step, and during the retraining.
//!
//! ```text
//! <dir>/llama.json       LlamaConfig of the model being trained (its mixer says which)
//! <dir>/generation.json  GenerationInfo, <dir>/tokenizer.json: with the checkpoint's model,
//!                        a checkpoint `load_llama_checkpoint` reads
//! <dir>/training.json    TrainingConfig
//! <dir>/recovery.json    RecoveryStart: held-out loss of the original and of the conversion
//! <dir>/checkpoint/      model, optimizer state, loss log (see Trainer::save)
//! <dir>/losses.csv       step, train_loss, valid_loss
//! ```

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use retention::RetentionBackend;

use crate::training_run::check_same_run;
use crate::{
    GenerationInfo, LlamaConfig, LlamaModel, LossLog, MixerKind, ModelError, RunDirectory,
    StepReport, TokenWindows, Trainer, TrainingConfig, TrainingData, save_llama_description,
};

/// The held-out losses a retraining starts from, measured on its validation batches.
#[derive(Config, Debug)]
pub struct RecoveryStart {
    /// Mean cross-entropy of the pretrained model as loaded (nats per token).
    pub original: f64,
    /// Mean cross-entropy of the model about to be trained: the conversion before any step
    /// (or the original itself, for a fine-tuned attention control).
    pub converted: f64,
}

impl RecoveryStart {
    /// The loss log of `log` with the starting loss as a validation point at step 0.
    pub fn with_start(&self, log: &LossLog) -> LossLog {
        let mut valid = vec![(0, self.converted)];
        valid.extend(log.valid.iter().copied());
        LossLog::new(log.train.clone(), valid)
    }
}

/// What a retraining leaves: its starting losses and the trainer (model, losses).
pub struct Retrained<B: AutodiffBackend>
where
    LlamaModel<B>: AutodiffModule<B>,
{
    /// The held-out losses before the first step.
    pub start: RecoveryStart,
    /// The trainer after the last step.
    pub trainer: Trainer<B, LlamaModel<B>>,
}

/// Converts `original` (loaded with `config`; `info` and the data's tokenizer go beside the
/// checkpoint for generation) to `mixer` (power retention: every attention layer,
/// [`LlamaModel::into_retention`] at `config.retention_chunk`, the op in
/// `config.retention_dtype`; attention: as it is, the control) and trains it for
/// `training.steps` in `dir`, from its checkpoint when `resume` is set and one exists;
/// checkpoints every `checkpoint_every` steps (0: only at the end) and at
/// the end, writes `losses.csv`, and calls `on_step` after every step. The original's
/// held-out loss is measured once, on the validation batches the run uses; then `original`
/// is dropped, or kept as the teacher where `training.distill` or `training.transfer_steps`
/// is positive.
///
/// # Errors
/// [`ModelError::Config`] when resuming with settings other than the saved ones; the model's,
/// the trainer's and I/O errors.
#[allow(clippy::too_many_arguments)]
pub fn retrain_in_directory<B>(
    original: LlamaModel<B>,
    config: &LlamaConfig,
    info: &GenerationInfo,
    mixer: MixerKind,
    training: &TrainingConfig,
    data: &TrainingData,
    dir: &RunDirectory,
    checkpoint_every: usize,
    resume: bool,
    device: &B::Device,
    on_step: impl FnMut(&StepReport),
) -> Result<Retrained<B>, ModelError>
where
    B: AutodiffBackend + RetentionBackend,
    B::InnerBackend: RetentionBackend,
{
    let root = dir.root();
    std::fs::create_dir_all(root).map_err(|e| ModelError::io(root, e))?;
    let (model_path, training_path) = (root.join("llama.json"), root.join("training.json"));
    let start_path = root.join("recovery.json");
    let trained = LlamaConfig {
        mixer,
        ..config.clone()
    };
    let resuming = resume && dir.has_checkpoint();
    if resuming {
        let saved = LlamaConfig::load(&model_path)
            .map_err(|e| ModelError::io(&model_path, std::io::Error::other(e.to_string())))?;
        check_same_run(root, saved.to_string() == trained.to_string(), training)?;
    }
    save_llama_description(&trained, info, &data.tokenizer, root)?;
    training
        .save(&training_path)
        .map_err(|e| ModelError::io(&training_path, e))?;

    B::seed(device, training.seed);
    let model = match mixer {
        MixerKind::Retention => original
            .clone()
            .into_retention(config.retention_chunk, config.retention_rotary, device)?
            .with_retention_dtype(config.retention_dtype),
        MixerKind::Attention => original.clone(),
    };
    let train = TokenWindows::new(data.train.clone(), training.seq_len)?;
    let valid = TokenWindows::new(data.valid.clone(), training.seq_len)?;
    let mut trainer = Trainer::new(training.clone(), model, train, &valid, device)?;
    let original = original.valid();
    let start = if resuming {
        RecoveryStart::load(&start_path)
            .map_err(|e| ModelError::io(&start_path, std::io::Error::other(e.to_string())))?
    } else {
        let start = RecoveryStart::new(
            trainer.validation_loss_of(&original)?,
            trainer.validation_loss()?,
        );
        start
            .save(&start_path)
            .map_err(|e| ModelError::io(&start_path, e))?;
        start
    };
    // the original teaches the run what it would predict (training.distill) or what its
    // mixers compute (training.transfer_steps), else it goes
    if training.distill > 0.0 || training.transfer_steps > 0 {
        trainer = trainer.with_teacher(original);
    } else {
        drop(original);
    }
    if resuming {
        trainer = trainer.resume(dir.checkpoint())?;
    }
    trainer.run_to_end(dir, checkpoint_every, on_step, |log| start.with_start(log))?;
    Ok(Retrained { start, trainer })
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};

    use super::*;
    use crate::TextTokenizer;

    type B = Autodiff<NdArray>;

    fn data() -> TrainingData {
        let text = "In the beginning God created the heaven and the earth. ".repeat(40);
        let tokenizer = TextTokenizer::train(&text, 300).expect("tokenizer");
        let ids = tokenizer.encode(&text).expect("encodes");
        let cut = ids.len() * 9 / 10;
        TrainingData {
            source: "test".into(),
            tokenizer,
            valid: ids[cut..].to_vec(),
            train: ids[..cut].to_vec(),
        }
    }

    /// A tiny Llama (vocabulary 300, width 32, two blocks) and 12 steps of 2 × 16 tokens.
    fn tiny_run() -> (LlamaConfig, TrainingConfig) {
        let config = LlamaConfig::new(300, 32, 2, 4, 2, 48)
            .with_max_seq(64)
            .with_retention_chunk(8);
        let training = TrainingConfig::new(12, 2, 16)
            .with_learning_rate(3e-3)
            .with_warmup_steps(2)
            .with_eval_every(6);
        (config, training)
    }

    /// The tiny run in `dir`: the original converted to retention, checkpoints every 6 steps.
    fn retrain_tiny(
        original: &LlamaModel<B>,
        config: &LlamaConfig,
        training: &TrainingConfig,
        data: &TrainingData,
        dir: &std::path::Path,
        resume: bool,
    ) -> Result<Retrained<B>, ModelError> {
        retrain_in_directory(
            original.clone(),
            config,
            &GenerationInfo::new(false),
            MixerKind::Retention,
            training,
            data,
            &RunDirectory::new(dir),
            6,
            resume,
            &Default::default(),
            |_| (),
        )
    }

    /// A converted model retrains (its loss falls from where the conversion left it), its run
    /// resumes from the checkpoint (a finished run stays finished, a longer one continues the
    /// same losses), and a run with other settings is refused.
    #[test]
    fn converts_retrains_and_resumes() {
        let dev = Default::default();
        let data = data();
        let (config, training) = tiny_run();
        let original = config.init::<B>(&dev).expect("builds");
        let tmp = tempfile::tempdir().expect("tmp");
        let run = |steps: usize, name: &str, resume: bool| {
            let mut training = training.clone();
            training.steps = steps;
            retrain_tiny(
                &original,
                &config,
                &training,
                &data,
                &tmp.path().join(name),
                resume,
            )
            .expect("retrains")
        };
        let whole = run(12, "whole", false);
        let first = whole.trainer.log().train[0];
        let last = *whole.trainer.log().train.last().expect("steps");
        assert!(last < first, "loss falls: {first} → {last}");
        assert!(whole.start.original.is_finite() && whole.start.converted.is_finite());
        let csv = std::fs::read_to_string(tmp.path().join("whole/losses.csv")).expect("csv");
        assert!(
            csv.lines().nth(1).is_some_and(|l| l.starts_with("0,")),
            "{csv}"
        );
        // the run directory is a checkpoint generation can load
        let (loaded, _, _, _) =
            crate::load_llama_checkpoint::<NdArray>(&tmp.path().join("whole"), &dev)
                .expect("loads");
        let ids = burn::tensor::Tensor::<NdArray, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(vec![1i64, 2, 3], [1, 3]),
            &dev,
        );
        loaded
            .forward(ids.clone())
            .expect("runs")
            .into_data()
            .assert_eq(
                &whole
                    .trainer
                    .model()
                    .valid()
                    .forward(ids)
                    .expect("runs")
                    .into_data(),
                true,
            );
        // resumed: a finished run stays as it was; a longer one continues its losses (the
        // loss log's JSON keeps them to about 1e-15)
        let same = |a: &[f64], b: &[f64]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| (x - y).abs() <= 1e-12 * y.abs())
        };
        let again = run(12, "whole", true);
        assert!(same(&again.trainer.log().train, &whole.trainer.log().train));
        assert!(same(&[again.start.converted], &[whole.start.converted]));
        let longer = run(15, "whole", true);
        assert_eq!(longer.trainer.log().train.len(), 15);
        assert!(same(
            &longer.trainer.log().train[..12],
            &whole.trainer.log().train
        ));
        // another configuration in the same directory is refused
        let other = retrain_tiny(
            &original,
            &config.clone().with_retention_chunk(4),
            &training,
            &data,
            &tmp.path().join("whole"),
            true,
        );
        assert!(matches!(other, Err(ModelError::Config(_))));
    }

    /// Distillation from the original: the converted model's held-out loss falls towards the
    /// original's, and a trainer asked to distil without a teacher refuses to step.
    #[test]
    fn distils_from_the_original() {
        let dev = Default::default();
        let data = data();
        let (config, training) = tiny_run();
        let training = training.with_distill(0.5);
        let original = config.init::<B>(&dev).expect("builds");
        let tmp = tempfile::tempdir().expect("tmp");
        let run = retrain_tiny(
            &original,
            &config,
            &training,
            &data,
            &tmp.path().join("distil"),
            false,
        )
        .expect("retrains");
        let last = run.trainer.log().valid.last().expect("validated").1;
        assert!(
            last < run.start.converted,
            "held-out loss {} → {last}",
            run.start.converted
        );
        let windows = TokenWindows::new(data.train.clone(), 16).expect("windows");
        let mut orphan =
            Trainer::new(training, original, windows.clone(), &windows, &dev).expect("builds");
        assert!(matches!(orphan.step(), Err(ModelError::Config(_))));
    }

    /// Mixer transfer: the pretrained model's own mixers reproduce its traces exactly, the
    /// conversion's do not (and the traces are matched block by block: the blocks' mixers
    /// differ, so a shifted pairing would not score zero); transfer steps bring the
    /// conversion's mixers closer to the attention they replace, and then the run trains on
    /// tokens; without a teacher the trainer refuses to step.
    #[test]
    fn transfers_the_mixers_then_trains_on_tokens() {
        let dev = Default::default();
        let data = data();
        let (config, training) = tiny_run();
        let original = config.init::<B>(&dev).expect("builds");
        let windows = TokenWindows::new(data.train.clone(), 16).expect("windows");
        let batch = windows.random_batch::<NdArray>(7, 0, 2, &dev);
        let teacher = original.valid();
        let traces = || teacher.mixer_traces(batch.inputs.clone()).expect("traces");
        let own = crate::mixer_transfer_loss(&teacher.mixers(), traces())
            .expect("scores")
            .into_scalar();
        assert_eq!(own, 0.0);
        let converted = teacher
            .clone()
            .into_retention(8, false, &dev)
            .expect("converts");
        let mut shifted = traces();
        shifted.reverse();
        let reversed = crate::mixer_transfer_loss(&teacher.mixers(), shifted)
            .expect("scores")
            .into_scalar();
        assert!(reversed > 0.1, "blocks paired in reverse score {reversed}");
        let before = crate::mixer_transfer_loss(&converted.mixers(), traces())
            .expect("scores")
            .into_scalar();
        assert!(before > 0.01, "the conversion's mixers differ: {before}");
        let mut bad = traces();
        bad[0].output = bad[0].output.clone().narrow(1, 0, 4);
        assert!(matches!(
            crate::mixer_transfer_loss(&teacher.mixers(), bad),
            Err(ModelError::Config(_))
        ));
        assert!(matches!(
            crate::mixer_transfer_loss(&teacher.mixers(), traces()[1..].to_vec()),
            Err(ModelError::Config(_))
        ));

        let training = training.with_transfer_steps(8).with_learning_rate(1e-2);
        let tmp = tempfile::tempdir().expect("tmp");
        let run = retrain_tiny(
            &original,
            &config,
            &training,
            &data,
            &tmp.path().join("transfer"),
            false,
        )
        .expect("retrains");
        let log = &run.trainer.log().train;
        assert_eq!(log.len(), 12);
        // the first eight losses are the transfer's relative error (a random batch each),
        // the last four the text's cross-entropy (several nats at a vocabulary of 300)
        assert!(log[..8].iter().all(|&l| l < 2.0), "{log:?}");
        assert!(log[8..].iter().all(|&l| l > 2.0), "{log:?}");
        let student = run.trainer.model().valid();
        let after = crate::mixer_transfer_loss(&student.mixers(), traces())
            .expect("scores")
            .into_scalar();
        assert!(
            after < 0.8 * before,
            "transfer error on a fixed batch: {before} → {after}"
        );

        let mut orphan = Trainer::new(
            training,
            original.into_retention(8, false, &dev).expect("converts"),
            windows.clone(),
            &windows,
            &dev,
        )
        .expect("builds");
        assert!(matches!(orphan.step(), Err(ModelError::Config(_))));
    }
}
