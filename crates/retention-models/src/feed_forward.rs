//! The SwiGLU feed-forward of a decoder block: `W_down (silu(W_gate x) ⊙ W_up x)`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig, SwiGlu, SwiGluConfig};
use burn::tensor::{Tensor, backend::Backend};

/// Configuration of a [`FeedForward`].
#[derive(Config, Debug)]
pub struct FeedForwardConfig {
    /// Width of the input and output.
    pub d_model: usize,
    /// Width of the hidden layer.
    pub hidden: usize,
}

impl FeedForwardConfig {
    /// Builds the layer (no biases).
    pub fn init<B: Backend>(&self, device: &B::Device) -> FeedForward<B> {
        FeedForward {
            gate_up: SwiGluConfig::new(self.d_model, self.hidden).init(device),
            down: LinearConfig::new(self.hidden, self.d_model)
                .with_bias(false)
                .init(device),
        }
    }
}

/// SwiGLU feed-forward.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    gate_up: SwiGlu<B>,
    down: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    /// Replaces the weights (`[d_model, hidden]` for the gate and up projections,
    /// `[hidden, d_model]` for the down projection), as a checkpoint loader does.
    pub fn set_weights(
        &mut self,
        gate: Param<Tensor<B, 2>>,
        up: Param<Tensor<B, 2>>,
        down: Param<Tensor<B, 2>>,
    ) {
        self.gate_up.linear_inner.weight = gate;
        self.gate_up.linear_outer.weight = up;
        self.down.weight = down;
    }

    /// # Shapes
    /// - `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down.forward(self.gate_up.forward(x))
    }
}
