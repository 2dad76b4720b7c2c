//! The storage types of Q, K, V and O, tied to their [`Dtype`].

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use twilight_jit::Dtype;

/// A 2-byte element type a variant can run on: [`half::f16`] or [`half::bf16`].
pub trait KvElement:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + std::fmt::Debug + 'static
{
    const DTYPE: Dtype;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// A NaN: outputs are filled with it before a launch so that unwritten elements show.
    fn poison() -> Self {
        Self::from_f32(f32::NAN)
    }
}

impl KvElement for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl KvElement for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// Rounds `x` to `T` and back: the value a kernel actually sees.
pub fn round_to<T: KvElement>(x: f32) -> f32 {
    T::from_f32(x).to_f32()
}
