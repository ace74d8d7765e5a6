//! What a [`SequenceMixer`] keeps between calls when a sequence arrives piece by piece
//! (generation: a prompt, then one token at a time).

use burn::nn::attention::{MhaInput, generate_autoregressive_mask};
use burn::tensor::{Tensor, backend::Backend};

use crate::{RetentionBackend, RetentionError, RetentionState, SequenceMixer};

/// The memory of a [`SequenceMixer`] over the tokens it has mixed so far, made by
/// [`SequenceMixer::new_cache`] and advanced by [`SequenceMixer::forward_cached`].
///
/// Attention's grows with every token (its keys and values); power retention's is its state,
/// whose size does not depend on how many tokens it has seen.
#[derive(Debug, Clone)]
pub enum MixerCache<B: Backend> {
    /// Burn's `MultiHeadAttention`: the inputs so far, `[batch, tokens, d_model]` (each call
    /// mixes them all again and answers the new positions).
    Inputs(Option<Tensor<B, 3>>),
    /// [`RotaryAttention`](crate::RotaryAttention): the rotated keys and the values so far,
    /// `[batch, kv_heads, tokens, head_dim]` each.
    KeysValues(Option<(Tensor<B, 4>, Tensor<B, 4>)>),
    /// [`PowerRetention`](crate::PowerRetention): the state after the tokens so far, and
    /// how many there were (the next token's position, for a rotary encoding).
    Retention(Option<(RetentionState<B>, usize)>),
}

impl<B: Backend> MixerCache<B> {
    /// Tokens mixed so far.
    pub fn tokens(&self) -> usize {
        match self {
            Self::Inputs(x) => x.as_ref().map_or(0, |x| x.dims()[1]),
            Self::KeysValues(kv) => kv.as_ref().map_or(0, |(k, _)| k.dims()[2]),
            Self::Retention(s) => s.as_ref().map_or(0, |(_, tokens)| *tokens),
        }
    }

    /// Bytes the cache holds on its device.
    pub fn size_bytes(&self) -> usize {
        fn bytes<B: Backend, const D: usize>(x: &Tensor<B, D>) -> usize {
            x.shape().num_elements() * x.dtype().size()
        }
        match self {
            Self::Inputs(Some(x)) => bytes(x),
            Self::KeysValues(Some((k, v))) => bytes(k) + bytes(v),
            Self::Retention(Some((state, _))) => state.size_bytes(),
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Inputs(_) => "Inputs",
            Self::KeysValues(_) => "KeysValues",
            Self::Retention(_) => "Retention",
        }
    }
}

impl<B: RetentionBackend> SequenceMixer<B> {
    /// The empty cache of this mixer's kind.
    pub fn new_cache(&self) -> MixerCache<B> {
        match self {
            Self::Attention(_) => MixerCache::Inputs(None),
            Self::RotaryAttention(_) => MixerCache::KeysValues(None),
            Self::PowerRetention(_) => MixerCache::Retention(None),
        }
    }

