//! The degree-2 feature layout evaluated inside kernels: [`pair_feature`] (coordinate pair →
//! feature, which the CUDA outer-product kernels use to write the state out as a `d × d × e`
//! tensor) against [`feature_pair`] (feature → pair, which every kernel uses), for every pair
//! at the head dims the tensor-core paths take and a few others.
#![cfg(feature = "wgpu")]

use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use retention_kernels::feature_pairs::{feature_pair, pair_block, pair_feature};

/// Unit `i` of `d²` writes the feature of the pair `(i / d, i mod d)` and the pair that
/// feature maps back to (packed as `x << 16 | y`).
#[cube(launch)]
fn layout_kernel(features: &mut Array<u32>, pairs: &mut Array<u32>, #[comptime] d: u32) {
    let i = ABSOLUTE_POS as u32;
    if i < d * d {
        let beta = comptime!(pair_block(d));
        let f = pair_feature(i / d, i % d, beta);
        features[i as usize] = f;
        pairs[i as usize] = feature_pair(f, beta);
    }
}

#[test]
fn pair_feature_inverts_feature_pair() {
    let client = match std::panic::catch_unwind(|| WgpuRuntime::client(&WgpuDevice::default())) {
        Ok(c) => c,
        Err(_) if std::env::var_os("CI").is_some() => panic!("no wgpu adapter and CI is set"),
        Err(_) => {
            eprintln!("SKIPPED: no wgpu adapter found (set CI=1 to make this a failure)");
            return;
        }
    };
    for d in [16u32, 32, 64, 128, 8, 24] {
        let beta = pair_block(d);
        let n = (d * d) as usize;
        let features = client.empty(n * 4);
        let pairs = client.empty(n * 4);
        // SAFETY: both buffers hold d² u32, the kernel writes indices below d² only.
        unsafe {
            layout_kernel::launch::<WgpuRuntime>(
                &client,
                CubeCount::Static((n as u32).div_ceil(256), 1, 1),
                CubeDim::new_1d(256),
                ArrayArg::from_raw_parts(features.clone(), n),
                ArrayArg::from_raw_parts(pairs.clone(), n),
                d,
            )
        };
        let features = u32::from_bytes(&client.read_one(features).expect("readback")).to_vec();
        let pairs = u32::from_bytes(&client.read_one(pairs).expect("readback")).to_vec();
        let big_d = (d * (d + beta) / 2) as usize;
        let mut hits = vec![0usize; big_d];
        for a in 0..d {
            for b in 0..d {
                let i = (a * d + b) as usize;
                let f = features[i] as usize;
                assert!(
                    f < big_d,
                    "d = {d}: pair ({a}, {b}) → feature {f} ≥ D = {big_d}"
                );
                let (x, y) = (pairs[i] >> 16, pairs[i] & 0xffff);
                // x lies in the lower block; in a shared block the pair keeps its order
                let expected = if a / beta <= b / beta { (a, b) } else { (b, a) };
                assert_eq!(
                    (x, y),
                    expected,
                    "d = {d}: pair ({a}, {b}) → feature {f} → ({x}, {y})"
                );
                if a / beta <= b / beta {
                    hits[f] += 1;
                }
            }
        }
        // the ordered pairs with x's block at most y's are exactly the features, once each
        assert!(
            hits.iter().all(|&h| h == 1),
            "d = {d}: features hit other than once: {:?}",
            hits.iter()
                .enumerate()
                .filter(|&(_, &h)| h != 1)
                .take(5)
                .collect::<Vec<_>>()
        );
    }
}
