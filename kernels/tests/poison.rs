//! Every kernel writes every element of its outputs: outputs are filled with NaN before the
//! launch and must come back finite. Runs on wgpu (Mesa lavapipe in CI).
#![cfg(feature = "wgpu")]

use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use retention_kernels::{
    Buffer, DecodeTiles, OutputTiles, StateTiles, Strategy,
    chunk_output::{OutputArgs, OutputDims, launch_output},
    chunk_state::{StateArgs, StateDims, launch_chunk_state},
    decode::{DecodeArgs, DecodeDims, launch_decode},
    discumsum::{ScanArgs, ScanDims, launch_discumsum},
};

type R = WgpuRuntime;

/// A client, or `None` (loudly) without an adapter; under `CI` a missing adapter fails.
fn client() -> Option<ComputeClient<R>> {
    match std::panic::catch_unwind(|| R::client(&WgpuDevice::default())) {
        Ok(c) => Some(c),
        Err(_) if std::env::var_os("CI").is_some() => panic!("no wgpu adapter and CI is set"),
        Err(_) => {
            eprintln!("SKIPPED: no wgpu adapter found (set CI=1 to make this a failure)");
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

struct Buf {
    handle: cubecl::server::Handle,
    len: usize,
}

impl Buf {
    fn new(client: &ComputeClient<R>, data: &[f32]) -> Self {
        Self {
            handle: client.create_from_slice(f32::as_bytes(data)),
            len: data.len(),
        }
    }
    fn poisoned(client: &ComputeClient<R>, len: usize) -> Self {
        Self::new(client, &vec![f32::NAN; len])
    }
    fn arg(&self) -> ArrayArg<R> {
        // SAFETY: the handle holds `len` f32 values.
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.len) }
    }
    fn buffer(&self) -> Buffer {
        Buffer {
            handle: self.handle.clone(),
            len: self.len,
        }
    }
    fn read(&self, client: &ComputeClient<R>) -> Vec<f32> {
        let bytes = client.read_one(self.handle.clone()).expect("readback");
        f32::from_bytes(&bytes).to_vec()
    }
}

fn assert_written(name: &str, client: &ComputeClient<R>, buf: &Buf) {
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
const E: usize = 12;
const BIG_D: usize = D * (D + 1) / 2;
const C: usize = 8;
const N: usize = T.div_ceil(C);

fn dtype() -> StorageType {
    f32::as_type_native_unchecked().storage_type()
}

#[test]
fn every_kernel_writes_every_output_element() {
    let Some(client) = client() else { return };
    let q = Buf::new(&client, &values(B * T * HQ * D, 1));
    let k = Buf::new(&client, &values(B * T * H * D, 2));
    let v = Buf::new(&client, &values(B * T * H * E, 3));
    let gates: Vec<f32> = values(B * H * N * C, 4)
        .iter()
        .map(|x| -0.1 * x.abs())
        .collect();
    let gates = Buf::new(&client, &gates);

    // chunk states
    let states = Buf::poisoned(&client, B * H * N * BIG_D * E);
    let sums = Buf::poisoned(&client, B * H * N * BIG_D);
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
    let tiles = StateTiles::plan(&client, dtype(), Strategy::Auto, D, E).expect("tiles fit");
    // SAFETY: sizes as documented.
    unsafe { launch_chunk_state(&client, dtype(), dims, tiles, args) };
    assert_written("chunk_state states", &client, &states);
    assert_written("chunk_state sums", &client, &sums);

    // scan, with an initial state
    let last = Buf::poisoned(&client, B * H * BIG_D * E);
    let initial = Buf::new(&client, &values(B * H * BIG_D * E, 5));
    let dims = ScanDims {
        sequences: B * H,
        width: BIG_D * E,
        n_chunks: N,
        chunk: C,
    };
    let args = ScanArgs {
        chunks: states.arg(),
        half: None,
        half_scale: 1.0,
        initial: Some(initial.arg()),
        gates: Some(gates.arg()),
        last: last.arg(),
    };
    // SAFETY: sizes as documented.
    unsafe { launch_discumsum(&client, dims, args) };
    assert_written("discumsum last", &client, &last);
    assert_written("discumsum entering states", &client, &states);

    // output, chunked and attention form
    for with_state in [true, false] {
        let out = Buf::poisoned(&client, B * T * HQ * E);
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
        let args = OutputArgs {
            q: q.arg(),
            k: k.arg(),
            v: v.arg(),
            gates: with_state.then(|| gates.arg()),
            states: with_state.then(|| (states.arg(), sums.arg())),
            out: out.arg(),
        };
        let tiles =
            OutputTiles::plan(&client, dtype(), Strategy::Auto, D, E, 2).expect("tiles fit");
        // SAFETY: sizes as documented.
        unsafe { launch_output(&client, dtype(), dims, tiles, args) };
        assert_written(
            if with_state {
                "output (chunked)"
            } else {
                "output (attention)"
            },
            &client,
            &out,
        );
    }

    // decode step
    let out = Buf::poisoned(&client, B * HQ * E);
    let new_state = Buf::poisoned(&client, B * H * BIG_D * E);
    let new_sum = Buf::poisoned(&client, B * H * BIG_D);
    let sum0: Vec<f32> = values(B * H * BIG_D, 6).iter().map(|x| x.abs()).collect();
    let sum0 = Buf::new(&client, &sum0);
    let q1 = Buf::new(&client, &values(B * HQ * D, 7));
    let k1 = Buf::new(&client, &values(B * H * D, 8));
    let v1 = Buf::new(&client, &values(B * H * E, 9));
    let g1 = Buf::new(&client, &[-0.1f32; B * H]);
    let tiles = DecodeTiles::plan(&client, D, E, HQ / H).expect("tiles fit");
    let dims = DecodeDims {
        batch: B,
        q_heads: HQ,
        kv_heads: H,
        expanded_dim: BIG_D,
        scale: 0.25,
        slices: 3,
    };
    let partial_num = Buf::poisoned(&client, 3 * B * HQ * E);
    let partial_den = Buf::poisoned(&client, 3 * B * HQ);
    let args = DecodeArgs {
        q: q1.buffer(),
        k: k1.buffer(),
        v: v1.buffer(),
        log_g: Some(g1.buffer()),
        state: last.buffer(),
        key_sum: sum0.buffer(),
        out: out.buffer(),
        new_state: new_state.buffer(),
        new_key_sum: new_sum.buffer(),
        partial_num: partial_num.buffer(),
        partial_den: partial_den.buffer(),
    };
    // SAFETY: sizes as documented.
    unsafe { launch_decode(&client, dtype(), dims, tiles, args) };
    assert_written("decode output", &client, &out);
    assert_written("decode state", &client, &new_state);
    assert_written("decode key-sum", &client, &new_sum);
}
