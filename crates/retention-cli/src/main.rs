//! `retention`: demo, apply, train, convert, retrain, generate, plot, and (with kernels) selftest and
//! bench.

use clap::{Parser, Subcommand};
use retention_cli::apply::{ApplyArgs, apply};
use retention_cli::bench::{BenchArgs, BenchImpl, BenchShape, bench};
use retention_cli::bench_plot::{parse_rows, plot_rows};
use retention_cli::context_bench::{ContextBenchArgs, context_bench};
use retention_cli::convert::{ConvertArgs, convert};
use retention_cli::demo::{DemoArgs, demo};
use retention_cli::drift::{DriftArgs, drift};
use retention_cli::generate::{GenerateArgs, generate};
use retention_cli::generate_latency::latency_curve;
use retention_cli::numerics::{NumericsArgs, numerics};
use retention_cli::retrain::{RetrainArgs, retrain};
use retention_cli::selftest::selftest;
use retention_cli::train::{TrainArgs, train};
use retention_cli::{BackendChoice, CliError, DtypeChoice, KernelsChoice, with_backend};

#[derive(Parser)]
#[command(
    name = "retention",
    version,
    about = "Power retention for Burn: demo and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the op three ways on random data and shows the constant cost per token.
    Demo {
        /// Backend to run on.
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        /// Tokens in the agreement check.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Largest context in the timing table.
        #[arg(long, default_value_t = 8192)]
        context: usize,
        /// Timed runs per table cell.
        #[arg(long, default_value_t = 15)]
        reps: usize,
    },
    /// Applies the op to q, k, v (and log_g) read from a safetensors file.
    Apply {
        /// Input safetensors file with `q`, `k`, `v` ([b, t, h, d]) and optional `log_g` ([b, t, h]).
        #[arg(long)]
        input: String,
        /// Output safetensors file (`out`, and with --final-state `state` and `key_sum`).
        #[arg(long)]
        output: String,
        /// Degree p (even).
        #[arg(long, default_value_t = 2)]
        degree: usize,
        /// Chunk size; absent = attention form.
        #[arg(long)]
        chunk: Option<usize>,
        /// Scale σ; absent (or 0) = 1/√head_dim.
        #[arg(long)]
        scale: Option<f64>,
        /// Backend to run on.
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        /// Also write the final state.
        #[arg(long)]
        final_state: bool,
    },
    /// Checks the backend's forms against an f64 oracle on randomized shapes (pass/fail table).
    Selftest {
        /// Backend to check.
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        /// Input dtypes (repeatable); default: f32, f16 and bf16 on CUDA/ROCm, f32 and f16 on
        /// wgpu, f64 and f32 on CPU backends.
        #[arg(long, value_enum)]
        dtype: Vec<DtypeChoice>,
        /// Randomized cases per dtype.
        #[arg(long, default_value_t = 200)]
        cases: u64,
        /// Also check gradients (the backward pass) against the f64 reference.
        #[arg(long)]
        grad: bool,
        /// Kernel family of the CubeCL backends (`cmma`: the HIP/Vulkan kernels, on CUDA too).
        #[arg(long, value_enum, default_value = "auto")]
        kernels: KernelsChoice,
    },
    /// Long-sequence numerics: one sequence of a million tokens under extreme gates in f32,
    /// f16 and bf16 (non-finite values, half against f32 kernels, f32 kernels against the f64
    /// reference at both ends, gradients); a table, and the rows as CSV.
    Numerics {
        /// Backend to check (kernel backends; the reference on CPU backends is slow at 1M).
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        #[command(flatten)]
        args: NumericsArgs,
    },
    /// Decode drift: many recurrent steps after a prefill, with an f32 or a bf16 state,
    /// against the chunked form at the same positions (the error per block of steps).
    Drift {
        /// Backend to run on.
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        #[command(flatten)]
        args: DriftArgs,
    },
    /// Context parallelism: one long sequence split across the devices of this machine, each
    /// slice's state handed to the next, against the same sequence on one device
    /// (`impl,mode,gpus,t,ms,throughput` rows).
    ContextBench {
        /// Backend to run on (its devices 0, 1, …).
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        #[command(flatten)]
        args: ContextBenchArgs,
    },
    /// Draws benchmark rows (the CSV of `bench` and the anchor script) as charts (SVG, and a
    /// PNG copy of each): time, tokens/s and TFLOP/s against the sequence length, decode
    /// latency against the context.
    Plot {
        /// The CSV (e.g. docs/bench/h200.csv).
        #[arg(long)]
        csv: std::path::PathBuf,
        /// Directory for the charts (`<shape>-<chart>.svg` and `.png`).
        #[arg(long, default_value = "docs/img")]
        out: std::path::PathBuf,
    },
    /// Draws runs' loss curves (their `losses.csv`) in one SVG, with the pretrained model's
    /// held-out loss and the +5 % bar (a recovery chart from runs made in several sittings).
    PlotLosses {
        /// A run as `LABEL=PATH/TO/losses.csv` (repeatable).
        #[arg(long = "run", required = true)]
        runs: Vec<retention_cli::plot_losses::LossRun>,
        /// The pretrained model's held-out loss (a run's `recovery.json`, `original`).
        #[arg(long)]
        original: Option<f64>,
        /// The chart's title.
        #[arg(long, default_value = "held-out loss")]
        title: String,
        /// The SVG to write.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Trains the decoder language model on a real corpus (retention, attention, or both) and
    /// draws their loss curves (`<out>/loss.svg`).
    Train {
        /// Backend to train on (under Autodiff).
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        #[command(flatten)]
        args: TrainArgs,
    },
    /// Generates text with a Llama-family GGUF checkpoint (e.g. SmolLM2-135M-Instruct): the
    /// text streams to stdout, the statistics go to stderr.
    Generate {
        /// Backend to run on.
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        #[command(flatten)]
        args: GenerateArgs,
    },
    /// Converts a pretrained Llama-family GGUF checkpoint to power retention (no retraining)
    /// and saves it as a checkpoint directory.
    Convert {
        /// Backend to convert on.
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        #[command(flatten)]
        args: ConvertArgs,
    },
    /// Converts a pretrained Llama-family GGUF checkpoint to power retention and retrains it
    /// on a corpus: held-out loss before, right after and during (the recovery curve).
    Retrain {
        /// Backend to train on (under Autodiff).
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        #[command(flatten)]
        args: RetrainArgs,
    },
    /// Times the forward pass and the decode step (CSV in the anchor benchmark's schema).
    Bench {
        /// Backend to time.
        #[arg(long, value_enum, default_value = "ndarray")]
        backend: BackendChoice,
        /// Head shape: mha64 (8/8 heads, d=64) or brumby (40/8 heads, d=128).
        #[arg(long, value_enum, default_value = "mha64")]
        shape: BenchShape,
        /// Sequence lengths of the forward rows, comma-separated (the flag alone: none).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "1024,2048,4096,8192,16384,32768,65536",
            num_args = 0..
        )]
        seqs: Vec<usize>,
        /// Tokens per call (batch = tokens / t).
        #[arg(long, default_value_t = 65_536)]
        tokens: usize,
        /// Chunk size (t ≤ chunk runs the attention form).
        #[arg(long, default_value_t = 1024)]
        chunk: usize,
        /// Timed runs (median reported).
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Implementations, comma-separated.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "burn-retention"
        )]
        impls: Vec<BenchImpl>,
        /// Forward calls per timed run, one device sync per run (the time is divided by it:
        /// the cost of a call among others, not of a host round trip).
        #[arg(long, default_value_t = 5)]
        calls_per_sync: usize,
        /// Also time forward + backward (`fwd+bwd` rows: gradients of q, k, v and the gates).
        #[arg(long)]
        backward: bool,
        /// Decode-step batch sizes, comma-separated (the flag alone: no decode rows).
        #[arg(long, value_delimiter = ',', default_value = "1,32", num_args = 0..)]
        decode_batches: Vec<usize>,
        /// Contexts behind the decode state, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1024,65536")]
        decode_contexts: Vec<usize>,
        /// Tokens a deferred-rewrite decode state keeps before absorbing them (rows
        /// `decode_window`; 0: none).
        #[arg(long, default_value_t = 16)]
        fold_every: usize,
        /// Input dtype.
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DtypeChoice,
        /// CSV output file.
        #[arg(long)]
        out: Option<String>,
        /// Also time an N × N matmul through Burn in the input dtype (a `burn_matmul` row).
        #[arg(long, value_name = "N")]
        matmul: Option<usize>,
        /// After our rows, run the anchor script (Manifest's Triton kernels, SDPA, torch's
        /// matmul) at the same shape, lengths and modes; its rows join the table and the CSV.
        #[arg(long)]
        compare: bool,
        /// The anchor script `--compare` runs with python3.
        #[arg(long, default_value = "benches/anchors/anchor_bench.py")]
        anchor_script: std::path::PathBuf,
        /// Also draw this run's rows as SVG charts into this directory (as `retention plot`).
        #[arg(long, value_name = "DIR")]
        plot: Option<std::path::PathBuf>,
        /// Kernel family of the CubeCL backends (`cmma`: the HIP/Vulkan kernels, on CUDA too).
        #[arg(long, value_enum, default_value = "auto")]
        kernels: KernelsChoice,
    },
}

