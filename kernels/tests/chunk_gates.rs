//! The chunked cumulative log-gates against a host loop, at chunks shorter than one staged
//! segment, and longer than one with a partial last segment (the other suites use short chunks
//! only).
#![cfg(feature = "wgpu")]

use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use retention_kernels::chunk_gates::{GateDims, launch_chunk_gates};

fn expected(log_g: &[f32], (b, t, h): (usize, usize, usize), chunk: usize) -> Vec<f32> {
    let n = t.div_ceil(chunk);
    let mut out = vec![0.0f32; b * h * n * chunk];
    for bi in 0..b {
        for kv in 0..h {
            for u in 0..n {
                let mut acc = 0.0f64;
                for p in 0..chunk {
                    let tok = u * chunk + p;
                    if tok < t {
                        acc += f64::from(log_g[(bi * t + tok) * h + kv]);
                    }
                    out[((bi * h + kv) * n + u) * chunk + p] = acc as f32;
                }
            }
        }
    }
    out
}

#[test]
fn chunk_gates_match_a_host_cumulative_sum() {
    let client = match std::panic::catch_unwind(|| WgpuRuntime::client(&WgpuDevice::default())) {
        Ok(c) => c,
        Err(_) if std::env::var_os("CI").is_some() => panic!("no wgpu adapter and CI is set"),
        Err(_) => {
            eprintln!("SKIPPED: no wgpu adapter found (set CI=1 to make this a failure)");
            return;
        }
    };
    let dtype = f32::as_type_native_unchecked().storage_type();
    for (b, t, h, chunk) in [(2, 11, 3, 5), (1, 700, 2, 300), (2, 2 * 1027 + 5, 1, 1027)] {
        let log_g: Vec<f32> = (0..b * t * h)
            .map(|i| -0.001 * ((i * 7919) % 1000) as f32)
            .collect();
        let n = t.div_ceil(chunk);
        let input = client.create_from_slice(f32::as_bytes(&log_g));
        let out = client.empty(b * h * n * chunk * 4);
        let dims = GateDims {
            batch: b,
            seq: t,
            kv_heads: h,
            chunk,
            n_chunks: n,
        };
        // SAFETY: `input` holds b·t·h f32, `out` b·h·n·c f32.
        unsafe {
            launch_chunk_gates(
                &client,
                dtype,
                dims,
                ArrayArg::from_raw_parts(input, b * t * h),
                ArrayArg::from_raw_parts(out.clone(), b * h * n * chunk),
            )
        };
        let got = f32::from_bytes(&client.read_one(out).expect("readback")).to_vec();
        let want = expected(&log_g, (b, t, h), chunk);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-5,
            "b={b} t={t} h={h} chunk={chunk}: error {worst:e}"
        );
    }
}
