//! `retention generate --latency-at`: the time of one generated token against the context
//! behind it, for a checkpoint's attention layers (a key/value cache that grows with the
//! context) and for their conversion to power retention (a state of fixed size).

use std::time::Instant;

use retention::RetentionBackend;
use retention_models::{LlamaModel, MixerKind, ModelError, Pretrained};

use crate::CliError;
use crate::bench::CSV_HEADER;
use crate::bench_plot::{parse_rows, plot_rows};
use crate::generate::GenerateArgs;

/// Untimed steps before the timed ones at each context.
pub const WARMUP_STEPS: usize = 2;

/// One measured context.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyRow {
    /// `attention` or `power_retention`.
    pub mixer: &'static str,
    /// Tokens in the cache when the timed steps began.
    pub context: usize,
    /// Median milliseconds per generated token (the whole model: every block, the head, the
    /// logits read back to the host).
    pub ms: f64,
    /// Bytes of the model's cache at that context.
    pub cache_bytes: usize,
}

impl LatencyRow {
    /// The row in the benchmark CSV schema (`impl,mode,shape,b,t,hq,hk,d,chunk,ms,
    /// tokens_per_s,tflops`, mode `generate`, no FLOP count).
    pub fn csv(&self, shape: &str, heads: (usize, usize, usize), chunk: Option<usize>) -> String {
        let (hq, hk, d) = heads;
        format!(
            "{},generate,{shape},1,{},{hq},{hk},{d},{},{:.4},{:.1},nan",
            self.mixer,
            self.context,
            chunk.map_or("-".to_string(), |c| c.to_string()),
            self.ms,
            1e3 / self.ms
        )
    }
}

