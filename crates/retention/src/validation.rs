//! Randomized validation against an independent `f64` oracle.
//!
//! The cases here drive both the kernel test suite and `retention selftest`, so a user
//! validating a new GPU runs exactly what CI runs. The oracle is written with plain loops in
//! `f64` on the host (no Burn ops), independent of every form it checks:
//! `y_i = Σ_{j≤i} w_ij v_j / Σ_{j≤i} w_ij`, `w_ij = (σ q_i·k_j)^p e^{G_i − G_j}`, and the state
//! `S = Σ_j e^{G_T − G_j} φ_K(k_j) v_jᵀ`, `z = Σ_j e^{G_T − G_j} φ_K(k_j)`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use burn::tensor::{DType, Tensor, TensorData, backend::Backend};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    DecodeState, KernelChoice, RetentionBackend, RetentionError, RetentionOptions, RetentionState,
    SympowLayout, power_retention, power_retention_decode, power_retention_step,
    power_retention_with_state,
};

/// Host-side inputs of one problem, `[b, t, heads, dim]` row-major.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Batch.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads.
    pub h: usize,
    /// Head dim of q and k.
    pub d: usize,
    /// Value dim.
    pub e: usize,
    /// `[b, t, hq, d]`.
    pub q: Vec<f64>,
    /// `[b, t, h, d]`.
    pub k: Vec<f64>,
    /// `[b, t, h, e]`.
    pub v: Vec<f64>,
    /// `[b, t, h]`.
    pub log_g: Option<Vec<f64>>,
}

/// How the log-gates are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gates {
    /// No gating.
    None,
    /// `logsigmoid(4 + N(0,1))`, gates ≈ 0.98 (as in Manifest's tests).
    Typical,
    /// `≈ −20`: only the current token survives.
    Strong,
    /// `≈ 0`: almost ungated.
    Weak,
}

/// One standard normal draw (Box–Muller).
pub fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// `n` standard normal draws.
pub fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| normal(rng)).collect()
}

