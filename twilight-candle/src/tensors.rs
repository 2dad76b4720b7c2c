//! Reaching the device memory behind candle tensors, and the checks that come first: a candle
//! tensor is a shared storage plus a layout, so every buffer twilight reads is a window
//! `[start, end)` of a storage's `CudaSlice`, and every one it writes is reached through candle's
//! in-place op, which holds the storage's write lock while twilight launches.

use std::cell::RefCell;

use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Error, InplaceOp1, Layout, Result, Shape, Storage, Tensor};
use cudarc::driver::CudaSlice;

/// The element range a contiguous tensor covers in its storage.
///
/// # Errors
/// [`Error::RequiresContiguous`] for a strided tensor.
pub(crate) fn contiguous_range(layout: &Layout, op: &'static str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or(Error::RequiresContiguous { op })
}

/// Checks rank and dtype of an input before anything touches its storage.
///
/// # Errors
/// [`Error::UnexpectedNumberOfDims`], [`Error::UnexpectedDType`].
pub(crate) fn check_rank_dtype(
    t: &Tensor,
    what: &'static str,
    rank: usize,
    dtype: DType,
) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::UnexpectedNumberOfDims {
            expected: rank,
            got: t.rank(),
            shape: t.shape().clone(),
        }
        .context(what));
    }
    if t.dtype() != dtype {
        return Err(Error::UnexpectedDType {
            msg: what,
            expected: dtype,
            got: t.dtype(),
        });
    }
    Ok(())
}

/// Checks that every input is contiguous (a view of a `[layers, ...]` tensor along its first
/// axis is): the kernels read each buffer as one dense window.
///
/// # Errors
/// [`Error::RequiresContiguous`] naming the op.
pub(crate) fn check_contiguous(inputs: &[&Tensor], op: &'static str) -> Result<()> {
    if inputs.iter().all(|t| t.is_contiguous()) {
        Ok(())
    } else {
        Err(Error::RequiresContiguous { op })
    }
}

/// Checks an input's exact shape.
///
/// # Errors
/// [`Error::UnexpectedShape`] naming the input.
pub(crate) fn check_shape(t: &Tensor, what: &str, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::UnexpectedShape {
            msg: what.to_string(),
            expected: Shape::from(expected.to_vec()),
            got: t.shape().clone(),
        });
    }
    Ok(())
}

/// The CUDA device behind `device`.
///
/// # Errors
/// A device error naming the input when it is not on a CUDA device.
pub(crate) fn cuda_device<'d>(device: &'d Device, what: &str) -> Result<&'d CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        other => Err(Error::Msg(format!(
            "{what} is on {:?}: twilight's candle ops run on a CUDA device",
            other.location()
        ))),
    }
}

/// Checks that every input lives on the device the op was built for. Candle ops of one device
/// all run on that device's stream, and so do twilight's launches (the decoder was built on
/// it), so a tensor of the same device needs no further synchronization; a tensor of another
/// device (even one on the same GPU: its stream differs) is refused.
///
/// # Errors
/// [`Error::DeviceMismatchBinaryOp`] naming the op.
pub fn check_devices(device: &Device, inputs: &[&Tensor], op: &'static str) -> Result<()> {
    for t in inputs {
        cuda_device(t.device(), op)?;
        if !t.device().same_device(device) {
            return Err(Error::DeviceMismatchBinaryOp {
                lhs: device.location(),
                rhs: t.device().location(),
                op,
            });
        }
    }
    Ok(())
}

/// The `CudaSlice` of a storage the caller already read-locked.
pub(crate) fn cuda_slice<'s, T: CudaDType>(
    storage: &'s Storage,
    what: &str,
) -> Result<&'s CudaSlice<T>> {
    match storage {
        Storage::Cuda(s) => s.as_cuda_slice::<T>(),
        _ => Err(Error::Msg(format!("{what} is not in CUDA memory"))),
    }
}

/// The device address of the allocation behind a tensor, which identifies its storage: two
/// tensors share storage exactly when their allocations start at the same address.
pub(crate) fn storage_address<T: CudaDType>(t: &Tensor, what: &str) -> Result<u64> {
    let (storage, _) = t.storage_and_layout();
    let slice = cuda_slice::<T>(&storage, what)?;
    Ok(twilight::DeviceRef::from(slice).address())
}

/// A fresh contiguous tensor of `shape` around a buffer twilight wrote on `device`'s stream.
pub(crate) fn wrap<T: CudaDType>(
    slice: CudaSlice<T>,
    device: &CudaDevice,
    shape: &[usize],
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, device.clone()));
    Tensor::from_storage(storage, shape.to_vec(), BackpropOp::none(), false)
}

/// Runs `f` on the storage of `t` under candle's write lock, through candle's in-place op (the
/// only way candle hands out a storage for writing). `t` must not share storage with any tensor
/// `f` reads: that tensor's read lock would wait on this write lock forever.
pub(crate) fn with_storage_mut<R>(
    t: &Tensor,
    name: &'static str,
    f: impl FnOnce(&mut CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let op = WithStorageMut {
        name,
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
    };
    t.inplace_op1(&op)?;
    op.out
        .into_inner()
        .unwrap_or_else(|| Err(Error::Msg(format!("{name}: the write did not run"))))
}

struct WithStorageMut<F, R> {
    name: &'static str,
    f: RefCell<Option<F>>,
    out: RefCell<Option<Result<R>>>,
}

impl<F, R> InplaceOp1 for WithStorageMut<F, R>
where
    F: FnOnce(&mut CudaStorage, &Layout) -> Result<R>,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
        Err(Error::Msg(format!(
            "{}: twilight's candle ops run on a CUDA device",
            self.name
        )))
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let f = self.f.borrow_mut().take();
        let result = match f {
            Some(f) => f(storage, layout),
            None => Err(Error::Msg(format!("{}: ran twice", self.name))),
        };
        // The result goes back through `out`, so that candle's own error for this op (a wrong
        // device) and `f`'s error stay apart.
        *self.out.borrow_mut() = Some(result);
        Ok(())
    }
}
