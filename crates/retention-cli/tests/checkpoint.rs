//! The checkpoint commands on SmolLM2-135M-Instruct, where `RETENTION_SMOLLM2_GGUF` names it
//! (`.ci/run` fetches it): `generate` answers from the GGUF file, `convert` writes a
//! checkpoint `generate` reads, `retrain` runs one step of both models and records the
//! recovery, and `generate --latency-at` times both mixers.

use std::path::PathBuf;

use burn::backend::NdArray;
use retention_cli::DtypeChoice;
use retention_cli::convert::{ConvertArgs, convert};
use retention_cli::generate::{GenerateArgs, ModelMixer, generate};
use retention_cli::generate_latency::latency_curve;
use retention_cli::retrain::{RetrainArgs, retrain};
use retention_cli::train::MixerChoice;

fn checkpoint() -> Option<PathBuf> {
    let path = std::env::var("RETENTION_SMOLLM2_GGUF").ok();
    if path.is_none() {
        eprintln!("skipped: set RETENTION_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf");
    }
    path.map(PathBuf::from)
}

fn generate_args(model: PathBuf, prompt: &str, max_tokens: usize) -> GenerateArgs {
    GenerateArgs {
        model,
        prompt: prompt.into(),
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        raw: false,
        mixer: ModelMixer::Attention,
        chunk: 64,
        rotary: false,
        latency_at: Vec::new(),
        latency_steps: 2,
        out: None,
        plot: None,
    }
}

#[test]
fn smollm2_generates_converts_and_retrains() {
    let Some(gguf) = checkpoint() else { return };
    let dev = Default::default();
    let answer = generate::<NdArray>(
        &dev,
        &generate_args(gguf.clone(), "What is the capital of France?", 12),
    )
    .expect("generates");
    assert!(answer.text.contains("Paris"), "{:?}", answer.text);

    // converted (not retrained): a checkpoint directory that generate reads
    let tmp = tempfile::tempdir().expect("tmp");
    let converted = tmp.path().join("converted");
    let config = convert::<NdArray>(
        &dev,
        &ConvertArgs {
            model: gguf.clone(),
            out: converted.clone(),
            chunk: 64,
            rotary: false,
        },
    )
    .expect("converts");
    assert_eq!(config.n_layers, 30);
    let from_dir = generate::<NdArray>(&dev, &generate_args(converted, "Hello", 3)).expect("runs");
    // (the chat format around "Hello": 10 tokens; it may stop before 3 new ones)
    assert_eq!(from_dir.prompt_tokens, 10);
    assert!((1..=3).contains(&from_dir.new_tokens));

    // one step of each model on a short text
    let corpus = tmp.path().join("corpus.txt");
    let verse = "And God said, Let there be light: and there was light.\n";
    std::fs::write(&corpus, verse.repeat(60)).expect("writes");
    let out = tmp.path().join("retrain");
    let summaries = retrain::<NdArray>(
        &dev,
        &RetrainArgs {
            model: gguf.clone(),
            mixer: MixerChoice::Both,
            corpus: corpus.display().to_string(),
            max_corpus_bytes: None,
            valid_fraction: 0.2,
            steps: 1,
            batch: 1,
            seq: 16,
            lr: 1e-4,
            warmup: 1,
            weight_decay: 0.0,
            chunk: 8,
            rotary: false,
            // the f64 op and frozen pretrained parts: the options a GPU run takes with bf16
            retention_dtype: Some(DtypeChoice::F64),
            mixers_only: true,
            distill: 0.5,
            transfer_steps: 0,
            eval_every: 1,
            eval_batches: 1,
            checkpoint_every: 0,
            resume: false,
            seed: 1,
            out: out.clone(),
        },
    )
    .expect("retrains");
    assert_eq!(summaries.len(), 2);
    let (retention, attention) = (&summaries[0], &summaries[1]);
    // the control starts from the original itself; the conversion starts elsewhere
    assert_eq!(attention.start.converted, attention.start.original);
    assert!(retention.start.converted.is_finite());
    assert_ne!(retention.start.converted, retention.start.original);
    for s in &summaries {
        assert_eq!(s.log.valid.len(), 2, "step 0 and step 1");
        assert!(out.join(s.mixer.name()).join("losses.csv").exists());
    }
    assert!(out.join("recovery.svg").exists());

    // per-token latency of both mixers at two contexts
    let mut args = generate_args(gguf, "", 0);
    args.latency_at = vec![8, 24];
    let rows = latency_curve::<NdArray>(&dev, &args).expect("times");
    let mixers: Vec<_> = rows.iter().map(|r| (r.mixer, r.context)).collect();
    assert_eq!(
        mixers,
        [
            ("attention", 8),
            ("attention", 24),
            ("power_retention", 8),
            ("power_retention", 24)
        ]
    );
    assert!(rows[1].cache_bytes > rows[0].cache_bytes);
    assert_eq!(rows[2].cache_bytes, rows[3].cache_bytes);
}