impl Problem {
    /// Seeded random inputs.
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        seed: u64,
        b: usize,
        t: usize,
        hq: usize,
        h: usize,
        d: usize,
        e: usize,
        gates: Gates,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let q = randn(&mut rng, b * t * hq * d);
        let k = randn(&mut rng, b * t * h * d);
        let v = randn(&mut rng, b * t * h * e);
        let n = b * t * h;
        let log_g = match gates {
            Gates::None => None,
            Gates::Typical => Some(
                (0..n)
                    .map(|_| {
                        let x = 4.0 + normal(&mut rng);
                        -(1.0 + (-x).exp()).ln()
                    })
                    .collect(),
            ),
            Gates::Strong => Some((0..n).map(|_| -20.0 + 0.5 * normal(&mut rng)).collect()),
            Gates::Weak => Some((0..n).map(|_| -1e-4 * rng.random::<f64>()).collect()),
        };
        Self {
            b,
            t,
            hq,
            h,
            d,
            e,
            q,
            k,
            v,
            log_g,
        }
    }

    /// The same problem with each query orthogonal to its own key and equal to the previous
    /// one: keys keep the second half of their coordinates at even positions and the first
    /// at odd ones, and the query at position `i > 0` is the key at `i − 1`. A row's own
    /// weight is then exactly zero and, under strong gates, its output is the previous
    /// token's value, carried by a weight of `e^{−20}·|k|⁴` (well conditioned: no other
    /// weight comes near it). That weight must survive every precision the kernels use
    /// (`e^{−20}` is below f16's range).
    pub fn self_orthogonal(&self) -> Self {
        let (d, half) = (self.d, self.d / 2);
        let mut out = self.clone();
        for (row, vals) in out.k.chunks_mut(d).enumerate() {
            let pos = row / self.h % self.t;
            let (from, to) = if pos % 2 == 0 { (0, half) } else { (half, d) };
            vals[from..to].iter_mut().for_each(|v| *v = 0.0);
        }
        let group = self.hq / self.h;
        for bi in 0..self.b {
            for i in 0..self.t {
                for head in 0..self.hq {
                    let at = ((bi * self.t + i) * self.hq + head) * d;
                    if i == 0 {
                        // the first query on the half its own key leaves out
                        out.q[at + half..at + d].iter_mut().for_each(|v| *v = 0.0);
                    } else {
                        let from = ((bi * self.t + i - 1) * self.h + head / group) * d;
                        let prev: Vec<f64> = out.k[from..from + d].to_vec();
                        out.q[at..at + d].copy_from_slice(&prev);
                    }
                }
            }
        }
        out
    }

    /// The same problem with every input rounded to `dtype` (so the oracle sees exactly what
    /// a half-precision run sees).
    pub fn rounded(&self, dtype: DType) -> Self {
        let round: fn(f64) -> f64 = match dtype {
            DType::F16 => |x| half::f16::from_f64(x).to_f64(),
            DType::BF16 => |x| half::bf16::from_f64(x).to_f64(),
            DType::F32 => |x| x as f32 as f64,
            _ => |x| x,
        };
        let r = |x: &[f64]| x.iter().map(|&v| round(v)).collect::<Vec<_>>();
        Self {
            q: r(&self.q),
            k: r(&self.k),
            v: r(&self.v),
            log_g: self.log_g.as_deref().map(r),
            ..self.clone()
        }
    }

    /// The inputs as tensors of `dtype` on `dev`.
    pub fn tensors<B: Backend>(
        &self,
        dev: &B::Device,
        dtype: DType,
    ) -> (
        Tensor<B, 4>,
        Tensor<B, 4>,
        Tensor<B, 4>,
        Option<Tensor<B, 3>>,
    ) {
        let (b, t) = (self.b, self.t);
        (
            tensor(&self.q, [b, t, self.hq, self.d], dev, dtype),
            tensor(&self.k, [b, t, self.h, self.d], dev, dtype),
            tensor(&self.v, [b, t, self.h, self.e], dev, dtype),
            self.log_g
                .as_ref()
                .map(|g| tensor(g, [b, t, self.h], dev, dtype)),
        )
    }

    /// The tokens `[from, to)` as a new problem.
    pub fn slice(&self, from: usize, to: usize) -> Self {
        Self {
            t: to - from,
            q: self.rows(&self.q, self.hq * self.d, from, to),
            k: self.rows(&self.k, self.h * self.d, from, to),
            v: self.rows(&self.v, self.h * self.e, from, to),
            log_g: self.log_g.as_ref().map(|g| self.rows(g, self.h, from, to)),
            ..self.clone()
        }
    }

    /// Sequence `i` of the batch as a problem of batch 1.
    pub fn sequence(&self, i: usize) -> Self {
        let one =
            |x: &[f64], width: usize| x[i * self.t * width..(i + 1) * self.t * width].to_vec();
        Self {
            b: 1,
            q: one(&self.q, self.hq * self.d),
            k: one(&self.k, self.h * self.d),
            v: one(&self.v, self.h * self.e),
            log_g: self.log_g.as_ref().map(|g| one(g, self.h)),
            ..self.clone()
        }
    }

    /// The problem with its key/value heads rotated by one (head `i` becomes head `i + 1`
    /// mod `h`) and their groups of query heads with them (query head `j` becomes `j + r`
    /// mod `hq`, `r = hq / h`): its output holds query head `j`'s rows at `j + r` mod `hq`.
    pub fn kv_heads_rotated(&self) -> Self {
        let r = self.hq / self.h;
        let rotate = |x: &[f64], heads: usize, shift: usize, width: usize| {
            let mut out = vec![0.0; x.len()];
            for (row, chunk) in x.chunks_exact(heads * width).enumerate() {
                for head in 0..heads {
                    let to = (head + shift) % heads;
                    out[(row * heads + to) * width..][..width]
                        .copy_from_slice(&chunk[head * width..][..width]);
                }
            }
            out
        };
        Self {
            q: rotate(&self.q, self.hq, r, self.d),
            k: rotate(&self.k, self.h, 1, self.d),
            v: rotate(&self.v, self.h, 1, self.e),
            log_g: self.log_g.as_ref().map(|g| rotate(g, self.h, 1, 1)),
            ..self.clone()
        }
    }

    /// Rows `[from, to)` of a `[b, t, width]` array.
    pub fn rows(&self, x: &[f64], width: usize, from: usize, to: usize) -> Vec<f64> {
        (0..self.b)
            .flat_map(|bi| x[(bi * self.t + from) * width..(bi * self.t + to) * width].to_vec())
            .collect()
    }

    /// Cumulative log-gates `G` of one sequence and key/value head.
    fn cumulative_gates(&self, bi: usize, kv: usize) -> Vec<f64> {
        let mut acc = 0.0;
        (0..self.t)
            .map(|i| {
                if let Some(lg) = &self.log_g {
                    acc += lg[(bi * self.t + i) * self.h + kv];
                }
                acc
            })
            .collect()
    }

    /// The oracle output `[b, t, hq, e]`; rows with zero weight give 0.
    pub fn naive(&self, degree: usize, scale: f64) -> Vec<f64> {
        let (b, t, hq, h, d, e) = (self.b, self.t, self.hq, self.h, self.d, self.e);
        let r = hq / h;
        let mut out = vec![0.0; b * t * hq * e];
        for bi in 0..b {
            for j in 0..hq {
                let kv = j / r;
                let g = self.cumulative_gates(bi, kv);
                for i in 0..t {
                    let qi = &self.q[((bi * t + i) * hq + j) * d..][..d];
                    // log-space with the row max for range safety
                    let logw: Vec<f64> = (0..=i)
                        .map(|s| {
                            let ks = &self.k[((bi * t + s) * h + kv) * d..][..d];
                            let dot: f64 =
                                qi.iter().zip(ks).map(|(a, b)| a * b).sum::<f64>() * scale;
                            degree as f64 * dot.abs().ln() + g[i] - g[s]
                        })
                        .collect();
                    let m = logw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    if m == f64::NEG_INFINITY {
                        continue;
                    }
                    let mut num = vec![0.0; e];
                    let mut den = 0.0;
                    for (s, lw) in logw.iter().enumerate() {
                        let w = (lw - m).exp();
                        den += w;
                        let vs = &self.v[((bi * t + s) * h + kv) * e..][..e];
                        for (n, x) in num.iter_mut().zip(vs) {
                            *n += w * x;
                        }
                    }
                    let o = &mut out[((bi * t + i) * hq + j) * e..][..e];
                    for (o, n) in o.iter_mut().zip(&num) {
                        *o = n / den;
                    }
                }
            }
        }
        out
    }

    /// The oracle state after the last token: `(S [b, h, D, e], z [b, h, D])` in the layout of
    /// [`SympowLayout`].
    pub fn naive_state(&self, degree: usize) -> (Vec<f64>, Vec<f64>) {
        let layout = SympowLayout::cached(self.d, degree);
        let big_d = layout.dim();
        let (t, h, d, e) = (self.t, self.h, self.d, self.e);
        let mut s = vec![0.0; self.b * h * big_d * e];
        let mut z = vec![0.0; self.b * h * big_d];
        for bi in 0..self.b {
            for kv in 0..h {
                let g = self.cumulative_gates(bi, kv);
                for j in 0..t {
                    let decay = (g[t - 1] - g[j]).exp();
                    let kj = &self.k[((bi * t + j) * h + kv) * d..][..d];
                    let vj = &self.v[((bi * t + j) * h + kv) * e..][..e];
                    for f in 0..big_d {
                        let mut phi = layout.key_weights()[f] * decay;
                        for m in 0..degree {
                            phi *= kj[layout.indices(m)[f] as usize];
                        }
                        z[(bi * h + kv) * big_d + f] += phi;
                        let row = &mut s[((bi * h + kv) * big_d + f) * e..][..e];
                        for (x, vx) in row.iter_mut().zip(vj) {
                            *x += phi * vx;
                        }
                    }
                }
            }
        }
        (s, z)
    }
}

