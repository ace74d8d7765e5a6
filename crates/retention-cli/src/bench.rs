//! `retention bench`: forward, forward + backward and decode-step timings at the shapes of the
//! anchor benchmark, as a table and as CSV rows with the anchor script's schema
//! (`impl,mode,shape,b,t,hq,hk,d,chunk,ms,tokens_per_s,tflops`) and FLOP formulas; with
//! `compare`, the anchor script's rows (Manifest's Triton kernels, SDPA, torch's matmul) from
//! the same run in the same file.

use std::io::Write as _;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::tensor::{DType, Distribution, Tensor, backend::Backend};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use retention::{
    DecodeState, KernelChoice, RetentionBackend, RetentionOptions, RetentionState, power_retention,
    power_retention_decode, power_retention_step, power_retention_with_state, reference,
};

use crate::CliError;
use crate::bench_plot::{PlotRow, parse_rows, plot_rows};

/// Head shapes of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchShape {
    /// 8 query and 8 key/value heads of dim 64.
    Mha64,
    /// Brumby-14B: 40 query heads over 8 key/value heads of dim 128.
    Brumby,
}

impl BenchShape {
    /// `(hq, hk, d)`.
    pub fn heads(self) -> (usize, usize, usize) {
        match self {
            Self::Mha64 => (8, 8, 64),
            Self::Brumby => (40, 8, 128),
        }
    }

    /// Name in the CSV.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mha64 => "mha64",
            Self::Brumby => "brumby",
        }
    }
}

/// Which implementation a row times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchImpl {
    /// The backend's `RetentionBackend` forms (CubeCL kernels on CubeCL backends).
    BurnRetention,
    /// The plain-tensor reference on the same backend.
    BurnReference,
}

impl BenchImpl {
    fn name(self) -> &'static str {
        match self {
            Self::BurnRetention => "burn_retention",
            Self::BurnReference => "burn_reference",
        }
    }
}

/// Arguments of `retention bench`.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    /// Head shape.
    pub shape: BenchShape,
    /// Sequence lengths; `tokens / t` sequences per call.
    pub seqs: Vec<usize>,
    /// Tokens per call.
    pub tokens: usize,
    /// Chunk size of the chunked form (`t ≤ chunk` runs the attention form).
    pub chunk: usize,
    /// Timed runs (median reported), after `warmup` untimed ones.
    pub reps: usize,
    /// Untimed runs first.
    pub warmup: usize,
    /// Forward calls per timed run (one device sync per run; the time is divided by it).
    pub calls_per_sync: usize,
    /// Also time forward + backward (`fwd+bwd` rows, our op only): gradients of q, k, v and
    /// the log-gates through `Autodiff`, as the anchor script times them.
    pub backward: bool,
    /// Implementations to time.
    pub impls: Vec<BenchImpl>,
    /// Decode-step batch sizes (empty: no decode rows).
    pub decode_batches: Vec<usize>,
    /// Contexts the decode step is timed after (a prefill of that many tokens).
    pub decode_contexts: Vec<usize>,
    /// Window of the deferred-rewrite decode rows (`decode_window`; 0: none).
    pub fold_every: usize,
    /// CSV file to write (rows are also printed).
    pub out: Option<String>,
    /// Element type of q, k, v.
    pub dtype: DType,
    /// Side of a square matmul timed through Burn in `dtype` (a `burn_matmul` row: the
    /// backend's tensor-core ceiling beside the op's rows); `None`: not timed.
    pub matmul: Option<usize>,
    /// The anchor script to run after our rows, in the same process tree and on the same GPU
    /// (`python3 SCRIPT --shape .. --tokens .. --chunk .. --ts .. --modes ..`); its CSV rows
    /// are printed and appended to `out`. `None`: ours only.
    pub compare: Option<std::path::PathBuf>,
    /// Directory for the charts of this run's rows ([`plot_rows`]);
    /// `None`: no charts.
    pub plot: Option<std::path::PathBuf>,
    /// Kernel family of the CubeCL backends.
    pub kernels: KernelChoice,
}

/// One measured row.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// `burn_retention` or `burn_reference`.
    pub implementation: &'static str,
    /// `fwd`, `decode` (one-token step) or `decode_window` (steps on a
    /// [`DecodeState`], its rewrite amortised).
    pub mode: &'static str,
    /// Shape name.
    pub shape: &'static str,
    /// Batch.
    pub b: usize,
    /// Sequence length (decode: context length behind the state).
    pub t: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads.
    pub hk: usize,
    /// Head dim.
    pub d: usize,
    /// Chunk (`None`: attention form, or not applicable); for `decode_window` rows the window
    /// length (`fold_every`).
    pub chunk: Option<usize>,
    /// Median milliseconds per call.
    pub ms: f64,
    /// FLOPs per call (anchor formulas).
    pub flops: f64,
    /// Tokens per call.
    pub tokens: usize,
}

