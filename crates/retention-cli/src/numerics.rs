//! `retention numerics`: the op over one long sequence (1M tokens by default, batch 1) under
//! extreme gates, in f32, f16 and bf16. It counts non-finite outputs, states and gradients,
//! compares the half-precision kernels with the f32 kernels on the same values, and the f32
//! kernels with the f64 reference (on the host) on the first and the last positions.
//!
//! The sequence runs in segments that pass their state on (`power_retention_with_state`):
//! a tensor of a million tokens at Brumby's heads has more elements than the kernels index
//! (2³²), and the state after every segment is what a long prefill carries anyway.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{DType, Distribution, ElementConversion, Tensor, backend::Backend};
use retention::validation::{tensor, to_vec};
use retention::{
    RetentionBackend, RetentionOptions, RetentionState, power_retention, power_retention_with_state,
};

use crate::bench::BenchShape;
use crate::gate_pattern::GatePattern;
use crate::{CliError, DtypeChoice};

/// Arguments of `retention numerics`.
#[derive(clap::Args, Debug, Clone)]
pub struct NumericsArgs {
    /// Head shapes, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "mha64,brumby"
    )]
    pub shapes: Vec<BenchShape>,
    /// Tokens of the sequence (batch 1).
    #[arg(long, default_value_t = 1 << 20)]
    pub tokens: usize,
    /// Tokens per call: the sequence runs as segments passing their state on.
    #[arg(long, default_value_t = 1 << 17)]
    pub segment: usize,
    /// Positions at the start and at the end checked against the f64 reference.
    #[arg(long, default_value_t = 4096)]
    pub check_tokens: usize,
    /// Tokens of the gradient check (0: none).
    #[arg(long, default_value_t = 1 << 17)]
    pub grad_tokens: usize,
    /// Gate patterns, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "zero,strong,alternating,random"
    )]
    pub gates: Vec<GatePattern>,
    /// Input dtypes, comma-separated; f32 always runs (the others are compared with it).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "f32,f16,bf16"
    )]
    pub dtypes: Vec<DtypeChoice>,
    /// Chunk size.
    #[arg(long, default_value_t = 1024)]
    pub chunk: usize,
    /// Seed of the inputs.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// CSV of the rows.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One measured quantity of `retention numerics` (or `retention drift`) and its bound.
#[derive(Debug, Clone)]
pub struct NumericsRow {
    /// Head shape.
    pub shape: &'static str,
    /// Gate pattern.
    pub gates: &'static str,
    /// Input dtype.
    pub dtype: DType,
    /// Tokens of the run.
    pub tokens: usize,
    /// What was measured.
    pub check: String,
    /// The value.
    pub value: f64,
    /// The largest value that passes (`∞`: reported, not bounded).
    pub limit: f64,
}

impl NumericsRow {
    /// Whether the value is within its bound (NaN never is).
    pub fn passed(&self) -> bool {
        self.value <= self.limit
    }

    /// The CSV header of [`csv_line`](Self::csv_line).
    pub const CSV_HEADER: &'static str = "shape,gates,dtype,tokens,check,value,limit,passed";

    /// The row as a CSV line.
    pub fn csv_line(&self) -> String {
        format!(
            "{},{},{:?},{},{},{:e},{},{}",
            self.shape,
            self.gates,
            self.dtype,
            self.tokens,
            self.check,
            self.value,
            self.limit,
            self.passed()
        )
    }
}

/// Tolerance of half-precision kernels against the f32 kernels.
const HALF_TOLERANCE: f64 = 2e-2;
/// Tolerance of the f32 kernels against the f64 reference.
const F32_TOLERANCE: f64 = 1e-4;

