//! Mixer transfer: a converted model's sequence mixers trained, layer by layer, to reproduce
//! what the pretrained model's attention computed on the same inputs.
//!
//! The pretrained model (the teacher) runs forward and records, for every block, its mixer's
//! input (the block input after the mixer's norm) and output ([`MixerTrace`]). The converted
//! model's mixers then take those inputs and are scored by how far their outputs are from the
//! recorded ones ([`mixer_transfer_loss`]). Every target is a dense hidden state rather than one
//! token, and no gradient crosses a block, so each layer learns its replacement from what the
//! teacher does rather than from the corpus alone: the first stage of a conversion before it
//! is retrained on tokens.

use burn::tensor::{Tensor, backend::AutodiffBackend, backend::Backend};
use retention::{RetentionBackend, RetentionError, SequenceMixer};

use crate::ModelError;
use crate::decoder_block::DecoderBlock;

/// One mixer's input (the normalised block input) and output in a forward pass.
#[derive(Debug, Clone)]
pub struct MixerTrace<B: Backend> {
    /// `[batch, seq, d_model]`: what the mixer read.
    pub input: Tensor<B, 3>,
    /// `[batch, seq, d_model]`: what it wrote (before the residual sum).
    pub output: Tensor<B, 3>,
}

impl<B: AutodiffBackend> MixerTrace<B> {
    /// The trace of an inner-backend forward pass (a teacher that runs without autodiff) as
    /// untracked tensors of `B`.
    pub fn from_inner(trace: MixerTrace<B::InnerBackend>) -> Self {
        Self {
            input: Tensor::from_inner(trace.input),
            output: Tensor::from_inner(trace.output),
        }
    }
}

/// Every block's mixer input and output as `x` (the embedded tokens) passes through `blocks`.
///
/// # Errors
/// The mixers' errors.
pub(crate) fn traces_through<B: RetentionBackend>(
    mut x: Tensor<B, 3>,
    blocks: &[DecoderBlock<B>],
) -> Result<Vec<MixerTrace<B>>, RetentionError> {
    let mut traces = Vec::with_capacity(blocks.len());
    for block in blocks {
        let (next, trace) = block.forward_traced(x)?;
        traces.push(trace);
        x = next;
    }
    Ok(traces)
}

/// The mean over mixers of `‖mixer(input) − output‖² / ‖output‖²`: zero where every mixer
/// reproduces its trace, one where it outputs zeros.
///
/// # Shapes
/// - every trace: `[batch, seq, d_model]`; result `[1]`
///
/// # Errors
/// [`ModelError::Config`] when the counts of mixers and traces differ or there are none, or a
/// trace's input and output differ in shape; the mixers' errors.
pub fn mixer_transfer_loss<B: RetentionBackend>(
    mixers: &[&SequenceMixer<B>],
    traces: Vec<MixerTrace<B>>,
) -> Result<Tensor<B, 1>, ModelError> {
    if mixers.len() != traces.len() || traces.is_empty() {
        return Err(ModelError::Config(format!(
            "mixer transfer needs one trace per mixer: {} mixers, {} traces",
            mixers.len(),
            traces.len()
        )));
    }
    let mut errors = Vec::with_capacity(traces.len());
    for (block, (mixer, trace)) in mixers.iter().zip(traces).enumerate() {
        if trace.input.dims() != trace.output.dims() {
            return Err(ModelError::Config(format!(
                "trace {block}: input {:?} and output {:?} differ in shape",
                trace.input.dims(),
                trace.output.dims()
            )));
        }
        let predicted = mixer.forward(trace.input)?;
        let scale = trace.output.clone().powi_scalar(2).mean().add_scalar(1e-12);
        errors.push((predicted - trace.output).powi_scalar(2).mean() / scale);
    }
    Ok(Tensor::cat(errors, 0).mean())
}