/// A host array as a tensor of `dtype`.
pub fn tensor<B: Backend, const N: usize>(
    x: &[f64],
    shape: [usize; N],
    dev: &B::Device,
    dtype: DType,
) -> Tensor<B, N> {
    Tensor::from_data(TensorData::new(x.to_vec(), shape), (dev, dtype))
}

/// A tensor's values as `f64` on the host.
///
/// # Panics
/// If the device cannot read the tensor back (a failed kernel, a lost device).
pub fn to_vec<B: Backend, const N: usize>(x: Tensor<B, N>) -> Vec<f64> {
    let data = if x.dtype() == DType::F64 {
        x.into_data()
    } else {
        x.cast(DType::F32).into_data()
    };
    data.convert::<f64>()
        .into_vec::<f64>()
        .unwrap_or_else(|e| panic!("cannot read tensor: {e:?}"))
}

/// `max |a − b| / max |b|` (absolute when `b` is all zeros); NaN or a length mismatch gives
/// `+∞`, so it fails every tolerance.
pub fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut err = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        err = err.max(d);
    }
    if scale == 0.0 { err } else { err / scale }
}

/// One randomized case of the kernel suite.
#[derive(Debug, Clone)]
pub struct SuiteCase {
    /// Case number (its seed).
    pub index: u64,
    /// Inputs.
    pub problem: Problem,
    /// Chunk size given to the op.
    pub chunk: usize,
    /// Degree `p`.
    pub degree: usize,
}

