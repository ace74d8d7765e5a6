//! `retention demo`: the three forms agree, and a decode step costs the same at any context.

use std::time::Instant;

use burn::tensor::{DType, Distribution, Tensor, backend::Backend};
use indicatif::{ProgressBar, ProgressStyle};
use retention::{
    RetentionBackend, RetentionOptions, RetentionState, power_retention, power_retention_step,
    power_retention_with_state,
};

use crate::CliError;

/// Arguments of `retention demo`.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    /// Sequence length of the agreement check.
    pub seq: usize,
    /// Largest context of the timing table (contexts double from 256).
    pub context: usize,
    /// Timed repetitions per table cell (median reported).
    pub reps: usize,
}

/// Sizes used by the demo: one sequence, 8 query heads over 2 key/value heads, head_dim 64.
const B: usize = 1;
const HQ: usize = 8;
const HK: usize = 2;
const D: usize = 64;

struct Inputs<Bk: Backend> {
    q: Tensor<Bk, 4>,
    k: Tensor<Bk, 4>,
    v: Tensor<Bk, 4>,
    g: Tensor<Bk, 3>,
}

impl<Bk: Backend> Inputs<Bk> {
    fn random(t: usize, dev: &Bk::Device) -> Self {
        let n = |shape: [usize; 4]| Tensor::random(shape, Distribution::Normal(0.0, 1.0), dev);
        // gates logsigmoid(4 + N(0,1)) ≈ 0.98
        let g = burn::tensor::activation::log_sigmoid(Tensor::random(
            [B, t, HK],
            Distribution::Normal(4.0, 1.0),
            dev,
        ));
        Self {
            q: n([B, t, HQ, D]),
            k: n([B, t, HK, D]),
            v: n([B, t, HK, D]),
            g,
        }
    }

    fn narrow(&self, from: usize, len: usize) -> Self {
        Self {
            q: self.q.clone().narrow(1, from, len),
            k: self.k.clone().narrow(1, from, len),
            v: self.v.clone().narrow(1, from, len),
            g: self.g.clone().narrow(1, from, len),
        }
    }
}

