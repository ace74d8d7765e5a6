//! Training against a teacher's next-token distribution: a converted model learns what the
//! pretrained model it came from would predict at every position, not only the one token the
//! text holds.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};

/// The teacher's next-token distribution for `logits`, a constant for the student's graph.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]` → `[batch, seq, vocab]` (rows sum to 1)
pub fn teacher_distribution<B: AutodiffBackend>(
    logits: Tensor<B::InnerBackend, 3>,
) -> Tensor<B, 3> {
    Tensor::from_inner(softmax(logits, 2))
}

/// Mean cross-entropy of the student's `logits` against targets mixing the text's tokens
/// (weight `1 − weight`) and the teacher's distribution `teacher` (weight `weight`), in nats
/// per token: `(1 − w)·CE(text) + w·H(teacher, student)`. With `w = 0` it is the usual
/// next-token loss; `H(p, q) = KL(p‖q) + H(p)` is smallest where the student matches the
/// teacher, and its gradient with respect to the logits is `q − p`.
///
/// # Shapes
/// - `logits`, `teacher`: `[batch, seq, vocab]`, `targets`: `[batch, seq]` → `[1]`
pub fn distillation_loss<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    teacher: Option<Tensor<B, 3>>,
    weight: f64,
) -> Tensor<B, 1> {
    let log_q = log_softmax(logits, 2);
    let text = || {
        log_q
            .clone()
            .gather(2, targets.clone().unsqueeze_dim::<3>(2))
            .mean()
            .neg()
    };
    match teacher {
        Some(p) if weight > 0.0 => {
            let soft = (p * log_q.clone()).sum_dim(2).mean().neg();
            if weight >= 1.0 {
                soft
            } else {
                text().mul_scalar(1.0 - weight) + soft.mul_scalar(weight)
            }
        }
        _ => text(),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::tensor::{Distribution, TensorData};

    use super::*;

    // f32, as the crate's other tests in this process: with these on NdArray<f64>, the
    // checkpoint round trips that ran after them differed from their originals at f32
    // rounding (why is not established)
    type B = Autodiff<NdArray>;

    /// Agreement of two computations in f32.
    const TOL: f64 = 1e-5;

    fn logits(seed: u64) -> Tensor<B, 3> {
        <B as Backend>::seed(&Default::default(), seed);
        Tensor::random(
            [2, 5, 7],
            Distribution::Normal(0.0, 2.0),
            &Default::default(),
        )
    }

    fn targets() -> Tensor<B, 2, Int> {
        Tensor::from_data(
            TensorData::new(vec![0i64, 3, 6, 2, 2, 1, 5, 4, 0, 6], [2, 5]),
            &Default::default(),
        )
    }

    fn scalar(x: Tensor<B, 1>) -> f64 {
        f64::from(x.into_scalar())
    }

    /// Weight 0 (or no teacher) is Burn's cross-entropy of the text's tokens.
    #[test]
    fn without_the_teacher_it_is_the_cross_entropy() {
        let x = logits(1);
        let ce = CrossEntropyLossConfig::new()
            .init(&Default::default())
            .forward(x.clone().reshape([10, 7]), targets().reshape([10]));
        let teacher = teacher_distribution::<B>(logits(2).inner());
        for loss in [
            distillation_loss(x.clone(), targets(), None, 0.7),
            distillation_loss(x.clone(), targets(), Some(teacher), 0.0),
        ] {
            assert!((scalar(loss) - scalar(ce.clone())).abs() < TOL);
        }
    }

    /// A student that predicts the teacher's distribution has no gradient from the teacher's
    /// part (`q − p = 0`), and its loss is the teacher's entropy; the mixture weighs the two
    /// parts linearly.
    #[test]
    fn the_teacher_part_is_zero_where_the_student_matches() {
        let x = logits(3).require_grad();
        let teacher = teacher_distribution::<B>(x.clone().inner());
        let loss = distillation_loss(x.clone(), targets(), Some(teacher.clone()), 1.0);
        let entropy = (teacher.clone() * teacher.clone().log())
            .sum_dim(2)
            .mean()
            .neg();
        assert!((scalar(loss.clone()) - scalar(entropy)).abs() < TOL);
        let grads = loss.backward();
        let g = x.grad(&grads).expect("gradient");
        assert!(f64::from(g.abs().max().into_scalar()) < TOL);

        let other = teacher_distribution::<B>(logits(4).inner());
        let text = scalar(distillation_loss(x.clone(), targets(), None, 0.0));
        let soft = scalar(distillation_loss(
            x.clone(),
            targets(),
            Some(other.clone()),
            1.0,
        ));
        let mixed = scalar(distillation_loss(x, targets(), Some(other), 0.25));
        assert!((mixed - (0.75 * text + 0.25 * soft)).abs() < TOL);
        // the two parts differ, so the mixture's check says something
        assert!((soft - text).abs() > 1e-3);
    }
}
