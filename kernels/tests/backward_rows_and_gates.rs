//! The backward pass's first and last kernels against host loops: the rows' `dN`, `dL` and
//! maxima ([`row_grads`](retention_kernels::row_grads)), and the log-gates' gradient from the
//! per-position terms ([`gate_grads`](retention_kernels::gate_grads)), at GQA groups, value
//! widths that are not multiples of the units per row, zero normalisers, and sequences shorter
//! and longer than one segment per unit.
#![cfg(feature = "wgpu")]

use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use retention_kernels::Buffer;
use retention_kernels::gate_grads::{GateGradArgs, launch_gate_grads};
use retention_kernels::query_rows_half::{
    QueryRowsHalfArgs, QueryRowsHalfDims, launch_query_rows_half,
};
use retention_kernels::row_grads::{RowGradArgs, RowGradDims, launch_row_grads};

fn client() -> Option<ComputeClient<WgpuRuntime>> {
    match std::panic::catch_unwind(|| WgpuRuntime::client(&WgpuDevice::default())) {
        Ok(c) => Some(c),
        Err(_) if std::env::var_os("CI").is_some() => panic!("no wgpu adapter and CI is set"),
        Err(_) => {
            eprintln!("SKIPPED: no wgpu adapter found (set CI=1 to make this a failure)");
            None
        }
    }
}

/// Deterministic values in (−1, 1).
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 20_001) as f32 / 10_000.0 - 1.0)
        .collect()
}

fn upload(client: &ComputeClient<WgpuRuntime>, data: &[f32]) -> Buffer {
    Buffer {
        handle: client.create_from_slice(f32::as_bytes(data)),
        len: data.len(),
    }
}

fn zeros(client: &ComputeClient<WgpuRuntime>, len: usize) -> Buffer {
    upload(client, &vec![f32::NAN; len])
}

fn read(client: &ComputeClient<WgpuRuntime>, buffer: &Buffer) -> Vec<f32> {
    f32::from_bytes(&client.read_one(buffer.handle.clone()).expect("readback")).to_vec()
}

fn worst(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).abs() / w.abs().max(1.0))
        .fold(0.0, f64::max)
}

#[test]
fn row_grads_match_a_host_loop() {
    let Some(client) = client() else { return };
    let f32_type = f32::as_type_native_unchecked().storage_type();
    for (b, t, hq, h, e) in [(1, 5, 1, 1, 8), (2, 7, 6, 2, 40), (1, 33, 4, 4, 64)] {
        let rows = b * t * hq;
        let dy = values(rows * e, 1);
        let y = values(rows * e, 2);
        // every fifth normaliser is zero: a row the forward wrote as zeros
        let stats: Vec<f32> = (0..rows)
            .map(|i| {
                if i % 5 == 3 {
                    0.0
                } else {
                    0.5 + (i % 7) as f32
                }
            })
            .collect();
        let args = RowGradArgs {
            dy: upload(&client, &dy),
            y: upload(&client, &y),
            stats: upload(&client, &stats),
            d_num: zeros(&client, rows * e),
            d_den: zeros(&client, rows),
            d_num_half: None,
            row_max: Some(zeros(&client, rows)),
        };
        let (d_num, d_den, row_max) = (
            args.d_num.clone(),
            args.d_den.clone(),
            args.row_max.clone().expect("asked for"),
        );
        let dims = RowGradDims {
            batch: b,
            seq: t,
            q_heads: hq,
            kv_heads: h,
            value_dim: e,
        };
        // SAFETY: the buffers have the documented sizes, all f32.
        unsafe { launch_row_grads(&client, f32_type, f32_type, dims, false, args) };

        let r = hq / h;
        let mut want_num = vec![0.0f64; rows * e];
        let mut want_den = vec![0.0f64; rows];
        let mut want_max = vec![0.0f64; rows];
        for row in 0..rows {
            let l = f64::from(stats[row]);
            let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
            let mut dot = 0.0;
            let mut most = 0.0f64;
            for c in 0..e {
                let dn = f64::from(dy[row * e + c]) * inv;
                want_num[row * e + c] = dn;
                dot += dn * f64::from(y[row * e + c]);
                most = most.max(dn.abs());
            }
            want_den[row] = -dot;
            let (head, token) = (row % hq, row / hq);
            let (pos, bi) = (token % t, token / t);
            want_max[((bi * h + head / r) * t + pos) * r + head % r] = most;
        }
        let shape = format!("b={b} t={t} hq={hq} h={h} e={e}");
        let err = worst(&read(&client, &d_num), &want_num);
        assert!(err < 1e-6, "dN, {shape}: {err:e}");
        let err = worst(&read(&client, &d_den), &want_den);
        assert!(err < 1e-5, "dL, {shape}: {err:e}");
        let err = worst(&read(&client, &row_max), &want_max);
        assert!(err < 1e-6, "row maxima, {shape}: {err:e}");
    }
}

