//! Shared test helpers: seeded random inputs, an independent naive f64 oracle written with
//! plain loops, and error metrics.
#![allow(dead_code)]

use burn::tensor::{DType, Tensor, TensorData, backend::Backend};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Host-side inputs of one problem, `[b, t, h*, d]` row-major.
#[derive(Debug, Clone)]
pub struct Problem {
    pub b: usize,
    pub t: usize,
    pub hq: usize,
    pub h: usize,
    pub d: usize,
    pub e: usize,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub log_g: Option<Vec<f64>>,
}

/// How the log-gates are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gates {
    None,
    /// `logsigmoid(4 + N(0,1))`, gates ≈ 0.98 (as Manifest's tests).
    Typical,
    /// `≈ −20`: only the current token survives.
    Strong,
    /// `≈ 0`: almost ungated.
    Weak,
}

pub fn normal(rng: &mut StdRng) -> f64 {
    // Box-Muller
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

pub fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| normal(rng)).collect()
}

impl Problem {
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
        let cut = |x: &[f64], w: usize| -> Vec<f64> {
            (0..self.b)
                .flat_map(|bi| x[(bi * self.t + from) * w..(bi * self.t + to) * w].to_vec())
                .collect()
        };
        Self {
            t: to - from,
            q: cut(&self.q, self.hq * self.d),
            k: cut(&self.k, self.h * self.d),
            v: cut(&self.v, self.h * self.e),
            log_g: self.log_g.as_ref().map(|g| cut(g, self.h)),
            ..self.clone()
        }
    }

    /// Independent oracle: `y_i = Σ_{j≤i} w_ij v_j / Σ w_ij`, `w_ij = (σ q_i·k_j)^p e^{G_i−G_j}`,
    /// with plain loops in f64. Rows with zero weight give 0. Returns `[b, t, hq, e]`.
    pub fn naive(&self, degree: usize, scale: f64) -> Vec<f64> {
        let (b, t, hq, h, d, e) = (self.b, self.t, self.hq, self.h, self.d, self.e);
        let r = hq / h;
        let mut out = vec![0.0; b * t * hq * e];
        for bi in 0..b {
            for j in 0..hq {
                let kv = j / r;
                // cumulative gates G for this kv head
                let mut g = vec![0.0; t];
                let mut acc = 0.0;
                for (i, gi) in g.iter_mut().enumerate() {
                    if let Some(lg) = &self.log_g {
                        acc += lg[(bi * t + i) * h + kv];
                    }
                    *gi = acc;
                }
                for i in 0..t {
                    let qi = &self.q[((bi * t + i) * hq + j) * d..][..d];
                    let mut num = vec![0.0; e];
                    let mut den = 0.0;
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
}

pub fn tensor<B: Backend, const N: usize>(
    x: &[f64],
    shape: [usize; N],
    dev: &B::Device,
    dtype: DType,
) -> Tensor<B, N> {
    Tensor::from_data(TensorData::new(x.to_vec(), shape), (dev, dtype))
}

pub fn to_vec<B: Backend, const N: usize>(x: Tensor<B, N>) -> Vec<f64> {
    x.cast(DType::F64)
        .into_data()
        .into_vec::<f64>()
        .unwrap_or_else(|e| panic!("cannot read tensor: {e:?}"))
}

/// `max |a − b| / max |b|` (0 when both are 0).
pub fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(!err.is_nan(), "NaN in result");
    if scale == 0.0 { err } else { err / scale }
}
