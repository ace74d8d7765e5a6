//! `retention context-bench`: one long sequence split across the devices of one machine
//! (context parallelism, [`power_retention_context_parallel`]) against the same sequence on one
//! device. Rows in the schema of `docs/bench/multigpu.csv`: `impl,mode,gpus,t,ms,throughput`
//! (`mode` = `context_parallel`, throughput in tokens/s; the 1-device row is the plain forward
//! with its final state).

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use retention::validation::{max_rel, to_vec};
use retention::{
    RetentionBackend, RetentionOptions, SequenceSlice, power_retention_context_parallel,
    power_retention_state, power_retention_with_state, to_device_synced,
};

use crate::backend_choice::devices_of;
use crate::bench::BenchShape;
use crate::{CliError, DtypeChoice};

/// Arguments of `retention context-bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct ContextBenchArgs {
    /// Head shape.
    #[arg(long, value_enum, default_value = "mha64")]
    pub shape: BenchShape,
    /// Sequence lengths (one sequence, batch 1), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "262144,524288,1048576")]
    pub seqs: Vec<usize>,
    /// Device counts, comma-separated (devices 0, 1, … of the backend).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub gpus: Vec<usize>,
    /// Chunk size.
    #[arg(long, default_value_t = 1024)]
    pub chunk: usize,
    /// Element type of the inputs.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DtypeChoice,
    /// Timed calls (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Untimed calls first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// CSV of the rows.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also time the parts of a multi-device call one by one, each followed by a sync of
    /// every device (`phase,...` lines on stdout): the first slice's state pass, its forward,
    /// the last slice's forward, a state's move to the next device, both forwards queued
    /// together (with and without flushes), and how long the call holds the host.
    #[arg(long)]
    pub phases: bool,
    /// Also compare each multi-device call's outputs and final state with one device's
    /// (largest error relative to the largest magnitude; `check,...` lines on stdout).
    #[arg(long)]
    pub check: bool,
}

/// One timed configuration.
#[derive(Debug, Clone)]
pub struct ContextRow {
    /// Devices the sequence was split across.
    pub gpus: usize,
    /// Tokens of the sequence.
    pub t: usize,
    /// Milliseconds per call (median).
    pub ms: f64,
}

impl ContextRow {
    /// The row in the CSV schema of `docs/bench/multigpu.csv`.
    pub fn csv(&self) -> String {
        format!(
            "burn_retention,context_parallel,{},{},{:.3},{:.0}",
            self.gpus,
            self.t,
            self.ms,
            self.t as f64 / (self.ms / 1e3)
        )
    }
}

