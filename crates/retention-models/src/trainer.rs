//! The training loop: AdamW with gradient clipping, linear warm-up then cosine decay (a pure
//! function of the step, so a resumed run needs no scheduler state), periodic validation, and
//! checkpoints that resume bit for bit.

use std::path::Path;

use burn::config::Config;
use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;
use retention::{RetentionBackend, to_device_synced};

use crate::replica_transfer::{grads_on, replica_on};
use crate::token_windows::{TokenBatch, TokenWindows};
use crate::{
    CausalLm, LanguageModel, MixerTrace, ModelError, Trainable, distillation_loss,
    mixer_transfer_loss, teacher_distribution,
};

/// Hyper-parameters of a training run.
#[derive(Config, Debug)]
pub struct TrainingConfig {
    /// Optimizer steps in the whole run.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    #[config(default = 3e-3)]
    pub learning_rate: f64,
    /// Steps of linear warm-up from 0 to the peak.
    #[config(default = 10)]
    pub warmup_steps: usize,
    /// The rate at the last step, as a fraction of the peak (cosine decay in between).
    #[config(default = 0.1)]
    pub final_lr_fraction: f64,
    /// AdamW's decoupled weight decay.
    #[config(default = 0.1)]
    pub weight_decay: f32,
    /// Gradients are rescaled to at most this global L2 norm.
    #[config(default = 1.0)]
    pub grad_clip: f32,
    /// Seed of the weights and of the batch order.
    #[config(default = 42)]
    pub seed: u64,
    /// Steps between validation passes (0: only at the end).
    #[config(default = 50)]
    pub eval_every: usize,
    /// Batches in a validation pass.
    #[config(default = 4)]
    pub eval_batches: usize,
    /// Which parameters the optimizer updates.
    #[config(default = "Trainable::All")]
    pub trainable: Trainable,
    /// Weight of a teacher's next-token distribution in the training targets (0: the text's
    /// tokens alone; see [`distillation_loss`]); a run with a positive weight needs a
    /// teacher ([`Trainer::with_teacher`]).
    #[config(default = 0.0)]
    pub distill: f64,
    /// Steps at the start of the run that train the sequence mixers to reproduce the
    /// teacher's mixer outputs block by block ([`mixer_transfer_loss`], on the teacher's mixer
    /// inputs) instead of predicting tokens; needs a teacher ([`Trainer::with_teacher`]) with
    /// as many blocks. Only the mixers receive gradients in those steps.
    #[config(default = 0)]
    pub transfer_steps: usize,
}

impl TrainingConfig {
    /// The learning rate of step `step` (0-based).
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = self.final_lr_fraction;
        self.learning_rate
            * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }

    fn optimizer(&self) -> AdamWConfig {
        AdamWConfig::new()
            .with_weight_decay(self.weight_decay)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(self.grad_clip)))
    }
}

/// The losses so far: one training loss per step, validation losses where they were measured.
#[derive(Config, Debug)]
pub struct LossLog {
    /// Mean cross-entropy of step `i`'s batch (nats per token), before the update (against
    /// the mixed targets under distillation).
    pub train: Vec<f64>,
    /// `(steps done, mean validation cross-entropy)`.
    pub valid: Vec<(usize, f64)>,
}

/// What one step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Steps done, this one included.
    pub step: usize,
    /// This step's training loss.
    pub loss: f64,
    /// The learning rate it used.
    pub learning_rate: f64,
    /// The validation loss, when this step ended with a validation pass.
    pub valid_loss: Option<f64>,
}

