//! `retention selftest`: the kernel-vs-oracle suite of `retention::validation` on any backend,
//! as a pass/fail table. This is how a user validates a new GPU.

use burn::tensor::DType;
use indicatif::{ProgressBar, ProgressStyle};
use retention::validation::{SuiteReport, run_grad_suite, run_suite};
use retention::{KernelChoice, RetentionBackend};

use crate::CliError;

/// Runs `cases` randomized cases per dtype on `B` with the `kernels` family and prints one table
/// per dtype; with `grad`,
/// also the gradient suite (the backward pass of `Autodiff<B>` against `Autodiff` of the
/// reference in f64).
///
/// # Errors
/// [`CliError::SelftestFailed`] if any check exceeds its tolerance.
pub fn selftest<B: RetentionBackend>(
    dev: &B::Device,
    backend: &str,
    dtypes: &[DType],
    kernels: KernelChoice,
    cases: u64,
    grad: bool,
) -> Result<Vec<SuiteReport>, CliError> {
    let mut reports = Vec::new();
    for &dtype in dtypes {
        let bar = ProgressBar::new(cases).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} cases ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("{backend} {dtype:?}"));
        let report = run_suite::<B>(dev, dtype, kernels, cases, |_| bar.inc(1))?;
        bar.finish_and_clear();
        println!("{}", report.table());
        reports.push(report);
        if grad {
            let bar = ProgressBar::new(cases).with_style(bar.style());
            bar.set_message(format!("{backend} {dtype:?} gradients"));
            let report = run_grad_suite::<B>(dev, dtype, kernels, cases, |_| bar.inc(1))?;
            bar.finish_and_clear();
            println!("{}", report.table());
            reports.push(report);
        }
    }
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| format!("{:?}:\n{}", r.dtype, r.failures()))
        .collect();
    if failed.is_empty() {
        println!(
            "selftest passed on {backend}: {cases} cases per dtype ({})",
            dtypes
                .iter()
                .map(|d| format!("{d:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(reports)
    } else {
        Err(CliError::SelftestFailed(failed.join("\n")))
    }
}
