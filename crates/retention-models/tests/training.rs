//! Training on ndarray: the tiny model learns the KJV, checkpoints restore exactly, and a resumed
//! run continues the uninterrupted run's loss curve.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData, backend::Backend};
use retention_models::{
    Corpus, LanguageModel, LanguageModelConfig, MixerKind, ModelError, RunDirectory, TokenWindows,
    Trainable, Trainer, TrainingConfig, TrainingData, train_in_directory,
};

type B = Autodiff<NdArray>;

/// The KJV through Debian's `bible` program; `None` (after saying so) when it is missing,
/// outside CI. In CI (`CI` set) a missing corpus fails the test: `.ci/run` installs it.
fn kjv() -> Option<Corpus> {
    match Corpus::kjv() {
        Ok(corpus) => Some(corpus),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("CI must provide the corpus: {e}"),
    }
}

#[test]
fn tiny_retention_model_learns_the_kjv_in_30_steps() -> Result<(), ModelError> {
    let Some(corpus) = kjv() else { return Ok(()) };
    let out = tempfile::tempdir().map_err(|e| ModelError::io("tempdir", e))?;
    let corpus = corpus.truncated(400_000);
    let data = TrainingData::prepare(&corpus, 512, 0.05, &out.path().join("tokenizer.json"))?;
    let model =
        LanguageModelConfig::tiny(data.tokenizer.vocab_size()).with_mixer(MixerKind::Retention);
    let training = TrainingConfig::new(30, 16, 64)
        .with_learning_rate(1e-2)
        .with_warmup_steps(5)
        .with_eval_every(0);
    let dev = Default::default();
    B::seed(&dev, training.seed);
    let train = TokenWindows::new(data.train.clone(), training.seq_len)?;
    let valid = TokenWindows::new(data.valid.clone(), training.seq_len)?;
    let mut trainer = Trainer::<B>::new(training, model.init(&dev)?, train, &valid, &dev)?;
    let before = trainer.validation_loss()?;
    while !trainer.finished() {
        trainer.step()?;
    }
    let after = trainer.validation_loss()?;
    eprintln!("validation loss {before:.3} -> {after:.3}");
    assert!(
        after <= 0.8 * before,
        "{before} -> {after}: fell by less than 20 %"
    );
    assert!(trainer.log().train.iter().all(|l| l.is_finite()));
    Ok(())
}

/// A synthetic token stream with structure to learn (the checkpoint tests need no corpus).
fn patterned_windows(seq: usize) -> Result<(TokenWindows, TokenWindows), ModelError> {
    let ids: Vec<u32> = (0..3000u32).map(|i| (i * 7 + i / 13) % 300).collect();
    let (a, b) = ids.split_at(2500);
    Ok((
        TokenWindows::new(a.to_vec(), seq)?,
        TokenWindows::new(b.to_vec(), seq)?,
    ))
}

fn tiny_model(mixer: MixerKind) -> Result<LanguageModel<B>, ModelError> {
    let config = LanguageModelConfig::tiny(300)
        .with_mixer(mixer)
        .with_chunk_size(Some(8));
    let dev = Default::default();
    // parameters initialise lazily, each clone on its own: a record fixes the values
    let record = config.init::<B>(&dev)?.into_record();
    Ok(config.init::<B>(&dev)?.load_record(record))
}

/// A 6-step run from `model` (the tests run in parallel threads and Burn's seeded generator
/// is shared, so runs that must match start from clones of one model, not from one seed).
fn tiny_trainer(model: LanguageModel<B>) -> Result<Trainer<B>, ModelError> {
    let training = TrainingConfig::new(6, 4, 24)
        .with_eval_every(0)
        .with_eval_batches(1);
    let (train, valid) = patterned_windows(training.seq_len)?;
    Trainer::new(training, model, train, &valid, &Default::default())
}

#[test]
fn checkpoint_restores_outputs_bit_for_bit() -> Result<(), ModelError> {
    let dir = tempfile::tempdir().map_err(|e| ModelError::io("tempdir", e))?;
    for mixer in [MixerKind::Retention, MixerKind::Attention] {
        let mut trainer = tiny_trainer(tiny_model(mixer)?)?;
        for _ in 0..3 {
            trainer.step()?;
        }
        let path = dir.path().join(mixer.name());
        trainer.save(&path)?;
        // a differently seeded model, overwritten by the checkpoint
        let restored = tiny_trainer(tiny_model(mixer)?)?.resume(&path)?;
        assert_eq!(restored.steps_done(), 3);
        let (probe, _) = patterned_windows(24)?;
        let batch = probe.random_batch::<B>(99, 0, 2, &Default::default());
        let a = trainer.model().forward(batch.inputs.clone())?.into_data();
        let b = restored.model().forward(batch.inputs)?.into_data();
        assert_eq!(a, b, "{}: outputs differ after save → load", mixer.name());
    }
    Ok(())
}