impl NumericsArgs {
    /// The dtypes run: f32 first, then the others asked for.
    fn dtype_list(&self) -> Vec<DType> {
        let mut out = vec![DType::F32];
        for d in &self.dtypes {
            let d = d.dtype();
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }
}

/// Runs the checks on backend `B`; prints a table and writes the CSV.
///
/// # Errors
/// An op error (a bug: every input is valid), an I/O error of the CSV, or
/// [`CliError::SelftestFailed`] when a row is out of its bound.
pub fn numerics<B: RetentionBackend>(
    dev: &B::Device,
    args: &NumericsArgs,
) -> Result<Vec<NumericsRow>, CliError> {
    let mut rows = Vec::new();
    for &shape in &args.shapes {
        for &gates in &args.gates {
            let start = Instant::now();
            let mut these = long_sequence::<B>(dev, args, shape, gates)?;
            if args.grad_tokens > 0 {
                these.extend(gradients::<B>(dev, args, shape, gates)?);
            }
            eprintln!(
                "{} gates {}: {:.1} s",
                shape.name(),
                gates.name(),
                start.elapsed().as_secs_f64()
            );
            for r in &these {
                eprintln!("  {}", r.csv_line());
            }
            rows.extend(these);
        }
    }
    finish(rows, args.out.as_ref())
}

/// Prints the rows as a table, writes the CSV, fails when a row is out of bounds.
pub(crate) fn finish(
    rows: Vec<NumericsRow>,
    out: Option<&PathBuf>,
) -> Result<Vec<NumericsRow>, CliError> {
    println!("| shape | gates | dtype | tokens | check | value | bound | result |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:?} | {} | {} | {:.3e} | {} | {} |",
            r.shape,
            r.gates,
            r.dtype,
            r.tokens,
            r.check,
            r.value,
            if r.limit.is_finite() {
                format!("{:.0e}", r.limit)
            } else {
                "-".into()
            },
            if r.passed() { "pass" } else { "FAIL" }
        );
    }
    if let Some(path) = out {
        let io = |source| CliError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut f = std::fs::File::create(path).map_err(io)?;
        writeln!(f, "{}", NumericsRow::CSV_HEADER).map_err(io)?;
        for r in &rows {
            writeln!(f, "{}", r.csv_line()).map_err(io)?;
        }
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.passed())
        .map(NumericsRow::csv_line)
        .collect();
    if failed.is_empty() {
        Ok(rows)
    } else {
        Err(CliError::SelftestFailed(failed.join("\n")))
    }
}

/// Inputs of tokens `[start, start + len)`: q, k, v and the log-gates in f32, rounded through
/// bf16 when half-precision runs share them (so that every dtype's run sees the same values).
pub(crate) struct Segment<B: Backend> {
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub g: Tensor<B, 3>,
}

