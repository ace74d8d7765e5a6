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
//! the source's queue and written on the destination's; which way a backend takes is its
//! [`RetentionBackend::retention_direct_moves`]. [`DeviceTransfer`] moves many tensors between
//! one sync before and one after (a model's parameters, their gradients). Context parallelism moves its slices and the states the
//! slices hand on this way, the data-parallel trainer its replicas and gradients, and
//! [`RetentionState::to_device`](crate::RetentionState::to_device) both tensors of a state.

use burn::tensor::{BasicOps, Tensor, TensorKind};

use crate::{RetentionBackend, RetentionError};

/// `x` on `device` in its own dtype (unchanged when it is already there): where the backend
/// moves tensors between its devices itself ([`RetentionBackend::retention_direct_moves`]:
/// CUDA), moved between two syncs of the destination; elsewhere copied through host memory.
///
/// # Errors
/// [`RetentionError::Device`] where syncing the destination fails (an error of the work
/// queued there, or of the transfer), or reading `x` back from its device.
pub fn to_device_synced<B, const D: usize, K>(
    x: Tensor<B, D, K>,
    device: &B::Device,
) -> Result<Tensor<B, D, K>, RetentionError>
where
    B: RetentionBackend,
    K: TensorKind<B> + BasicOps<B> + 'static,
{
    if &x.device() == device {
        return Ok(x);
    }
    let mut transfer = DeviceTransfer::<B>::begin(device)?;
    let moved = transfer.move_tensor(x)?;
    transfer.finish()?;
    Ok(moved)
}

/// Tensors moved to one device between one sync of it before the first move and one after the
/// last, their sources kept alive until then: the moves of [`to_device_synced`] at the cost of
/// two syncs for all of them. Queue no work on the destination or the sources between
/// [`begin`](Self::begin) and [`finish`](Self::finish) (a kernel queued there could take a
/// block the transfers still use). Where the backend copies through host memory each move
/// reads its tensor back at once and the syncs are skipped.
pub struct DeviceTransfer<B: RetentionBackend> {
    device: B::Device,
    direct: bool,
    /// The moved tensors' sources, dropped once the destination is synced after the moves.
    sources: Vec<Box<dyn Send>>,
}

impl<B: RetentionBackend> DeviceTransfer<B> {
    /// Starts moving tensors to `device`: syncs it where the moves are the backend's own.
    ///
    /// # Errors
    /// [`RetentionError::Device`] where syncing `device` fails.
    pub fn begin(device: &B::Device) -> Result<Self, RetentionError> {
        let direct = B::retention_direct_moves(device);
        if direct {
            sync::<B>(device, "before moves to it")?;
        }
        Ok(Self {
            device: device.clone(),
            direct,
            sources: Vec::new(),
        })
    }

    /// `x` on the transfer's device in its own dtype (unchanged when it is already there).
    ///
    /// # Errors
    /// [`RetentionError::Device`] where reading `x` back from its device fails (host copies).
    pub fn move_tensor<const D: usize, K>(
        &mut self,
        x: Tensor<B, D, K>,
    ) -> Result<Tensor<B, D, K>, RetentionError>
    where
        K: TensorKind<B> + BasicOps<B> + 'static,
    {
        if x.device() == self.device {
            return Ok(x);
        }
        if !self.direct {
            let data = x.try_into_data().map_err(|e| {
                RetentionError::Device(format!("reading a tensor to move it: {e:?}"))
            })?;
            let dtype = data.dtype;
            return Ok(Tensor::from_data(data, (&self.device, dtype)));
        }
        self.sources.push(Box::new(x.clone()));
        Ok(x.to_device(&self.device))
    }

    /// Waits for the moves (a sync of the destination), then lets their sources go.
    ///
    /// # Errors
    /// [`RetentionError::Device`] where syncing the destination fails.
    pub fn finish(self) -> Result<(), RetentionError> {
        if self.direct && !self.sources.is_empty() {
            sync::<B>(&self.device, "after moves to it")?;
        }
        drop(self.sources);
        Ok(())
    }
}

fn sync<B: RetentionBackend>(device: &B::Device, when: &str) -> Result<(), RetentionError> {
    B::sync(device).map_err(|e| RetentionError::Device(format!("syncing {device:?} {when}: {e:?}")))
}