impl SuiteCase {
    /// Case `index`: head dims 32/64/128 (8/16/32 for p = 4), value dims equal, half or
    /// awkward, GQA ratios 1/2/4/5, batch up to 3, sequences from 1 token, chunks that divide
    /// the sequence, do not, or exceed it, and gates none / typical / `e^-20` / `≈ 1`. Every
    /// tenth case has p = 4 and runs the attention form.
    pub fn new(index: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(0xC0BE_0000 + index);
        let degree = if index % 10 == 9 { 4 } else { 2 };
        let d = if degree == 4 {
            [8, 16, 32][rng.random_range(0..3)]
        } else {
            match rng.random_range(0..20) {
                0..=8 => 32,
                9..=16 => 64,
                _ => 128,
            }
        };
        let e = match rng.random_range(0..4) {
            0 | 1 => d,
            2 => d / 2,
            _ if d == 128 => 64,
            _ => 24,
        };
        let r = [1, 2, 4, 5][(index % 4) as usize];
        let h = if d == 128 { 1 } else { rng.random_range(1..=2) };
        let b = if index % 5 == 0 {
            3
        } else {
            rng.random_range(1..=2)
        };
        let t: usize = if d == 128 {
            rng.random_range(1..=40)
        } else {
            rng.random_range(1..=96)
        };
        let chunk = match rng.random_range(0..10) {
            0..=5 if t > 1 => rng.random_range(1..t),
            6 | 7 => t + rng.random_range(0..8),
            _ => [16, 32, 64][rng.random_range(0..3)],
        };
        let gates =
            [Gates::None, Gates::Typical, Gates::Strong, Gates::Weak][(index / 2 % 4) as usize];
        Self {
            index,
            problem: Problem::random(index, b, t, h * r, h, d, e, gates),
            chunk,
            degree,
        }
    }

    /// One line describing the case.
    pub fn describe(&self) -> String {
        let p = &self.problem;
        format!(
            "case {}: b={} t={} hq={} h={} d={} e={} chunk={} p={} gated={}",
            self.index,
            p.b,
            p.t,
            p.hq,
            p.h,
            p.d,
            p.e,
            self.chunk,
            self.degree,
            p.log_g.is_some()
        )
    }
}

/// What a suite row checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    /// `power_retention` with `t ≤ chunk`: the attention form, p = 2.
    Attention,
    /// `power_retention` with `t > chunk`: the chunked form.
    Chunked,
    /// The attention form with p = 4.
    AttentionP4,
    /// The state after a prefill (`power_retention_with_state`), vs the direct sum.
    PrefillState,
    /// Output of a prefill continued from an initial state.
    InitialState,
    /// The chunked form under strong gates with each query orthogonal to its own key
    /// ([`Problem::self_orthogonal`]): every output is carried by a weight of `e^{−20}`.
    StrongGatesOrthogonal,
    /// Chunks longer than two 64-key steps (200 tokens, typical gates, chunks 256 and 128):
    /// rows past the first step read steps whose keys all precede them, which the kernels
    /// weigh without a mask (the suite's random cases stay below that length).
    LongChunk,
    /// The chunked form as context parallelism runs it: the sequence split into slices of whole
    /// chunks (here all on the suite's device), each slice's chunk contributions kept by its
    /// state pass and read by its forward from the state the slices before it end with.
    ContextParallel,
    /// A batch of 32 (t = 300, 2 heads of 32, chunk 128), whole and as its two halves (the
    /// second a view at an offset into the batch): batch rows stay independent.
    LargeBatch,
    /// The chunked form in segments of whole chunks (a `segment_elements` budget smaller
    /// than the sequence's chunk states), each starting from the previous one's state.
    Segmented,
    /// Output of one decode step after the prefill.
    Step,
    /// State after that decode step.
    StepState,
    /// Outputs of decode steps on a [`DecodeState`] (a window of recent
    /// tokens read beside the state and absorbed every few steps).
    WindowDecode,
    /// State after those steps, the waiting tokens absorbed.
    WindowState,
    /// Gradients (q, k, v, log-gates) through the attention form, p = 2.
    GradAttention,
    /// Gradients through the chunked form.
    GradChunked,
    /// Gradients through the attention form, p = 4.
    GradAttentionP4,
}