/// Every float parameter's values by its path (`blocks.0.mixer.query.weight`).
#[derive(Default)]
struct ParamValues {
    path: Vec<String>,
    values: Vec<(String, TensorData)>,
}

impl ModuleVisitor<B> for ParamValues {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.values
            .push((self.path.join("."), param.val().into_data()));
    }
}

fn param_values(model: &LanguageModel<B>) -> Vec<(String, TensorData)> {
    let mut v = ParamValues::default();
    model.visit(&mut v);
    v.values
}

/// With `Trainable::Mixers` the optimizer moves the mixers' parameters alone, also after a
/// resume (a checkpoint's parameters come back frozen where the run froze them).
#[test]
fn frozen_parameters_stay_as_they_were() -> Result<(), ModelError> {
    let dir = tempfile::tempdir().map_err(|e| ModelError::io("tempdir", e))?;
    let model = tiny_model(MixerKind::Retention)?;
    let before = param_values(&model);
    let frozen = |model: LanguageModel<B>| -> Result<Trainer<B>, ModelError> {
        let training = TrainingConfig::new(6, 4, 24)
            .with_eval_every(0)
            .with_eval_batches(1)
            .with_learning_rate(1e-2)
            .with_warmup_steps(1)
            .with_trainable(Trainable::Mixers);
        let (train, valid) = patterned_windows(training.seq_len)?;
        Trainer::new(training, model, train, &valid, &Default::default())
    };
    let mut trainer = frozen(model.clone())?;
    for _ in 0..3 {
        trainer.step()?;
    }
    trainer.save(dir.path())?;
    let mut trainer = frozen(model)?.resume(dir.path())?;
    while !trainer.finished() {
        trainer.step()?;
    }
    let after = param_values(trainer.model());
    assert_eq!(before.len(), after.len());
    let (mut moved, mut kept) = (0, 0);
    for ((path, a), (_, b)) in before.iter().zip(&after) {
        let in_mixer = path.split('.').any(|s| s == "mixer");
        if in_mixer {
            assert_ne!(a, b, "{path}: a mixer parameter did not train");
            moved += 1;
        } else {
            assert_eq!(a, b, "{path}: a frozen parameter changed");
            kept += 1;
        }
    }
    assert!(moved > 0 && kept > 0, "moved {moved}, kept {kept}");
    Ok(())
}

#[test]
fn resumed_training_continues_the_loss_curve() -> Result<(), ModelError> {
    let dir = tempfile::tempdir().map_err(|e| ModelError::io("tempdir", e))?;
    let model = tiny_model(MixerKind::Retention)?;
    let mut straight = tiny_trainer(model.clone())?;
    while !straight.finished() {
        straight.step()?;
    }
    let mut first = tiny_trainer(model.clone())?;
    for _ in 0..3 {
        first.step()?;
    }
    first.save(dir.path())?;
    drop(first);
    // a freshly initialised model: everything comes from the checkpoint
    let mut resumed = tiny_trainer(tiny_model(MixerKind::Retention)?)?.resume(dir.path())?;
    while !resumed.finished() {
        resumed.step()?;
    }
    assert_eq!(resumed.log().train, straight.log().train);
    Ok(())
}

#[test]
fn run_directory_resumes_and_refuses_other_settings() -> Result<(), ModelError> {
    let out = tempfile::tempdir().map_err(|e| ModelError::io("tempdir", e))?;
    let text: String = (0..400)
        .map(|i| format!("line {} of {}\n", i % 37, i % 11))
        .collect();
    let path = out.path().join("corpus.txt");
    std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
    let corpus = Corpus::from_file(&path)?;
    let data = TrainingData::prepare(&corpus, 300, 0.2, &out.path().join("tokenizer.json"))?;
    let model = LanguageModelConfig::tiny(data.tokenizer.vocab_size()).with_chunk_size(Some(8));
    let run = RunDirectory::new(out.path().join("retention"));
    let dev = Default::default();
    let short = TrainingConfig::new(2, 2, 16)
        .with_eval_every(0)
        .with_eval_batches(1);
    train_in_directory::<B>(&model, &short, &data, &run, 0, false, &[dev], |_| {})?;
    assert!(run.has_checkpoint() && run.losses_csv().exists());
    // the same run, longer: continues from step 2
    let mut seen = Vec::new();
    let mut longer = short.clone();
    longer.steps = 4;
    let t = train_in_directory::<B>(&model, &longer, &data, &run, 0, true, &[dev], |r| {
        seen.push(r.step)
    })?;
    assert_eq!(seen, [3, 4]);
    assert_eq!(t.log().train.len(), 4);
    // other settings are refused, not silently mixed in
    let other = longer.with_learning_rate(1.0);
    let err = train_in_directory::<B>(&model, &other, &data, &run, 0, true, &[dev], |_| {});
    assert!(matches!(err, Err(ModelError::Config(_))));
    Ok(())
}

