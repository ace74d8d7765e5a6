//! Moving a tensor to another device without racing the work queued on either.
//!
//! `Tensor::to_device` between two CUDA devices (burn 0.21 on cubecl-cuda 0.10) sends the
//! buffer with NCCL on a stream of the runtime's own that later work on neither device waits
//! for. The sent buffer goes back to the source's memory pool as soon as its tensor is dropped
//! (a temporary copy of a narrowed view is dropped at once), and the next kernel queued there
//! may overwrite it before the transfer reads it; the received buffer comes from the
//! destination's pool, whose free blocks may still be written by kernels queued there. Two
//! H200s gave wrong values both ways: a narrowed view of 131k tokens moved to the second GPU
//! (or a compact copy of it, moved and dropped) read back right when nothing else ran, and
//! fed into the forward pass its output was off by more than its own magnitude; a whole
//! tensor moved to an idle device came through exact.
//!
//! [`to_device_synced`] syncs the destination before the move (nothing queued there can still
//! be using the block the move lands in) and after it (the transfer has then read its source,
//! which may be dropped): the copy still runs over the devices' own link, and the host waits
//! for the destination's queued work. Other backends (wgpu and HIP have no move between
//! devices in cubecl 0.10: it panics inside the runtime) copy through host memory, read back on
//! the source's queue and written on the destination's. Context parallelism moves its slices and the states the
//! slices hand on this way, the data-parallel trainer its replicas and gradients, and
//! [`RetentionState::to_device`](crate::RetentionState::to_device) both tensors of a state.

use burn::tensor::backend::Backend;
use burn::tensor::{BasicOps, Tensor, TensorKind};

use crate::RetentionError;

/// `x` on `device` in its own dtype (unchanged when it is already there): on CUDA moved
/// between the destination's syncs, elsewhere copied through host memory.
///
/// # Errors
/// [`RetentionError::Device`] where syncing the destination fails (an error of the work
/// queued there, or of the transfer), or reading `x` back from its device.
pub fn to_device_synced<B, const D: usize, K>(
    x: Tensor<B, D, K>,
    device: &B::Device,
) -> Result<Tensor<B, D, K>, RetentionError>
where
    B: Backend,
    K: TensorKind<B> + BasicOps<B>,
{
    if &x.device() == device {
        return Ok(x);
    }
    // the backend's name carries its runtime's (`cubecl<cuda>`, `fusion<cubecl<cuda>>`)
    if !B::name(device).contains("cuda") {
        let data = x
            .try_into_data()
            .map_err(|e| RetentionError::Device(format!("reading a tensor to move it: {e:?}")))?;
        let dtype = data.dtype;
        return Ok(Tensor::from_data(data, (device, dtype)));
    }
    let sync = |when: &str| {
        B::sync(device)
            .map_err(|e| RetentionError::Device(format!("syncing {device:?} {when}: {e:?}")))
    };
    sync("before a move to it")?;
    let moved = x.to_device(device);
    sync("after a move to it")?;
    Ok(moved)
}