/// Reads `contexts` (ascending) tokens into a cache of `model` (a fixed pseudo-random token
/// sequence: a step's cost does not depend on which tokens) and times `steps` generated tokens
/// after each, continuing one cache from context to context (a row's context is the cache's
/// tokens when its timed steps began: the previous row's steps may go past the next context
/// asked for); `on_row` sees each row when it is measured.
///
/// # Errors
/// [`ModelError::Config`] when `steps` is 0 or the contexts are not ascending; the model's
/// errors (a context past its rotary table: see [`LlamaModel::with_max_seq`]).
pub fn measure_latency<B: RetentionBackend>(
    model: &LlamaModel<B>,
    mixer: &'static str,
    vocab: usize,
    contexts: &[usize],
    steps: usize,
    device: &B::Device,
    mut on_row: impl FnMut(&LatencyRow),
) -> Result<Vec<LatencyRow>, ModelError> {
    if steps == 0 || vocab == 0 {
        return Err(ModelError::Config(
            "the latency needs at least one timed step and a vocabulary".into(),
        ));
    }
    if contexts.first() == Some(&0) || contexts.windows(2).any(|w| w[0] >= w[1]) {
        return Err(ModelError::Config(format!(
            "contexts must be ascending and at least 1, got {contexts:?}"
        )));
    }
    let token = |i: usize| ((i * 7919 + 13) % vocab) as u32;
    let mut cache = model.new_cache();
    let mut rows = Vec::with_capacity(contexts.len());
    for &context in contexts {
        // (the timed steps of the last context may have gone past this one)
        let fill: Vec<u32> = (cache.tokens()..context).map(token).collect();
        if !fill.is_empty() {
            model.prefill(&fill, &mut cache, device)?;
        }
        let context = cache.tokens();
        let mut times = Vec::with_capacity(steps);
        for i in 0..WARMUP_STEPS + steps {
            let start = Instant::now();
            // the logits come back to the host: the step is complete when this returns
            model.step(token(context + i), &mut cache, device)?;
            if i >= WARMUP_STEPS {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        let row = LatencyRow {
            mixer,
            context,
            ms: times[times.len() / 2],
            cache_bytes: cache.size_bytes(),
        };
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// `retention generate --latency-at`: loads the checkpoint on `dev` and times a generated
/// token after each context of `args.latency_at`, with the checkpoint's attention and then
/// converted to power retention; prints a table, writes the CSV rows to `args.out` and the
/// chart to `args.plot`.
///
/// # Errors
/// [`CliError::Model`] when the checkpoint cannot be loaded or a step fails;
/// [`CliError::Io`] and [`CliError::Plot`] when the CSV or the chart cannot be written.
pub fn latency_curve<B: RetentionBackend>(
    dev: &B::Device,
    args: &GenerateArgs,
) -> Result<Vec<LatencyRow>, CliError> {
    let Pretrained {
        model,
        config,
        name,
        ..
    } = Pretrained::<B>::open(&args.model, dev)?;
    if config.mixer != MixerKind::Attention {
        return Err(CliError::Input(format!(
            "{}: the latency curve starts from an attention model and converts it itself",
            args.model.display()
        )));
    }
    let vocab = config.vocab_size;
    let shape: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let heads = model
        .heads()
        .ok_or_else(|| CliError::Input("the checkpoint's blocks tell no head layout".into()))?;
    let longest = args.latency_at.iter().max().copied().unwrap_or(0);
    // room for the timed and warm-up steps past the longest context
    let mut model = model.with_max_seq(longest + args.latency_steps + WARMUP_STEPS + 1, dev);
    let mut lines = vec![CSV_HEADER.to_string()];
    println!("| mixer | context | ms / token | tokens / s | cache |");
    println!("|---|---|---|---|---|");
    let show = |r: &LatencyRow| {
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.1} MB |",
            r.mixer,
            r.context,
            r.ms,
            1e3 / r.ms,
            r.cache_bytes as f64 / 1e6
        );
    };
    let mut rows = Vec::new();
    for (mixer, chunk) in [("attention", None), ("power_retention", Some(args.chunk))] {
        if chunk.is_some() {
            model = model.into_retention(args.chunk, args.rotary, dev)?;
        }
        let measured = measure_latency(
            &model,
            mixer,
            vocab,
            &args.latency_at,
            args.latency_steps,
            dev,
            show,
        )?;
        lines.extend(measured.iter().map(|r| r.csv(&shape, heads, chunk)));
        rows.extend(measured);
    }
    let text = lines.join("\n") + "\n";
    if let Some(out) = &args.out {
        std::fs::write(out, &text).map_err(|source| CliError::Io {
            path: out.display().to_string(),
            source,
        })?;
    }
    if let Some(dir) = &args.plot {
        for path in plot_rows(&parse_rows(&text)?, dir)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use retention_models::LlamaConfig;

    use super::*;

    #[test]
    fn rows_per_context_with_growing_and_fixed_caches() {
        let dev = Default::default();
        let model = LlamaConfig::new(40, 32, 2, 4, 2, 48)
            .with_max_seq(64)
            .init::<NdArray>(&dev)
            .expect("builds");
        let contexts = [4, 9, 20];
        let attention =
            measure_latency(&model, "attention", 40, &contexts, 2, &dev, |_| ()).expect("runs");
        // each context continues the last one's cache, the timed steps included
        let at: Vec<usize> = attention.iter().map(|r| r.context).collect();
        assert_eq!(at, [4, 9, 20]);
        assert!(attention.iter().all(|r| r.ms > 0.0));
        assert!(attention[2].cache_bytes > attention[0].cache_bytes);
        let converted = model.into_retention(8, true, &dev).expect("converts");
        let retention = measure_latency(
            &converted,
            "power_retention",
            40,
            &contexts,
            2,
            &dev,
            |_| (),
        )
        .expect("runs");
        assert_eq!(retention[0].cache_bytes, retention[2].cache_bytes);
        let line = retention[1].csv("tiny", (4, 2, 8), Some(8));
        assert!(
            line.starts_with("power_retention,generate,tiny,1,9,4,2,8,8,"),
            "{line}"
        );
        // descending contexts and no steps are refused
        for (contexts, steps) in [(&[9, 4][..], 1), (&[4][..], 0)] {
            assert!(matches!(
                measure_latency(&converted, "x", 40, contexts, steps, &dev, |_| ()),
                Err(ModelError::Config(_))
            ));
        }
    }
}