/// Data parallelism over two replicas (here both on the one ndarray device: the split, the
/// replicas and the summed gradients are what is tested) takes the steps of one device on the
/// same batches: losses and parameters agree to rounding.
#[test]
fn data_parallel_steps_match_one_device() -> Result<(), ModelError> {
    let model = tiny_model(MixerKind::Retention)?;
    let mut one = tiny_trainer(model.clone())?;
    let dev: burn::backend::ndarray::NdArrayDevice = Default::default();
    let mut two = tiny_trainer(model)?.with_devices(vec![dev, dev])?;
    for step in 0..4 {
        let a = one.step()?.loss;
        let b = two.step()?.loss;
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "step {step}: loss {a} on one device, {b} on two replicas"
        );
    }
    let worst = param_values(one.model())
        .into_iter()
        .zip(param_values(two.model()))
        .map(|((name, a), (_, b))| {
            let (a, b) = (
                a.to_vec::<f32>().expect("f32 parameters"),
                b.to_vec::<f32>().expect("f32 parameters"),
            );
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            let scale = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max).max(1e-6);
            (diff / scale, name)
        })
        .fold(
            (0.0f32, String::new()),
            |m, x| if x.0 > m.0 { x } else { m },
        );
    assert!(
        worst.0 <= 1e-4,
        "parameter {} differs by {:.2e} of its scale",
        worst.1,
        worst.0
    );
    Ok(())
}

#[test]
fn data_parallel_needs_a_divisible_batch_and_no_teacher() -> Result<(), ModelError> {
    let dev: burn::backend::ndarray::NdArrayDevice = Default::default();
    // batch 4 over 3 replicas
    let err = tiny_trainer(tiny_model(MixerKind::Retention)?)?.with_devices(vec![dev; 3]);
    assert!(matches!(err, Err(ModelError::Config(m)) if m.contains("batch_size 4")));
    let err = tiny_trainer(tiny_model(MixerKind::Retention)?)?.with_devices(Vec::new());
    assert!(matches!(err, Err(ModelError::Config(m)) if m.contains("none given")));
    let training = TrainingConfig::new(6, 4, 24)
        .with_eval_every(0)
        .with_eval_batches(1)
        .with_distill(0.5);
    let (train, valid) = patterned_windows(training.seq_len)?;
    let err = Trainer::<B>::new(
        training,
        tiny_model(MixerKind::Retention)?,
        train,
        &valid,
        &dev,
    )?
    .with_devices(vec![dev, dev]);
    assert!(matches!(err, Err(ModelError::Config(m)) if m.contains("teacher")));
    Ok(())
}

/// Data parallelism over two wgpu devices (the adapter as Burn's default device and as its CPU
/// device: two clients with their own memory), so the replica's parameters and its gradients
/// cross between devices: the losses of one device's steps on the same batches.
#[cfg(feature = "wgpu")]
#[test]
fn data_parallel_across_two_devices_matches_one_device() -> Result<(), ModelError> {
    use burn::backend::wgpu::{Wgpu, WgpuDevice};
    type W = Autodiff<Wgpu>;
    let name = "data parallel, two devices (wgpu)";
    let (dev, cpu) = (WgpuDevice::DefaultDevice, WgpuDevice::Cpu);
    let probe = std::panic::catch_unwind(|| {
        for d in [&WgpuDevice::DefaultDevice, &WgpuDevice::Cpu] {
            let _ = Tensor::<W, 1>::zeros([1], d).into_data();
        }
    });
    match probe {
        Ok(()) => {}
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("{name}: no GPU or CPU adapter, and CI is set")
        }
        Err(_) => {
            eprintln!("SKIPPED {name}: no GPU and CPU adapter found");
            return Ok(());
        }
    }
    let config = LanguageModelConfig::tiny(300)
        .with_mixer(MixerKind::Retention)
        .with_chunk_size(Some(8));
    let record = config.init::<W>(&dev)?.into_record();
    let model = config.init::<W>(&dev)?.load_record(record);
    let training = TrainingConfig::new(6, 4, 24)
        .with_eval_every(0)
        .with_eval_batches(1);
    let windows = || patterned_windows(training.seq_len);
    let (train, valid) = windows()?;
    let mut one = Trainer::new(training.clone(), model.clone(), train, &valid, &dev)?;
    let (train, valid) = windows()?;
    let mut two =
        Trainer::new(training, model, train, &valid, &dev)?.with_devices(vec![dev, cpu])?;
    for step in 0..4 {
        let a = one.step()?.loss;
        let b = two.step()?.loss;
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "step {step}: loss {a} on one device, {b} on two"
        );
    }
    Ok(())
}
