//! Trains the tiny decoder language model on the King James Version twice, once with power
//! retention and once with softmax attention as the sequence mixer (the one config value that
//! differs), and draws both loss curves into `runs/train_lm/loss.svg`.
//!
//! ```sh
//! apt-get install -y bible-kjv        # the corpus: Debian's public-domain KJV text
//! cargo run --release --example train_lm [steps]
//! ```
//!
//! `retention train` is the full-featured version (backends, presets, resume, progress bars).

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use power_retention::models::{
    Corpus, LanguageModelConfig, LossLog, MixerKind, ModelError, RunDirectory, TrainingConfig,
    TrainingData, plot_losses, train_in_directory,
};

fn main() -> Result<(), ModelError> {
    let steps = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let out = std::path::Path::new("runs/train_lm");
    let corpus = Corpus::kjv()?;
    let data = TrainingData::prepare(&corpus, 512, 0.05, &out.join("tokenizer.json"))?;
    let training = TrainingConfig::new(steps, 16, 128)
        .with_learning_rate(1e-2)
        .with_eval_every(50);
    let device = Default::default();

    let mut logs: Vec<(MixerKind, LossLog)> = Vec::new();
    for mixer in [MixerKind::Retention, MixerKind::Attention] {
        // the one line that swaps the mixer
        let model = LanguageModelConfig::tiny(data.tokenizer.vocab_size()).with_mixer(mixer);
        let dir = RunDirectory::new(out.join(mixer.name()));
        let trainer = train_in_directory::<Autodiff<NdArray>>(
            &model,
            &training,
            &data,
            &dir,
            0,
            false,
            std::slice::from_ref(&device),
            |r| {
                if let Some(v) = r.valid_loss {
                    println!(
                        "{:>9} step {:>4}: train {:.3}, validation {v:.3}",
                        mixer.name(),
                        r.step,
                        r.loss
                    );
                }
            },
        )?;
        println!(
            "{:>9}: {} parameters, checkpoint in {}",
            mixer.name(),
            trainer.model().num_params(),
            dir.checkpoint().display()
        );
        logs.push((mixer, trainer.log().clone()));
    }
    let runs: Vec<(&str, &LossLog)> = logs.iter().map(|(m, l)| (m.name(), l)).collect();
    plot_losses(
        &runs,
        &[],
        "tiny decoder LM on the KJV",
        &out.join("loss.svg"),
    )?;
    println!("loss curves: {}", out.join("loss.svg").display());
    Ok(())
}
