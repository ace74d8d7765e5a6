//! `retention`: demo, apply, and (with kernels) selftest and bench.

use clap::{Parser, Subcommand};
use retention_cli::apply::{ApplyArgs, apply};
use retention_cli::demo::{DemoArgs, demo};
use retention_cli::{BackendChoice, CliError, with_backend};

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
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
