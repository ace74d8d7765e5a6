//! `retention plot-losses`: draws the loss curves of runs (their `losses.csv`) in one chart,
//! with the pretrained model's held-out loss and the +5 % bar where it is given: a recovery
//! chart from runs made in several sittings or on several machines.

use std::path::{Path, PathBuf};

use retention_models::{LossLog, plot_losses, read_losses_csv};

use crate::CliError;

/// One run to draw: its label and its `losses.csv`.
#[derive(Debug, Clone)]
pub struct LossRun {
    /// The legend's label.
    pub label: String,
    /// The run's `losses.csv`.
    pub csv: PathBuf,
}

impl std::str::FromStr for LossRun {
    type Err = String;

    /// `LABEL=PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((label, csv)) if !label.is_empty() && !csv.is_empty() => Ok(Self {
                label: label.to_string(),
                csv: PathBuf::from(csv),
            }),
            _ => Err(format!("`{s}` is not LABEL=PATH/TO/losses.csv")),
        }
    }
}

/// Draws `runs` into the SVG `out`, with `original` (the pretrained model's held-out loss)
/// and 1.05 × `original` as dashed lines when given.
///
/// # Errors
/// A CSV that cannot be read or parsed; the plot's errors.
pub fn plot_loss_runs(
    runs: &[LossRun],
    original: Option<f64>,
    title: &str,
    out: &Path,
) -> Result<(), CliError> {
    let logs = runs
        .iter()
        .map(|r| read_losses_csv(&r.csv))
        .collect::<Result<Vec<LossLog>, _>>()?;
    let named: Vec<(&str, &LossLog)> = runs.iter().map(|r| r.label.as_str()).zip(&logs).collect();
    let references: Vec<(&str, f64)> = original
        .map(|o| vec![("pretrained attention, held out", o), ("+5 %", o * 1.05)])
        .unwrap_or_default();
    plot_losses(&named, &references, title, out)?;
    Ok(())
}
