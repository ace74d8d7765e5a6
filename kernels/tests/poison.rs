//! Every kernel writes every element of its outputs: outputs are filled with NaN before the
//! launch and must come back finite. Runs the FMA kernels on wgpu (Mesa lavapipe in CI) with
//! f32 inputs, and with `--features cuda` the tensor-core kernels on CUDA with bf16 inputs.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use cubecl::prelude::*;
use half::{bf16, f16};
use retention_kernels::{
    Buffer, ChunkedTiles, DecodeMode, DecodeTiles, IntraGradTiles, OutputTiles, Strategy,
    chunk_gates::{GateDims, launch_chunk_gates},
    chunk_grad::GradDims,
    chunk_grad_intra_mma::{IntraGradInputs, launch_intra_key_grads, launch_intra_query_grads},
    chunk_output::{OutputArgs, OutputDims, launch_output},
    chunk_state::{StateArgs, StateDims, launch_chunk_state},
    decode::{DecodeArgs, DecodeDims, launch_decode},
    discumsum::{ScanArgs, ScanDims, ScanWrites, launch_discumsum},
    gate_grads::{GateGradArgs, launch_gate_grads},
    query_state::{QueryStateArgs, launch_query_state, state_scale},
    row_grads::{RowGradArgs, RowGradDims, launch_row_grads},
};

/// A client, or `None` (loudly) without a device; under `CI` a missing wgpu adapter fails.
fn client<R: Runtime>(device: &R::Device, required_in_ci: bool) -> Option<ComputeClient<R>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| R::client(device))) {
        Ok(c) => Some(c),
        Err(_) if required_in_ci && std::env::var_os("CI").is_some() => {
            panic!("no device and CI is set")
        }
        Err(_) => {
            eprintln!("SKIPPED: no device found (set CI=1 to make this a failure on wgpu)");
            None
        }
    }
}

/// Deterministic values in (−1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (x % 20_001) as f32 / 10_000.0 - 1.0
        })
        .collect()
}

/// Element types of the buffers.
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // bf16 inputs: the CUDA test
enum Elem {
    F32,
    F16,
    Bf16,
}

impl Elem {
    fn storage(self) -> StorageType {
        match self {
            Self::F32 => f32::as_type_native_unchecked().storage_type(),
            Self::F16 => f16::as_type_native_unchecked().storage_type(),
            Self::Bf16 => bf16::as_type_native_unchecked().storage_type(),
        }
    }
}

struct Buf {
    handle: cubecl::server::Handle,
    len: usize,
    elem: Elem,
}

impl Buf {
    fn new<R: Runtime>(client: &ComputeClient<R>, data: &[f32], elem: Elem) -> Self {
        let handle = match elem {
            Elem::F32 => client.create_from_slice(f32::as_bytes(data)),
            Elem::F16 => {
                let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                client.create_from_slice(f16::as_bytes(&v))
            }
            Elem::Bf16 => {
                let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                client.create_from_slice(bf16::as_bytes(&v))
            }
        };
        Self {
            handle,
            len: data.len(),
            elem,
        }
    }
    fn poisoned<R: Runtime>(client: &ComputeClient<R>, len: usize, elem: Elem) -> Self {
        Self::new(client, &vec![f32::NAN; len], elem)
    }
    fn arg<R: Runtime>(&self) -> ArrayArg<R> {
        // SAFETY: the handle holds `len` elements.
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.len) }
    }
    fn buffer(&self) -> Buffer {
        Buffer {
            handle: self.handle.clone(),
            len: self.len,
        }
    }
    fn read<R: Runtime>(&self, client: &ComputeClient<R>) -> Vec<f32> {
        let bytes = client.read_one(self.handle.clone()).expect("readback");
        match self.elem {
            Elem::F32 => f32::from_bytes(&bytes).to_vec(),
            Elem::F16 => f16::from_bytes(&bytes).iter().map(|x| x.to_f32()).collect(),
            Elem::Bf16 => bf16::from_bytes(&bytes)
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        }
    }
}

fn assert_written<R: Runtime>(name: &str, client: &ComputeClient<R>, buf: &Buf) {
    let data = buf.read(client);
    let unwritten = data.iter().filter(|x| !x.is_finite()).count();
    assert_eq!(
        unwritten,
        0,
        "{name}: {unwritten} of {} elements not written",
        data.len()
    );
}

const B: usize = 2;
const T: usize = 37;
const HQ: usize = 4;
const H: usize = 2;
const D: usize = 16;
const BIG_D: usize = D * (D + 16) / 2;
const C: usize = 8;
const N: usize = T.div_ceil(C);