#[test]
fn gate_grads_match_a_host_suffix_sum() {
    let Some(client) = client() else { return };
    for (b, t, hq, h, last) in [
        (1, 3, 1, 1, false),
        (2, 300, 6, 2, true),
        (1, 1000, 2, 2, false),
        (1, 4 * 256 + 9, 3, 1, true),
    ] {
        let dg_q = values(b * t * hq, 3);
        let dg_k = values(b * t * h, 4);
        let term = values(b * h, 5);
        let out = zeros(&client, b * t * h);
        let args = GateGradArgs {
            dg_q: upload(&client, &dg_q),
            dg_k: upload(&client, &dg_k),
            last: last.then(|| upload(&client, &term)),
            out: out.clone(),
        };
        // SAFETY: the buffers have the documented sizes, all f32.
        unsafe { launch_gate_grads(&client, [b, t, hq, h], args) };

        let r = hq / h;
        let mut want = vec![0.0f64; b * t * h];
        for bi in 0..b {
            for kv in 0..h {
                let mut acc = if last {
                    f64::from(term[bi * h + kv])
                } else {
                    0.0
                };
                for pos in (0..t).rev() {
                    let token = bi * t + pos;
                    acc -= f64::from(dg_k[token * h + kv]);
                    for rho in 0..r {
                        acc += f64::from(dg_q[token * hq + kv * r + rho]);
                    }
                    want[token * h + kv] = acc;
                }
            }
        }
        // relative to the largest suffix sum: f32 sums of up to a thousand terms
        let peak = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let got = read(&client, &out);
        let err = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (f64::from(g) - w).abs() / peak)
            .fold(0.0f64, f64::max);
        assert!(err < 1e-5, "b={b} t={t} hq={hq} h={h} last={last}: {err:e}");
    }
}

#[test]
fn query_rows_half_match_a_host_loop() {
    let Some(client) = client() else { return };
    let f32_type = f32::as_type_native_unchecked().storage_type();
    // GQA groups, widths apart, scales apart per (b, h)
    for (b, t, hq, h, d, e) in [
        (1, 5, 1, 1, 8, 8),
        (2, 37, 6, 2, 16, 40),
        (3, 300, 4, 4, 64, 24),
    ] {
        let rows = b * t * hq;
        let q = values(rows * d, 6);
        let d_num = values(rows * e, 7);
        let beta: Vec<f32> = (0..b * h).map(|i| 0.25 + i as f32).collect();
        let f16_zeros = |len: usize| Buffer {
            handle: client.create_from_slice(half::f16::as_bytes(&vec![half::f16::NAN; len])),
            len,
        };
        let args = QueryRowsHalfArgs {
            q: upload(&client, &q),
            d_num: upload(&client, &d_num),
            beta: upload(&client, &beta),
            q_half: f16_zeros(rows * d),
            d_num_half: f16_zeros(rows * e),
        };
        let (q_half, d_num_half) = (args.q_half.clone(), args.d_num_half.clone());
        let dims = QueryRowsHalfDims {
            batch: b,
            seq: t,
            q_heads: hq,
            kv_heads: h,
            head_dim: d,
            value_dim: e,
        };
        let scale = 0.125f32;
        // SAFETY: the buffers have the documented sizes; q is f32.
        unsafe { launch_query_rows_half(&client, f32_type, dims, scale, args) };

        let read_half = |buffer: &Buffer| -> Vec<half::f16> {
            half::f16::from_bytes(&client.read_one(buffer.handle.clone()).expect("readback"))
                .to_vec()
        };
        let shape = format!("b={b} t={t} hq={hq} h={h} d={d} e={e}");
        let got = read_half(&q_half);
        for (i, (&g, &x)) in got.iter().zip(&q).enumerate() {
            let want = half::f16::from_f32(x * scale);
            assert_eq!(g, want, "σq at {i}, {shape}");
        }
        let got = read_half(&d_num_half);
        let r = hq / h;
        for (i, (&g, &x)) in got.iter().zip(&d_num).enumerate() {
            let row = i / e;
            let (head, bi) = (row % hq, row / hq / t);
            let beta = beta[bi * h + head / r];
            let want = half::f16::from_f32(x / beta);
            assert_eq!(g, want, "dN/β at {i}, {shape}");
        }
    }
}
