#![cfg(feature = "ndarray")]
//! The module: shapes, gradients to every parameter, training reduces a loss, decoding with
//! the state equals the full forward, and the one-line mixer swap.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::attention::MultiHeadAttentionConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Distribution, Tensor, backend::AutodiffBackend};
use retention::{
    ComputeDtype, DecodeState, PowerRetention, PowerRetentionConfig, SequenceMixerConfig,
};

type B = NdArray;
type AD = Autodiff<NdArray>;

fn config() -> PowerRetentionConfig {
    PowerRetentionConfig::new(32, 4)
        .with_n_kv_heads(Some(2))
        .with_chunk_size(Some(4))
}

fn input<Bk: burn::tensor::backend::Backend>(
    b: usize,
    t: usize,
    dev: &Bk::Device,
) -> Tensor<Bk, 3> {
    Tensor::random([b, t, 32], Distribution::Normal(0.0, 1.0), dev)
}

#[test]
fn output_shape() {
    let dev = Default::default();
    let layer: PowerRetention<B> = config().init(&dev).expect("valid config");
    assert_eq!(
        layer
            .forward(input::<B>(3, 11, &dev))
            .expect("valid")
            .dims(),
        [3, 11, 32]
    );
    assert_eq!(layer.query.weight.dims(), [32, 32]);
    assert_eq!(layer.key.weight.dims(), [32, 16]);
    assert_eq!(layer.gate.as_ref().map(|g| g.weight.dims()), Some([32, 2]));
}

/// Collects the gradient norm of every float parameter, with its path.
struct GradNorms<'a> {
    grads: &'a <AD as AutodiffBackend>::Gradients,
    found: Vec<(String, Option<f64>)>,
    path: Vec<String>,
}

impl ModuleVisitor<AD> for GradNorms<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        let norm = param
            .val()
            .grad(self.grads)
            .map(|g| g.powi_scalar(2).sum().into_scalar() as f64);
        self.found.push((self.path.join("."), norm));
    }
}

#[test]
fn gradients_reach_every_parameter() {
    let dev = Default::default();
    let layer: PowerRetention<AD> = config().with_bias(true).init(&dev).expect("valid config");
    let loss = layer
        .forward(input::<AD>(2, 9, &dev))
        .expect("valid")
        .powi_scalar(2)
        .mean();
    let grads = loss.backward();
    let mut v = GradNorms {
        grads: &grads,
        found: Vec::new(),
        path: Vec::new(),
    };
    layer.visit(&mut v);
    // 5 linears with bias: 10 parameters
    assert_eq!(v.found.len(), 10, "parameters: {:?}", v.found);
    for (path, norm) in v.found {
        let norm = norm.unwrap_or_else(|| panic!("no gradient for {path}"));
        assert!(
            norm.is_finite() && norm > 0.0,
            "gradient of {path} is {norm}"
        );
    }
}

/// A layer whose op runs in another dtype returns the model's dtype, the same values up to
/// that dtype's rounding, and the same gradients (here f64 inside an f32 model: the two
/// differ by f32 rounding only; on GPUs `Bf16` puts the op on the tensor-core kernels).
#[test]
fn compute_dtype_casts_around_the_op() {
    let dev = Default::default();
    let layer: PowerRetention<AD> = config().init(&dev).expect("valid config");
    let x = input::<AD>(2, 9, &dev);
    let run = |layer: &PowerRetention<AD>| {
        let y = layer.forward(x.clone()).expect("valid");
        assert_eq!(y.dtype(), burn::tensor::DType::F32);
        let grads = y.clone().powi_scalar(2).mean().backward();
        let dq = layer.query.weight.val().grad(&grads).expect("query grad");
        let dg = layer
            .gate
            .as_ref()
            .and_then(|g| g.weight.val().grad(&grads))
            .expect("gate grad");
        (y.inner(), dq, dg)
    };
    let (y, dq, dg) = run(&layer);
    // cloned after a forward pass: a clone of a parameter not drawn yet draws its own. The
    // clone is forked (same values, fresh leaves): burn 0.21 can drop the gradient of a leaf
    // reused after a backward while another thread's backward sweeps the graphs
    // (tracel-ai/burn#5573), and the tests of this file run in parallel.
    let wide = layer
        .clone()
        .fork(&dev)
        .with_compute_dtype(ComputeDtype::F64);
    let (y64, dq64, dg64) = run(&wide);
    let rel = |a: Tensor<B, 2>, b: Tensor<B, 2>| {
        let scale = b.clone().abs().max().into_scalar();
        (a - b).abs().max().into_scalar() / scale
    };
    let [b, t, d] = y.dims();
    let flat = |y: Tensor<B, 3>| y.reshape([b * t, d]);
    let output = rel(flat(y64), flat(y));
    assert!(
        output > 0.0,
        "the f64 op returned the f32 op's values bit for bit"
    );
    for (name, err) in [
        ("output", output),
        ("∂W_q", rel(dq64, dq)),
        ("∂W_gate", rel(dg64, dg)),
    ] {
        assert!(err < 1e-4, "{name}: f64 op vs f32 op differ by {err:.2e}");
    }
}

