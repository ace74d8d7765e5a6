//! `retention bench --compare` runs the anchor script at the benchmark's own shape, lengths and
//! modes and puts its rows beside ours in one CSV (here a stand-in script that records its
//! arguments, since torch and Manifest's kernels live on the GPU machine); `--matmul` adds the
//! Burn matmul row; `retention plot` draws the result.

#![cfg(feature = "ndarray")]

use std::process::Command;

const STAND_IN: &str = r##"
import sys
open(sys.argv[0] + ".args", "w").write(" ".join(sys.argv[1:]))
print("# gpu=stand-in")
print("impl,mode,shape,b,t,hq,hk,d,chunk,ms,tokens_per_s,tflops")
print("torch_matmul,matmul,mha64,1,8192,0,0,0,-,1.4000,0,785.4")
print("sdpa,fwd,mha64,2,64,8,8,64,-,0.0100,12800000,1.0")
print("retention_triton,fwd,mha64,2,64,8,8,64,32,ERR RuntimeError: out of memory, twice, really")
print("retention_triton,fwd+bwd,mha64,2,64,8,8,64,32,0.0300,4266667,1.0")
"##;

#[test]
fn compare_appends_the_anchor_rows_of_the_same_run() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no python3");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("anchor.py");
    std::fs::write(&script, STAND_IN).expect("script written");
    let csv = dir.path().join("rows.csv");
    let out = Command::new(env!("CARGO_BIN_EXE_retention"))
        .args([
            "bench",
            "--dtype",
            "f32",
            "--seqs",
            "64",
            "--tokens",
            "128",
            "--chunk",
            "32",
            "--reps",
            "1",
            "--warmup",
            "1",
            "--calls-per-sync",
            "1",
            "--backward",
            "--decode-batches",
            "--matmul",
            "32",
            "--compare",
            "--anchor-script",
        ])
        .arg(&script)
        .arg("--out")
        .arg(&csv)
        .arg("--plot")
        .arg(dir.path().join("run-charts"))
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench --compare failed: {stderr}");
    assert!(
        dir.path().join("run-charts/mha64-time.svg").exists(),
        "--plot draws the run's rows"
    );
    // the same-run ratios: Manifest's fwd row failed, SDPA's fwd and Manifest's fwd+bwd exist
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ratio_line = |mode: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{mode} ")) && l.contains("mha64"))
            .unwrap_or_default()
            .to_string()
    };
    let fwd = ratio_line("fwd");
    assert!(fwd.contains("0.0100 (") && fwd.contains(" - "), "{stdout}");
    assert!(ratio_line("fwd+bwd").contains("0.0300 ("), "{stdout}");

    let args = std::fs::read_to_string(dir.path().join("anchor.py.args")).expect("script ran");
    assert_eq!(
        args,
        "--shape mha64 --tokens 128 --chunk 32 --ts 64 --modes fwd,fwd+bwd"
    );
    let text = std::fs::read_to_string(&csv).expect("csv written");
    let impls: Vec<(&str, &str)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split(',');
            (f.next().unwrap_or(""), f.next().unwrap_or(""))
        })
        .collect();
    // ours first, then the anchors' measured rows (the failed one and the comments left out)
    assert_eq!(
        impls,
        [
            ("burn_retention", "fwd"),
            ("burn_retention", "fwd+bwd"),
            ("burn_matmul", "matmul"),
            ("torch_matmul", "matmul"),
            ("sdpa", "fwd"),
            ("retention_triton", "fwd+bwd"),
        ]
    );

    let charts = dir.path().join("img");
    let plot = Command::new(env!("CARGO_BIN_EXE_retention"))
        .arg("plot")
        .arg("--csv")
        .arg(&csv)
        .arg("--out")
        .arg(&charts)
        .output()
        .expect("the binary runs");
    assert!(
        plot.status.success(),
        "plot failed: {}",
        String::from_utf8_lossy(&plot.stderr)
    );
    let tflops = std::fs::read_to_string(charts.join("mha64-tflops.svg")).expect("chart");
    assert!(tflops.contains("Burn matmul 32") && tflops.contains("torch matmul 8192"));
}

#[test]
fn a_failing_anchor_script_is_an_error() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no python3");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("anchor.py");
    std::fs::write(&script, "import sys\nsys.exit(3)\n").expect("script written");
    let out = Command::new(env!("CARGO_BIN_EXE_retention"))
        .args([
            "bench",
            "--dtype",
            "f32",
            "--seqs",
            "64",
            "--tokens",
            "64",
            "--reps",
            "1",
            "--warmup",
            "1",
            "--decode-batches",
            "--compare",
            "--anchor-script",
        ])
        .arg(&script)
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("anchor script") && stderr.contains("exit"),
        "{stderr}"
    );
}