/// The input dtypes `backend` computes in: a half dtype on a CPU backend (or f64 on a GPU one)
/// gets an error naming these instead of a panic inside the backend.
fn check_dtype(backend: BackendChoice, dtype: DtypeChoice) -> Result<(), CliError> {
    let supported = match backend {
        BackendChoice::Ndarray | BackendChoice::Tch => vec![DtypeChoice::F64, DtypeChoice::F32],
        _ => default_dtypes(backend),
    };
    if supported.contains(&dtype) {
        return Ok(());
    }
    Err(CliError::UnsupportedDtype {
        backend: backend.name().to_string(),
        dtype: dtype.dtype(),
        supported: supported
            .iter()
            .map(|d| format!("{:?}", d.dtype()))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn default_dtypes(backend: BackendChoice) -> Vec<DtypeChoice> {
    match backend {
        BackendChoice::Cuda | BackendChoice::Rocm => {
            vec![DtypeChoice::F32, DtypeChoice::F16, DtypeChoice::Bf16]
        }
        BackendChoice::Wgpu => vec![DtypeChoice::F32, DtypeChoice::F16],
        BackendChoice::Ndarray | BackendChoice::Tch => vec![DtypeChoice::F64, DtypeChoice::F32],
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Demo {
            backend,
            seq,
            context,
            reps,
        } => {
            let args = DemoArgs { seq, context, reps };
            with_backend!(backend, |Bk, dev| demo::<Bk>(&dev, backend.name(), &args))
        }
        Command::Apply {
            input,
            output,
            degree,
            chunk,
            scale,
            backend,
            final_state,
        } => {
            let args = ApplyArgs {
                input,
                output,
                degree,
                chunk,
                scale,
                final_state,
            };
            let summary = with_backend!(backend, |Bk, dev| apply::<Bk>(&dev, &args))?;
            println!(
                "wrote {} to {} (out shape {:?})",
                summary.written.join(", "),
                args.output,
                summary.out_shape
            );
            Ok(())
        }
        Command::Selftest {
            backend,
            dtype,
            cases,
            grad,
            kernels,
        } => {
            let choices = if dtype.is_empty() {
                default_dtypes(backend)
            } else {
                dtype
            };
            for &choice in &choices {
                check_dtype(backend, choice)?;
            }
            let dtypes: Vec<_> = choices.into_iter().map(DtypeChoice::dtype).collect();
            with_backend!(backend, |Bk, dev| selftest::<Bk>(
                &dev,
                backend.name(),
                &dtypes,
                kernels.choice(),
                cases,
                grad
            )
            .map(drop))
        }
        Command::Numerics { backend, args } => {
            for &choice in &args.dtypes {
                check_dtype(backend, choice)?;
            }
            with_backend!(backend, |Bk, dev| numerics::<Bk>(&dev, &args).map(drop))
        }
        Command::ContextBench { backend, args } => {
            with_backend!(backend, |Bk, dev| context_bench::<Bk>(&dev, &args)
                .map(drop))
        }
        Command::Drift { backend, args } => {
            // a chart drawn from an earlier run's CSV runs nothing
            for &choice in args.states.iter().filter(|_| args.from_csv.is_none()) {
                check_dtype(backend, choice)?;
            }
            with_backend!(backend, |Bk, dev| drift::<Bk>(&dev, &args).map(drop))
        }
        Command::PlotLosses {
            runs,
            original,
            title,
            out,
        } => {
            retention_cli::plot_losses::plot_loss_runs(&runs, original, &title, &out)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Plot { csv, out } => {
            let text = std::fs::read_to_string(&csv).map_err(|source| CliError::Io {
                path: csv.display().to_string(),
                source,
            })?;
            for path in plot_rows(&parse_rows(&text)?, &out)? {
                println!("{}", path.display());
            }
            if !retention_cli::chart_png::has_fonts() {
                eprintln!(
                    "no system font found: the PNG copies carry no text (Debian: apt-get install fonts-dejavu-core)"
                );
            }
            Ok(())
        }
        Command::Generate { backend, args } => {
            if args.latency_at.is_empty() {
                with_backend!(backend, |Bk, dev| generate::<Bk>(&dev, &args).map(drop))
            } else {
                with_backend!(backend, |Bk, dev| latency_curve::<Bk>(&dev, &args)
                    .map(drop))
            }
        }
        Command::Convert { backend, args } => {
            with_backend!(backend, |Bk, dev| convert::<Bk>(&dev, &args).map(drop))
        }
        Command::Retrain { backend, args } => {
            with_backend!(backend, |Bk, dev| retrain::<Bk>(&dev, &args).map(drop))
        }
        Command::Train { backend, args } => {
            args.device_indices(backend.name())?;
            with_backend!(backend, |Bk, dev| train::<Bk>(&dev, &args).map(drop))
        }
        Command::Bench {
            backend,
            shape,
            seqs,
            tokens,
            chunk,
            reps,
            warmup,
            calls_per_sync,
            backward,
            impls,
            decode_batches,
            decode_contexts,
            fold_every,
            dtype,
            out,
            matmul,
            compare,
            anchor_script,
            plot,
            kernels,
        } => {
            check_dtype(backend, dtype)?;
            let args = BenchArgs {
                shape,
                seqs,
                tokens,
                chunk,
                reps,
                warmup,
                calls_per_sync,
                backward,
                impls,
                decode_batches,
                decode_contexts,
                fold_every,
                out,
                dtype: dtype.dtype(),
                matmul,
                compare: compare.then_some(anchor_script),
                plot,
                kernels: kernels.choice(),
            };
            with_backend!(backend, |Bk, dev| bench::<Bk>(&dev, &args).map(drop))
        }
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
