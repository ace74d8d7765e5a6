//! `retention apply`: run the op on tensors from a safetensors file (interop with PyTorch).

use burn::tensor::{DType, Tensor, TensorData};
use retention::{
    RetentionBackend, RetentionOptions, check_shapes, power_retention, power_retention_with_state,
};

use crate::CliError;
use crate::tensor_file::{FileDtype, HostTensor, TensorFile, write};

/// Arguments of `retention apply`.
#[derive(Debug, Clone)]
pub struct ApplyArgs {
    /// Input file with `q`, `k`, `v` and optionally `log_g`.
    pub input: String,
    /// Output file; receives `out` (and `state`, `key_sum`).
    pub output: String,
    /// Degree `p`.
    pub degree: usize,
    /// Chunk size; `None` = attention form.
    pub chunk: Option<usize>,
    /// Scale; `None` (or 0, as in Manifest's API) = `1/√head_dim`.
    pub scale: Option<f64>,
    /// Also write the final state.
    pub final_state: bool,
}

/// What `apply` computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplySummary {
    /// Shape of `out`.
    pub out_shape: Vec<usize>,
    /// Names written.
    pub written: Vec<String>,
}

fn tensor<B: RetentionBackend, const N: usize>(t: HostTensor, dev: &B::Device) -> Tensor<B, N> {
    Tensor::from_data(TensorData::new(t.values, t.shape), (dev, DType::F32))
}

fn host<B: RetentionBackend, const N: usize>(
    t: Tensor<B, N>,
    dtype: FileDtype,
) -> Result<HostTensor, CliError> {
    let shape = t.dims().to_vec();
    let values = t
        .cast(DType::F32)
        .into_data()
        .into_vec::<f32>()
        .map_err(|e| CliError::Device(format!("{e:?}")))?;
    Ok(HostTensor {
        values,
        shape,
        dtype,
    })
}

/// The op's inputs as `retention apply` reads them from a file, their shapes checked.
#[derive(Debug, Clone)]
pub struct ApplyInputs {
    /// `[batch, seq, q_heads, head_dim]`.
    pub q: HostTensor,
    /// `[batch, seq, kv_heads, head_dim]`.
    pub k: HostTensor,
    /// `[batch, seq, kv_heads, value_dim]`.
    pub v: HostTensor,
    /// `[batch, seq, kv_heads]`, if the file has it.
    pub log_g: Option<HostTensor>,
}

impl ApplyInputs {
    /// Tensors `q`, `k`, `v` and, if present, `log_g` of `file`, checked against each other
    /// and `options` as the op checks them.
    ///
    /// # Errors
    /// Missing tensors, unsupported dtypes, and the op's shape errors (as
    /// [`CliError::Retention`]).
    pub fn read(file: &TensorFile, options: &RetentionOptions) -> Result<Self, CliError> {
        let (q, k, v) = (file.require("q")?, file.require("k")?, file.require("v")?);
        let log_g = file.get("log_g")?;
        check_shapes(
            &q.shape,
            &k.shape,
            &v.shape,
            log_g.as_ref().map(|g| g.shape.as_slice()),
            options,
        )?;
        Ok(Self { q, k, v, log_g })
    }
}

/// Reads `q`, `k`, `v` (`[b, t, h, d]`) and optional `log_g` (`[b, t, h]`) from
/// `args.input`, runs [`power_retention`] with Manifest's semantics for
/// `power_retention(Q, K, V, log_G, deg=p, scale=σ, chunk_size=c)`, and writes `out`
/// (`[b, t, hq, e]`, in the dtype of `q`) to `args.output`; with `final_state`, also `state`
/// (`[b, h, D, e]`) and `key_sum` (`[b, h, D]`) in f32, in this crate's exact feature layout
/// (`D = C(d+p−1, p)`, not Manifest's padded one).
///
/// # Errors
/// Unreadable or malformed files, missing tensors, unsupported dtypes, and every shape error
/// of the op (as [`CliError::Retention`]).
pub fn apply<B: RetentionBackend>(
    dev: &B::Device,
    args: &ApplyArgs,
) -> Result<ApplySummary, CliError> {
    let file = TensorFile::open(&args.input)?;
    let options = RetentionOptions::new()
        .with_degree(args.degree)
        .with_chunk_size(args.chunk)
        .with_scale(args.scale.filter(|s| *s != 0.0));
    let ApplyInputs { q, k, v, log_g } = ApplyInputs::read(&file, &options)?;
    let out_dtype = q.dtype;
    let (q, k, v) = (
        tensor::<B, 4>(q, dev),
        tensor::<B, 4>(k, dev),
        tensor::<B, 4>(v, dev),
    );
    let log_g = log_g.map(|g| tensor::<B, 3>(g, dev));
    let mut written = vec!["out".to_string()];
    let (out, state) = if args.final_state {
        let (y, s) = power_retention_with_state(q, k, v, log_g, None, &options)?;
        written.extend(["state".to_string(), "key_sum".to_string()]);
        (y, Some(s))
    } else {
        (power_retention(q, k, v, log_g, &options)?, None)
    };
    let out = host(out, out_dtype)?;
    let out_shape = out.shape.clone();
    match state {
        Some(s) => {
            let (st, ks) = (
                host(s.state, FileDtype::F32)?,
                host(s.key_sum, FileDtype::F32)?,
            );
            write(
                &args.output,
                &[("out", &out), ("state", &st), ("key_sum", &ks)],
            )?;
        }
        None => write(&args.output, &[("out", &out)])?,
    }
    Ok(ApplySummary { out_shape, written })
}