/// A model (by default the small [`LanguageModel`]; any [`CausalLm`]), its optimizer state
/// and its data, stepped one batch at a time.
pub struct Trainer<B: AutodiffBackend, M: AutodiffModule<B> = LanguageModel<B>> {
    config: TrainingConfig,
    model: M,
    optim: OptimizerAdaptor<AdamW, M, B>,
    train: TokenWindows,
    valid: Vec<TokenBatch<B::InnerBackend>>,
    step: usize,
    log: LossLog,
    device: B::Device,
    /// Data parallelism: the devices beside `device` (where the model and the optimizer live)
    /// that a step's batch is split across; empty: `device` alone.
    replicas: Vec<B::Device>,
    /// The model whose next-token distributions the training targets mix in
    /// ([`TrainingConfig::distill`]).
    teacher: Option<M::InnerModule>,
}

/// The recorder of checkpoints: full precision, so a restored model is bit-identical.
type Checkpointer = NamedMpkFileRecorder<FullPrecisionSettings>;

fn checkpoint_error(dir: &Path, file: &str, e: &dyn std::fmt::Display) -> ModelError {
    ModelError::Checkpoint {
        path: dir.join(file).display().to_string(),
        message: e.to_string(),
    }
}

/// The files of a checkpoint directory.
const MODEL_FILE: &str = "model";
const OPTIMIZER_FILE: &str = "optimizer";
const LOG_FILE: &str = "losses.json";

