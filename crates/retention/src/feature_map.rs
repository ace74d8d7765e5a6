//! The symmetric power feature map φ: `R^d → R^D` with `φ_Q(q)·φ_K(k) = (q·k)^p`.
//!
//! This is the public layout of [`RetentionState`](crate::RetentionState).
//!
//! **Degree 2** (the chunked and recurrent kernels): the `d` coordinates are split into blocks of
//! `β` ([`pair_block`]: the largest power of two ≤ 16 dividing `d`, so 16 for the usual head
//! dims). For block `m`, outer coordinate `x < β(m+1)` and offset `r < β`, feature
//! `β²·m(m+1)/2 + β·x + r` is `x_x · x_{βm+r}`; keys weigh it 2 when `x < βm` and 1 otherwise
//! (inside the diagonal block both orders appear). `D = d(d+β)/2`: 9216 for d = 128 (11.6 %
//! over the `d(d+1)/2` distinct pairs), the layout of Manifest's Triton kernels for
//! `d % 16 == 0`. The padding buys regular tiles: `β` consecutive features are one query
//! coordinate times `β` consecutive ones, so kernels build feature tiles with vector products.
//!
//! **Other degrees** (attention form and reference only): the non-decreasing multi-indices
//! `α = (α_1 ≤ … ≤ α_p)` over `0..d` in lexicographic order, `D = C(d+p−1, p)`; feature `α` of
//! `x` is `Π_k x_{α_k}`, keys additionally carry the multinomial weight
//! `m(α) = p! / Π_i c_i!` (`c_i` = multiplicity of coordinate `i` in `α`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData, backend::Backend};

/// `β`, the coordinate-block width of the degree-2 layout: the largest power of two ≤ 16 that
/// divides `head_dim` (1 for odd head dims).
///
/// ```
/// assert_eq!(retention::pair_block(128), 16);
/// assert_eq!(retention::pair_block(24), 8);
/// assert_eq!(retention::pair_block(7), 1);
/// ```
pub fn pair_block(head_dim: usize) -> usize {
    if head_dim == 0 {
        1
    } else {
        (head_dim & head_dim.wrapping_neg()).min(16)
    }
}

/// `D`, the number of features: `d(d+β)/2` for degree 2 (see the module docs), `C(d+p−1, p)`
/// for other degrees.
///
/// ```
/// assert_eq!(retention::expanded_dim(128, 2), 9216);
/// assert_eq!(retention::expanded_dim(64, 2), 2560);
/// assert_eq!(retention::expanded_dim(64, 4), 766_480);
/// ```
pub fn expanded_dim(head_dim: usize, degree: usize) -> usize {
    checked_expanded_dim(head_dim, degree).unwrap_or(usize::MAX)
}