impl BenchRow {
    /// The CSV line (anchor schema).
    pub fn csv(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{},{},{:.4},{:.0},{:.1}",
            self.implementation,
            self.mode,
            self.shape,
            self.b,
            self.t,
            self.hq,
            self.hk,
            self.d,
            self.chunk.map_or("-".to_string(), |c| c.to_string()),
            self.ms,
            self.tokens as f64 / self.ms * 1e3,
            self.flops / self.ms / 1e9
        )
    }
}

impl From<&BenchRow> for PlotRow {
    fn from(r: &BenchRow) -> Self {
        Self {
            implementation: r.implementation.to_string(),
            mode: r.mode.to_string(),
            shape: r.shape.to_string(),
            b: r.b,
            t: r.t,
            ms: r.ms,
            tokens_per_s: r.tokens as f64 / r.ms * 1e3,
            tflops: r.flops / r.ms / 1e9,
        }
    }
}

/// Decode steps per timed run (one device sync per run).
pub const DECODE_CALLS: usize = 20;

/// The CSV header of the anchor script.
pub const CSV_HEADER: &str = "impl,mode,shape,b,t,hq,hk,d,chunk,ms,tokens_per_s,tflops";

/// Least warm-up time before a row is timed: a few calls of a 60 µs decode step leave the
/// GPU's clocks and the memory pool cold (the first decode row came out 10–14 % slower than
/// the same step timed after it).
const MIN_WARMUP: Duration = Duration::from_millis(500);

/// Median over `reps` runs of `calls` back-to-back calls of `f` and one device sync, divided
/// by `calls`, in milliseconds: the cost of a call inside a longer stream of work (a decode
/// step of one layer among many), without one host round trip per call. At least `warmup`
/// untimed calls run first, and untimed calls go on until [`MIN_WARMUP`] has passed.
fn time_ms_per_call<B: Backend>(
    dev: &B::Device,
    warmup: usize,
    reps: usize,
    calls: usize,
    mut f: impl FnMut(),
) -> f64 {
    let started = Instant::now();
    let mut done = 0;
    while done < warmup || started.elapsed() < MIN_WARMUP {
        f();
        done += 1;
        if done % 16 == 0 {
            let _ = B::sync(dev);
        }
    }
    let _ = B::sync(dev);
    let calls = calls.max(1);
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                f();
            }
            let _ = B::sync(dev);
            start.elapsed().as_secs_f64() * 1e3 / calls as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn inputs<B: Backend>(
    b: usize,
    t: usize,
    (hq, hk, d): (usize, usize, usize),
    dtype: DType,
    dev: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 3>) {
    let n = |shape: [usize; 4]| {
        Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), dev).cast(dtype)
    };
    let g = burn::tensor::activation::log_sigmoid(Tensor::<B, 3>::random(
        [b, t, hk],
        Distribution::Normal(4.0, 1.0),
        dev,
    ))
    .cast(dtype);
    (n([b, t, hq, d]), n([b, t, hk, d]), n([b, t, hk, d]), g)
}

/// [`time_ms_per_call`] for a call that carries a state forward (`advance` takes the state
/// the previous call returned); the first error a call raises is returned after the timing.
fn time_carried<B: Backend, S>(
    dev: &B::Device,
    args: &BenchArgs,
    calls: usize,
    initial: S,
    mut advance: impl FnMut(S) -> Result<S, CliError>,
) -> Result<f64, CliError> {
    let mut carried = Some(advance(initial)?);
    let mut failure = None;
    let ms = time_ms_per_call::<B>(dev, args.warmup, args.reps, calls, || {
        if let Some(state) = carried.take() {
            match advance(state) {
                Ok(next) => carried = Some(next),
                Err(e) => failure = failure.take().or(Some(e)),
            }
        }
    });
    failure.map_or(Ok(ms), Err)
}

