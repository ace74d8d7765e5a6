//! `retention drift`: how far a long decode strays from the chunked form. After a prefill,
//! every further token is one recurrent step on a state kept in f32 or in bf16 (what
//! Manifest's library keeps); the steps' outputs are compared, block by block, with the f32
//! kernels' chunked form over the whole sequence at the same positions.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{DType, Tensor};
use retention::{
    RetentionBackend, RetentionOptions, power_retention, power_retention_step,
    power_retention_with_state,
};

use crate::bench::BenchShape;
use crate::drift_plot::{curve_name, drift_curves, plot_drift, read_drift_csv};
use crate::gate_pattern::GatePattern;
use crate::numerics::{NumericsRow, Segment, finish, max_abs};
use crate::{CliError, DtypeChoice};

/// Arguments of `retention drift`.
#[derive(clap::Args, Debug, Clone)]
pub struct DriftArgs {
    /// Head shapes, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "mha64")]
    pub shapes: Vec<BenchShape>,
    /// Tokens of the prefill (the chunked form) before the steps.
    #[arg(long, default_value_t = 4096)]
    pub prefill: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 100_000)]
    pub steps: usize,
    /// Steps per row: the error is the worst over each block of this many steps.
    #[arg(long, default_value_t = 1000)]
    pub every: usize,
    /// Gate patterns, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "zero,random")]
    pub gates: Vec<GatePattern>,
    /// Element types of the decode state, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16")]
    pub states: Vec<DtypeChoice>,
    /// Chunk size of the prefill and of the chunked form compared with.
    #[arg(long, default_value_t = 1024)]
    pub chunk: usize,
    /// Seed of the inputs.
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
    /// CSV of the rows (`tokens` is the position after the block).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also draw the curves as an SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Draw `--plot` from this CSV of an earlier run instead of running.
    #[arg(long, requires = "plot")]
    pub from_csv: Option<PathBuf>,
}

/// The bound on an f32 state's drift (the chunked form's own f32 error is ≈ 10⁻⁶); a bf16
/// state's is reported, not bounded.
const F32_STATE_BOUND: f64 = 1e-3;

/// Runs the decode-drift measurement on backend `B` (inputs in f32); prints a table and
/// writes the CSV.
///
/// # Errors
/// An op error (a bug), an I/O error of the CSV, or [`CliError::SelftestFailed`] when an f32
/// state drifts past its bound.
pub fn drift<B: RetentionBackend>(
    dev: &B::Device,
    args: &DriftArgs,
) -> Result<Vec<NumericsRow>, CliError> {
    if let (Some(csv), Some(svg)) = (&args.from_csv, &args.plot) {
        let text = std::fs::read_to_string(csv).map_err(|source| CliError::Io {
            path: csv.display().to_string(),
            source,
        })?;
        plot_drift(&read_drift_csv(&text)?, TITLE, svg)?;
        return Ok(Vec::new());
    }
    let opts = RetentionOptions::new().with_chunk_size(Some(args.chunk));
    let total = args.prefill + args.steps;
    let every = args.every.max(1);
    let mut rows = Vec::new();
    for &shape in &args.shapes {
        for &gates in &args.gates {
            let x = Segment::<B>::random(dev, shape, gates, args.seed, 0, total, false);
            let want = power_retention(
                x.q.clone(),
                x.k.clone(),
                x.v.clone(),
                Some(x.g.clone()),
                &opts,
            )?;
            for &state_dtype in &args.states {
                let start = Instant::now();
                let state_dtype = state_dtype.dtype();
                let prefix = |t: &Tensor<B, 4>| t.clone().narrow(1, 0, args.prefill);
                let (_, state) = power_retention_with_state(
                    prefix(&x.q),
                    prefix(&x.k),
                    prefix(&x.v),
                    Some(x.g.clone().narrow(1, 0, args.prefill)),
                    None,
                    &opts,
                )?;
                let mut state = state.cast(state_dtype);
                let mut block = Vec::with_capacity(every);
                let mut block_start = args.prefill;
                for i in args.prefill..total {
                    let at = |t: &Tensor<B, 4>| t.clone().narrow(1, i, 1);
                    let (y, next) = power_retention_step(
                        at(&x.q),
                        at(&x.k),
                        at(&x.v),
                        Some(x.g.clone().narrow(1, i, 1)),
                        state,
                        &opts,
                    )?;
                    state = next;
                    block.push(y);
                    if block.len() == every || i + 1 == total {
                        let ys = Tensor::cat(std::mem::take(&mut block), 1);
                        let n = ys.dims()[1];
                        let reference = want.clone().narrow(1, block_start, n);
                        let err = max_abs(ys - reference.clone())
                            / max_abs(reference).max(f64::MIN_POSITIVE);
                        block_start += n;
                        rows.push(NumericsRow {
                            shape: shape.name(),
                            gates: gates.name(),
                            dtype: state_dtype,
                            tokens: block_start,
                            check: "decode max-rel vs chunked f32".into(),
                            value: err,
                            limit: if state_dtype == DType::F32 {
                                F32_STATE_BOUND
                            } else {
                                f64::INFINITY
                            },
                        });
                    }
                }
                let last = rows.last().map_or(f64::NAN, |r| r.value);
                eprintln!(
                    "{} gates {} state {state_dtype:?}: {} steps in {:.1} s, last block {last:.3e}",
                    shape.name(),
                    gates.name(),
                    args.steps,
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    let rows = finish(rows, args.out.as_ref())?;
    if let Some(svg) = &args.plot {
        let points = rows.iter().map(|r| {
            let name = curve_name(r.shape, r.gates, &format!("{:?}", r.dtype));
            (name, r.tokens, r.value)
        });
        plot_drift(&drift_curves(points), TITLE, svg)?;
    }
    Ok(rows)
}

const TITLE: &str = "decode drift: recurrent steps against the chunked form";