/// A compute dtype the backend lacks is an error naming the setting, not a panic inside
/// the backend's cast.
#[test]
fn an_unsupported_compute_dtype_is_refused() {
    let dev = Default::default();
    let layer: PowerRetention<B> = config()
        .with_compute_dtype(ComputeDtype::Bf16)
        .init(&dev)
        .expect("valid config");
    match layer.forward(input::<B>(1, 5, &dev)) {
        Err(e) => assert!(e.to_string().contains("compute_dtype Bf16"), "{e}"),
        Ok(_) => panic!("ndarray has no bf16 tensors: the layer must refuse"),
    }
}

#[test]
fn adam_steps_reduce_a_toy_loss() {
    let dev = Default::default();
    let mut layer: PowerRetention<AD> = config().init(&dev).expect("valid config");
    let mut optim = AdamConfig::new().init();
    let x = input::<AD>(2, 12, &dev);
    // target: the input shifted by one token (copy the previous token)
    let target = Tensor::cat(
        vec![Tensor::zeros([2, 1, 32], &dev), x.clone().narrow(1, 0, 11)],
        1,
    );
    let loss_of = |layer: &PowerRetention<AD>| {
        (layer.forward(x.clone()).expect("valid") - target.clone())
            .powi_scalar(2)
            .mean()
    };
    let first = loss_of(&layer).into_scalar();
    for _ in 0..15 {
        let loss = loss_of(&layer);
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        layer = optim.step(1e-2, layer, grads);
    }
    let last = loss_of(&layer).into_scalar();
    assert!(
        last < 0.9 * first,
        "loss {first} -> {last}: training did not reduce it"
    );
}

#[test]
fn prefill_and_steps_match_forward() {
    let dev = Default::default();
    let layer: PowerRetention<B> = config().init(&dev).expect("valid config");
    let x = input::<B>(2, 15, &dev);
    let full = layer.forward(x.clone()).expect("valid");
    let (head, mut state) = layer
        .prefill(x.clone().narrow(1, 0, 10), None)
        .expect("valid");
    let mut outs = vec![head];
    for i in 10..15 {
        outs.push(
            layer
                .forward_step(x.clone().narrow(1, i, 1), &mut state)
                .expect("valid"),
        );
    }
    full.into_data().assert_approx_eq::<f32>(
        &Tensor::cat(outs, 1).into_data(),
        burn::tensor::Tolerance::rel_abs(1e-4, 1e-5),
    );
    assert!(
        layer.forward_step(x.narrow(1, 0, 2), &mut state).is_err(),
        "two tokens are not a step"
    );
}

#[test]
fn prefill_and_windowed_decode_match_forward() {
    let dev = Default::default();
    let layer: PowerRetention<B> = config().init(&dev).expect("valid config");
    let x = input::<B>(2, 17, &dev);
    let full = layer.forward(x.clone()).expect("valid");
    let (head, state) = layer
        .prefill(x.clone().narrow(1, 0, 9), None)
        .expect("valid");
    let mut window = DecodeState::new(state, 3).expect("in range");
    let mut outs = vec![head];
    for i in 9..17 {
        outs.push(
            layer
                .forward_decode(x.clone().narrow(1, i, 1), &mut window)
                .expect("valid"),
        );
    }
    assert_eq!(window.pending(), 2, "8 tokens: two windows of 3 absorbed");
    full.into_data().assert_approx_eq::<f32>(
        &Tensor::cat(outs, 1).into_data(),
        burn::tensor::Tolerance::rel_abs(1e-4, 1e-5),
    );
    assert!(
        layer
            .forward_decode(x.narrow(1, 0, 2), &mut window)
            .is_err(),
        "two tokens are not a step"
    );
    assert!(
        DecodeState::new(layer.init_state(2, &dev), 0).is_err(),
        "an empty window is rejected"
    );
}

#[test]
fn one_line_swap_between_attention_and_retention() {
    let dev = Default::default();
    let x = input::<B>(2, 7, &dev);
    for cfg in [
        SequenceMixerConfig::Attention(MultiHeadAttentionConfig::new(32, 4).with_dropout(0.0)),
        SequenceMixerConfig::PowerRetention(config()),
    ] {
        let mixer = cfg.init::<B>(&dev).expect("valid");
        let y = mixer.forward(x.clone()).expect("valid");
        assert_eq!(y.dims(), [2, 7, 32]);
        // causal: the first 3 outputs do not depend on later tokens
        let y3 = mixer.forward(x.clone().narrow(1, 0, 3)).expect("valid");
        y.narrow(1, 0, 3).into_data().assert_approx_eq::<f32>(
            &y3.into_data(),
            burn::tensor::Tolerance::rel_abs(1e-4, 1e-5),
        );
    }
}
