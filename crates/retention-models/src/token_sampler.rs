//! The next token from a row of logits: the most likely one (temperature 0), or a draw from the
//! softmax at a temperature, kept to the smallest set of tokens whose probability reaches
//! `top_p` (nucleus sampling).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ModelError;

/// How [`TokenSampler`] picks tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Nucleus: the draw is kept to the most likely tokens whose probabilities add up to at
    /// least this (1 keeps all).
    pub top_p: f32,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks tokens from logits as its [`SamplingConfig`] says, drawing from its own seeded
/// generator.
#[derive(Debug)]
pub struct TokenSampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl TokenSampler {
    /// A sampler.
    ///
    /// # Errors
    /// [`ModelError::Config`] when the temperature is negative or not finite, or `top_p` is
    /// not in `(0, 1]`.
    pub fn new(config: SamplingConfig) -> Result<Self, ModelError> {
        if !config.temperature.is_finite() || config.temperature < 0.0 {
            return Err(ModelError::Config(format!(
                "temperature must be ≥ 0, got {}",
                config.temperature
            )));
        }
        if !(config.top_p > 0.0 && config.top_p <= 1.0) {
            return Err(ModelError::Config(format!(
                "top_p must lie in (0, 1], got {}",
                config.top_p
            )));
        }
        Ok(Self {
            config,
            rng: StdRng::seed_from_u64(config.seed),
        })
    }

    /// The next token for `logits` (one per vocabulary entry; NaN counts as impossible).
    ///
    /// # Errors
    /// [`ModelError::Config`] when `logits` is empty.
    pub fn pick(&mut self, logits: &[f32]) -> Result<u32, ModelError> {
        if logits.is_empty() {
            return Err(ModelError::Config("no logits to pick a token from".into()));
        }
        Ok(self.pick_from(logits))
    }

    fn pick_from(&mut self, logits: &[f32]) -> u32 {
        let valid = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .max_by(|a, b| valid(*a.1).total_cmp(&valid(*b.1)))
                .map_or(0, |(i, _)| i as u32)
        };
        if self.config.temperature == 0.0 {
            return argmax();
        }
        let top = logits
            .iter()
            .copied()
            .map(valid)
            .fold(f32::NEG_INFINITY, f32::max);
        if !top.is_finite() {
            return argmax();
        }
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let p = f64::from((valid(x) - top) / self.config.temperature).exp();
                (i as u32, p)
            })
            .filter(|(_, p)| *p > 0.0)
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = probs.iter().map(|(_, p)| p).sum();
        // the nucleus: the most likely tokens until their share reaches top_p
        let mut kept = 0.0;
        let mut len = 0;
        for (_, p) in &probs {
            kept += p;
            len += 1;
            if kept >= f64::from(self.config.top_p) * total {
                break;
            }
        }
        probs.truncate(len.max(1));
        let mut draw = self.rng.random::<f64>() * kept;
        for (token, p) in &probs {
            draw -= p;
            if draw <= 0.0 {
                return *token;
            }
        }
        probs.last().map_or_else(argmax, |(token, _)| *token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_p: f32) -> TokenSampler {
        TokenSampler::new(SamplingConfig {
            temperature,
            top_p,
            seed: 7,
        })
        .expect("valid")
    }

    #[test]
    fn temperature_zero_is_the_argmax() {
        assert_eq!(
            sampler(0.0, 1.0).pick(&[0.1, 3.0, f32::NAN, 2.9]).ok(),
            Some(1)
        );
        assert!(matches!(
            sampler(1.0, 1.0).pick(&[]),
            Err(ModelError::Config(_))
        ));
    }

    #[test]
    fn draws_follow_the_softmax_and_the_nucleus() {
        // probabilities ∝ e^{x}: 0.64, 0.24, 0.09, 0.03 at temperature 1
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = sampler(1.0, 1.0);
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[s.pick(&logits).expect("a row") as usize] += 1;
        }
        let total: f64 = logits.iter().map(|x| f64::from(*x).exp()).sum();
        for (i, c) in counts.iter().enumerate() {
            let want = f64::from(logits[i]).exp() / total;
            let got = *c as f64 / 20_000.0;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
        // top_p 0.8 keeps the two most likely tokens (0.64 + 0.24 ≥ 0.8)
        let mut s = sampler(1.0, 0.8);
        assert!((0..2_000).all(|_| s.pick(&logits).is_ok_and(|t| t < 2)));
    }

    #[test]
    fn bad_settings_are_refused() {
        for (t, p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            let config = SamplingConfig {
                temperature: t,
                top_p: p,
                seed: 0,
            };
            assert!(matches!(
                TokenSampler::new(config),
                Err(ModelError::Config(_))
            ));
        }
    }
}
