//! A decoder's state that rewrites `S` only every few tokens, and its step.

use burn::tensor::{Tensor, backend::Backend};

use crate::device_failure::checked;
use crate::op::{check_step, float};
use crate::{RetentionBackend, RetentionError, RetentionOptions, RetentionState};

/// The most tokens a [`DecodeState`] keeps beside its state before absorbing them (64: the
/// token cache of Brumby-14B's decoder, `chunk_size = 64`).
pub const MAX_FOLD_EVERY: usize = 64;

/// Tokens absorbed per backend call (a longer window is absorbed in pieces, in order): what
/// the absorption kernel stages in shared memory at head dims up to 128.
const ABSORB_PIECE: usize = 32;

/// The tokens kept beside the state, `[batch, n, kv_heads, ·]`.
#[derive(Debug, Clone)]
struct Window<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
}

/// Recurrent state for decoding that defers the rewrite of `S`: the last tokens' keys, values
/// and log-gates wait beside a [`RetentionState`] and are absorbed every `fold_every` tokens.
///
/// This is the token-cache protocol of Brumby-14B's decoder (Manifest's
/// `power_retention_inference` with a cache of `chunk_size = 64` tokens): every token is either
/// in the state or in the window, and the state is discounted to just before the window's first
/// token; `DecodeState::new(state, 64)` decodes as Brumby does.
///
/// [`power_retention_decode`] then reads `S` once per token (shared by every query head of a
/// group) and writes only the token itself; `S` is rewritten once per `fold_every` tokens. A
/// step is bound by the state's bytes on a GPU, and [`power_retention_step`](crate::power_retention_step)
/// reads and writes all of them, so this roughly halves a step's cost at large batch. Outputs
/// are the same as the step's, up to rounding. Backends without the decode kernels (ndarray,
/// tch) read the window through the plain-tensor chunked form, which costs more per token than
/// [`power_retention_step`](crate::power_retention_step): use that there.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{DType, Distribution, Tensor};
/// use retention::{DecodeState, RetentionOptions, RetentionState, power_retention_decode};
///
/// let dev = Default::default();
/// let opts = RetentionOptions::new();
/// let empty = RetentionState::<NdArray>::zeros(1, 2, 8, 8, 2, DType::F32, &dev);
/// let mut state = DecodeState::new(empty, 4)?;
/// for _ in 0..6 {
///     let q = Tensor::<NdArray, 4>::random([1, 1, 2, 8], Distribution::Normal(0.0, 1.0), &dev);
///     let k = Tensor::<NdArray, 4>::random([1, 1, 2, 8], Distribution::Normal(0.0, 1.0), &dev);
///     let v = Tensor::<NdArray, 4>::random([1, 1, 2, 8], Distribution::Normal(0.0, 1.0), &dev);
///     let (y, next) = power_retention_decode(q, k, v, None, state, &opts)?;
///     assert_eq!(y.dims(), [1, 1, 2, 8]);
///     state = next;
/// }
/// assert_eq!(state.pending(), 2); // 4 absorbed, 2 waiting
/// let plain: RetentionState<NdArray> = state.into_state(&opts)?;
/// # Ok::<(), retention::RetentionError>(())
/// ```
#[derive(Debug, Clone)]
pub struct DecodeState<B: Backend> {
    base: RetentionState<B>,
    window: Option<Window<B>>,
    fold_every: usize,
}

impl<B: RetentionBackend> DecodeState<B> {
    /// A decode state that starts from `state` (e.g. after a prefill) and absorbs its tokens
    /// every `fold_every` steps.
    ///
    /// # Errors
    /// [`RetentionError::FoldEvery`] unless `1 ≤ fold_every ≤` [`MAX_FOLD_EVERY`].
    pub fn new(state: RetentionState<B>, fold_every: usize) -> Result<Self, RetentionError> {
        if fold_every == 0 || fold_every > MAX_FOLD_EVERY {
            return Err(RetentionError::FoldEvery {
                got: fold_every,
                max: MAX_FOLD_EVERY,
            });
        }
        Ok(Self {
            base: state,
            window: None,
            fold_every,
        })
    }

    /// Tokens waiting beside the state.
    pub fn pending(&self) -> usize {
        self.window.as_ref().map_or(0, |w| w.keys.dims()[1])
    }

    /// Tokens kept before they are absorbed.
    pub fn fold_every(&self) -> usize {
        self.fold_every
    }