/// Median milliseconds of `f` over `args.reps` runs (after `args.warmup`), every device synced
/// after each run.
fn median_ms<B: Backend>(
    devices: &[B::Device],
    args: &ContextBenchArgs,
    mut f: impl FnMut() -> Result<(), CliError>,
) -> Result<f64, CliError> {
    let mut run = || -> Result<f64, CliError> {
        let start = Instant::now();
        f()?;
        for device in devices {
            let _ = B::sync(device);
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..args.warmup {
        run()?;
    }
    let mut times = (0..args.reps.max(1))
        .map(|_| run())
        .collect::<Result<Vec<f64>, CliError>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The parts of one multi-device call, timed one by one (`--phases`).
fn time_phases<B: RetentionBackend>(
    slices: &[SequenceSlice<B>],
    devices: &[B::Device],
    opts: &RetentionOptions,
    args: &ContextBenchArgs,
) -> Result<(), CliError> {
    let (first, last) = match (slices.first(), slices.last()) {
        (Some(f), Some(l)) => (f.clone(), l.clone()),
        _ => return Ok(()),
    };
    // one slice's forward from no state
    let forward = |slice: &SequenceSlice<B>| {
        power_retention_with_state(
            slice.q.clone(),
            slice.k.clone(),
            slice.v.clone(),
            slice.log_g.clone(),
            None,
            opts,
        )
    };
    let state_ms = median_ms::<B>(devices, args, || {
        let s = power_retention_state(
            first.k.clone(),
            first.v.clone(),
            first.log_g.clone(),
            None,
            opts,
        )?;
        drop(s);
        Ok(())
    })?;
    println!("phase,state_pass_first,{state_ms:.3}");
    for (name, slice) in [("forward_first", &first), ("forward_last", &last)] {
        let ms = median_ms::<B>(devices, args, || {
            drop(forward(slice)?);
            Ok(())
        })?;
        println!("phase,{name},{ms:.3}");
    }
    // the two passes of one slice apart and together: the state pass keeping the chunk
    // contributions, the forward that reads them, both queued back to back (synced, and until
    // the host is free again)
    let prim4 = |x: &Tensor<B, 4>| x.clone().into_primitive().tensor();
    let gates = || first.log_g.clone().map(|g| g.into_primitive().tensor());
    let chunk = args.chunk.min(first.q.dims()[1].next_multiple_of(16));
    let keep = || {
        B::retention_chunked_state_keeping(prim4(&first.k), prim4(&first.v), gates(), chunk, opts)
    };
    let keep_ms = median_ms::<B>(devices, args, || {
        drop(keep());
        Ok(())
    })?;
    println!("phase,keep_pass_first,{keep_ms:.3}");
    let (_, _, kept) = keep();
    if let Some(kept) = kept {
        let from = |kept: retention::ChunkContributions<B>| {
            B::retention_chunked_from_contributions(
                prim4(&first.q),
                prim4(&first.k),
                prim4(&first.v),
                gates(),
                None,
                kept,
                chunk,
                opts,
            )
        };
        let from_ms = median_ms::<B>(devices, args, || {
            drop(from(kept.clone()));
            Ok(())
        })?;
        println!("phase,from_pass_first,{from_ms:.3}");
        drop(kept);
        let mut host = Vec::new();
        let both_ms = median_ms::<B>(devices, args, || {
            let start = Instant::now();
            let (_, _, kept) = keep();
            if let Some(kept) = kept {
                drop(from(kept));
            }
            host.push(start.elapsed().as_secs_f64() * 1e3);
            Ok(())
        })?;
        host.sort_by(f64::total_cmp);
        println!("phase,keep_then_from_first,{both_ms:.3}");
        println!(
            "phase,keep_then_from_first_host,{:.3}",
            host[host.len() / 2]
        );
    }
    let mut host = Vec::new();
    let forward_ms = median_ms::<B>(devices, args, || {
        let start = Instant::now();
        drop(forward(&first)?);
        host.push(start.elapsed().as_secs_f64() * 1e3);
        Ok(())
    })?;
    host.sort_by(f64::total_cmp);
    println!("phase,forward_first_again,{forward_ms:.3}");
    println!("phase,forward_first_host,{:.3}", host[host.len() / 2]);
    if slices.len() < 2 {
        return Ok(());
    }
    // the last slice's tokens on the first device: whether a difference between the two
    // slices' forwards is the devices' or the slices'
    let here = first.q.device();
    let moved = SequenceSlice {
        q: to_device_synced(last.q.clone(), &here)?,
        k: to_device_synced(last.k.clone(), &here)?,
        v: to_device_synced(last.v.clone(), &here)?,
        log_g: match &last.log_g {
            Some(g) => Some(to_device_synced(g.clone(), &here)?),
            None => None,
        },
    };
    let ms = median_ms::<B>(devices, args, || {
        drop(forward(&moved)?);
        Ok(())
    })?;
    println!("phase,forward_last_on_first_device,{ms:.3}");
    // the two forwards queued back to back, with and without a flush after each: whether the
    // devices overlap at all
    for flush in [true, false] {
        let both = median_ms::<B>(devices, args, || {
            let mut outs = Vec::with_capacity(2);
            for slice in [&first, &last] {
                outs.push(forward(slice)?);
                if flush {
                    B::retention_flush(&slice.q.device());
                }
            }
            drop(outs);
            Ok(())
        })?;
        println!("phase,forwards_first_and_last_flush_{flush},{both:.3}");
    }
    // how long the call holds the host (the syncs after it are left out)
    let mut host_only = Vec::new();
    for _ in 0..args.reps.max(1) {
        let start = Instant::now();
        let out = power_retention_context_parallel(slices.to_vec(), None, opts)?;
        host_only.push(start.elapsed().as_secs_f64() * 1e3);
        for device in devices {
            let _ = B::sync(device);
        }
        drop(out);
    }
    host_only.sort_by(f64::total_cmp);
    println!("phase,call_returns,{:.3}", host_only[host_only.len() / 2]);

    let state = power_retention_state(first.k.clone(), first.v.clone(), None, None, opts)?;
    let target = last.q.device();
    let move_ms = median_ms::<B>(devices, args, || {
        drop(state.clone().to_device(&target)?);
        Ok(())
    })?;
    println!("phase,state_move,{move_ms:.3}");
    Ok(())
}

/// Times [`power_retention_context_parallel`] at every length and device count; prints each
/// row as it is measured and writes the CSV if asked.
///
/// # Errors
/// A device count the backend does not have; the op's errors; the CSV's I/O errors.
pub fn context_bench<B: RetentionBackend>(
    dev: &B::Device,
    args: &ContextBenchArgs,
) -> Result<Vec<ContextRow>, CliError> {
    let (hq, hk, d) = args.shape.heads();
    let opts = RetentionOptions::new().with_chunk_size(Some(args.chunk));
    let dtype: DType = args.dtype.dtype();
    let mut rows = Vec::new();
    println!("impl,mode,gpus,t,ms,throughput");
    for &t in &args.seqs {
        let normal = |shape: [usize; 4]| {
            Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), dev).cast(dtype)
        };
        let (q, k, v) = (
            normal([1, t, hq, d]),
            normal([1, t, hk, d]),
            normal([1, t, hk, d]),
        );
        let g = burn::tensor::activation::log_sigmoid(Tensor::<B, 3>::random(
            [1, t, hk],
            Distribution::Normal(4.0, 1.0),
            dev,
        ))
        .cast(dtype);
        for &gpus in &args.gpus {
            let devices = devices_of::<B>(dev, &(0..gpus).collect::<Vec<_>>(), "--gpus")?;
            let slices = SequenceSlice::split(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(g.clone()),
                args.chunk,
                &devices,
            )?;
            let ms = median_ms::<B>(&devices, args, || {
                let (outputs, state) =
                    power_retention_context_parallel(slices.clone(), None, &opts)?;
                drop((outputs, state));
                Ok(())
            })?;
            let row = ContextRow { gpus, t, ms };
            println!("{}", row.csv());
            rows.push(row);
            if args.phases {
                time_phases::<B>(&slices, &devices, &opts, args)?;
            }
            if args.check && gpus > 1 {
                let (outputs, state) = power_retention_context_parallel(slices, None, &opts)?;
                let got = outputs
                    .into_iter()
                    .map(|y| to_device_synced(y, dev))
                    .collect::<Result<Vec<_>, _>>()?;
                let got = Tensor::cat(got, 1);
                let (want, want_state) = power_retention_with_state(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(g.clone()),
                    None,
                    &opts,
                )?;
                let output = max_rel(&to_vec(got), &to_vec(want));
                let state = max_rel(
                    &to_vec(state.to_device(dev)?.state),
                    &to_vec(want_state.state),
                );
                println!("check,{gpus},{t},output,{output:.3e},state,{state:.3e}");
            }
        }
    }
    if let Some(path) = &args.out {
        let mut text = String::from("impl,mode,gpus,t,ms,throughput\n");
        for row in &rows {
            text.push_str(&row.csv());
            text.push('\n');
        }
        std::fs::write(path, text).map_err(|source| CliError::Io {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(rows)
}