/// Milliseconds per forward + backward call of the op on `Autodiff<B>`: the gradients of q, k,
/// v and the log-gates for an output gradient of ones (`backward` on the output itself, which
/// seeds it; the kernels do the same work for any gradient). The anchors pass a gradient they
/// made beforehand; a loss such as `(y · dy).sum()` would add a product, a reduction and their
/// backward passes that neither side of the comparison is about.
fn time_fwd_bwd<B: RetentionBackend>(
    dev: &B::Device,
    args: &BenchArgs,
    b: usize,
    t: usize,
    heads: (usize, usize, usize),
    opts: &RetentionOptions,
) -> Result<f64, CliError> {
    let (q, k, v, g) = inputs::<Autodiff<B>>(b, t, heads, args.dtype, dev);
    let (q, k, v, g) = (
        q.require_grad(),
        k.require_grad(),
        v.require_grad(),
        g.require_grad(),
    );
    let step = || -> Result<(), CliError> {
        let y = power_retention(q.clone(), k.clone(), v.clone(), Some(g.clone()), opts)?;
        drop(y.backward());
        Ok(())
    };
    step()?;
    Ok(time_ms_per_call::<B>(
        dev,
        args.warmup,
        args.reps,
        args.calls_per_sync,
        || {
            let _ = step();
        },
    ))
}

/// Forward FLOPs of one call (the anchor script's formulas, ideal `D`).
pub fn forward_flops(b: usize, t: usize, hq: usize, hk: usize, d: usize, chunk: usize) -> f64 {
    let (b, t, hq, hk, d, c) = (
        b as f64,
        t as f64,
        hq as f64,
        hk as f64,
        d as f64,
        chunk as f64,
    );
    if t <= c {
        2.0 * b * hq * t * t * d
    } else {
        let big_d = d * (d + 1.0) / 2.0;
        b * t * (hq * c * (d + d) + 2.0 * big_d * d * (hk + hq))
    }
}

/// FLOPs of one decode step: the state read by every query head and the state update,
/// `2·b·D·(e+1)·(hq + hk)` with the ideal `D = d(d+1)/2` (as the forward count).
pub fn decode_flops(b: usize, hq: usize, hk: usize, d: usize) -> f64 {
    let big_d = (d * (d + 1) / 2) as f64;
    2.0 * b as f64 * big_d * (d as f64 + 1.0) * (hq + hk) as f64
}