    /// The state before the waiting tokens.
    pub fn base(&self) -> &RetentionState<B> {
        &self.base
    }

    /// The state after every token seen (absorbs the waiting ones).
    ///
    /// # Errors
    /// [`RetentionError`] for invalid `options` (the shapes were checked by each step).
    pub fn into_state(
        self,
        options: &RetentionOptions,
    ) -> Result<RetentionState<B>, RetentionError> {
        options.validate()?;
        let device = self.base.state.device();
        let state = match self.window {
            None => self.base,
            Some(w) => absorb(w, self.base, options),
        };
        checked::<B, _>(&device, state)
    }
}

/// `base` advanced by the window's tokens, [`ABSORB_PIECE`] at a time.
fn absorb<B: RetentionBackend>(
    w: Window<B>,
    base: RetentionState<B>,
    options: &RetentionOptions,
) -> RetentionState<B> {
    let n = w.keys.dims()[1];
    let dtype = base.dtype();
    let mut state = base;
    let mut from = 0;
    while from < n {
        let len = ABSORB_PIECE.min(n - from);
        let (s, z) = B::retention_absorb(
            w.keys
                .clone()
                .narrow(1, from, len)
                .into_primitive()
                .tensor(),
            w.values
                .clone()
                .narrow(1, from, len)
                .into_primitive()
                .tensor(),
            w.log_g
                .clone()
                .map(|g| g.narrow(1, from, len).into_primitive().tensor()),
            state.state.into_primitive().tensor(),
            state.key_sum.into_primitive().tensor(),
            options,
        );
        state = RetentionState {
            state: float(s),
            key_sum: float(z),
        };
        from += len;
    }
    // the base keeps its dtype (see `RetentionState::cast`)
    state.cast(dtype)
}

/// One decode step on a [`DecodeState`]: the token's output, and the state with the token
/// kept (absorbed with the others once `fold_every` are waiting).
///
/// # Shapes
/// As [`power_retention_step`](crate::power_retention_step): `q [batch, 1, q_heads, head_dim]`,
/// `k [batch, 1, kv_heads, head_dim]`, `v [batch, 1, kv_heads, value_dim]`,
/// `log_g [batch, 1, kv_heads]`; output `[batch, 1, q_heads, value_dim]`.
///
/// # Errors
/// As [`power_retention_step`](crate::power_retention_step).
pub fn power_retention_decode<B: RetentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_g: Option<Tensor<B, 3>>,
    state: DecodeState<B>,
    options: &RetentionOptions,
) -> Result<(Tensor<B, 4>, DecodeState<B>), RetentionError> {
    check_step(&q, &k, &v, log_g.as_ref(), &state.base, options)?;
    let device = q.device();
    let DecodeState {
        base,
        window,
        fold_every,
    } = state;
    let window = match window {
        None => Window {
            keys: k,
            values: v,
            log_g,
        },
        Some(w) => {
            // a gate missing on either side is a gate of 1 (log-gate 0)
            let gates = match (w.log_g, log_g) {
                (None, None) => None,
                (old, new) => {
                    let n = w.keys.dims()[1];
                    let [b, _, h, _] = k.dims();
                    let zeros = |len: usize| Tensor::zeros([b, len, h], (&k.device(), k.dtype()));
                    Some(Tensor::cat(
                        vec![
                            old.unwrap_or_else(|| zeros(n)),
                            new.unwrap_or_else(|| zeros(1)),
                        ],
                        1,
                    ))
                }
            };
            Window {
                keys: Tensor::cat(vec![w.keys, k], 1),
                values: Tensor::cat(vec![w.values, v], 1),
                log_g: gates,
            }
        }
    };
    let y = float(B::retention_window(
        q.into_primitive().tensor(),
        window.keys.clone().into_primitive().tensor(),
        window.values.clone().into_primitive().tensor(),
        window.log_g.clone().map(|g| g.into_primitive().tensor()),
        base.state.clone().into_primitive().tensor(),
        base.key_sum.clone().into_primitive().tensor(),
        options,
    ));
    let next = if window.keys.dims()[1] >= fold_every {
        DecodeState {
            base: absorb(window, base, options),
            window: None,
            fold_every,
        }
    } else {
        DecodeState {
            base,
            window: Some(window),
            fold_every,
        }
    };
    checked::<B, _>(&device, (y, next))
}
