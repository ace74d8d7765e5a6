//! The symmetric power feature map φ: `R^d → R^D` with `φ_Q(q)·φ_K(k) = (q·k)^p`.
//!
//! Features are indexed by the non-decreasing multi-indices `α = (α_1 ≤ … ≤ α_p)` over
//! `0..d`, in lexicographic order, so `D = C(d+p−1, p)` (the exact dimension, no padding).
//! Feature `α` of `x` is `Π_k x_{α_k}`; the key side additionally carries the multinomial
//! weight `m(α) = p! / Π_i c_i!` (`c_i` = multiplicity of coordinate `i` in `α`), the query side
//! carries none. This is the public layout of [`RetentionState`](crate::RetentionState).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

/// `D = C(d+p−1, p)`, the number of features of the degree-`p` symmetric power of `R^d`.
///
/// ```
/// assert_eq!(retention::expanded_dim(128, 2), 8256);
/// assert_eq!(retention::expanded_dim(64, 4), 766_480);
/// ```
pub fn expanded_dim(head_dim: usize, degree: usize) -> usize {
    // C(n, k) with n = d + p − 1, k = p, computed incrementally (exact in u128).
    let n = (head_dim + degree).saturating_sub(1) as u128;
    let mut c: u128 = 1;
    for i in 0..degree as u128 {
        c = c * (n - i) / (i + 1);
    }
    c as usize
}

/// Index tables of the feature map for one `(head_dim, degree)` pair.
#[derive(Debug, Clone, PartialEq)]
pub struct SympowLayout {
    head_dim: usize,
    degree: usize,
    /// `indices[k][f]` = `α_k` of feature `f`.
    indices: Vec<Vec<i64>>,
    /// Key-side multinomial weight of each feature.
    weights: Vec<f64>,
}

impl SympowLayout {
    /// Enumerates the multi-indices of the degree-`degree` symmetric power of `R^head_dim`.
    pub fn new(head_dim: usize, degree: usize) -> Self {
        let dim = expanded_dim(head_dim, degree);
        let mut indices = vec![Vec::with_capacity(dim); degree];
        let mut weights = Vec::with_capacity(dim);
        let factorial = |n: usize| (1..=n).map(|i| i as f64).product::<f64>();
        let p_fact = factorial(degree);
        let mut alpha = vec![0usize; degree];
        if head_dim > 0 {
            loop {
                for (k, &a) in alpha.iter().enumerate() {
                    indices[k].push(a as i64);
                }
                // multiplicities of a sorted multi-index are its runs
                let mut denom = 1.0;
                let mut run = 1;
                for k in 1..=degree {
                    if k < degree && alpha[k] == alpha[k - 1] {
                        run += 1;
                    } else {
                        denom *= factorial(run);
                        run = 1;
                    }
                }
                weights.push(p_fact / denom);
                // next non-decreasing multi-index in lexicographic order
                let Some(k) = (0..degree).rev().find(|&k| alpha[k] + 1 < head_dim) else {
                    break;
                };
                let next = alpha[k] + 1;
                alpha[k..].iter_mut().for_each(|a| *a = next);
            }
        }
        Self {
            head_dim,
            degree,
            indices,
            weights,
        }
    }

    /// The layout for `(head_dim, degree)`, built once per process and shared.
    pub fn cached(head_dim: usize, degree: usize) -> Arc<Self> {
        type Layouts = HashMap<(usize, usize), Arc<SympowLayout>>;
        static CACHE: OnceLock<Mutex<Layouts>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        // a poisoned lock only means another thread panicked while inserting; the map is intact
        let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((head_dim, degree))
            .or_insert_with(|| Arc::new(Self::new(head_dim, degree)))
            .clone()
    }

    /// Head dimension `d`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Degree `p`.
    pub fn degree(&self) -> usize {
        self.degree
    }

    /// Expanded dimension `D`.
    pub fn dim(&self) -> usize {
        self.weights.len()
    }

    /// Key-side weights `m(α)`, one per feature.
    pub fn key_weights(&self) -> &[f64] {
        &self.weights
    }

    /// `α_k` for every feature.
    pub fn indices(&self, k: usize) -> &[i64] {
        &self.indices[k]
    }

    /// `φ_Q(x)`: expands the last dimension of `x` (`[.., d]` → `[.., D]`), without weights.
    pub fn expand_query<B: Backend, const N: usize>(&self, x: Tensor<B, N>) -> Tensor<B, N> {
        self.expand(x, false)
    }

    /// `φ_K(x)`: expands the last dimension of `x` (`[.., d]` → `[.., D]`), times `m(α)`.
    pub fn expand_key<B: Backend, const N: usize>(&self, x: Tensor<B, N>) -> Tensor<B, N> {
        self.expand(x, true)
    }

    fn expand<B: Backend, const N: usize>(&self, x: Tensor<B, N>, weighted: bool) -> Tensor<B, N> {
        let device = x.device();
        let dim = self.dim();
        let mut out_shape = x.dims();
        out_shape[N - 1] = dim;
        let mut idx_shape = [1; N];
        idx_shape[N - 1] = dim;
        let mut out: Option<Tensor<B, N>> = None;
        for k in 0..self.degree {
            // one gather per factor (faster than `select` on CPU backends)
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(self.indices[k].clone(), [dim]),
                &device,
            )
            .reshape(idx_shape)
            .expand(out_shape);
            let factor = x.clone().gather(N - 1, idx);
            out = Some(match out {
                None => factor,
                Some(acc) => acc * factor,
            });
        }
        let Some(out) = out else {
            // degree 0 is rejected by validation; keep a well-defined value anyway
            return x.ones_like().narrow(N - 1, 0, 1);
        };
        if weighted && self.weights.iter().any(|&w| w != 1.0) {
            let w = Tensor::<B, 1>::from_data(
                TensorData::new(self.weights.clone(), [dim]),
                (&device, x.dtype()),
            );
            out * w.unsqueeze::<N>()
        } else {
            out
        }
    }
}
