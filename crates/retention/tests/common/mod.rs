//! Shared test helpers: the seeded problems, the independent f64 oracle and the error metric
//! of `retention::validation` (the same ones `retention selftest` uses).
#![allow(unused_imports, dead_code)] // each test crate uses a part

pub use retention::validation::{Gates, Problem, max_rel, normal, randn, tensor, to_vec};

/// The default device of `B` if it works; without one (no GPU adapter) skip loudly, or fail
/// when `CI` is set: CI must run the GPU suites (on Mesa's lavapipe).
pub fn adapter<B: burn::tensor::backend::Backend>(name: &str) -> Option<B::Device> {
    let probe = std::panic::catch_unwind(|| {
        let dev = B::Device::default();
        let _ = burn::tensor::Tensor::<B, 1>::zeros([1], &dev).into_data();
        dev
    });
    match probe {
        Ok(dev) => Some(dev),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("{name}: no GPU adapter, and CI is set: the GPU suites must run in CI")
        }
        Err(_) => {
            eprintln!("SKIPPED {name}: no GPU adapter found (set CI=1 to make this a failure)");
            None
        }
    }
}