impl<B: Backend> Segment<B> {
    pub(crate) fn random(
        dev: &B::Device,
        shape: BenchShape,
        gates: GatePattern,
        seed: u64,
        start: usize,
        len: usize,
        round: bool,
    ) -> Self {
        let (hq, h, d) = shape.heads();
        B::seed(
            dev,
            seed ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let normal = Distribution::Normal(0.0, 1.0);
        let g = gates.log_gates::<B>([1, len, h], start, dev);
        let (q, k, v) = (
            Tensor::random([1, len, hq, d], normal, dev),
            Tensor::random([1, len, h, d], normal, dev),
            Tensor::random([1, len, h, d], normal, dev),
        );
        if !round {
            return Self { q, k, v, g };
        }
        let round = |x: Tensor<B, 4>| x.cast(DType::BF16).cast(DType::F32);
        Self {
            q: round(q),
            k: round(k),
            v: round(v),
            g: g.cast(DType::BF16).cast(DType::F32),
        }
    }

    pub(crate) fn cast(&self, dtype: DType) -> Self {
        Self {
            q: self.q.clone().cast(dtype),
            k: self.k.clone().cast(dtype),
            v: self.v.clone().cast(dtype),
            g: self.g.clone().cast(dtype),
        }
    }
}

/// Non-finite elements of `x`.
pub(crate) fn non_finite<B: Backend, const N: usize>(x: Tensor<B, N>) -> f64 {
    let n: i64 = x.is_finite().bool_not().int().sum().into_scalar().elem();
    n as f64
}

/// `max |x|` over the finite elements of `x`.
pub(crate) fn finite_max_abs<B: Backend, const N: usize>(x: Tensor<B, N>) -> f64 {
    let finite = x.clone().is_finite();
    max_abs(x.zeros_like().mask_where(finite, x))
}

/// `max |x|` in f64 (NaN when `x` holds one).
pub(crate) fn max_abs<B: Backend, const N: usize>(x: Tensor<B, N>) -> f64 {
    let m: f64 = x.cast(DType::F32).abs().max().into_scalar().elem();
    m
}

/// The segments `[start, len)` of a run of `tokens`: the first and the last `check` tokens
/// alone (their reference checks), the rest in `segment`s.
fn segments(tokens: usize, segment: usize, check: usize) -> Vec<(usize, usize)> {
    let check = check.min(tokens);
    let mut out = vec![(0, check)];
    let tail = tokens.saturating_sub(check).max(check);
    let mut s = check;
    while s < tail {
        let len = segment.max(1).min(tail - s);
        out.push((s, len));
        s += len;
    }
    if tail < tokens {
        out.push((tail, tokens - tail));
    }
    out.retain(|&(_, len)| len > 0);
    out
}

fn long_sequence<B: RetentionBackend>(
    dev: &B::Device,
    args: &NumericsArgs,
    shape: BenchShape,
    gates: GatePattern,
) -> Result<Vec<NumericsRow>, CliError> {
    let opts = RetentionOptions::new().with_chunk_size(Some(args.chunk));
    let parts = segments(args.tokens, args.segment, args.check_tokens);
    let dtypes = args.dtype_list();
    let mut states: Vec<Option<RetentionState<B>>> = vec![None; dtypes.len()];
    let mut bad_out = vec![0.0f64; dtypes.len()];
    let mut diff = vec![0.0f64; dtypes.len()];
    let mut scale = 0.0f64;
    let mut reference_rows = Vec::new();
    let last = parts.len() - 1;
    for (i, &(start, len)) in parts.iter().enumerate() {
        let seg = Segment::<B>::random(dev, shape, gates, args.seed, start, len, dtypes.len() > 1);
        let mut y32 = None;
        let entering32 = states[0].clone();
        for (j, &dtype) in dtypes.iter().enumerate() {
            let x = seg.cast(dtype);
            let entering = states[j].take();
            let entering_half = (j > 0).then(|| entering.clone()).flatten();
            let before = (j == 0 && i == last && i > 0)
                .then(|| entering.clone())
                .flatten();
            let (y, s) = power_retention_with_state(x.q, x.k, x.v, Some(x.g), entering, &opts)?;
            bad_out[j] += non_finite(y.clone());
            states[j] = Some(s);
            match &y32 {
                None => {
                    scale = scale.max(max_abs(y.clone()));
                    if i == 0 || i == last {
                        let where_ = if i == 0 { "first" } else { "last" };
                        let err = reference_error(&seg, y.clone(), before, shape, &opts);
                        reference_rows.push(NumericsRow {
                            shape: shape.name(),
                            gates: gates.name(),
                            dtype,
                            tokens: args.tokens,
                            check: format!("max-rel vs f64 reference on the {where_} {len} tokens"),
                            value: err,
                            limit: F32_TOLERANCE,
                        });
                    }
                    y32 = Some(y);
                }
                Some(y32) => {
                    let gap = (y.cast(DType::F32) - y32.clone()).abs();
                    let worst = max_abs(gap.clone());
                    if worst > diff[j] && worst > HALF_TOLERANCE * scale {
                        let context = Worst {
                            seg: &seg,
                            entering32: entering32.clone(),
                            entering_half,
                            shape,
                            opts: &opts,
                        };
                        report_worst(gap, y32.clone(), start, dtype, context);
                    }
                    diff[j] = diff[j].max(worst);
                }
            }
        }
    }
    let row = |dtype, check: &str, value, limit| NumericsRow {
        shape: shape.name(),
        gates: gates.name(),
        dtype,
        tokens: args.tokens,
        check: check.into(),
        value,
        limit,
    };
    let mut rows = Vec::new();
    let f32_state = states[0].clone();
    for (j, &dtype) in dtypes.iter().enumerate() {
        rows.push(row(dtype, "non-finite outputs", bad_out[j], 0.0));
        if let Some(s) = &states[j] {
            let bad = non_finite(s.state.clone()) + non_finite(s.key_sum.clone());
            rows.push(row(dtype, "non-finite final state", bad, 0.0));
            if j == 0 {
                rows.push(row(
                    dtype,
                    "largest |S| of the final state",
                    max_abs(s.state.clone()),
                    f64::INFINITY,
                ));
                rows.push(row(
                    dtype,
                    "largest |z| of the final state",
                    max_abs(s.key_sum.clone()),
                    f64::INFINITY,
                ));
            } else if let Some(f) = &f32_state {
                let err = max_abs(s.state.clone().cast(DType::F32) - f.state.clone())
                    / max_abs(f.state.clone()).max(f64::MIN_POSITIVE);
                rows.push(row(
                    dtype,
                    "final state max-rel vs f32 kernels",
                    err,
                    HALF_TOLERANCE,
                ));
            }
        }
        if j > 0 {
            let err = diff[j] / scale.max(f64::MIN_POSITIVE);
            rows.push(row(
                dtype,
                "output max-rel vs f32 kernels",
                err,
                HALF_TOLERANCE,
            ));
        }
    }
    rows.extend(reference_rows);
    Ok(rows)
}

/// What [`report_worst`] needs to compute the f64 reference of the worst row: the segment,
/// the state the f32 run entered it with, the head shape and the options.
struct Worst<'a, B: Backend> {
    seg: &'a Segment<B>,
    entering32: Option<RetentionState<B>>,
    entering_half: Option<RetentionState<B>>,
    shape: BenchShape,
    opts: &'a RetentionOptions,
}