/// [`expanded_dim`], or `None` where `D` does not fit in a `usize`
/// ([`check_shapes`](crate::check_shapes) refuses such problems).
///
/// ```
/// assert_eq!(retention::checked_expanded_dim(64, 4), Some(766_480));
/// assert_eq!(retention::checked_expanded_dim(1, 1 << 60), Some(1));
/// assert_eq!(retention::checked_expanded_dim(1 << 40, 1 << 40), None);
/// ```
pub fn checked_expanded_dim(head_dim: usize, degree: usize) -> Option<usize> {
    if head_dim == 0 {
        return Some(0);
    }
    if degree == 2 {
        return head_dim
            .checked_add(pair_block(head_dim))?
            .checked_mul(head_dim)
            .map(|x| x / 2);
    }
    // C(n, k) with n = d + p − 1 and k = min(p, d − 1) (C(n, p) = C(n, n − p)), built
    // incrementally: each partial product C(n − k + i + 1, i + 1) is exact, and the first
    // one past usize::MAX ends the walk, so no degree makes it long.
    let n = (head_dim as u128 + degree as u128).saturating_sub(1);
    let k = (degree as u128).min(n.saturating_sub(degree as u128));
    let mut c: u128 = 1;
    for i in 0..k {
        c = c.checked_mul(n - i)? / (i + 1);
        if c > usize::MAX as u128 {
            return None;
        }
    }
    usize::try_from(c).ok()
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
    /// Enumerates the features of the degree-`degree` map of `R^head_dim` (module docs).
    pub fn new(head_dim: usize, degree: usize) -> Self {
        if degree == 2 {
            return Self::pairs(head_dim);
        }
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

    /// The degree-2 block layout.
    fn pairs(head_dim: usize) -> Self {
        let beta = pair_block(head_dim);
        let dim = expanded_dim(head_dim, 2);
        let mut outer = Vec::with_capacity(dim);
        let mut inner = Vec::with_capacity(dim);
        let mut weights = Vec::with_capacity(dim);
        for m in 0..head_dim / beta {
            for x in 0..beta * (m + 1) {
                for r in 0..beta {
                    outer.push(x as i64);
                    inner.push((beta * m + r) as i64);
                    weights.push(if x < beta * m { 2.0 } else { 1.0 });
                }
            }
        }
        Self {
            head_dim,
            degree: 2,
            indices: vec![outer, inner],
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

    /// The gradient of `x` through [`Self::expand_query`] (`weighted` false) or
    /// [`Self::expand_key`] (`weighted` true), for the gradient `d_features` (`[.., D]`) of
    /// the features: each feature `m(α)·Π_k x_{α_k}` sends `d·m(α)·Π_{k'≠k} x_{α_k'}` to every
    /// coordinate `α_k` it multiplies.
    pub fn expand_backward<B: Backend, const N: usize>(
        &self,
        x: Tensor<B, N>,
        d_features: Tensor<B, N>,
        weighted: bool,
    ) -> Tensor<B, N> {
        let indices = self.factor_indices::<B, N>(x.dims(), &x.device());
        let factors: Vec<Tensor<B, N>> = indices
            .iter()
            .map(|idx| x.clone().gather(N - 1, idx.clone()))
            .collect();
        let d_features = self.weigh(d_features, weighted);
        let mut dx = x.zeros_like();
        for (k, idx) in indices.iter().enumerate() {
            let mut part = d_features.clone();
            for (k2, factor) in factors.iter().enumerate() {
                if k2 != k {
                    part = part * factor.clone();
                }
            }
            dx = dx.scatter(N - 1, idx.clone(), part, IndexingUpdateOp::Add);
        }
        dx
    }

    /// `α_k` of every feature as a gather index over `x`'s last dimension, one per factor `k`.
    fn factor_indices<B: Backend, const N: usize>(
        &self,
        x_shape: [usize; N],
        device: &B::Device,
    ) -> Vec<Tensor<B, N, Int>> {
        let dim = self.dim();
        let mut out_shape = x_shape;
        out_shape[N - 1] = dim;
        let mut idx_shape = [1; N];
        idx_shape[N - 1] = dim;
        self.indices
            .iter()
            .map(|ix| {
                Tensor::<B, 1, Int>::from_data(TensorData::new(ix.clone(), [dim]), device)
                    .reshape(idx_shape)
                    .expand(out_shape)
            })
            .collect()
    }

    /// `t · m(α)` over the last dimension when `weighted` (and the weights are not all 1).
    fn weigh<B: Backend, const N: usize>(&self, t: Tensor<B, N>, weighted: bool) -> Tensor<B, N> {
        if weighted && self.weights.iter().any(|&w| w != 1.0) {
            let w = Tensor::<B, 1>::from_data(
                TensorData::new(self.weights.clone(), [self.dim()]),
                (&t.device(), t.dtype()),
            );
            t * w.unsqueeze::<N>()
        } else {
            t
        }
    }

    fn expand<B: Backend, const N: usize>(&self, x: Tensor<B, N>, weighted: bool) -> Tensor<B, N> {
        let mut out: Option<Tensor<B, N>> = None;
        // one gather per factor (faster than `select` on CPU backends)
        for idx in self.factor_indices::<B, N>(x.dims(), &x.device()) {
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
        self.weigh(out, weighted)
    }
}
