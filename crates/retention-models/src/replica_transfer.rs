//! A model's replica on another device and the replica's gradients back, all of a module's
//! tensors moved between one sync of the destination before and one after
//! ([`retention::DeviceTransfer`]): burn's `Module::fork` and `GradientsParams::to_device`
//! move tensors between two CUDA devices in a way that races the work queued on either (see
//! [`retention::to_device_synced`]).

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{BasicOps, Bool, Int, Tensor, TensorKind};
use retention::{DeviceTransfer, RetentionBackend, RetentionError};

use crate::ModelError;

/// `model`'s replica on `device`: every parameter copied there, detached, tracked where the
/// original is (as `Module::fork`).
///
/// # Errors
/// [`ModelError::Retention`] where a device fails while a parameter moves to it.
pub(crate) fn replica_on<B, M>(model: M, device: &B::Device) -> Result<M, ModelError>
where
    B: AutodiffBackend + RetentionBackend,
    M: AutodiffModule<B>,
{
    let mut copy = MoveSynced {
        transfer: DeviceTransfer::<B>::begin(device)?,
        failure: None,
    };
    let replica = model.map(&mut copy);
    copy.transfer.finish()?;
    match copy.failure {
        Some(e) => Err(e.into()),
        None => Ok(replica),
    }
}

/// `grads` (of `module`'s parameters) on `device`.
///
/// # Errors
/// [`ModelError::Retention`] where a device fails while a gradient moves to it.
pub(crate) fn grads_on<B, M>(
    mut grads: GradientsParams,
    device: &B::Device,
    module: &M,
) -> Result<GradientsParams, ModelError>
where
    B: AutodiffBackend,
    B::InnerBackend: RetentionBackend,
    M: AutodiffModule<B>,
{
    let mut visitor = GradsMoveSynced::<B::InnerBackend> {
        transfer: DeviceTransfer::begin(device)?,
        grads: &mut grads,
        failure: None,
    };
    module.visit(&mut visitor);
    visitor.transfer.finish()?;
    match visitor.failure {
        Some(e) => Err(e.into()),
        None => Ok(grads),
    }
}

/// Moves every parameter to the transfer's device, keeping the first failure (the parameter
/// then stays where it was).
struct MoveSynced<B: RetentionBackend> {
    transfer: DeviceTransfer<B>,
    failure: Option<RetentionError>,
}

impl<B: AutodiffBackend + RetentionBackend> MoveSynced<B> {
    /// `x` on the device, or `x` where that fails.
    fn copy<const D: usize, K>(&mut self, x: Tensor<B, D, K>) -> Tensor<B, D, K>
    where
        K: TensorKind<B> + BasicOps<B> + 'static,
    {
        match self.transfer.move_tensor(x.clone()) {
            Ok(moved) => moved,
            Err(e) => {
                self.failure.get_or_insert(e);
                x
            }
        }
    }
}

impl<B: AutodiffBackend + RetentionBackend> ModuleMapper<B> for MoveSynced<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|x| {
            let tracked = x.is_require_grad();
            // a leaf again after the move (as `Module::fork`)
            let moved = self.copy(x).detach();
            if tracked { moved.require_grad() } else { moved }
        })
    }

    fn map_int<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Int>>,
    ) -> Param<Tensor<B, D, Int>> {
        param.map(|x| self.copy(x))
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Bool>>,
    ) -> Param<Tensor<B, D, Bool>> {
        param.map(|x| self.copy(x))
    }
}

/// Moves every parameter's gradient in `grads` to the transfer's device, keeping the first
/// failure.
struct GradsMoveSynced<'a, B: RetentionBackend> {
    transfer: DeviceTransfer<B>,
    grads: &'a mut GradientsParams,
    failure: Option<RetentionError>,
}

impl<A: AutodiffBackend> ModuleVisitor<A> for GradsMoveSynced<'_, A::InnerBackend>
where
    A::InnerBackend: RetentionBackend,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        let Some(grad) = self.grads.remove::<A::InnerBackend, D>(param.id) else {
            return;
        };
        match self.transfer.move_tensor(grad.clone()) {
            Ok(moved) => self.grads.register(param.id, moved),
            Err(e) => {
                self.failure.get_or_insert(e);
                self.grads.register(param.id, grad);
            }
        }
    }
}