impl Check {
    /// Row label.
    pub fn label(self) -> &'static str {
        match self {
            Check::Attention => "attention form (t ≤ chunk)",
            Check::Chunked => "chunked form",
            Check::AttentionP4 => "attention form, p = 4",
            Check::PrefillState => "prefill final state",
            Check::InitialState => "prefill from a state",
            Check::StrongGatesOrthogonal => "strong gates, own key orthogonal",
            Check::LongChunk => "long chunks (steps before the rows)",
            Check::ContextParallel => "context-parallel slices (one device)",
            Check::LargeBatch => "batch of 32, whole and halves",
            Check::Segmented => "chunked form in segments",
            Check::Step => "decode step output",
            Check::StepState => "decode step state",
            Check::WindowDecode => "windowed decode output",
            Check::WindowState => "windowed decode state",
            Check::GradAttention => "gradients, attention form",
            Check::GradChunked => "gradients, chunked form",
            Check::GradAttentionP4 => "gradients, attention form, p = 4",
        }
    }
}

/// Tolerance on [`max_rel`] against the oracle for outputs of `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-4,
        _ => 2e-2,
    }
}

/// Tolerance on [`max_rel`] of gradients against the `f64` oracle for inputs of `dtype`.
pub fn grad_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::F32 => 1e-3,
        _ => 3e-2,
    }
}

