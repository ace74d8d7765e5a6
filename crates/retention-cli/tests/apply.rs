//! `retention apply`: file round trip equals the op, and bad files get clear errors.

#![cfg(feature = "ndarray")]

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor};
use retention::{RetentionOptions, power_retention, power_retention_with_state};
use retention_cli::CliError;
use retention_cli::apply::{ApplyArgs, apply};
use retention_cli::tensor_file::{FileDtype, HostTensor, TensorFile, write};

type B = NdArray;

fn host<const N: usize>(t: &Tensor<B, N>, dtype: FileDtype) -> HostTensor {
    HostTensor {
        values: t.to_data().into_vec::<f32>().expect("f32 data"),
        shape: t.dims().to_vec(),
        dtype,
    }
}

fn args(dir: &tempfile::TempDir, chunk: Option<usize>, final_state: bool) -> ApplyArgs {
    ApplyArgs {
        input: dir.path().join("in.safetensors").display().to_string(),
        output: dir.path().join("out.safetensors").display().to_string(),
        degree: 2,
        chunk,
        scale: None,
        final_state,
    }
}

fn inputs() -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 3>) {
    let dev = Default::default();
    let n = |s: [usize; 4]| Tensor::<B, 4>::random(s, Distribution::Normal(0.0, 1.0), &dev);
    let g = burn::tensor::activation::log_sigmoid(Tensor::<B, 3>::random(
        [2, 19, 2],
        Distribution::Normal(4.0, 1.0),
        &dev,
    ));
    (n([2, 19, 4, 16]), n([2, 19, 2, 16]), n([2, 19, 2, 16]), g)
}

#[test]
fn round_trip_equals_the_op() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (q, k, v, g) = inputs();
    let a = args(&dir, Some(8), true);
    let f = FileDtype::F32;
    write(
        &a.input,
        &[
            ("q", &host(&q, f)),
            ("k", &host(&k, f)),
            ("v", &host(&v, f)),
            ("log_g", &host(&g, f)),
        ],
    )
    .expect("write input");
    let summary = apply::<B>(&Default::default(), &a).expect("apply");
    assert_eq!(summary.out_shape, vec![2, 19, 4, 16]);
    assert_eq!(summary.written, vec!["out", "state", "key_sum"]);

    let opts = RetentionOptions::new().with_chunk_size(Some(8));
    let want =
        power_retention(q.clone(), k.clone(), v.clone(), Some(g.clone()), &opts).expect("op");
    let (_, state) = power_retention_with_state(q, k, v, Some(g), None, &opts).expect("op");
    let out = TensorFile::open(&a.output).expect("output file");
    let got = out.require("out").expect("out");
    assert_eq!(got.dtype, FileDtype::F32);
    let want = host(&want, f);
    let err = got
        .values
        .iter()
        .zip(&want.values)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err < 1e-5, "out differs from the op by {err}");
    let st = out.require("state").expect("state");
    assert_eq!(st.shape, state.state.dims().to_vec());
    assert_eq!(
        out.require("key_sum").expect("key_sum").shape,
        vec![2, 2, 256] // D = d(d + 16)/2 for d = 16
    );
}

#[test]
fn half_precision_in_half_precision_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (q, k, v, _) = inputs();
    let a = args(&dir, None, false);
    let h = FileDtype::BF16;
    write(
        &a.input,
        &[
            ("q", &host(&q, h)),
            ("k", &host(&k, h)),
            ("v", &host(&v, h)),
        ],
    )
    .expect("write");
    apply::<B>(&Default::default(), &a).expect("apply");
    let out = TensorFile::open(&a.output)
        .expect("output")
        .require("out")
        .expect("out");
    assert_eq!(out.dtype, FileDtype::BF16);
    assert!(out.values.iter().all(|x| x.is_finite()));
}

#[test]
fn missing_tensor_wrong_rank_and_bad_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (q, k, _, _) = inputs();
    let a = args(&dir, None, false);
    let f = FileDtype::F32;
    write(&a.input, &[("q", &host(&q, f)), ("k", &host(&k, f))]).expect("write");
    let e = apply::<B>(&Default::default(), &a).expect_err("v is missing");
    assert!(matches!(e, CliError::MissingTensor { .. }), "{e:?}");
    assert!(
        e.to_string().contains("missing tensor `v` (found: k, q)"),
        "{e}"
    );

    let v3 = HostTensor {
        values: vec![0.0; 2 * 19 * 32],
        shape: vec![2, 19, 32],
        dtype: f,
    };
    write(
        &a.input,
        &[("q", &host(&q, f)), ("k", &host(&k, f)), ("v", &v3)],
    )
    .expect("write");
    let e = apply::<B>(&Default::default(), &a).expect_err("v has rank 3");
    assert!(e.to_string().contains("`v` must have rank 4"), "{e}");

    std::fs::write(&a.input, b"not a safetensors file").expect("write");
    let e = apply::<B>(&Default::default(), &a).expect_err("garbage");
    assert!(matches!(e, CliError::Format { .. }), "{e:?}");
    let e = apply::<B>(
        &Default::default(),
        &args(&tempfile::tempdir().expect("dir"), None, false),
    )
    .expect_err("no file");
    assert!(matches!(e, CliError::Io { .. }), "{e:?}");
}
