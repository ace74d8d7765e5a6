//! A dtype the chosen backend does not compute in is an error that names what it takes, not a
//! panic inside the backend.

#![cfg(feature = "ndarray")]

use std::process::Command;

fn retention(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_retention"))
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn half_dtypes_on_the_cpu_backend_are_refused() {
    for args in [
        &["bench", "--dtype", "bf16", "--seqs", "8", "--tokens", "8"][..],
        &["selftest", "--dtype", "f16", "--cases", "1"][..],
    ] {
        let (ok, stderr) = retention(args);
        assert!(!ok, "{args:?} must fail");
        assert!(
            stderr.contains("does not take") && stderr.contains("F64, F32"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}
