//! Shape checking of the op's inputs, shared by the tensor API and by callers that hold
//! shapes only (file readers, the CLI).

use crate::{MAX_TENSOR_ELEMENTS, RetentionError, RetentionOptions, expanded_dim};

/// The sizes of one retention problem, as read from validated inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionDims {
    /// Batch size `b`.
    pub batch: usize,
    /// Sequence length `t`.
    pub seq: usize,
    /// Query heads `hq`.
    pub q_heads: usize,
    /// Key/value heads `h` (`hq` is a multiple of `h`).
    pub kv_heads: usize,
    /// Query/key head dimension `d`.
    pub head_dim: usize,
    /// Value head dimension `e`.
    pub value_dim: usize,
}

impl RetentionDims {
    /// Query heads per key/value head, `r = hq / h`.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// Shape of the state, `[batch, kv_heads, D, value_dim]`, for degree `degree`.
    pub fn state_shape(&self, degree: usize) -> [usize; 4] {
        [
            self.batch,
            self.kv_heads,
            expanded_dim(self.head_dim, degree),
            self.value_dim,
        ]
    }

    /// Tokens per segment when the chunked form at `chunk` would hold more chunk-state
    /// elements than `limit` (a whole number of chunks), or `None` when the sequence runs in
    /// one call. `limit`: the smaller of [`RetentionOptions::segment_elements`] and the f32
    /// elements one allocation of the device holds.
    ///
    /// # Errors
    /// [`RetentionError::TooLarge`] when one chunk's state alone exceeds the budget or the
    /// 32-bit element limit.
    pub fn segment_tokens(
        &self,
        chunk: usize,
        options: &RetentionOptions,
        limit: usize,
    ) -> Result<Option<usize>, RetentionError> {
        let shape = self.state_shape(options.degree);
        check_elements("state", &shape)?;
        let per_chunk: usize = shape.iter().product();
        if per_chunk > limit {
            return Err(RetentionError::TooLarge {
                arg: "chunk state",
                shape: shape.to_vec(),
                elements: per_chunk,
                limit,
            });
        }
        let chunk = chunk.max(1);
        let chunks = self.seq.div_ceil(chunk);
        Ok((per_chunk.saturating_mul(chunks) > limit).then(|| (limit / per_chunk) * chunk))
    }

    /// Shape of the key-sum, `[batch, kv_heads, D]`, for degree `degree`.
    pub fn key_sum_shape(&self, degree: usize) -> [usize; 3] {
        [
            self.batch,
            self.kv_heads,
            expanded_dim(self.head_dim, degree),
        ]
    }
}

fn rank(
    arg: &'static str,
    shape: &[usize],
    expected: usize,
    layout: &'static str,
) -> Result<(), RetentionError> {
    if shape.len() == expected {
        Ok(())
    } else {
        Err(RetentionError::Rank {
            arg,
            expected,
            layout,
            got: shape.len(),
            shape: shape.to_vec(),
        })
    }
}

fn same(
    arg: &'static str,
    shape: &[usize],
    axis: usize,
    dim: &'static str,
    reference: &'static str,
    expected: usize,
) -> Result<(), RetentionError> {
    if shape[axis] == expected {
        Ok(())
    } else {
        Err(RetentionError::Mismatch {
            arg,
            reference,
            dim,
            expected,
            got: shape[axis],
            shape: shape.to_vec(),
        })
    }
}

/// Checks the shapes of `q`, `k`, `v` and `log_g` and the options; returns the problem sizes.
///
/// # Shapes
/// - `q`: `[batch, seq, q_heads, head_dim]`
/// - `k`: `[batch, seq, kv_heads, head_dim]`
/// - `v`: `[batch, seq, kv_heads, value_dim]`
/// - `log_g`: `[batch, seq, kv_heads]`
///
/// # Errors
/// The first problem found, as a [`RetentionError`] naming the argument.
pub fn check_shapes(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    log_g: Option<&[usize]>,
    options: &RetentionOptions,
) -> Result<RetentionDims, RetentionError> {
    const QL: &str = "[batch, seq, q_heads, head_dim]";
    rank("q", q, 4, QL)?;
    rank("k", k, 4, "[batch, seq, kv_heads, head_dim]")?;
    rank("v", v, 4, "[batch, seq, kv_heads, value_dim]")?;
    if let Some(g) = log_g {
        rank("log_g", g, 3, "[batch, seq, kv_heads]")?;
    }
    same("k", k, 0, "batch", "q", q[0])?;
    same("v", v, 0, "batch", "q", q[0])?;
    same("k", k, 1, "seq", "q", q[1])?;
    same("v", v, 1, "seq", "q", q[1])?;
    same("v", v, 2, "heads", "k", k[2])?;
    let (q_heads, kv_heads) = (q[2], k[2]);
    if kv_heads == 0 || q_heads == 0 || q_heads % kv_heads != 0 {
        return Err(RetentionError::HeadRatio {
            query_heads: q_heads,
            kv_heads,
        });
    }
    if q[3] == 0 {
        return Err(RetentionError::Empty {
            arg: "q",
            dim: "head_dim",
            shape: q.to_vec(),
        });
    }
    if k[3] != q[3] {
        return Err(RetentionError::HeadDim {
            arg: "k",
            expected: q[3],
            got: k[3],
        });
    }
    if v[3] == 0 {
        return Err(RetentionError::Empty {
            arg: "v",
            dim: "value_dim",
            shape: v.to_vec(),
        });
    }
    if let Some(g) = log_g {
        let expected = vec![q[0], q[1], kv_heads];
        if g != expected.as_slice() {
            return Err(RetentionError::GateShape {
                expected,
                got: g.to_vec(),
            });
        }
    }
    options.validate()?;
    check_feature_count(q[3], options.degree)?;
    let out = [q[0], q[1], q[2], v[3]];
    for (arg, shape) in [("q", q), ("k", k), ("v", v), ("output", &out[..])] {
        check_elements(arg, shape)?;
    }
    Ok(RetentionDims {
        batch: q[0],
        seq: q[1],
        q_heads,
        kv_heads,
        head_dim: q[3],
        value_dim: v[3],
    })
}

