//! Options of the retention op.

use burn::config::Config;

use crate::{KernelChoice, RetentionError};

/// Options of [`power_retention`](crate::power_retention), mirroring the keyword arguments of
/// Manifest's `power_retention(Q, K, V, log_G, deg=.., scale=.., chunk_size=..)`.
///
/// ```
/// use retention::RetentionOptions;
/// let opts = RetentionOptions::new().with_degree(2).with_chunk_size(Some(128));
/// assert_eq!(opts.degree, 2);
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct RetentionOptions {
    /// The power `p` of the scores `(σ·q·k)^p`; even, at least 2.
    #[config(default = 2)]
    pub degree: usize,
    /// The scale `σ`; `None` means `1/√head_dim`. It cancels in the normalised output and only
    /// keeps intermediate values in range.
    #[config(default = "None")]
    pub scale: Option<f64>,
    /// Chunk size of the linear-cost chunked form; `None` selects the quadratic attention form.
    #[config(default = "None")]
    pub chunk_size: Option<usize>,
    /// Largest number of chunk-state elements (`batch · kv_heads · chunks · D · value_dim`) one
    /// call of the chunked form holds at once. A longer sequence runs as segments of whole
    /// chunks, each starting from the state the previous one ended with: the same result, with
    /// the memory of the chunk states bounded and every kernel index within 32 bits. The
    /// device's largest allocation bounds it too
    /// ([`RetentionBackend::retention_max_allocation`](crate::RetentionBackend::retention_max_allocation):
    /// 128 MiB on wgpu/lavapipe).
    #[config(default = "DEFAULT_SEGMENT_ELEMENTS")]
    pub segment_elements: usize,
    /// Which kernels a CubeCL backend runs (the same result whichever; for comparing and
    /// testing the kernel families on one device).
    #[config(default = "KernelChoice::Auto")]
    pub kernels: KernelChoice,
}

/// Default of [`RetentionOptions::segment_elements`]: `2³¹` elements (8 GiB of f32 chunk
/// states).
pub const DEFAULT_SEGMENT_ELEMENTS: usize = 1 << 31;

/// Most elements one input, output or state tensor of the op may have (kernel positions are
/// 32-bit).
pub const MAX_TENSOR_ELEMENTS: usize = u32::MAX as usize;

impl RetentionOptions {
    /// The scale actually used for head dimension `head_dim`.
    pub fn scale_for(&self, head_dim: usize) -> f64 {
        self.scale.unwrap_or(1.0 / (head_dim.max(1) as f64).sqrt())
    }

    /// Checks degree, scale and chunk size.
    ///
    /// # Errors
    /// [`RetentionError::Degree`], [`RetentionError::Scale`] or [`RetentionError::ChunkSize`].
    pub fn validate(&self) -> Result<(), RetentionError> {
        if self.degree == 0 || self.degree % 2 == 1 {
            return Err(RetentionError::Degree(self.degree));
        }
        if let Some(s) = self.scale
            && !(s.is_finite() && s > 0.0)
        {
            return Err(RetentionError::Scale(s));
        }
        if self.chunk_size == Some(0) {
            return Err(RetentionError::ChunkSize);
        }
        if self.segment_elements == 0 {
            return Err(RetentionError::Config(
                "`segment_elements` must be at least 1, got 0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use burn::config::Config;

    use super::RetentionOptions;
    use crate::KernelChoice;

    #[test]
    fn the_kernel_choice_round_trips() {
        let opts = RetentionOptions::new().with_kernels(KernelChoice::Cmma);
        let back =
            RetentionOptions::load_binary(opts.to_string().as_bytes()).expect("its own JSON loads");
        assert_eq!(back, opts);
        assert_eq!(back.kernels, KernelChoice::Cmma);
    }
}
