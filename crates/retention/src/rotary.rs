//! Rotary position encoding of queries and keys at absolute positions, computed for the
//! positions at hand (no table, so no longest sequence): what a power retention layer
//! converted from rotary attention applies to keep the pretrained geometry of `q·k`.

use burn::tensor::{Tensor, TensorData, backend::Backend};

/// Rotates each adjacent coordinate pair `(x_{2i}, x_{2i+1})` of the token at position
/// `start + s` by the angle `(start + s) · θ^{−2i/d}`, the rotary encoding of Llama-family
/// checkpoints in GGUF's layout (Burn's `RotaryEncoding`). Angles are computed in f64 on the
/// host, so far positions keep their precision.
///
/// # Shapes
/// - `x`: `[batch, seq, heads, head_dim]` (even `head_dim`) → the same
pub fn rotate_pairs<B: Backend>(x: Tensor<B, 4>, start: usize, theta: f64) -> Tensor<B, 4> {
    let [_, t, _, d] = x.dims();
    RotaryAngles::new(start, t, d, theta, &x.device()).rotate(x)
}

/// The cosines and sines of [`rotate_pairs`] for `seq` positions from `start`, made once and
/// applied to the queries and the keys alike.
pub(crate) struct RotaryAngles<B: Backend> {
    cos: Tensor<B, 5>,
    sin: Tensor<B, 5>,
}

impl<B: Backend> RotaryAngles<B> {
    pub(crate) fn new(
        start: usize,
        seq: usize,
        head_dim: usize,
        theta: f64,
        device: &B::Device,
    ) -> Self {
        let half = head_dim / 2;
        let (mut cos, mut sin) = (
            Vec::with_capacity(seq * half),
            Vec::with_capacity(seq * half),
        );
        for s in 0..seq {
            let position = (start + s) as f64;
            for i in 0..half {
                let angle = position * theta.powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |values: Vec<f32>| {
            Tensor::<B, 4>::from_data(TensorData::new(values, [1, seq, 1, half]), device)
                .unsqueeze_dim::<5>(4)
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// `x` (`[batch, seq, heads, head_dim]`) rotated, in its own dtype.
    pub(crate) fn rotate(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, t, h, d] = x.dims();
        let dtype = x.dtype();
        let (cos, sin) = (self.cos.clone().cast(dtype), self.sin.clone().cast(dtype));
        let pairs = x.reshape([b, t, h, d / 2, 2]);
        let even = pairs.clone().narrow(4, 0, 1);
        let odd = pairs.narrow(4, 1, 1);
        let rotated_even = even.clone() * cos.clone() - odd.clone() * sin.clone();
        let rotated_odd = even * sin + odd * cos;
        Tensor::cat(vec![rotated_even, rotated_odd], 4).reshape([b, t, h, d])
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::backend::NdArray;
    use burn::nn::RotaryEncodingConfig;
    use burn::tensor::{Distribution, Tolerance};

    use super::*;

    type B = NdArray;

    /// The same rotation as Burn's `RotaryEncoding` (which `RotaryAttention` uses), from any
    /// start, and a rotation preserves norms.
    #[test]
    fn equals_burns_rotary_encoding() {
        let dev = Default::default();
        let (b, t, h, d) = (2, 7, 3, 8);
        let rope = RotaryEncodingConfig::new(64, d)
            .with_theta(500.0)
            .init::<B>(&dev);
        let x = Tensor::<B, 4>::random([b, t, h, d], Distribution::Normal(0.0, 1.0), &dev);
        for start in [0, 5, 40] {
            let ours = rotate_pairs(x.clone(), start, 500.0);
            let burns = rope.apply(x.clone().swap_dims(1, 2), start).swap_dims(1, 2);
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&burns.into_data(), Tolerance::rel_abs(1e-4, 1e-5));
            let norms = |y: Tensor<B, 4>| (y.clone() * y).sum_dim(3);
            norms(ours).into_data().assert_approx_eq::<f32>(
                &norms(x.clone()).into_data(),
                Tolerance::rel_abs(1e-5, 1e-6),
            );
        }
    }
}
