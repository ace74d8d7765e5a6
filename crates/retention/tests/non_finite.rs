#![cfg(feature = "ndarray")]
//! A NaN or an infinity in the inputs is neither refused (finding one costs a read of every
//! element) nor hidden: it reaches every output that depends on it, and nothing in an earlier
//! chunk, another head group or another sequence. A query's reaches its own row; a key's,
//! value's or log-gate's the rows of its key/value head's query group from its token on, and
//! may reach the group's earlier rows of the same chunk (the masked products of a chunk
//! multiply its future values by zero, and 0·NaN is NaN, as in flash attention's diagonal
//! tiles); the attention form is one chunk. Run on ndarray (f64, the reference) and, with
//! `--features wgpu`, on the CubeCL kernels (f32; lavapipe in CI).

mod common;

use burn::tensor::DType;
use common::{Gates, Problem, to_vec};
use retention::{RetentionBackend, RetentionOptions, power_retention};

/// Which input gets the poisoned element.
#[derive(Debug, Clone, Copy)]
enum Poisoned {
    Query,
    Key,
    Value,
    Gate,
}

/// Poisons token `at` of sequence 0 (query head 0, or key/value head 0) with `x`, runs every
/// form on `B` in `dtype` with head dims `(d, e)`, and checks which output rows are non-finite.
fn check<B: RetentionBackend>(
    dev: &B::Device,
    dtype: DType,
    (d, e): (usize, usize),
    which: Poisoned,
    x: f64,
) {
    let (b, t, hq, h, at) = (2, 40, 4, 2, 21);
    let mut p = Problem::random(7, b, t, hq, h, d, e, Gates::Typical);
    match which {
        Poisoned::Query => p.q[(at * hq) * d] = x,
        Poisoned::Key => p.k[(at * h) * d + 1] = x,
        Poisoned::Value => p.v[(at * h) * e] = x,
        Poisoned::Gate => {
            if let Some(g) = p.log_g.as_mut() {
                g[at * h] = x;
            }
        }
    }
    let r = hq / h;
    for chunk in [None, Some(4), Some(16)] {
        let (q, k, v, g) = p.tensors::<B>(dev, dtype);
        let options = RetentionOptions::new().with_chunk_size(chunk);
        let y = to_vec(power_retention(q, k, v, g, &options).expect("valid shapes"));
        for bi in 0..b {
            for i in 0..t {
                for j in 0..hq {
                    let row = &y[((bi * t + i) * hq + j) * e..][..e];
                    let chunk_start = chunk.map_or(0, |c| at / c * c);
                    let (reached, may_reach) = match which {
                        Poisoned::Query => (bi == 0 && i == at && j == 0, false),
                        _ => (
                            bi == 0 && i >= at && j / r == 0,
                            bi == 0 && i >= chunk_start && j / r == 0,
                        ),
                    };
                    let finite = row.iter().all(|v| v.is_finite());
                    let place = format!(
                        "{which:?} = {x} at token {at}, chunk {chunk:?}: row (sequence {bi}, token {i}, head {j}) = {row:?}"
                    );
                    if reached {
                        assert!(!finite, "hidden: {place}");
                    } else if !may_reach {
                        assert!(finite, "leaked: {place}");
                    }
                }
            }
        }
    }
}

const NAN_INPUTS: [Poisoned; 4] = [
    Poisoned::Query,
    Poisoned::Key,
    Poisoned::Value,
    Poisoned::Gate,
];
const INFINITE_INPUTS: [Poisoned; 3] = [Poisoned::Query, Poisoned::Key, Poisoned::Value];

mod ndarray {
    use super::*;
    type B = burn::backend::NdArray<f64>;

    #[test]
    fn nan_reaches_exactly_what_depends_on_it() {
        for which in NAN_INPUTS {
            check::<B>(&Default::default(), DType::F64, (4, 3), which, f64::NAN);
        }
    }

    #[test]
    fn infinity_reaches_exactly_what_depends_on_it() {
        for which in INFINITE_INPUTS {
            check::<B>(
                &Default::default(),
                DType::F64,
                (4, 3),
                which,
                f64::INFINITY,
            );
        }
    }
}

/// The same on the kernels (head dims they take: multiples of 8).
#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use common::adapter;
    type B = burn::backend::Wgpu;

    #[test]
    fn nan_reaches_exactly_what_depends_on_it() {
        if let Some(dev) = adapter::<B>("non-finite inputs (wgpu)") {
            for which in NAN_INPUTS {
                check::<B>(&dev, DType::F32, (8, 8), which, f64::NAN);
            }
        }
    }

    #[test]
    fn infinity_reaches_exactly_what_depends_on_it() {
        if let Some(dev) = adapter::<B>("non-finite inputs (wgpu)") {
            for which in INFINITE_INPUTS {
                check::<B>(&dev, DType::F32, (8, 8), which, f64::INFINITY);
            }
        }
    }
}