/// Runs the benchmark on `B`; prints a table and returns the rows (written to `args.out`).
///
/// # Errors
/// The op's errors, or the CSV file's.
pub fn bench<B: RetentionBackend>(
    dev: &B::Device,
    args: &BenchArgs,
) -> Result<Vec<BenchRow>, CliError> {
    let (hq, hk, d) = args.shape.heads();
    let n_fwd = args.seqs.len() * (args.impls.len() + usize::from(args.backward));
    let n_dec = args.decode_batches.len() * args.decode_contexts.len();
    let bar = ProgressBar::new((n_fwd + n_dec) as u64).with_style(
        ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    let opts = RetentionOptions::new()
        .with_chunk_size(Some(args.chunk))
        .with_kernels(args.kernels);
    let scale = 1.0 / (d as f64).sqrt();
    for &t in &args.seqs {
        let b = (args.tokens / t).max(1);
        let (q, k, v, g) = inputs::<B>(b, t, (hq, hk, d), args.dtype, dev);
        // fwd+bwd counts 3× the forward FLOPs, as the anchor script does
        let fwd_row = |imp: BenchImpl, mode: &'static str, passes: f64, ms: f64| BenchRow {
            implementation: imp.name(),
            mode,
            shape: args.shape.name(),
            b,
            t,
            hq,
            hk,
            d,
            chunk: (t > args.chunk).then_some(args.chunk),
            ms,
            flops: passes * forward_flops(b, t, hq, hk, d, args.chunk),
            tokens: b * t,
        };
        for &imp in &args.impls {
            bar.set_message(format!("{} fwd t={t} b={b}", imp.name()));
            let run = || match imp {
                BenchImpl::BurnRetention => {
                    power_retention(q.clone(), k.clone(), v.clone(), Some(g.clone()), &opts)
                        .map(drop)
                }
                BenchImpl::BurnReference => {
                    if t <= args.chunk {
                        drop(reference::attention_form(
                            q.clone(),
                            k.clone(),
                            v.clone(),
                            Some(g.clone()),
                            2,
                            scale,
                        ));
                    } else {
                        drop(reference::chunked_form(
                            q.clone(),
                            k.clone(),
                            v.clone(),
                            Some(g.clone()),
                            None,
                            args.chunk,
                            2,
                            scale,
                        ));
                    }
                    Ok(())
                }
            };
            run()?;
            let ms =
                time_ms_per_call::<B>(dev, args.warmup, args.reps, args.calls_per_sync, || {
                    let _ = run();
                });
            rows.push(fwd_row(imp, "fwd", 1.0, ms));
            bar.inc(1);
        }
        if args.backward {
            bar.set_message(format!("burn_retention fwd+bwd t={t} b={b}"));
            let ms = time_fwd_bwd::<B>(dev, args, b, t, (hq, hk, d), &opts)?;
            rows.push(fwd_row(BenchImpl::BurnRetention, "fwd+bwd", 3.0, ms));
            bar.inc(1);
        }
    }
    for &b in &args.decode_batches {
        for &ctx in &args.decode_contexts {
            bar.set_message(format!("decode b={b} context={ctx}"));
            let state = prefill_state::<B>(b, ctx, (hq, hk, d), args, &opts, dev)?;
            let (q, k, v, g) = inputs::<B>(b, 1, (hq, hk, d), args.dtype, dev);
            // each step carries the state forward, as a decoder does: the state a step reads
            // is the one the previous step wrote (the prefill's state, repeated over the
            // batch, is a strided view that a step would otherwise copy every call)
            let ms = time_carried::<B, _>(dev, args, DECODE_CALLS, state.clone(), |s| {
                let (_, next) = power_retention_step(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(g.clone()),
                    s,
                    &opts,
                )?;
                Ok(next)
            })?;
            let decode_row = |mode: &'static str, chunk: Option<usize>, ms: f64| BenchRow {
                implementation: BenchImpl::BurnRetention.name(),
                mode,
                shape: args.shape.name(),
                b,
                t: ctx,
                hq,
                hk,
                d,
                chunk,
                ms,
                flops: decode_flops(b, hq, hk, d),
                tokens: b,
            };
            rows.push(decode_row("decode", None, ms));
            bar.inc(1);
            if args.fold_every > 0 {
                // steps carry the state forward, so the window fills and is absorbed in turn;
                // runs of a multiple of the window average the absorptions in
                let calls = DECODE_CALLS.div_ceil(args.fold_every) * args.fold_every;
                let window = DecodeState::new(state.clone(), args.fold_every)?;
                let ms = time_carried::<B, _>(dev, args, calls, window, |s| {
                    let (_, next) = power_retention_decode(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        Some(g.clone()),
                        s,
                        &opts,
                    )?;
                    Ok(next)
                })?;
                rows.push(decode_row("decode_window", Some(args.fold_every), ms));
            }
        }
    }
    if let Some(n) = args.matmul {
        bar.set_message(format!("burn matmul {n}³"));
        rows.push(time_matmul::<B>(dev, args, n));
    }
    bar.finish_and_clear();
    print_table(&rows);
    let anchors = match &args.compare {
        Some(script) => run_anchors(script, args)?,
        None => Vec::new(),
    };
    // the anchors' rows, read once for the ratios and the charts
    let anchor_rows = parse_rows(
        &std::iter::once(CSV_HEADER)
            .chain(anchors.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    if !anchor_rows.is_empty() {
        print_ratios(&rows, &anchor_rows);
    }
    if let Some(path) = &args.out {
        let io = |source| CliError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::create(path).map_err(io)?;
        writeln!(file, "{CSV_HEADER}").map_err(io)?;
        for row in &rows {
            writeln!(file, "{}", row.csv()).map_err(io)?;
        }
        for line in &anchors {
            writeln!(file, "{line}").map_err(io)?;
        }
    }
    if let Some(dir) = &args.plot {
        let all: Vec<PlotRow> = rows.iter().map(PlotRow::from).chain(anchor_rows).collect();
        for path in plot_rows(&all, dir)? {
            println!("{}", path.display());
        }
    }
    Ok(rows)
}

/// A `burn_matmul` row: the median time of an `n × n` by `n × n` matmul in the bench dtype
/// (`2n³` FLOPs), the ceiling the op's TFLOP/s compare with.
fn time_matmul<B: Backend>(dev: &B::Device, args: &BenchArgs, n: usize) -> BenchRow {
    let a = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), dev).cast(args.dtype);
    let b = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), dev).cast(args.dtype);
    let ms = time_ms_per_call::<B>(dev, args.warmup, args.reps, args.calls_per_sync, || {
        drop(a.clone().matmul(b.clone()));
    });
    BenchRow {
        implementation: "burn_matmul",
        mode: "matmul",
        shape: args.shape.name(),
        b: 1,
        t: n,
        hq: 0,
        hk: 0,
        d: 0,
        chunk: None,
        ms,
        flops: 2.0 * (n as f64).powi(3),
        tokens: 0,
    }
}