/// Runs one case on backend `B` in `dtype`; returns the error of every check it makes.
///
/// # Errors
/// A [`RetentionError`] if the op rejects the case (a bug: every case is valid).
pub fn check_case<B: RetentionBackend>(
    case: &SuiteCase,
    dev: &B::Device,
    dtype: DType,
    kernels: KernelChoice,
) -> Result<Vec<(Check, f64)>, RetentionError> {
    let p = case.problem.rounded(dtype);
    let scale = 1.0 / (p.d as f64).sqrt();
    let oracle = p.naive(case.degree, scale);
    let mut out = Vec::new();
    if case.degree != 2 {
        let (q, k, v, g) = p.tensors::<B>(dev, dtype);
        let opts = RetentionOptions::new()
            .with_degree(case.degree)
            .with_chunk_size(None)
            .with_kernels(kernels);
        let y = to_vec(power_retention(q, k, v, g, &opts)?);
        out.push((Check::AttentionP4, max_rel(&y, &oracle)));
        return Ok(out);
    }
    let opts = RetentionOptions::new()
        .with_chunk_size(Some(case.chunk))
        .with_kernels(kernels);
    let (q, k, v, g) = p.tensors::<B>(dev, dtype);
    let y = to_vec(power_retention(q, k, v, g, &opts)?);
    let form = if p.t > case.chunk {
        Check::Chunked
    } else {
        Check::Attention
    };
    out.push((form, max_rel(&y, &oracle)));
    if p.t > case.chunk && case.index % 2 == 1 {
        // segments of one or two chunks
        let per_chunk = p.b * p.h * crate::expanded_dim(p.d, 2) * p.e;
        let segmented = opts
            .clone()
            .with_segment_elements(per_chunk * (1 + (case.index / 2 % 2) as usize));
        let (q, k, v, g) = p.tensors::<B>(dev, dtype);
        let y = to_vec(power_retention(q, k, v, g, &segmented)?);
        out.push((Check::Segmented, max_rel(&y, &oracle)));
    }

    if p.t > case.chunk && case.index % 8 == 3 {
        // two or three slices of whole chunks
        let (q, k, v, g) = p.tensors::<B>(dev, dtype);
        let devices = vec![dev.clone(); 3];
        let slices = crate::SequenceSlice::split(q, k, v, g, case.chunk, &devices)?;
        let (ys, _) = crate::power_retention_context_parallel(slices, None, &opts)?;
        let y = to_vec(Tensor::cat(ys, 1));
        out.push((Check::ContextParallel, max_rel(&y, &oracle)));
    }

    if p.t >= 2 && case.index % 5 == 2 {
        let sharp = Problem::random(case.index, p.b, p.t, p.hq, p.h, p.d, p.e, Gates::Strong)
            .self_orthogonal()
            .rounded(dtype);
        let (q, k, v, g) = sharp.tensors::<B>(dev, dtype);
        let y = to_vec(power_retention(q, k, v, g, &opts)?);
        out.push((
            Check::StrongGatesOrthogonal,
            max_rel(&y, &sharp.naive(2, scale)),
        ));
    }

    // once in every 50 cases (case 1 of any run of two or more)
    if case.index % 50 == 1 {
        let long =
            Problem::random(case.index + 500, 1, 200, 4, 2, 64, 64, Gates::Typical).rounded(dtype);
        let want = long.naive(2, 1.0 / (long.d as f64).sqrt());
        let mut worst = 0.0f64;
        for chunk in [256, 128] {
            let opts = RetentionOptions::new()
                .with_chunk_size(Some(chunk))
                .with_kernels(kernels);
            let (q, k, v, g) = long.tensors::<B>(dev, dtype);
            let y = to_vec(power_retention(q, k, v, g, &opts)?);
            worst = worst.max(max_rel(&y, &want));
        }
        out.push((Check::LongChunk, worst));
    }

    // once in every 50 cases (case 4 of any run of five or more)
    if case.index % 50 == 4 {
        let (b, t) = (32, 300);
        let big =
            Problem::random(case.index + 700, b, t, 2, 2, 32, 32, Gates::Typical).rounded(dtype);
        let want = big.naive(2, 1.0 / (big.d as f64).sqrt());
        let opts = RetentionOptions::new()
            .with_chunk_size(Some(128))
            .with_kernels(kernels);
        let (q, k, v, g) = big.tensors::<B>(dev, dtype);
        let whole = to_vec(power_retention(
            q.clone(),
            k.clone(),
            v.clone(),
            g.clone(),
            &opts,
        )?);
        let half = |x: &Tensor<B, 4>, i: usize| x.clone().narrow(0, i * b / 2, b / 2);
        let mut halves = Vec::new();
        for i in 0..2 {
            let g = g.as_ref().map(|g| g.clone().narrow(0, i * b / 2, b / 2));
            halves.push(power_retention(
                half(&q, i),
                half(&k, i),
                half(&v, i),
                g,
                &opts,
            )?);
        }
        let halves = to_vec(Tensor::cat(halves, 0));
        out.push((
            Check::LargeBatch,
            max_rel(&whole, &want).max(max_rel(&halves, &want)),
        ));
    }

    let state_error = |s: RetentionState<B>, want: &Problem| {
        let (ws, wz) = want.naive_state(2);
        max_rel(&to_vec(s.state), &ws).max(max_rel(&to_vec(s.key_sum), &wz))
    };
    let width = p.hq * p.e;
    if p.t >= 2 {
        let prefix = p.slice(0, p.t - 1);
        let (q, k, v, g) = prefix.tensors::<B>(dev, dtype);
        let (_, state) = power_retention_with_state(q, k, v, g, None, &opts)?;
        out.push((Check::PrefillState, state_error(state.clone(), &prefix)));
        let (q, k, v, g) = p.slice(p.t - 1, p.t).tensors::<B>(dev, dtype);
        let (y, next) = power_retention_step(q, k, v, g, state, &opts)?;
        out.push((
            Check::Step,
            max_rel(&to_vec(y), &p.rows(&oracle, width, p.t - 1, p.t)),
        ));
        out.push((Check::StepState, state_error(next, &p)));
    }
    if p.t >= 2 && case.index % 2 == 0 {
        // the last m tokens decoded on a window absorbed every 1, 3 or 5 steps
        let m = (p.t - 1).min(7);
        let fold_every = [1, 3, 5][(case.index / 2 % 3) as usize];
        let (q, k, v, g) = p.slice(0, p.t - m).tensors::<B>(dev, dtype);
        let (_, prefix) = power_retention_with_state(q, k, v, g, None, &opts)?;
        let mut state = DecodeState::new(prefix, fold_every)?;
        // rows by batch element, then position (the oracle's order)
        let mut ys = vec![Vec::new(); p.b];
        for i in p.t - m..p.t {
            let (q, k, v, g) = p.slice(i, i + 1).tensors::<B>(dev, dtype);
            let (y, next) = power_retention_decode(q, k, v, g, state, &opts)?;
            for (bi, row) in to_vec(y).chunks(width).enumerate() {
                ys[bi].extend_from_slice(row);
            }
            state = next;
        }
        out.push((
            Check::WindowDecode,
            max_rel(&ys.concat(), &p.rows(&oracle, width, p.t - m, p.t)),
        ));
        out.push((
            Check::WindowState,
            state_error(state.into_state(&opts)?, &p),
        ));
    }
    if p.t >= 4 && case.index % 3 == 0 {
        let t1 = p.t / 2;
        let (q, k, v, g) = p.slice(0, t1).tensors::<B>(dev, dtype);
        let (_, s1) = power_retention_with_state(q, k, v, g, None, &opts)?;
        let (q, k, v, g) = p.slice(t1, p.t).tensors::<B>(dev, dtype);
        let (y, _) = power_retention_with_state(q, k, v, g, Some(s1), &opts)?;
        out.push((
            Check::InitialState,
            max_rel(&to_vec(y), &p.rows(&oracle, width, t1, p.t)),
        ));
    }
    Ok(out)
}

