//! `retention train` end to end on ndarray: both mixers on a small text file, their run
//! directories, the loss plot, and a resumed run.

use burn::backend::NdArray;
use retention_cli::train::{MixerChoice, TrainArgs, train};

fn args(out: &std::path::Path, corpus: &std::path::Path, steps: usize, resume: bool) -> TrainArgs {
    TrainArgs {
        mixer: MixerChoice::Both,
        tiny: true,
        corpus: corpus.display().to_string(),
        max_corpus_bytes: None,
        vocab: Some(300),
        steps: Some(steps),
        batch: Some(2),
        seq: Some(16),
        lr: None,
        chunk: Some(8),
        seed: 1,
        out: out.to_path_buf(),
        resume,
        checkpoint_every: 0,
        eval_every: Some(2),
        devices: Vec::new(),
    }
}

#[test]
fn trains_both_mixers_plots_them_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let text: String = (0..300)
        .map(|i| format!("verse {} of chapter {}: and it was so.\n", i % 31, i % 7))
        .collect();
    std::fs::write(&corpus, text).unwrap();
    let out = dir.path().join("run");

    let first = train::<NdArray>(&Default::default(), &args(&out, &corpus, 2, false)).unwrap();
    assert_eq!(first.len(), 2);
    for s in &first {
        assert_eq!(s.log.train.len(), 2);
        assert!(s.log.train.iter().all(|l| l.is_finite()));
        assert!(out.join(s.mixer.name()).join("losses.csv").exists());
    }
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("retention") && svg.contains("attention"));

    // two more steps from the checkpoints: the logs keep the first two losses
    let second = train::<NdArray>(&Default::default(), &args(&out, &corpus, 4, true)).unwrap();
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(b.log.train.len(), 4);
        assert_eq!(b.log.train[..2], a.log.train[..]);
    }
}

#[test]
fn a_missing_corpus_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    let err = train::<NdArray>(&Default::default(), &args(dir.path(), &missing, 1, false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.txt"), "{err}");
}

/// `--devices` entries that name a backend must name the one in use; a device the backend
/// lacks is an error before any training.
#[test]
fn devices_name_the_backend_in_use() {
    use retention_cli::train::DeviceIndex;
    let dir = std::path::Path::new("/nonexistent");
    let mut a = args(dir, dir, 1, false);
    a.devices = vec![
        DeviceIndex {
            backend: None,
            index: 0,
        },
        DeviceIndex {
            backend: Some("cuda".into()),
            index: 1,
        },
    ];
    assert_eq!(a.device_indices("cuda").unwrap(), vec![0, 1]);
    let err = a.device_indices("rocm").unwrap_err().to_string();
    assert!(err.contains("cuda:1") && err.contains("rocm"), "{err}");
}