/// Checks that a tensor of `shape` has at most [`MAX_TENSOR_ELEMENTS`] elements.
///
/// # Errors
/// [`RetentionError::TooLarge`] naming `arg`.
pub(crate) fn check_elements(arg: &'static str, shape: &[usize]) -> Result<(), RetentionError> {
    check_elements_within(arg, shape, MAX_TENSOR_ELEMENTS)
}

/// Checks that a tensor of `shape` has at most `limit` elements.
fn check_elements_within(
    arg: &'static str,
    shape: &[usize],
    limit: usize,
) -> Result<(), RetentionError> {
    let elements = shape
        .iter()
        .try_fold(1usize, |n, &x| n.checked_mul(x))
        .unwrap_or(usize::MAX);
    if elements > limit {
        return Err(RetentionError::TooLarge {
            arg,
            shape: shape.to_vec(),
            elements,
            limit,
        });
    }
    Ok(())
}

/// Checks that each `[batch, seq, heads, dim]` tensor of a call (`q`, `k`, `v`, the output)
/// fits one allocation of `max_bytes` (`None`: no limit known) as f32, the dtype of the
/// kernels' working copies of half inputs and of the rows kept for the backward pass. Above
/// it the device's runtime refuses the buffer on its own thread and the op would return an
/// unwritten output.
///
/// # Errors
/// [`RetentionError::TooLarge`] naming the first tensor that does not fit, with the limit in
/// f32 elements.
pub(crate) fn check_allocations(
    dims: &RetentionDims,
    max_bytes: Option<usize>,
) -> Result<(), RetentionError> {
    let Some(max_bytes) = max_bytes else {
        return Ok(());
    };
    let limit = max_bytes / 4;
    let RetentionDims {
        batch: b,
        seq: t,
        q_heads: hq,
        kv_heads: h,
        head_dim: d,
        value_dim: e,
    } = *dims;
    for (arg, shape) in [
        ("q", [b, t, hq, d]),
        ("k", [b, t, h, d]),
        ("v", [b, t, h, e]),
        ("output", [b, t, hq, e]),
    ] {
        check_elements_within(arg, &shape, limit)?;
    }
    Ok(())
}

/// Checks a `(state, key_sum)` pair against the problem sizes.
///
/// # Errors
/// [`RetentionError::StateShape`] naming `state` or `key_sum`.
pub fn check_state_shapes(
    dims: &RetentionDims,
    degree: usize,
    state: &[usize],
    key_sum: &[usize],
) -> Result<(), RetentionError> {
    let expected = dims.state_shape(degree);
    if state != expected.as_slice() {
        return Err(RetentionError::StateShape {
            arg: "state",
            layout: "[batch, kv_heads, D, value_dim]",
            expected: expected.to_vec(),
            got: state.to_vec(),
        });
    }
    let expected = dims.key_sum_shape(degree);
    if key_sum != expected.as_slice() {
        return Err(RetentionError::StateShape {
            arg: "key_sum",
            layout: "[batch, kv_heads, D]",
            expected: expected.to_vec(),
            got: key_sum.to_vec(),
        });
    }
    Ok(())
}

/// Checks that a layer input `[batch, seq, width]` has `width == d_model`.
///
/// # Errors
/// [`RetentionError::Mismatch`] naming `x`.
pub(crate) fn check_width(shape: [usize; 3], d_model: usize) -> Result<(), RetentionError> {
    same("x", &shape, 2, "width", "d_model of the layer", d_model)
}

/// [`RetentionError::FeatureCount`] when `D = C(d + p − 1, p)` does not fit in a `usize`.
pub(crate) fn check_feature_count(head_dim: usize, degree: usize) -> Result<(), RetentionError> {
    match crate::checked_expanded_dim(head_dim, degree) {
        Some(_) => Ok(()),
        None => Err(RetentionError::FeatureCount { head_dim, degree }),
    }
}