/// Worst error of one check over a suite.
#[derive(Debug, Clone)]
pub struct SuiteRow {
    /// Cases that made this check.
    pub cases: usize,
    /// Cases over the tolerance.
    pub failures: usize,
    /// Largest error.
    pub worst: f64,
    /// The case with the largest error.
    pub worst_case: String,
}

/// Result of [`run_suite`].
#[derive(Debug, Clone)]
pub struct SuiteReport {
    /// Dtype of the inputs.
    pub dtype: DType,
    /// Tolerance applied.
    pub tolerance: f64,
    /// One row per check.
    pub rows: BTreeMap<Check, SuiteRow>,
}

impl SuiteReport {
    /// Whether every check of every case is within tolerance.
    pub fn passed(&self) -> bool {
        self.rows.values().all(|r| r.failures == 0)
    }

    /// A Markdown table of the rows.
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| dtype | check | cases | worst max-rel error | tolerance | result |\n|---|---|---|---|---|---|\n",
        );
        for (check, row) in &self.rows {
            let _ = writeln!(
                s,
                "| {:?} | {} | {} | {:.2e} | {:.0e} | {} |",
                self.dtype,
                check.label(),
                row.cases,
                row.worst,
                self.tolerance,
                if row.failures == 0 {
                    "pass".to_string()
                } else {
                    format!("FAIL ({})", row.failures)
                }
            );
        }
        s
    }

    /// The failing rows with their worst case, one per line.
    pub fn failures(&self) -> String {
        self.rows
            .iter()
            .filter(|(_, r)| r.failures > 0)
            .map(|(c, r)| format!("{}: {:.2e} at {}\n", c.label(), r.worst, r.worst_case))
            .collect()
    }
}

/// Runs cases `0..cases` on `B` in `dtype` with the `kernels` family, calling `progress` after
/// each.
///
/// # Errors
/// The first [`RetentionError`] a case raises.
pub fn run_suite<B: RetentionBackend>(
    dev: &B::Device,
    dtype: DType,
    kernels: KernelChoice,
    cases: u64,
    progress: impl FnMut(u64),
) -> Result<SuiteReport, RetentionError> {
    collect(dtype, tolerance(dtype), cases, progress, |case| {
        check_case::<B>(case, dev, dtype, kernels)
    })
}

/// Runs the gradient checks of cases `0..cases` on `Autodiff<B>` in `dtype` with the `kernels`
/// family (the backward pass of `B`) against `Autodiff` of the reference in `f64` on ndarray,
/// calling `progress` after each case.
///
/// # Errors
/// The first [`RetentionError`] a case raises.
#[cfg(feature = "ndarray")]
pub fn run_grad_suite<B: RetentionBackend>(
    dev: &B::Device,
    dtype: DType,
    kernels: KernelChoice,
    cases: u64,
    progress: impl FnMut(u64),
) -> Result<SuiteReport, RetentionError> {
    collect(dtype, grad_tolerance(dtype), cases, progress, |case| {
        grad_oracle::check_grad_case::<B>(case, dev, dtype, kernels)
    })
}

fn collect(
    dtype: DType,
    tol: f64,
    cases: u64,
    mut progress: impl FnMut(u64),
    mut check: impl FnMut(&SuiteCase) -> Result<Vec<(Check, f64)>, RetentionError>,
) -> Result<SuiteReport, RetentionError> {
    let mut rows: BTreeMap<Check, SuiteRow> = BTreeMap::new();
    for i in 0..cases {
        let case = SuiteCase::new(i);
        for (check, err) in check(&case)? {
            let row = rows.entry(check).or_insert(SuiteRow {
                cases: 0,
                failures: 0,
                worst: 0.0,
                worst_case: String::new(),
            });
            row.cases += 1;
            if err > tol {
                row.failures += 1;
            }
            if err > row.worst || row.worst_case.is_empty() {
                row.worst = err;
                row.worst_case = case.describe();
            }
        }
        progress(i);
    }
    Ok(SuiteReport {
        dtype,
        tolerance: tol,
        rows,
    })
}

#[cfg(feature = "ndarray")]
mod grad_oracle {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{DType, Tensor};
    use rand::{SeedableRng, rngs::StdRng};

    use super::{Check, SuiteCase, randn, tensor, to_vec};
    use crate::{
        KernelChoice, RetentionBackend, RetentionError, RetentionOptions, power_retention,
        reference,
    };

    type Oracle = Autodiff<NdArray<f64>>;

