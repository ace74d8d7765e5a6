//! What a [`LlamaModel`](crate::LlamaModel) keeps between calls while it generates.

use burn::tensor::backend::Backend;
use retention::MixerCache;

/// The memory of a [`LlamaModel`](crate::LlamaModel) over the tokens it has read: one
/// [`MixerCache`] per block (attention's keys and values, or a power retention state) and the
/// count of tokens. Made by [`LlamaModel::new_cache`](crate::LlamaModel::new_cache), advanced
/// by [`LlamaModel::forward_cached`](crate::LlamaModel::forward_cached).
#[derive(Debug, Clone)]
pub struct LlamaCache<B: Backend> {
    pub(crate) layers: Vec<MixerCache<B>>,
    pub(crate) tokens: usize,
}

impl<B: Backend> LlamaCache<B> {
    /// Tokens read so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Bytes the caches of every block hold on the device: growing with the tokens for
    /// attention, constant for power retention once the first token is read.
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().map(MixerCache::size_bytes).sum()
    }
}