fn host<Bk: Backend, const N: usize>(t: Tensor<Bk, N>) -> Vec<f64> {
    t.cast(DType::F64)
        .into_data()
        .into_vec::<f64>()
        .unwrap_or_default()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b
        .iter()
        .fold(0.0f64, |m, x| m.max(x.abs()))
        .max(f64::MIN_POSITIVE);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn median_us<Bk: Backend>(
    dev: &Bk::Device,
    reps: usize,
    mut f: impl FnMut(),
) -> Result<f64, CliError> {
    let sync = |dev| Bk::sync(dev).map_err(|e| CliError::Device(format!("{e:?}")));
    f(); // warm-up
    sync(dev)?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        f();
        sync(dev)?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Attention decode with a KV cache: the newest query against every cached key, cost ∝ context.
fn attention_decode<Bk: Backend>(
    q: Tensor<Bk, 4>,
    k: Tensor<Bk, 4>,
    v: Tensor<Bk, 4>,
    g: Tensor<Bk, 3>,
) -> Tensor<Bk, 4> {
    let [b, t, h, d] = k.dims();
    let r = HQ / h;
    let q = q.reshape([b, h, r, d]).mul_scalar(1.0 / (d as f64).sqrt());
    let scores = q.matmul(k.permute([0, 2, 3, 1])); // [b, h, r, t]
    // G_t − G_j = Σ_{s > j} a_s: reverse cumulative sum, excluding j
    let g = g.swap_dims(1, 2); // [b, h, t]
    let total = g.clone().sum_dim(2);
    let decay = (total - g.cumsum(2)).reshape([b, h, 1, t]);
    let logw = scores.powi_scalar(2).log() + decay;
    let w = (logw.clone() - logw.max_dim(3)).exp();
    let y = w.clone().matmul(v.swap_dims(1, 2)) / w.sum_dim(3);
    y.reshape([b, 1, HQ, d])
}

/// Runs the demo on backend `Bk` and prints its two tables.
///
/// # Errors
/// Only device failures; the inputs are generated valid.
pub fn demo<Bk: RetentionBackend>(
    dev: &Bk::Device,
    backend: &str,
    args: &DemoArgs,
) -> Result<(), CliError> {
    println!(
        "power retention demo: backend {backend}, batch {B}, {HQ} query heads over {HK} key/value heads, head_dim {D}, degree 2, gates on\n"
    );

    // 1. agreement of the three forms
    let t = args.seq.max(1);
    let x = Inputs::<Bk>::random(t, dev);
    let attention = RetentionOptions::new();
    let chunk = 64.min(t.max(2) / 2).max(1);
    let chunked = RetentionOptions::new().with_chunk_size(Some(chunk));
    let y_att = host(power_retention(
        x.q.clone(),
        x.k.clone(),
        x.v.clone(),
        Some(x.g.clone()),
        &attention,
    )?);
    let (y_chk, _) = power_retention_with_state(
        x.q.clone(),
        x.k.clone(),
        x.v.clone(),
        Some(x.g.clone()),
        None,
        &chunked,
    )?;
    let y_chk = host(y_chk);
    let bar = ProgressBar::new(t as u64).with_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} tokens")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("recurrent form");
    let mut state = RetentionState::<Bk>::zeros(B, HK, D, D, 2, DType::F32, dev);
    let mut y_rec = Vec::with_capacity(t * HQ * D);
    for i in 0..t {
        let s = x.narrow(i, 1);
        let (y, next) = power_retention_step(s.q, s.k, s.v, Some(s.g), state, &attention)?;
        state = next;
        y_rec.extend(host(y));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("agreement over {t} tokens (max |a − b| / max |b|, b = attention form):");
    println!(
        "  chunked form (chunk {chunk})   {:.2e}",
        max_rel(&y_chk, &y_att)
    );
    println!(
        "  recurrent form (token steps) {:.2e}\n",
        max_rel(&y_rec, &y_att)
    );

    // 2. cost per generated token as the context grows
    let mut contexts = vec![];
    let mut c = 256;
    while c <= args.context.max(256) {
        contexts.push(c);
        c *= 2;
    }
    let longest = *contexts.last().unwrap_or(&256);
    let x = Inputs::<Bk>::random(longest + 1, dev);
    let bar = ProgressBar::new(contexts.len() as u64).with_style(
        ProgressStyle::with_template("timing {bar:40} {pos}/{len} contexts")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let prefill = RetentionOptions::new().with_chunk_size(Some(256));
    let mut state: Option<RetentionState<Bk>> = None;
    let mut covered = 0;
    let mut rows = Vec::new();
    for &ctx in &contexts {
        // extend the state from `covered` to `ctx` tokens (prefill continues from the state)
        let s = x.narrow(covered, ctx - covered);
        let (_, next) =
            power_retention_with_state(s.q, s.k, s.v, Some(s.g), state.take(), &prefill)?;
        covered = ctx;
        let tok = x.narrow(ctx, 1);
        let step_us = median_us::<Bk>(dev, args.reps, || {
            let _ = power_retention_step(
                tok.q.clone(),
                tok.k.clone(),
                tok.v.clone(),
                Some(tok.g.clone()),
                next.clone(),
                &attention,
            );
        })?;
        let cache = x.narrow(0, ctx + 1);
        let attn_us = median_us::<Bk>(dev, args.reps, || {
            let _ = attention_decode(
                tok.q.clone(),
                cache.k.clone(),
                cache.v.clone(),
                cache.g.clone(),
            );
        })?;
        let kv_bytes = 2 * (ctx + 1) * HK * D * 4;
        rows.push((ctx, attn_us, step_us, kv_bytes, next.size_bytes()));
        state = Some(next);
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "time per generated token (median of {} runs, µs) as the context grows:",
        args.reps
    );
    println!(
        "{:>9} | {:>22} | {:>22} | {:>13} | {:>11}",
        "context", "attention + KV cache", "retention step", "KV cache", "state"
    );
    println!(
        "{:->9}-+-{:->22}-+-{:->22}-+-{:->13}-+-{:->11}",
        "", "", "", "", ""
    );
    for (ctx, attn, step, kv, st) in rows {
        println!(
            "{ctx:>9} | {attn:>19.1} µs | {step:>19.1} µs | {:>10.2} MB | {:>8.2} MB",
            kv as f64 / 1e6,
            st as f64 / 1e6
        );
    }
    println!(
        "\nThe retention step reads a fixed-size state: its cost and memory do not grow with the context."
    );
    Ok(())
}