    /// Mixes the next tokens of a sequence whose earlier tokens `cache` holds, and adds them
    /// to it. Outputs equal [`forward`](Self::forward)'s over the whole sequence at the same
    /// positions (up to rounding): a prompt can be mixed whole or in pieces, then one token at
    /// a time. Power retention and rotary attention do only the new tokens' work (retention
    /// in time and memory independent of the tokens before); Burn's `MultiHeadAttention`
    /// mixes every token again.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    ///
    /// # Errors
    /// The errors of [`forward`](Self::forward);
    /// [`PowerRetention::prefill`](crate::PowerRetention::prefill) and
    /// [`RotaryAttention::attend`](crate::RotaryAttention::attend) for a cache that does not
    /// fit `x`; [`RetentionError::Config`] for a cache of another mixer's kind. On error the
    /// cache is left unchanged.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        cache: &mut MixerCache<B>,
    ) -> Result<Tensor<B, 3>, RetentionError> {
        match (self, &mut *cache) {
            (Self::PowerRetention(retention), MixerCache::Retention(cache)) => {
                let t = x.dims()[1];
                let (y, next, tokens) = match cache.clone() {
                    Some((mut state, seen)) if t == 1 => {
                        let y = retention.forward_step_at(x, &mut state, seen)?;
                        (y, state, seen + 1)
                    }
                    Some((state, seen)) => {
                        let (y, state) = retention.prefill_at(x, Some(state), seen)?;
                        (y, state, seen + t)
                    }
                    None => {
                        let (y, state) = retention.prefill_at(x, None, 0)?;
                        (y, state, t)
                    }
                };
                *cache = Some((next, tokens));
                Ok(y)
            }
            (Self::RotaryAttention(attention), MixerCache::KeysValues(past)) => {
                let (y, keys, values) = attention.attend(x, past.clone())?;
                *past = Some((keys, values));
                Ok(y)
            }
            (Self::Attention(mha), MixerCache::Inputs(past)) => {
                let [b, t, _] = x.dims();
                crate::shapes::check_width(x.dims(), mha.d_model)?;
                let all = match past {
                    Some(p) if p.dims()[0] == b => Tensor::cat(vec![p.clone(), x], 1),
                    Some(p) => {
                        return Err(RetentionError::StateShape {
                            arg: "inputs",
                            layout: "[batch, tokens, d_model]",
                            expected: vec![b, p.dims()[1], mha.d_model],
                            got: p.dims().to_vec(),
                        });
                    }
                    None => x,
                };
                let total = all.dims()[1];
                let mask = generate_autoregressive_mask::<B>(b, total, &all.device());
                let y = mha
                    .forward(MhaInput::self_attn(all.clone()).mask_attn(mask))
                    .context
                    .narrow(1, total - t, t);
                *past = Some(all);
                Ok(y)
            }
            (mixer, cache) => Err(RetentionError::Config(format!(
                "a {} cache given to a {} mixer (make it with SequenceMixer::new_cache)",
                cache.kind(),
                mixer.kind()
            ))),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Attention(_) => "MultiHeadAttention",
            Self::RotaryAttention(_) => "RotaryAttention",
            Self::PowerRetention(_) => "PowerRetention",
        }
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::backend::NdArray;
    use burn::nn::attention::MultiHeadAttentionConfig;
    use burn::tensor::{Distribution, Tolerance};

    use super::*;
    use crate::{PowerRetentionConfig, RotaryAttentionConfig, SequenceMixerConfig};

    type B = NdArray;

    fn mixers() -> Vec<SequenceMixer<B>> {
        let dev = Default::default();
        [
            SequenceMixerConfig::Attention(MultiHeadAttentionConfig::new(32, 4).with_dropout(0.0)),
            SequenceMixerConfig::RotaryAttention(RotaryAttentionConfig::new(32, 4, 2)),
            SequenceMixerConfig::PowerRetention(
                PowerRetentionConfig::new(32, 4)
                    .with_n_kv_heads(Some(2))
                    .with_chunk_size(Some(4)),
            ),
            SequenceMixerConfig::PowerRetention(
                PowerRetentionConfig::new(32, 4)
                    .with_n_kv_heads(Some(2))
                    .with_chunk_size(Some(4))
                    .with_rotary_theta(Some(100.0)),
            ),
        ]
        .iter()
        .map(|c| c.init::<B>(&dev).expect("builds"))
        .collect()
    }

    /// A sequence mixed in pieces (a prompt, single tokens, another piece) through the cache
    /// equals the sequence mixed whole, for every kind of mixer.
    #[test]
    fn pieces_equal_the_whole_sequence() {
        let dev = Default::default();
        let x = Tensor::<B, 3>::random([2, 11, 32], Distribution::Normal(0.0, 1.0), &dev);
        for mixer in mixers() {
            let whole = mixer.forward(x.clone()).expect("runs");
            let mut cache = mixer.new_cache();
            assert_eq!(cache.size_bytes(), 0);
            let pieces: Vec<_> = [0..5, 5..6, 6..7, 7..11]
                .into_iter()
                .map(|r| {
                    let piece = x.clone().narrow(1, r.start, r.len());
                    mixer.forward_cached(piece, &mut cache).expect("runs")
                })
                .collect();
            assert_eq!(cache.tokens(), 11, "{}", mixer.kind());
            Tensor::cat(pieces, 1)
                .into_data()
                .assert_approx_eq::<f32>(&whole.into_data(), Tolerance::rel_abs(1e-4, 1e-5));
        }
    }

    /// Attention's cache grows with the tokens, power retention's stays the size of its state.
    #[test]
    fn retention_cache_does_not_grow() {
        let dev = Default::default();
        for mixer in mixers().into_iter().skip(1) {
            let mut cache = mixer.new_cache();
            let mut sizes = Vec::new();
            for _ in 0..3 {
                let x = Tensor::<B, 3>::random([1, 4, 32], Distribution::Normal(0.0, 1.0), &dev);
                mixer.forward_cached(x, &mut cache).expect("runs");
                sizes.push(cache.size_bytes());
            }
            match mixer {
                SequenceMixer::PowerRetention(_) => assert_eq!(sizes[0], sizes[2]),
                _ => assert_eq!(sizes[2], 3 * sizes[0]),
            }
        }
    }

    #[test]
    fn a_cache_that_does_not_fit_is_refused_and_kept() {
        let dev = Default::default();
        let mixers = mixers();
        let x = Tensor::<B, 3>::random([1, 3, 32], Distribution::Normal(0.0, 1.0), &dev);
        // another mixer's kind
        let mut cache = mixers[2].new_cache();
        assert!(matches!(
            mixers[1].forward_cached(x.clone(), &mut cache),
            Err(RetentionError::Config(m)) if m.contains("Retention cache")
        ));
        // a cache of another batch size
        let two = Tensor::<B, 3>::zeros([2, 1, 32], &dev);
        for mixer in &mixers {
            let mut cache = mixer.new_cache();
            mixer.forward_cached(x.clone(), &mut cache).expect("runs");
            let err = mixer.forward_cached(two.clone(), &mut cache);
            assert!(
                matches!(err, Err(RetentionError::StateShape { .. })),
                "{}: {err:?}",
                mixer.kind()
            );
            assert_eq!(cache.tokens(), 3);
        }
        // past the rotary table
        let short = RotaryAttentionConfig::new(32, 4, 2)
            .with_max_seq(5)
            .init::<B>(&dev)
            .expect("builds");
        let short = SequenceMixer::RotaryAttention(short);
        let mut cache = short.new_cache();
        short.forward_cached(x.clone(), &mut cache).expect("runs");
        assert!(matches!(
            short.forward_cached(x, &mut cache),
            Err(RetentionError::Config(m)) if m.contains("6 tokens")
        ));
        assert_eq!(cache.tokens(), 3);
    }

    /// A rotary layer cannot continue from a state without the position, and its positions
    /// matter: the same tokens later in the sequence mix differently.
    #[test]
    fn a_rotary_layer_needs_positions() {
        let dev = Default::default();
        let SequenceMixer::PowerRetention(rotary) = mixers().remove(3) else {
            panic!("the fourth mixer is rotary retention");
        };
        let x = Tensor::<B, 3>::random([1, 4, 32], Distribution::Normal(0.0, 1.0), &dev);
        let (_, mut state) = rotary.prefill(x.clone(), None).expect("runs");
        let one = x.clone().narrow(1, 0, 1);
        for err in [
            rotary.forward_step(one.clone(), &mut state).map(drop),
            rotary.prefill(x.clone(), Some(state.clone())).map(drop),
        ] {
            assert!(matches!(err, Err(RetentionError::Config(m)) if m.contains("_at")));
        }
        let at = |position| {
            let mut s = state.clone();
            rotary
                .forward_step_at(one.clone(), &mut s, position)
                .expect("runs")
        };
        let moved = (at(4) - at(9)).abs().max().into_scalar();
        assert!(moved > 1e-4, "{moved}");
    }
}