/// Tokens into a segment up to which [`report_worst`] computes the f64 reference of the worst
/// row on the host (beyond: not computed; run with a shorter `--segment`).
const WORST_REFERENCE_TOKENS: usize = 16_384;

/// Prints where the largest gap between a half-precision run and the f32 run lies: position
/// (absolute and within its chunk), head, column, the f32 value there, and the f64 reference
/// of that element (from the state the f32 run entered the segment with) where the position
/// lies within [`WORST_REFERENCE_TOKENS`] of the segment's start.
fn report_worst<B: RetentionBackend>(
    gap: Tensor<B, 4>,
    y32: Tensor<B, 4>,
    start: usize,
    dtype: DType,
    context: Worst<'_, B>,
) {
    let chunk = context.opts.chunk_size.unwrap_or(usize::MAX);
    let [_, len, heads, e] = gap.dims();
    let n = len * heads * e;
    let at: i64 = gap.clone().reshape([n]).argmax(0).into_scalar().elem();
    let at = at.max(0) as usize;
    let (pos, head, col) = (at / (heads * e), at / e % heads, at % e);
    let pick = |x: Tensor<B, 4>| -> f64 {
        let v: f32 = x
            .slice([0..1, pos..pos + 1, head..head + 1, col..col + 1])
            .into_scalar()
            .elem();
        v as f64
    };
    if pos < WORST_REFERENCE_TOKENS {
        worst_states(&context, dtype, pos, head, col);
    }
    let reference = (pos < WORST_REFERENCE_TOKENS)
        .then(|| worst_reference(&context, pos, head, col))
        .flatten();
    eprintln!(
        "    {dtype:?} worst gap {:.3e} at position {} ({} in its chunk), head {head}, column {col}; f32 value {:.3e}; f64 reference {}",
        pick(gap),
        start + pos,
        (start + pos) % chunk.max(1),
        pick(y32),
        reference.map_or("not computed".into(), |r| format!("{r:.3e}")),
    );
}