/// Runs the anchor script at this benchmark's shape, sequence lengths, tokens and chunk (modes
/// `fwd`, plus `fwd+bwd` with `backward`), passing its output through; returns its CSV rows
/// (lines of the anchor schema other than the header; comments start with `#`).
///
/// # Errors
/// [`CliError::Io`] when `python3` cannot start; [`CliError::Device`] when the script fails.
fn run_anchors(script: &std::path::Path, args: &BenchArgs) -> Result<Vec<String>, CliError> {
    use std::io::BufRead as _;
    let ts: Vec<String> = args.seqs.iter().map(usize::to_string).collect();
    let modes = if args.backward { "fwd,fwd+bwd" } else { "fwd" };
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .args(["--shape", args.shape.name()])
        .args(["--tokens", &args.tokens.to_string()])
        .args(["--chunk", &args.chunk.to_string()])
        .args(["--ts", &ts.join(",")])
        .args(["--modes", modes])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| CliError::Io {
            path: format!("python3 {}", script.display()),
            source,
        })?;
    let mut rows = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line.map_err(|source| CliError::Io {
                path: script.display().to_string(),
                source,
            })?;
            println!("{line}");
            // a row has the schema's 12 fields with a number of milliseconds (a failed
            // measurement prints `ERR …` there)
            let fields: Vec<&str> = line.split(',').collect();
            if !line.starts_with('#')
                && fields.len() == 12
                && fields.get(9).is_some_and(|ms| ms.parse::<f64>().is_ok())
            {
                rows.push(line);
            }
        }
    }
    let status = child.wait().map_err(|source| CliError::Io {
        path: script.display().to_string(),
        source,
    })?;
    if !status.success() {
        return Err(CliError::Device(format!(
            "anchor script {} exited with {status}",
            script.display()
        )));
    }
    Ok(rows)
}

/// The state after a prefill of `context` random tokens per sequence (prefilled a sequence at
/// a time in pieces of at most 64k tokens, so long contexts fit).
fn prefill_state<B: RetentionBackend>(
    b: usize,
    context: usize,
    heads: (usize, usize, usize),
    args: &BenchArgs,
    opts: &RetentionOptions,
    dev: &B::Device,
) -> Result<RetentionState<B>, CliError> {
    // one sequence's prefill, its state repeated over the batch: a batch of long prefills
    // would hold `b` times the chunk states at once (tens of GB at Brumby heads)
    let piece = context.min(65_536);
    let (q, k, v, g) = inputs::<B>(1, piece, heads, args.dtype, dev);
    let mut state = None;
    let mut done = 0;
    while done < context {
        let (_, s) = power_retention_with_state(
            q.clone(),
            k.clone(),
            v.clone(),
            Some(g.clone()),
            state,
            opts,
        )?;
        state = Some(s);
        done += piece;
    }
    let state = state.ok_or_else(|| CliError::Device("empty prefill".into()))?;
    Ok(RetentionState {
        state: state.state.repeat_dim(0, b),
        key_sum: state.key_sum.repeat_dim(0, b),
    })
}

/// Our time against each anchor's at the same mode, shape and length, from this run's rows:
/// `speed-up = anchor ms / our ms` (above 1: ours is faster).
fn print_ratios(ours: &[BenchRow], anchor_rows: &[PlotRow]) {
    println!(
        "\n{:<8} {:<7} {:>7} {:>10} {:>22} {:>22}",
        "mode", "shape", "t", "ours ms", "Manifest ms (speed-up)", "SDPA ms (speed-up)"
    );
    for r in ours.iter().filter(|r| r.implementation == "burn_retention") {
        let anchor = |name: &str| {
            anchor_rows
                .iter()
                .rev()
                .find(|a| {
                    a.implementation == name && a.mode == r.mode && a.shape == r.shape && a.t == r.t
                })
                .map_or("-".to_string(), |a| {
                    format!("{:.4} ({:.2}×)", a.ms, a.ms / r.ms)
                })
        };
        println!(
            "{:<8} {:<7} {:>7} {:>10.4} {:>22} {:>22}",
            r.mode,
            r.shape,
            r.t,
            r.ms,
            anchor("retention_triton"),
            anchor("sdpa")
        );
    }
}

fn print_table(rows: &[BenchRow]) {
    println!(
        "{:<15} {:<13} {:<7} {:>4} {:>7} {:>6} {:>10} {:>14} {:>9}",
        "impl", "mode", "shape", "b", "t", "chunk", "ms", "tokens/s", "TFLOP/s"
    );
    for r in rows {
        println!(
            "{:<15} {:<13} {:<7} {:>4} {:>7} {:>6} {:>10.4} {:>14.0} {:>9.1}",
            r.implementation,
            r.mode,
            r.shape,
            r.b,
            r.t,
            r.chunk.map_or("-".to_string(), |c| c.to_string()),
            r.ms,
            r.tokens as f64 / r.ms * 1e3,
            r.flops / r.ms / 1e9
        );
    }
}
