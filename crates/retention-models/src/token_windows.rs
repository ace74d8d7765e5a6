//! Next-token batches: random windows of a token stream, drawn from a seed and the step number
//! alone, so a resumed run sees exactly the batches the uninterrupted one would have.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ModelError;

/// One batch: `inputs[b, i]` is followed by `targets[b, i]` in the text.
#[derive(Debug, Clone)]
pub struct TokenBatch<B: Backend> {
    /// `[batch, seq]` token ids.
    pub inputs: Tensor<B, 2, Int>,
    /// `[batch, seq]` the ids one position later.
    pub targets: Tensor<B, 2, Int>,
}

/// A token stream cut into `seq + 1`-token windows.
#[derive(Debug, Clone)]
pub struct TokenWindows {
    ids: Vec<u32>,
    seq: usize,
}

impl TokenWindows {
    /// Windows of `seq` inputs (and their `seq` targets) over `ids`.
    ///
    /// # Errors
    /// [`ModelError::Config`] when `seq` is 0 or the stream is shorter than `seq + 1` tokens.
    pub fn new(ids: Vec<u32>, seq: usize) -> Result<Self, ModelError> {
        if seq == 0 || ids.len() <= seq {
            return Err(ModelError::Config(format!(
                "seq_len must be in 1..{} for a stream of {} tokens, got {seq}",
                ids.len(),
                ids.len()
            )));
        }
        Ok(Self { ids, seq })
    }

    /// Tokens in the stream.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// How many ids of the stream lie outside `0..vocab_size`.
    pub fn ids_outside(&self, vocab_size: usize) -> usize {
        self.ids
            .iter()
            .filter(|&&id| id as usize >= vocab_size)
            .count()
    }

    /// Whether the stream is empty (never: [`TokenWindows::new`] refuses short streams).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// `batch` windows at offsets drawn from `(seed, step)`: the same arguments give the same
    /// batch in every run.
    pub fn random_batch<B: Backend>(
        &self,
        seed: u64,
        step: u64,
        batch: usize,
        device: &B::Device,
    ) -> TokenBatch<B> {
        // a distinct stream per step (SplitMix-style mixing keeps neighbouring steps apart)
        let mut rng = StdRng::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let starts: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..self.ids.len() - self.seq))
            .collect();
        self.batch_at(&starts, device)
    }

    /// Windows at evenly spaced offsets: a fixed validation set of `batches × batch` windows.
    pub fn evenly_spaced<B: Backend>(
        &self,
        batches: usize,
        batch: usize,
        device: &B::Device,
    ) -> Vec<TokenBatch<B>> {
        let count = (batches * batch).max(1);
        let span = self.ids.len() - self.seq;
        let starts: Vec<usize> = (0..count).map(|i| i * span / count).collect();
        starts
            .chunks(batch.max(1))
            .map(|s| self.batch_at(s, device))
            .collect()
    }

    fn batch_at<B: Backend>(&self, starts: &[usize], device: &B::Device) -> TokenBatch<B> {
        let (b, t) = (starts.len(), self.seq);
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for &s in starts {
            inputs.extend(self.ids[s..s + t].iter().map(|&i| i as i64));
            targets.extend(self.ids[s + 1..s + t + 1].iter().map(|&i| i as i64));
        }
        TokenBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [b, t]), device),
            targets: Tensor::from_data(TensorData::new(targets, [b, t]), device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn targets_follow_inputs_and_batches_repeat_per_step() {
        let windows = TokenWindows::new((0..100).collect(), 8).unwrap();
        let dev = Default::default();
        let a = windows.random_batch::<NdArray>(7, 3, 4, &dev);
        let b = windows.random_batch::<NdArray>(7, 3, 4, &dev);
        let c = windows.random_batch::<NdArray>(7, 4, 4, &dev);
        let x: Vec<i64> = a.inputs.to_data().convert::<i64>().to_vec().unwrap();
        let y: Vec<i64> = a.targets.to_data().convert::<i64>().to_vec().unwrap();
        assert!(x.iter().zip(&y).all(|(i, t)| t - i == 1));
        assert_eq!(a.inputs.to_data(), b.inputs.to_data());
        assert_ne!(a.inputs.to_data(), c.inputs.to_data());
    }

    #[test]
    fn short_streams_are_refused() {
        assert!(TokenWindows::new(vec![1, 2, 3], 3).is_err());
        assert!(TokenWindows::new(vec![1, 2, 3], 0).is_err());
    }
}
