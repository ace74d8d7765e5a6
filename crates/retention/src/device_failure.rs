//! Failures on a device's runtime thread, reported as errors of the op.
//!
//! A CubeCL runtime builds kernels and allocates buffers on a thread of its own, one per
//! device. A panic there (a kernel that fails to expand or compile, an allocation the device
//! refuses) is caught and logged by the runtime, and the launch that asked for it returns
//! as if it had run: the op's output would be an unwritten buffer. So the kernel backends run
//! each form's launches as one exclusive task on that thread ([`guarded`]), which does see the
//! failure, and record it for the device; the op takes it after the backend returns
//! (`RetentionBackend::retention_device_failure`) and answers [`RetentionError::Device`].
//!
//! Two cases report later than the call that failed: a backward pass (Burn's autodiff runs it
//! and cannot return an error), and `Fusion` backends, which may run an op's launches after
//! the op returns. Their failures stay recorded until [`check_device`] or the next retention
//! op on that device reports them.

#[cfg(feature = "cube")]
use std::any::TypeId;
#[cfg(feature = "cube")]
use std::collections::HashSet;
#[cfg(feature = "cube")]
use std::sync::{Mutex, PoisonError};

#[cfg(feature = "cube")]
use burn::tensor::backend::Device as _;

use crate::{RetentionBackend, RetentionError};

/// A device of a CubeCL runtime: the runtime's type and the device's id (no allocation: the
/// ops look their device up on every call, decode steps included).
#[cfg(feature = "cube")]
pub(crate) type DeviceKey = (TypeId, burn::tensor::backend::DeviceId);

/// The key failures of `R`'s `device` are recorded under.
#[cfg(feature = "cube")]
pub(crate) fn device_key<R: burn_cubecl::CubeRuntime>(device: &R::Device) -> DeviceKey {
    (TypeId::of::<R>(), device.to_id())
}

/// Failures not yet reported, at most one per device.
#[cfg(feature = "cube")]
static FAILURES: Mutex<Vec<(DeviceKey, String)>> = Mutex::new(Vec::new());

/// Records that `what` failed on `device`. The first failure not yet reported is kept (later
/// ones usually follow from it).
#[cfg(feature = "cube")]
fn record(device: DeviceKey, what: String) {
    let mut failures = FAILURES.lock().unwrap_or_else(PoisonError::into_inner);
    if !failures.iter().any(|(d, _)| *d == device) {
        failures.push((device, what));
    }
}

/// Takes the failure recorded for `device`, if any.
#[cfg(feature = "cube")]
pub(crate) fn take(device: DeviceKey) -> Option<String> {
    let mut failures = FAILURES.lock().unwrap_or_else(PoisonError::into_inner);
    let at = failures.iter().position(|(d, _)| *d == device)?;
    Some(failures.swap_remove(at).1)
}

/// `Ok(out)`, or the failure recorded on `device` since the last report.
pub(crate) fn checked<B: RetentionBackend, T>(
    device: &B::Device,
    out: T,
) -> Result<T, RetentionError> {
    match B::retention_device_failure(device) {
        Some(what) => Err(RetentionError::Device(what)),
        None => Ok(out),
    }
}

/// Reports a failure of the retention kernels on `device` that no op has reported yet: one in
/// a backward pass, or in an op whose launches a `Fusion` backend ran after it returned.
/// Starts the work queued for `device` first (without waiting for the device), so every
/// retention op called before is covered. Call it after `backward()` where a silent failure
/// would cost more than the check (a round trip to the runtime's threads, no wait for the
/// device): once per training step, for instance.
///
/// # Errors
/// [`RetentionError::Device`] naming what failed; the failure is then cleared.
///
/// # Example
/// ```
/// use burn::backend::NdArray;
///
/// retention::check_device::<NdArray>(&Default::default())?;
/// # Ok::<(), retention::RetentionError>(())
/// ```
pub fn check_device<B: RetentionBackend>(device: &B::Device) -> Result<(), RetentionError> {
    B::retention_flush(device);
    checked::<B, ()>(device, ())
}

/// Runs `body(args)` (one form's launches) as one exclusive task on `device`'s runtime thread
/// and returns its outputs, and whether a launch or an allocation failed there: then the
/// outputs come from `body` run again the usual way (queued, the failure logged again by the
/// runtime): tensors of the right shapes that nobody reads.
#[cfg(feature = "cube")]
fn attempt<R, A, T>(device: &R::Device, args: A, body: impl Fn(A) -> T + Sync) -> (T, bool)
where
    R: burn_cubecl::CubeRuntime,
    A: Clone + Send,
    T: Send + 'static,
{
    let first = args.clone();
    match R::client(device).exclusive(|| body(first)) {
        Ok(out) => (out, false),
        Err(_) => (body(args), true),
    }
}

/// [`attempt`], a failure recorded for the op to report.
#[cfg(feature = "cube")]
pub(crate) fn guarded<R, A, T>(
    device: &R::Device,
    form: &str,
    args: A,
    body: impl Fn(A) -> T + Sync,
) -> T
where
    R: burn_cubecl::CubeRuntime,
    A: Clone + Send,
    T: Send + 'static,
{
    let (out, failed) = attempt::<R, A, T>(device, args, body);
    if failed {
        record_failure::<R>(device, form);
    }
    out
}

#[cfg(feature = "cube")]
fn record_failure<R: burn_cubecl::CubeRuntime>(device: &R::Device, form: &str) {
    record(
        device_key::<R>(device),
        format!(
            "the retention kernels of `{form}` failed on {device:?}'s runtime thread (a kernel that did not build, or an allocation the device refused; the runtime logged which); their outputs were not written"
        ),
    );
}

/// Kernel variants (device, form, and a hash of what selects the kernels) that ran once under
/// [`guarded_until_built`] without failing: their kernels are built.
#[cfg(feature = "cube")]
static BUILT: Mutex<Option<HashSet<BuiltVariant>>> = Mutex::new(None);

/// A device, a form and a hash of its kernels' variant.
#[cfg(feature = "cube")]
type BuiltVariant = (DeviceKey, &'static str, u64);

/// [`guarded`] until `variant` (a hash of what selects the kernels and their compile-time
/// configuration) has run once on `device` without failing; after that `body` runs the usual
/// way, queued without waiting for the runtime's thread. For the decode forms, whose calls are
/// short enough that the wait for that thread (≈ 20–60 µs per step on an H200 at batch 1)
/// would cost a third of a step: their kernels can no longer fail to build, and what they
/// allocate per step is a token's output and one state.
#[cfg(feature = "cube")]
pub(crate) fn guarded_until_built<R, A, T>(
    device: &R::Device,
    form: &'static str,
    variant: u64,
    args: A,
    body: impl Fn(A) -> T + Sync,
) -> T
where
    R: burn_cubecl::CubeRuntime,
    A: Clone + Send,
    T: Send + 'static,
{
    let key = (device_key::<R>(device), form, variant);
    let built = |set: &Option<HashSet<_>>| set.as_ref().is_some_and(|s| s.contains(&key));
    if built(&BUILT.lock().unwrap_or_else(PoisonError::into_inner)) {
        return body(args);
    }
    let (out, failed) = attempt::<R, A, T>(device, args, body);
    if failed {
        // guard the next call too
        record_failure::<R>(device, form);
    } else {
        BUILT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(HashSet::new)
            .insert(key);
    }
    out
}
