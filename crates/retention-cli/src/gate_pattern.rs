//! Log-gate patterns of the long-sequence checks: the regimes a trained model's gates can
//! reach, at their extremes.

use burn::tensor::{Distribution, Tensor, activation::log_sigmoid, backend::Backend};
use clap::ValueEnum;

/// How the per-token log-gates `ln g ≤ 0` of a check are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GatePattern {
    /// All ≈ 0 (`ln g ∈ [−10⁻⁴, 0]`): nothing is forgotten, the state sums every token.
    Zero,
    /// All ≈ −20 (`ln g ∈ [−21, −19]`): every token forgets everything before it.
    Strong,
    /// 0 and −20 in turn: the state is rebuilt every second token.
    Alternating,
    /// `ln σ(x)`, `x ~ N(3, 2²)`: mostly slow forgetting with a tail of fast, as trained gates.
    Random,
}

impl GatePattern {
    /// Its name in tables and CSV files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zero => "zero",
            Self::Strong => "strong",
            Self::Alternating => "alternating",
            Self::Random => "random",
        }
    }

    /// Log-gates `[batch, seq, heads]` in f32 for the tokens from `start` (the alternating
    /// pattern is aligned to absolute positions).
    pub fn log_gates<B: Backend>(
        self,
        [batch, seq, heads]: [usize; 3],
        start: usize,
        device: &B::Device,
    ) -> Tensor<B, 3> {
        let shape = [batch, seq, heads];
        match self {
            Self::Zero => Tensor::random(shape, Distribution::Uniform(-1e-4, 0.0), device),
            Self::Strong => Tensor::random(shape, Distribution::Uniform(-21.0, -19.0), device),
            Self::Alternating => {
                // −20 at odd absolute positions
                let odd = Tensor::<B, 1, burn::tensor::Int>::arange(
                    start as i64..(start + seq) as i64,
                    device,
                )
                .remainder_scalar(2)
                .float()
                .reshape([1, seq, 1]);
                (odd * -20.0).expand(shape)
            }
            Self::Random => log_sigmoid(Tensor::random(
                shape,
                Distribution::Normal(3.0, 2.0),
                device,
            )),
        }
    }
}