/// Where the worst row of a half-precision run goes wrong: the state entering its chunk from
/// the half and the f32 kernels (`S` and `z` apart), and the f64 reference of the row from the
/// half kernels' state (wrong state, or wrong output from a right one).
fn worst_states<B: RetentionBackend>(
    at: &Worst<'_, B>,
    dtype: DType,
    pos: usize,
    head: usize,
    col: usize,
) {
    let chunk = at.opts.chunk_size.unwrap_or(usize::MAX);
    let start = pos - pos % chunk;
    let prefix = |dtype: DType, entering: Option<RetentionState<B>>| {
        let x = at.seg.cast(dtype);
        let part = |t: Tensor<B, 4>| t.narrow(1, 0, start);
        power_retention_with_state(
            part(x.q),
            part(x.k),
            part(x.v),
            Some(x.g.narrow(1, 0, start)),
            entering,
            at.opts,
        )
        .ok()
        .map(|(_, s)| s)
    };
    let (half, full) = if start == 0 {
        (at.entering_half.clone(), at.entering32.clone())
    } else {
        (
            prefix(dtype, at.entering_half.clone()),
            prefix(DType::F32, at.entering32.clone()),
        )
    };
    let (Some(half), Some(full)) = (half, full) else {
        eprintln!("      (no entering state to compare)");
        return;
    };
    let (hq, h, _) = at.shape.heads();
    let kv = head / (hq / h);
    // relative to the largest element of the f32 kernels' state (the head's part)
    let rel = |a: Tensor<B, 1>, b: Tensor<B, 1>| {
        let b = b.cast(DType::F32);
        max_abs(a.cast(DType::F32) - b.clone()) / max_abs(b).max(f64::MIN_POSITIVE)
    };
    let s_err = rel(
        half.state.clone().narrow(1, kv, 1).flatten(0, 3),
        full.state.clone().narrow(1, kv, 1).flatten(0, 3),
    );
    let z_err = rel(
        half.key_sum.clone().narrow(1, kv, 1).flatten(0, 2),
        full.key_sum.clone().narrow(1, kv, 1).flatten(0, 2),
    );
    let shifted = |t: Tensor<B, 4>| t.narrow(1, start, pos + 1 - start);
    let tail = Segment {
        q: shifted(at.seg.q.clone()),
        k: shifted(at.seg.k.clone()),
        v: shifted(at.seg.v.clone()),
        g: at.seg.g.clone().narrow(1, start, pos + 1 - start),
    };
    let from_half = Worst {
        seg: &tail,
        entering32: Some(half),
        entering_half: None,
        shape: at.shape,
        opts: at.opts,
    };
    let reference = worst_reference(&from_half, pos - start, head, col);
    eprintln!(
        "      {dtype:?} state entering chunk at {start} of the segment: S max-rel {s_err:.3e}, z max-rel {z_err:.3e} against the f32 kernels'; f64 reference of the row from it {}",
        reference.map_or("not computed".into(), |r| format!("{r:.3e}")),
    );
}

/// The f64 reference of output element `(pos, head, col)` of `at.seg`, from the state the f32
/// run entered the segment with, on the host (the key/value head of `head` alone).
fn worst_reference<B: RetentionBackend>(
    at: &Worst<'_, B>,
    pos: usize,
    head: usize,
    col: usize,
) -> Option<f64> {
    let (hq, h, _) = at.shape.heads();
    let r = hq / h;
    let ([q, k, v], g, init) = host_head(at.seg, at.entering32.as_ref(), head / r, r, pos + 1);
    let (y, _) = power_retention_with_state(q, k, v, Some(g), init, at.opts).ok()?;
    let v: f64 = y
        .slice([0..1, pos..pos + 1, head % r..head % r + 1, col..col + 1])
        .into_scalar()
        .elem();
    Some(v)
}

/// Key/value head `kv`'s part of the first `len` tokens of `seg` on the host in f64 (its
/// `r` query heads), and of `entering`: the inputs of the f64 reference for that head.
#[allow(clippy::type_complexity)]
fn host_head<B: RetentionBackend>(
    seg: &Segment<B>,
    entering: Option<&RetentionState<B>>,
    kv: usize,
    r: usize,
    len: usize,
) -> (
    [Tensor<NdArray<f64>, 4>; 3],
    Tensor<NdArray<f64>, 3>,
    Option<RetentionState<NdArray<f64>>>,
) {
    type H = NdArray<f64>;
    let host = Default::default();
    let to_host4 = |x: Tensor<B, 4>| {
        let dims = x.dims();
        tensor::<H, 4>(&to_vec(x), dims, &host, DType::F64)
    };
    let to_host3 = |x: Tensor<B, 3>| {
        let dims = x.dims();
        tensor::<H, 3>(&to_vec(x), dims, &host, DType::F64)
    };
    let q = to_host4(seg.q.clone().narrow(1, 0, len).narrow(2, kv * r, r));
    let k = to_host4(seg.k.clone().narrow(1, 0, len).narrow(2, kv, 1));
    let v = to_host4(seg.v.clone().narrow(1, 0, len).narrow(2, kv, 1));
    let g = to_host3(seg.g.clone().narrow(1, 0, len).narrow(2, kv, 1));
    let init = entering.map(|s| RetentionState::<H> {
        state: to_host4(s.state.clone().narrow(1, kv, 1)),
        key_sum: to_host3(s.key_sum.clone().narrow(1, kv, 1)),
    });
    ([q, k, v], g, init)
}

