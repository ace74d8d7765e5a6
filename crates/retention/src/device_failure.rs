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
use std::collections::HashSet;
#[cfg(feature = "cube")]
use std::sync::{Mutex, PoisonError};

use crate::{RetentionBackend, RetentionError};

/// Failures not yet reported: (device key, what failed), at most one per device.
#[cfg(feature = "cube")]
static FAILURES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

#[cfg(feature = "cube")]
/// Records that `what` failed on the device keyed `device`. The first failure not yet
/// reported is kept (later ones usually follow from it).
pub(crate) fn record(device: String, what: String) {
    let mut failures = FAILURES.lock().unwrap_or_else(PoisonError::into_inner);
    if !failures.iter().any(|(d, _)| *d == device) {
        failures.push((device, what));
    }
}

#[cfg(feature = "cube")]
/// Takes the failure recorded for the device keyed `device`, if any.
pub(crate) fn take(device: &str) -> Option<String> {
    let mut failures = FAILURES.lock().unwrap_or_else(PoisonError::into_inner);
    let at = failures.iter().position(|(d, _)| d == device)?;
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

/// The key failures of `R`'s `device` are recorded under.
#[cfg(feature = "cube")]
pub(crate) fn device_key<R: burn_cubecl::CubeRuntime>(device: &R::Device) -> String {
    format!("{}/{device:?}", std::any::type_name::<R>())
}

/// Runs `body(args)` (one form's launches) as one exclusive task on `device`'s runtime thread
/// and returns its outputs. If a launch or an allocation fails there, the failure is recorded
/// for the op to report, and the outputs come from `body` run again the usual way (queued,
/// the failure logged again by the runtime): tensors of the right shapes that nobody reads.
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
    let client = R::client(device);
    let attempt = args.clone();
    match client.exclusive(|| body(attempt)) {
        Ok(out) => out,
        Err(_) => {
            record(
                device_key::<R>(device),
                format!(
                    "the retention kernels of `{form}` failed on {device:?}'s runtime thread (a kernel that did not build, or an allocation the device refused; the runtime logged which); their outputs were not written"
                ),
            );
            body(args)
        }
    }
}

/// Kernel variants (device, form and what selects the kernels) that ran once under
/// [`guarded`] without failing: their kernels are built.
#[cfg(feature = "cube")]
static BUILT: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// [`guarded`] until `variant` (what selects the kernels and their compile-time
/// configuration, in words) has run once on `device` without failing; after that `body` runs
/// the usual way, queued without waiting for the runtime's thread. For the decode forms,
/// whose calls are short enough that the wait for that thread (≈ 20–60 µs per step on an H200
/// at batch 1) would cost a third of a step: their kernels can no longer fail to build, and
/// what they allocate per step is a token's output and one state.
#[cfg(feature = "cube")]
pub(crate) fn guarded_until_built<R, A, T>(
    device: &R::Device,
    form: &str,
    variant: String,
    args: A,
    body: impl Fn(A) -> T + Sync,
) -> T
where
    R: burn_cubecl::CubeRuntime,
    A: Clone + Send,
    T: Send + 'static,
{
    let key = format!("{}/{form}/{variant}", device_key::<R>(device));
    let built = |set: &Option<HashSet<String>>| set.as_ref().is_some_and(|s| s.contains(&key));
    if built(&BUILT.lock().unwrap_or_else(PoisonError::into_inner)) {
        return body(args);
    }
    let before = take(&device_key::<R>(device));
    let out = guarded::<R, A, T>(device, form, args, body);
    match take(&device_key::<R>(device)) {
        // this call failed: keep its failure for the op, and guard the next call too
        Some(failure) => record(device_key::<R>(device), before.unwrap_or(failure)),
        None => {
            if let Some(earlier) = before {
                record(device_key::<R>(device), earlier);
            }
            BUILT
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(HashSet::new)
                .insert(key);
        }
    }
    out
}
