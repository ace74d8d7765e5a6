//! The gradient of the per-token log-gates from the per-position terms of the cumulative
//! gates: `∂G_t = Σ_ρ (query side of head h·r + ρ) − (key side)`, plus the final state's term
//! at the last position, then `∂log_g_t = Σ_{i ≥ t} ∂G_i`.
//!
//! One cube per `(b, h)` sequence: each unit sums a contiguous segment, one unit turns the
//! segment sums into the sums of all later segments (in order), then each unit walks its
//! segment backwards from that carry. Every output is a sum of its own suffix (no difference of
//! prefixes, which would carry an error proportional to the total).

use cubecl::prelude::*;

use crate::Buffer;

/// Units per cube.
const UNITS: u32 = 256;

#[cube]
fn term(
    dg_q: &Array<f32>,
    dg_k: &Array<f32>,
    token: u32,
    q_heads: u32,
    kv_heads: u32,
    kvh: u32,
) -> f32 {
    let ratio = q_heads / kv_heads;
    let mut acc = -dg_k[(token * kv_heads + kvh) as usize];
    for rho in 0..ratio {
        acc += dg_q[(token * q_heads + kvh * ratio + rho) as usize];
    }
    acc
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gate_grads_kernel(
    dg_q: &Array<f32>,
    dg_k: &Array<f32>,
    last: &Array<f32>,
    out: &mut Array<f32>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    #[comptime] with_last: bool,
) {
    let sequence = CUBE_POS_X;
    let bi = sequence / kv_heads;
    let kvh = sequence % kv_heads;
    let segment = (seq + UNITS - 1) / UNITS;
    let start = UNIT_POS * segment;
    let mut end = start + segment;
    if end > seq {
        end = seq;
    }
    let mut part = SharedMemory::<f32>::new(UNITS as usize);

    let mut sum = 0.0f32;
    let mut pos = start;
    while pos < end {
        sum += term(dg_q, dg_k, bi * seq + pos, q_heads, kv_heads, kvh);
        pos += 1;
    }
    part[UNIT_POS as usize] = sum;
    sync_cube();
    if UNIT_POS == 0 {
        let mut carry = 0.0f32;
        if comptime!(with_last) {
            carry = last[sequence as usize];
        }
        for j in 0..UNITS {
            let at = (UNITS - 1 - j) as usize;
            let segment_sum = part[at];
            part[at] = carry;
            carry += segment_sum;
        }
    }
    sync_cube();
    let mut acc = part[UNIT_POS as usize];
    let mut pos = end;
    while pos > start {
        pos -= 1;
        let token = bi * seq + pos;
        acc += term(dg_q, dg_k, token, q_heads, kv_heads, kvh);
        out[(token * kv_heads + kvh) as usize] = acc;
    }
}

/// Buffers of [`launch_gate_grads`] (flat, contiguous, row-major).
pub struct GateGradArgs {
    /// The query side of `∂G`, `f32 [b, t, hq]`.
    pub dg_q: Buffer,
    /// The key side of `∂G` (subtracted), `f32 [b, t, h]`.
    pub dg_k: Buffer,
    /// The final state's gate term `f32 [b, h]` (added at the last position); `None`: none.
    pub last: Option<Buffer>,
    /// Output `∂log_g`, `f32 [b, t, h]`.
    pub out: Buffer,
}

/// Writes `∂log_g` from the per-position gate terms of a backward pass (`b`, `t`, `hq`, `h`).
///
/// # Safety
/// The buffers must have the sizes documented on [`GateGradArgs`], and `hq` must be a multiple
/// of `h`.
pub unsafe fn launch_gate_grads<R: Runtime>(
    client: &ComputeClient<R>,
    [batch, seq, q_heads, kv_heads]: [usize; 4],
    args: GateGradArgs,
) {
    let with_last = args.last.is_some();
    let last = args.last.unwrap_or_else(|| Buffer::unused(client));
    // SAFETY: the buffers hold what the caller promised.
    unsafe {
        gate_grads_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static((batch * kv_heads) as u32, 1, 1),
            CubeDim::new_1d(UNITS),
            args.dg_q.arg(),
            args.dg_k.arg(),
            last.arg(),
            args.out.arg(),
            seq as u32,
            q_heads as u32,
            kv_heads as u32,
            with_last,
        )
    }
}