/// `max-rel` of the f32 kernels' output `y` of `seg` (from `entering`) against the f64
/// reference on the host, over the query heads of the first and the last key/value head.
fn reference_error<B: RetentionBackend>(
    seg: &Segment<B>,
    y: Tensor<B, 4>,
    entering: Option<RetentionState<B>>,
    shape: BenchShape,
    opts: &RetentionOptions,
) -> f64 {
    let (hq, h, d) = shape.heads();
    let r = hq / h;
    let [_, len, _, _] = seg.q.dims();
    let mut heads = vec![0, h - 1];
    heads.dedup();
    let (mut err, mut ref_max) = (0.0f64, 0.0f64);
    for kv in heads {
        let ([q, k, v], g, init) = host_head(seg, entering.as_ref(), kv, r, len);
        let want = match power_retention_with_state(q, k, v, Some(g), init, opts) {
            Ok((y, _)) => to_vec(y),
            Err(_) => return f64::INFINITY,
        };
        let have = to_vec(y.clone().narrow(2, kv * r, r));
        debug_assert_eq!(want.len(), len * r * d);
        for (a, b) in have.iter().zip(&want) {
            let e = (a - b).abs();
            err = if e.is_nan() {
                f64::INFINITY
            } else {
                err.max(e)
            };
            ref_max = ref_max.max(b.abs());
        }
    }
    if ref_max == 0.0 { err } else { err / ref_max }
}

/// Non-finite gradients of q, k, v and the log-gates at `grad_tokens` in every dtype.
fn gradients<B: RetentionBackend>(
    dev: &B::Device,
    args: &NumericsArgs,
    shape: BenchShape,
    gates: GatePattern,
) -> Result<Vec<NumericsRow>, CliError> {
    let opts = RetentionOptions::new().with_chunk_size(Some(args.chunk));
    let dtypes = args.dtype_list();
    let seg = Segment::<Autodiff<B>>::random(
        dev,
        shape,
        gates,
        args.seed,
        0,
        args.grad_tokens,
        dtypes.len() > 1,
    );
    let (hq, _, d) = shape.heads();
    let w: Tensor<Autodiff<B>, 4> = Tensor::random(
        [1, args.grad_tokens, hq, d],
        Distribution::Normal(0.0, 1.0),
        dev,
    );
    let mut rows = Vec::new();
    for dtype in dtypes {
        let x = seg.cast(dtype);
        let (q, k, v, g) = (
            x.q.require_grad(),
            x.k.require_grad(),
            x.v.require_grad(),
            x.g.require_grad(),
        );
        let y = power_retention(q.clone(), k.clone(), v.clone(), Some(g.clone()), &opts)?;
        let grads = (y.cast(DType::F32) * w.clone()).sum().backward();
        let (mut bad, mut largest) = (0.0, 0.0f64);
        for x in [&q, &k, &v] {
            let grad = x.grad(&grads);
            bad += grad.clone().map_or(f64::NAN, non_finite);
            largest = largest.max(grad.map_or(f64::NAN, finite_max_abs));
        }
        let grad = g.grad(&grads);
        bad += grad.clone().map_or(f64::NAN, non_finite);
        largest = largest.max(grad.map_or(f64::NAN, finite_max_abs));
        // f16 holds at most 65,504: a larger exact gradient has no f16 value
        rows.push(NumericsRow {
            shape: shape.name(),
            gates: gates.name(),
            dtype,
            tokens: args.grad_tokens,
            check: "largest finite |gradient|".into(),
            value: largest,
            limit: f64::INFINITY,
        });
        rows.push(NumericsRow {
            shape: shape.name(),
            gates: gates.name(),
            dtype,
            tokens: args.grad_tokens,
            check: "non-finite gradients of q k v and log_g".into(),
            value: bad,
            limit: 0.0,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::segments;

    #[test]
    fn segments_cover_the_sequence_with_both_ends_alone() {
        assert_eq!(
            segments(100, 30, 10),
            vec![(0, 10), (10, 30), (40, 30), (70, 20), (90, 10)]
        );
        assert_eq!(segments(15, 30, 10), vec![(0, 10), (10, 5)]);
        assert_eq!(segments(8, 30, 10), vec![(0, 8)]);
        assert_eq!(segments(20, 30, 10), vec![(0, 10), (10, 10)]);
    }
}