impl<B, M> Trainer<B, M>
where
    B: AutodiffBackend + RetentionBackend,
    B::InnerBackend: RetentionBackend,
    M: AutodiffModule<B> + CausalLm<B>,
    M::InnerModule: CausalLm<B::InnerBackend>,
{
    /// A run starting from `model` at step 0.
    ///
    /// # Errors
    /// [`ModelError::Config`] for zero steps, batch size or sequence length, a distillation
    /// weight outside `[0, 1]`, or a validation stream shorter than one window;
    /// [`ModelError::TokenIds`] when a stream holds ids outside the model's vocabulary
    /// (checked here, once, so the steps need not).
    pub fn new(
        config: TrainingConfig,
        model: M,
        train: TokenWindows,
        valid: &TokenWindows,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        if config.steps == 0 || config.batch_size == 0 || config.seq_len == 0 {
            return Err(ModelError::Config(format!(
                "steps ({}), batch_size ({}) and seq_len ({}) must be positive",
                config.steps, config.batch_size, config.seq_len
            )));
        }
        if !(0.0..=1.0).contains(&config.distill) {
            return Err(ModelError::Config(format!(
                "distill is a weight in [0, 1], got {}",
                config.distill
            )));
        }
        let vocab_size = model.vocab_size();
        let count = train.ids_outside(vocab_size) + valid.ids_outside(vocab_size);
        if count > 0 {
            return Err(ModelError::TokenIds { vocab_size, count });
        }
        let valid = valid.evenly_spaced(config.eval_batches.max(1), config.batch_size, device);
        let model = match config.trainable {
            Trainable::All => model,
            Trainable::Mixers => model.frozen_but_mixers(),
        };
        Ok(Self {
            optim: config.optimizer().init(),
            config,
            model,
            train,
            valid,
            step: 0,
            log: LossLog::new(Vec::new(), Vec::new()),
            device: device.clone(),
            replicas: Vec::new(),
            teacher: None,
        })
    }

    /// The run with each step's batch split evenly across `devices` (data parallelism): every
    /// device runs a replica of the model on its share, the gradients are summed on the first
    /// device (the trainer's, where the optimizer steps) and each share's loss counts
    /// `1/devices.len()` of the step's, so a step is the single-device step on the same batch
    /// up to the order of the sums. Each device is flushed once its share is queued, so the
    /// devices run at once.
    ///
    /// # Errors
    /// [`ModelError::Config`] for no devices, a first device other than the trainer's, a batch
    /// size that `devices.len()` does not divide, or a teacher-driven run (`distill`,
    /// `transfer_steps`: the teacher lives on one device).
    pub fn with_devices(self, devices: Vec<B::Device>) -> Result<Self, ModelError> {
        let n = devices.len();
        let Some((first, replicas)) = devices.split_first() else {
            return Err(ModelError::Config("devices: none given".into()));
        };
        if first != &self.device {
            return Err(ModelError::Config(format!(
                "devices: the first must be the trainer's device {:?}, got {first:?}",
                self.device
            )));
        }
        if self.config.batch_size % n != 0 {
            return Err(ModelError::Config(format!(
                "batch_size {} is not a multiple of the {n} devices",
                self.config.batch_size
            )));
        }
        if n > 1 && (self.config.distill > 0.0 || self.config.transfer_steps > 0) {
            return Err(ModelError::Config(
                "distill and transfer_steps run on one device (the teacher's)".into(),
            ));
        }
        let replicas = replicas.to_vec();
        Ok(Self { replicas, ..self })
    }

    /// The run with `teacher`'s next-token distributions mixed into its training targets,
    /// with weight [`TrainingConfig::distill`] (the pretrained model a conversion started
    /// from, say). The validation loss stays the text's cross-entropy.
    pub fn with_teacher(self, teacher: M::InnerModule) -> Self {
        Self {
            teacher: Some(teacher),
            ..self
        }
    }

    /// Steps done.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Whether every configured step is done.
    pub fn finished(&self) -> bool {
        self.step >= self.config.steps
    }

    /// The model as it is now.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The losses so far.
    pub fn log(&self) -> &LossLog {
        &self.log
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &TrainingConfig {
        &self.config
    }

    /// One optimizer step on the next batch (then a validation pass when one is due).
    ///
    /// # Errors
    /// The model's errors.
    pub fn step(&mut self) -> Result<StepReport, ModelError> {
        let batch = self.train.random_batch::<B>(
            self.config.seed,
            self.step as u64,
            self.config.batch_size,
            &self.device,
        );
        let (value, grads) = if !self.replicas.is_empty() {
            self.data_parallel_grads(batch)?
        } else {
            let loss = self.loss(batch)?;
            let value = loss.clone().into_scalar().elem::<f64>();
            (
                value,
                GradientsParams::from_grads(loss.backward(), &self.model),
            )
        };
        // a backward pass cannot return an error: a failure of the retention kernels on a
        // device's runtime thread (their gradients unwritten) is reported here, before the
        // update would apply it
        for device in std::iter::once(&self.device).chain(&self.replicas) {
            retention::check_device::<B>(device)?;
        }
        let lr = self.config.learning_rate_at(self.step);
        self.model = self.optim.step(lr, self.model.clone(), grads);
        self.step += 1;
        self.log.train.push(value);
        let due = self.config.eval_every > 0 && self.step % self.config.eval_every == 0;
        let valid_loss = if due || self.finished() {
            let v = self.validation_loss()?;
            self.log.valid.push((self.step, v));
            Some(v)
        } else {
            None
        };
        Ok(StepReport {
            step: self.step,
            loss: value,
            learning_rate: lr,
            valid_loss,
        })
    }

    /// The loss of `batch` on the trainer's device: the mixers' transfer loss, the distilled
    /// loss or the text's cross-entropy, as the step and the configuration say.
    fn loss(&self, batch: TokenBatch<B>) -> Result<burn::tensor::Tensor<B, 1>, ModelError> {
        Ok(if self.step < self.config.transfer_steps {
            let teacher = self.teacher.as_ref().ok_or_else(|| {
                ModelError::Config(format!(
                    "transfer_steps = {} needs a teacher (Trainer::with_teacher)",
                    self.config.transfer_steps
                ))
            })?;
            let traces = teacher
                .mixer_traces(batch.inputs.inner())?
                .into_iter()
                .map(MixerTrace::from_inner)
                .collect();
            mixer_transfer_loss(&self.model.mixers(), traces)?
        } else if self.config.distill > 0.0 {
            let teacher = self.teacher.as_ref().ok_or_else(|| {
                ModelError::Config(format!(
                    "distill = {} needs a teacher (Trainer::with_teacher)",
                    self.config.distill
                ))
            })?;
            let probs =
                teacher_distribution::<B>(teacher.next_token_logits(batch.inputs.clone().inner())?);
            let logits = self.model.next_token_logits(batch.inputs)?;
            distillation_loss(logits, batch.targets, Some(probs), self.config.distill)
        } else {
            self.model.next_token_loss(batch.inputs, batch.targets)?
        })
    }

    /// The step's loss and gradients with `batch` split across [`Self::with_devices`]'
    /// devices: every share's forward and backward pass is queued (and its device flushed)
    /// before any result is read, then the gradients are copied to the trainer's device and
    /// summed there. Replicas and gradients move with their destination synced before and
    /// after ([`crate::replica_transfer`]).
    fn data_parallel_grads(
        &self,
        batch: TokenBatch<B>,
    ) -> Result<(f64, GradientsParams), ModelError> {
        let n = 1 + self.replicas.len();
        let share = self.config.batch_size / n;
        let mut queued = Vec::with_capacity(n);
        let devices = std::iter::once(&self.device).chain(&self.replicas);
        for (i, device) in devices.enumerate() {
            let replica = if i == 0 {
                self.model.clone()
            } else {
                replica_on(self.model.clone(), device)?
            };
            let part = |ids: &burn::tensor::Tensor<B, 2, burn::tensor::Int>| {
                to_device_synced(ids.clone().narrow(0, i * share, share), device)
            };
            let loss = replica
                .next_token_loss(part(&batch.inputs)?, part(&batch.targets)?)?
                .div_scalar(n as f64);
            let grads = loss.backward();
            B::retention_flush(device);
            queued.push((replica, loss, grads));
        }
        let mut sum = GradientsAccumulator::<M>::new();
        let mut value = 0.0;
        for (replica, loss, grads) in queued {
            value += loss.into_scalar().elem::<f64>();
            let grads = grads_on(
                GradientsParams::from_grads(grads, &replica),
                &self.device,
                &replica,
            )?;
            sum.accumulate(&self.model, grads);
        }
        Ok((value, sum.grads()))
    }

    /// Steps to the end, calling `on_step` after each; every `checkpoint_every` steps (0: only
    /// at the end) and at the end saves to `dir`'s checkpoint and writes its `losses.csv`
    /// from `csv_log(log)`.
    ///
    /// # Errors
    /// Those of [`step`](Self::step), [`save`](Self::save) and the CSV's writing.
    pub fn run_to_end(
        &mut self,
        dir: &crate::RunDirectory,
        checkpoint_every: usize,
        mut on_step: impl FnMut(&StepReport),
        csv_log: impl Fn(&LossLog) -> LossLog,
    ) -> Result<(), ModelError> {
        while !self.finished() {
            let report = self.step()?;
            on_step(&report);
            let due = checkpoint_every > 0 && report.step % checkpoint_every == 0;
            if due || self.finished() {
                self.save(dir.checkpoint())?;
                crate::write_losses_csv(&csv_log(&self.log), &dir.losses_csv())?;
            }
        }
        Ok(())
    }

    /// Mean cross-entropy over the fixed validation batches.
    ///
    /// # Errors
    /// The model's errors.
    pub fn validation_loss(&self) -> Result<f64, ModelError> {
        self.validation_loss_of(&self.model.valid())
    }

    /// Mean cross-entropy of another model (of the same vocabulary) over the same validation
    /// batches: the loss of a model before its conversion, say.
    ///
    /// # Errors
    /// The model's errors; [`ModelError::Config`] when its vocabulary is smaller than the
    /// trainer's model's.
    pub fn validation_loss_of<N: CausalLm<B::InnerBackend>>(
        &self,
        model: &N,
    ) -> Result<f64, ModelError> {
        if model.vocab_size() < self.model.vocab_size() {
            return Err(ModelError::Config(format!(
                "a vocabulary of {} tokens cannot score the trainer's data (made for {})",
                model.vocab_size(),
                self.model.vocab_size()
            )));
        }
        let mut total = 0.0;
        for batch in &self.valid {
            let loss = model.next_token_loss(batch.inputs.clone(), batch.targets.clone())?;
            total += loss.into_scalar().elem::<f64>();
        }
        Ok(total / self.valid.len().max(1) as f64)
    }

    /// Writes the model, the optimizer state and the loss log to `dir` (created if missing).
    ///
    /// # Errors
    /// [`ModelError::Io`] / [`ModelError::Checkpoint`] when writing fails.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let recorder = Checkpointer::new();
        let failed = |file: &str, e: &dyn std::fmt::Display| checkpoint_error(dir, file, e);
        self.model
            .clone()
            .save_file(dir.join(MODEL_FILE), &recorder)
            .map_err(|e| failed(MODEL_FILE, &e))?;
        Recorder::<B>::record(&recorder, self.optim.to_record(), dir.join(OPTIMIZER_FILE))
            .map_err(|e| failed(OPTIMIZER_FILE, &e))?;
        self.log
            .save(dir.join(LOG_FILE))
            .map_err(|e| ModelError::io(dir.join(LOG_FILE), e))
    }

    /// Continues the run saved in `dir`: `self` must be built with the same model
    /// configuration, training configuration and data; its weights, optimizer state, step and
    /// losses are replaced by the saved ones.
    ///
    /// # Errors
    /// [`ModelError::Checkpoint`] when a file is missing or does not match the model.
    pub fn resume(mut self, dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let recorder = Checkpointer::new();
        let failed = |file: &str, e: &dyn std::fmt::Display| checkpoint_error(dir, file, e);
        self.model = self
            .model
            .load_file(dir.join(MODEL_FILE), &recorder, &self.device)
            .map_err(|e| failed(MODEL_FILE, &e))?;
        let record = Recorder::<B>::load(&recorder, dir.join(OPTIMIZER_FILE), &self.device)
            .map_err(|e| failed(OPTIMIZER_FILE, &e))?;
        self.optim = self.optim.load_record(record);
        self.log = LossLog::load(dir.join(LOG_FILE)).map_err(|e| failed(LOG_FILE, &e))?;
        self.step = self.log.train.len();
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_decays_to_its_floor() {
        let c = TrainingConfig::new(110, 1, 1)
            .with_learning_rate(1.0)
            .with_warmup_steps(10)
            .with_final_lr_fraction(0.1);
        assert!((c.learning_rate_at(0) - 0.1).abs() < 1e-12);
        assert!((c.learning_rate_at(9) - 1.0).abs() < 1e-12);
        assert!((c.learning_rate_at(10) - 1.0).abs() < 1e-12);
        assert!((c.learning_rate_at(60) - 0.55).abs() < 1e-12);
        assert!((c.learning_rate_at(110) - 0.1).abs() < 1e-12);
        let rates: Vec<f64> = (10..110).map(|s| c.learning_rate_at(s)).collect();
        assert!(rates.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn streams_with_ids_outside_the_vocabulary_are_refused_up_front() {
        type B = burn::backend::Autodiff<burn::backend::NdArray>;
        let dev = Default::default();
        let model = crate::LanguageModelConfig::tiny(50)
            .init::<B>(&dev)
            .expect("model");
        let train = TokenWindows::new((0..120u32).map(|i| i % 60).collect(), 8).expect("train");
        let valid = TokenWindows::new(vec![1; 20], 8).expect("valid");
        match Trainer::new(TrainingConfig::new(2, 1, 8), model, train, &valid, &dev) {
            Err(ModelError::TokenIds { vocab_size, count }) => {
                assert_eq!((vocab_size, count), (50, 20))
            }
            Err(e) => panic!("expected a token-id error, got {e}"),
            Ok(_) => panic!("expected a token-id error"),
        }
    }
}