    /// `[dq, dk, dv, dlog_g]` of `Σ y·w` (the last empty when ungated).
    fn grads<B: burn::tensor::backend::AutodiffBackend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        g: Option<Tensor<B, 3>>,
        forward: impl FnOnce(
            Tensor<B, 4>,
            Tensor<B, 4>,
            Tensor<B, 4>,
            Option<Tensor<B, 3>>,
        ) -> Result<Tensor<B, 4>, RetentionError>,
        w: Tensor<B, 4>,
    ) -> Result<[Vec<f64>; 4], RetentionError> {
        let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
        let g = g.map(|g| g.require_grad());
        let y = forward(q.clone(), k.clone(), v.clone(), g.clone())?;
        let grads = (y * w).sum().backward();
        let read = |t: &Tensor<B, 4>| t.grad(&grads).map(to_vec).unwrap_or_default();
        Ok([
            read(&q),
            read(&k),
            read(&v),
            g.and_then(|g| g.grad(&grads))
                .map(to_vec)
                .unwrap_or_default(),
        ])
    }

    /// The gradient error of one case, in the loss it predicts: for each input `x` (q, k, v,
    /// log-gates) the largest error of `∂L/∂x` times the largest `|x|` (the first-order change of
    /// the loss under a perturbation of the input's own size), over the largest such change of
    /// the oracle. A per-tensor relative error would divide by gradients that are legitimately
    /// tiny (under gates of `e^-20` a row attends to its own token only, `∂y/∂q ≈ 0`, and f32
    /// rounding of `y ≈ v` leaves noise far above them), which says nothing about training.
    pub(super) fn check_grad_case<B: RetentionBackend>(
        case: &SuiteCase,
        dev: &B::Device,
        dtype: DType,
        kernels: KernelChoice,
    ) -> Result<Vec<(Check, f64)>, RetentionError> {
        let p = case.problem.rounded(dtype);
        let chunk = (case.degree == 2).then_some(case.chunk);
        let opts = RetentionOptions::new()
            .with_degree(case.degree)
            .with_chunk_size(chunk)
            .with_kernels(kernels);
        let shape = [p.b, p.t, p.hq, p.e];
        let w = randn(
            &mut StdRng::seed_from_u64(0x9AD0_0000 + case.index),
            p.b * p.t * p.hq * p.e,
        );
        // the weights as the backend sees them (rounded to its dtype)
        let w_ours = tensor::<Autodiff<B>, 4>(&w, shape, dev, dtype);
        let w = to_vec(w_ours.clone().inner());

        let (q, k, v, g) = p.tensors::<Autodiff<B>>(dev, dtype);
        let ours = grads(
            q,
            k,
            v,
            g,
            |q, k, v, g| power_retention(q, k, v, g, &opts),
            w_ours,
        )?;

        let cpu = Default::default();
        let (q, k, v, g) = p.tensors::<Oracle>(&cpu, DType::F64);
        let scale = 1.0 / (p.d as f64).sqrt();
        let degree = case.degree;
        let oracle = grads(
            q,
            k,
            v,
            g,
            |q, k, v, g| {
                Ok(match chunk {
                    Some(c) if p.t > c => {
                        reference::chunked_form(q, k, v, g, None, c, degree, scale).0
                    }
                    _ => reference::attention_form(q, k, v, g, degree, scale),
                })
            },
            tensor::<Oracle, 4>(&w, shape, &cpu, DType::F64),
        )?;
        let inputs = [&p.q, &p.k, &p.v];
        let peak = |x: &[f64]| x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let size = |i: usize| match (i, &p.log_g) {
            (3, Some(g)) => peak(g),
            (3, None) => 0.0,
            (i, _) => peak(inputs[i]),
        };
        let check = match chunk {
            None => Check::GradAttentionP4,
            Some(c) if p.t > c => Check::GradChunked,
            Some(_) => Check::GradAttention,
        };
        let mut worst = 0.0f64;
        let mut scale = 0.0f64;
        for (i, (a, o)) in ours.iter().zip(&oracle).enumerate() {
            if o.is_empty() {
                continue;
            }
            if a.len() != o.len() || a.iter().any(|v| !v.is_finite()) {
                return Ok(vec![(check, f64::INFINITY)]);
            }
            let diff = a
                .iter()
                .zip(o)
                .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            worst = worst.max(diff * size(i));
            scale = scale.max(peak(o) * size(i));
        }
        let err = if scale > 0.0 { worst / scale } else { worst };
        Ok(vec![(check, err)])
    }
}