#[cfg(feature = "wgpu")]
#[test]
fn every_fma_kernel_writes_every_output_element() {
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    let Some(client) = client::<WgpuRuntime>(&WgpuDevice::default(), true) else {
        return;
    };
    // an awkward value dim: the FMA tiles take any
    every_kernel_writes_every_output_element(&client, Elem::F32, Strategy::Fma, 12);
}

#[cfg(feature = "cuda")]
#[test]
fn every_tensor_core_kernel_writes_every_output_element() {
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    let Some(client) = client::<CudaRuntime>(&CudaDevice::default(), false) else {
        return;
    };
    every_kernel_writes_every_output_element(&client, Elem::Bf16, Strategy::Mma, 32);
}

fn every_kernel_writes_every_output_element<R: Runtime>(
    client: &ComputeClient<R>,
    elem: Elem,
    strategy: Strategy,
    e: usize,
) {
    let dtype = elem.storage();
    let q = Buf::new(client, &values(B * T * HQ * D, 1), elem);
    let k = Buf::new(client, &values(B * T * H * D, 2), elem);
    let v = Buf::new(client, &values(B * T * H * e, 3), elem);
    let gates: Vec<f32> = values(B * H * N * C, 4)
        .iter()
        .map(|x| -0.1 * x.abs())
        .collect();
    let gates = Buf::new(client, &gates, Elem::F32);

    // chunked cumulative log-gates from per-token gates in the input dtype
    let log_g: Vec<f32> = values(B * T * H, 10)
        .iter()
        .map(|x| -0.1 * x.abs())
        .collect();
    let log_g = Buf::new(client, &log_g, elem);
    let cumulative = Buf::poisoned(client, B * H * N * C, Elem::F32);
    let dims = GateDims {
        batch: B,
        seq: T,
        kv_heads: H,
        chunk: C,
        n_chunks: N,
    };
    // SAFETY: sizes as documented.
    unsafe { launch_chunk_gates(client, dtype, dims, log_g.arg(), cumulative.arg()) };
    assert_written("chunk gates", client, &cumulative);

    let tiles = ChunkedTiles::plan(client, dtype, strategy, D, e).expect("tiles fit");
    assert_eq!(
        tiles.query.is_some(),
        strategy == Strategy::Mma,
        "the tensor-core path runs where asked"
    );

    // chunk states
    let states = Buf::poisoned(client, B * H * N * BIG_D * e, Elem::F32);
    let sums = Buf::poisoned(client, B * H * N * BIG_D, Elem::F32);
    let dims = StateDims {
        batch: B,
        seq: T,
        kv_heads: H,
        chunk: C,
        n_chunks: N,
        expanded_dim: BIG_D,
    };
    let args = StateArgs {
        k: k.arg(),
        v: v.arg(),
        gates: Some(gates.arg()),
        states: states.arg(),
        sums: sums.arg(),
    };
    // SAFETY: sizes as documented.
    unsafe { launch_chunk_state(client, dtype, dims, tiles.state, args) };
    assert_written("chunk_state states", client, &states);
    assert_written("chunk_state sums", client, &sums);

    // scans, with an initial state; states to f16 where the query-state kernel reads them
    let half = tiles
        .query
        .map(|_| Buf::poisoned(client, B * H * N * BIG_D * e, Elem::F16));
    let last = Buf::poisoned(client, B * H * BIG_D * e, Elem::F32);
    let last_sum = Buf::poisoned(client, B * H * BIG_D, Elem::F32);
    let initial = Buf::new(client, &values(B * H * BIG_D * e, 5), Elem::F32);
    let initial_sum = Buf::new(client, &values(B * H * BIG_D, 6), Elem::F32);
    for (chunks, init, out, width, to_half) in [
        (&states, &initial, &last, BIG_D * e, half.as_ref()),
        (&sums, &initial_sum, &last_sum, BIG_D, None),
    ] {
        let dims = ScanDims {
            sequences: B * H,
            width,
            n_chunks: N,
            chunk: C,
            reverse: false,
        };
        let args = ScanArgs {
            chunks: chunks.arg(),
            half: to_half.map(Buf::arg),
            half_scale: state_scale(BIG_D),
            writes: ScanWrites::Entering,
            initial: Some(init.arg()),
            gates: Some(gates.arg()),
            last: out.arg(),
        };
        // SAFETY: sizes as documented.
        unsafe { launch_discumsum(client, dims, args) };
        assert_written("discumsum last", client, out);
        assert_written(
            "discumsum entering states",
            client,
            to_half.unwrap_or(chunks),
        );
    }

    // output, chunked (after the query-state product where it runs apart) and attention form
    for with_state in [true, false] {
        let (chunk, n_chunks) = if with_state { (C, N) } else { (T, 1) };
        let dims = OutputDims {
            batch: B,
            seq: T,
            q_heads: HQ,
            kv_heads: H,
            chunk,
            n_chunks,
            expanded_dim: BIG_D,
            scale: 0.25,
        };
        let state_part = match (with_state, tiles.query, &half) {
            (false, ..) => None,
            (true, Some(query), Some(half)) => {
                let num = Buf::poisoned(client, B * T * HQ * e, Elem::F32);
                let den = Buf::poisoned(client, B * T * HQ, Elem::F32);
                let args = QueryStateArgs {
                    q: q.arg(),
                    states: half.arg(),
                    sums: sums.arg(),
                    num: num.arg(),
                    den: den.arg(),
                };
                // SAFETY: sizes as documented.
                unsafe { launch_query_state(client, dtype, dims, query, args) };
                assert_written("query_state numerators", client, &num);
                assert_written("query_state denominators", client, &den);
                Some((num, den))
            }
            (true, ..) => None,
        };
        let out = Buf::poisoned(client, B * T * HQ * e, elem);
        let states_arg = match (&state_part, with_state) {
            (Some((num, den)), _) => Some((num.arg(), den.arg())),
            (None, true) => Some((states.arg(), sums.arg())),
            (None, false) => None,
        };
        let args = OutputArgs {
            q: q.arg(),
            k: k.arg(),
            v: v.arg(),
            gates: with_state.then(|| gates.arg()),
            states: states_arg,
            out: out.arg(),
            out_dtype: dtype,
            stats: None,
        };
        let output = if with_state {
            tiles.output
        } else {
            OutputTiles::plan(client, dtype, strategy, D, e, 2).expect("tiles fit")
        };
        // SAFETY: sizes as documented.
        unsafe { launch_output(client, dtype, dims, output, args) };
        let name = if with_state {
            "output (chunked)"
        } else {
            "output (attention)"
        };
        assert_written(name, client, &out);
    }

    // backward: the rows' gradients, the tensor-core intra-chunk pairs, the gate gradient
    let rows = B * T * HQ;
    let half_rows = elem != Elem::F32;
    let dy = Buf::new(client, &values(rows * e, 11), elem);
    let y = Buf::new(client, &values(rows * e, 12), Elem::F32);
    let stats: Vec<f32> = values(rows, 13).iter().map(|x| 0.5 + x.abs()).collect();
    let stats = Buf::new(client, &stats, Elem::F32);
    let d_num = Buf::poisoned(client, rows * e, Elem::F32);
    let d_den = Buf::poisoned(client, rows, Elem::F32);
    let d_num_half = Buf::poisoned(client, rows * e, Elem::Bf16);
    let row_max = Buf::poisoned(client, rows, Elem::F32);
    let args = RowGradArgs {
        dy: dy.buffer(),
        y: y.buffer(),
        stats: stats.buffer(),
        d_num: d_num.buffer(),
        d_den: d_den.buffer(),
        d_num_half: half_rows.then(|| d_num_half.buffer()),
        row_max: Some(row_max.buffer()),
    };
    let row_dims = RowGradDims {
        batch: B,
        seq: T,
        q_heads: HQ,
        kv_heads: H,
        value_dim: e,
    };
    let half_type = if half_rows { Elem::Bf16 } else { Elem::F32 };
    // SAFETY: sizes as documented.
    unsafe {
        launch_row_grads(
            client,
            dtype,
            half_type.storage(),
            row_dims,
            half_rows,
            args,
        )
    };
    assert_written("row gradients dN", client, &d_num);
    assert_written("row gradients dL", client, &d_den);
    assert_written("row maxima", client, &row_max);
    if half_rows {
        assert_written("row gradients dN (bf16)", client, &d_num_half);
    }
    if let Some(intra) = IntraGradTiles::plan(client, dtype, strategy, D, e, 2) {
        for (chunk, n_chunks) in [(C, N), (T, 1)] {
            let dims = GradDims {
                batch: B,
                seq: T,
                q_heads: HQ,
                kv_heads: H,
                chunk,
                n_chunks,
                expanded_dim: BIG_D,
                scale: 0.25,
            };
            let chunk_gates: Vec<f32> = values(B * H * n_chunks * chunk, 14)
                .iter()
                .map(|x| -0.1 * x.abs())
                .collect();
            let chunk_gates = Buf::new(client, &chunk_gates, Elem::F32);
            let inputs = IntraGradInputs {
                q: q.buffer(),
                k: k.buffer(),
                v: v.buffer(),
                d_num: d_num_half.buffer(),
                d_den: d_den.buffer(),
                gates: Some(chunk_gates.buffer()),
            };
            let dq = Buf::poisoned(client, B * T * HQ * D, Elem::F32);
            let dg_q = Buf::poisoned(client, B * T * HQ, Elem::F32);
            let dk = Buf::poisoned(client, B * T * H * D, Elem::F32);
            let dv = Buf::poisoned(client, B * T * H * e, Elem::F32);
            let dg_k = Buf::poisoned(client, B * T * H, Elem::F32);
            // SAFETY: sizes as documented.
            unsafe {
                launch_intra_query_grads(
                    client,
                    dtype,
                    dims,
                    intra,
                    &inputs,
                    &dq.buffer(),
                    &dg_q.buffer(),
                );
                launch_intra_key_grads(
                    client,
                    dtype,
                    dims,
                    intra,
                    &inputs,
                    &dk.buffer(),
                    &dv.buffer(),
                    &dg_k.buffer(),
                );
            }
            for (name, buf) in [
                ("intra ∂q", &dq),
                ("intra query gate terms", &dg_q),
                ("intra ∂k", &dk),
                ("intra ∂v", &dv),
                ("intra key gate terms", &dg_k),
            ] {
                assert_written(&format!("{name}, chunk {chunk}"), client, buf);
            }
        }
    } else {
        assert!(
            strategy != Strategy::Mma,
            "the tensor-core pairs run where asked"
        );
    }
    let dg_q = Buf::new(client, &values(B * T * HQ, 15), Elem::F32);
    let dg_k = Buf::new(client, &values(B * T * H, 16), Elem::F32);
    let log_g_grad = Buf::poisoned(client, B * T * H, Elem::F32);
    let args = GateGradArgs {
        dg_q: dg_q.buffer(),
        dg_k: dg_k.buffer(),
        last: None,
        out: log_g_grad.buffer(),
    };
    // SAFETY: sizes as documented.
    unsafe { launch_gate_grads(client, [B, T, HQ, H], args) };
    assert_written("gate gradient", client, &log_g_grad);

    // decode: a one-token step, a window read and a window absorption
    let sum0: Vec<f32> = values(B * H * BIG_D, 6).iter().map(|x| x.abs()).collect();
    let sum0 = Buf::new(client, &sum0, Elem::F32);
    let q1 = Buf::new(client, &values(B * HQ * D, 7), elem);
    let scale = 0.25;
    for (mode, window) in [
        (DecodeMode::Step, 1),
        (DecodeMode::Read, 3),
        (DecodeMode::Absorb, 3),
    ] {
        let keys = Buf::new(client, &values(B * window * H * D, 8), elem);
        let vals = Buf::new(client, &values(B * window * H * e, 9), elem);
        let gates = Buf::new(client, &vec![-0.1f32; B * window * H], Elem::F32);
        let out = Buf::poisoned(client, B * HQ * e, elem);
        let new_state = Buf::poisoned(client, B * H * BIG_D * e, Elem::F32);
        let new_sum = Buf::poisoned(client, B * H * BIG_D, Elem::F32);
        let tiles = DecodeTiles::plan(client, D, e, HQ / H, mode, window).expect("tiles fit");
        let dims = DecodeDims {
            batch: B,
            q_heads: HQ,
            kv_heads: H,
            expanded_dim: BIG_D,
            scale,
            slices: 3,
            window,
        };
        let partial_num = Buf::poisoned(client, 3 * B * HQ * e, Elem::F32);
        let partial_den = Buf::poisoned(client, 3 * B * HQ, Elem::F32);
        let args = DecodeArgs {
            q: q1.buffer(),
            keys: keys.buffer(),
            values: vals.buffer(),
            log_g: Some(gates.buffer()),
            state: last.buffer(),
            key_sum: sum0.buffer(),
            out: mode.reads().then(|| out.buffer()),
            new_state: mode
                .advances()
                .then(|| (new_state.buffer(), new_sum.buffer())),
            partial_num: partial_num.buffer(),
            partial_den: partial_den.buffer(),
        };
        // SAFETY: sizes as documented.
        unsafe { launch_decode(client, dtype, dims, tiles, args) };
        if mode.reads() {
            assert_written(&format!("decode output ({mode:?})"), client, &out);
        }
        if mode.advances() {
            assert_written(&format!("decode state ({mode:?})"), client, &new_state);
            assert_written(&format!("decode key-sum ({mode:?})"), client, &new_sum);
        }
    }
}
