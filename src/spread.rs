//! Keeping a small grid's blocks on separate SMs when its launch overlaps the previous kernel.
//!
//! With launch overlap (programmatic dependent launch) a kernel's blocks are placed while the
//! previous kernel still holds most SMs, and the block scheduler fills the SMs with room up to
//! the kernel's occupancy: the headline's 64 selection rows in 256-thread blocks (six fit an
//! SM) landed on 18-25 SMs, and each row's latency-bound chain of radix passes shared its SM
//! with two or three others (bench/PERF-NOTES.md, v21). A kernel of one block per row is fastest with its rows
//! spread as evenly as the SMs allow; padding each block's dynamic shared memory so that only
//! `ceil(rows / SMs)` fit an SM does that, whatever else is running. The padding is not used by
//! the kernel.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaStream};

/// Dynamic shared memory per block that holds a kernel at each small occupancy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RowSpread {
    /// `padding[c - 1]`: bytes per block so that at most `c` blocks fit an SM, for every `c`
    /// below the kernel's own occupancy. Empty where the driver could not say, or the device
    /// lacks the shared memory to pad with.
    padding: Vec<u32>,
}

/// The device's shared memory, as the block scheduler counts it.
#[derive(Clone, Copy, Debug)]
struct SharedMemory {
    per_sm: u32,
    /// Set aside by the system for each resident block.
    reserved_per_block: u32,
    /// The most one block may ask for (after opting in).
    per_block: u32,
}

/// Paddings are whole KB, so that the allocation granularity cannot push one over its cap.
const GRANULE: u32 = 1024;

/// The first driver (12.5) that takes a shared-memory carveout as a launch attribute; with an
/// older one a padded launch could get a smaller carveout than its cap assumes, so nothing is
/// padded.
const CARVEOUT_ATTRIBUTE_DRIVER: i32 = 12050;

fn driver_version() -> Option<i32> {
    let mut version = 0;
    // SAFETY: writes one integer that outlives the call.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .ok()
        .map(|()| version)
}

impl RowSpread {
    /// The paddings of `function` on blocks of `threads`, checked against the driver's own
    /// occupancy figure; lets the function take the largest of them. Spreading is an
    /// optimization: where the driver cannot say or refuses, the blocks are not spread.
    pub fn of(stream: &Arc<CudaStream>, function: &CudaFunction, threads: u32) -> Self {
        match driver_version() {
            Some(version) if version >= CARVEOUT_ATTRIBUTE_DRIVER => {}
            version => {
                tracing::debug!(
                    ?version,
                    "the driver takes no carveout per launch; blocks will not be spread"
                );
                return RowSpread::default();
            }
        }
        let Some(memory) = SharedMemory::of(stream) else {
            return RowSpread::default();
        };
        let occupancy = |bytes: u32| {
            function
                .occupancy_max_active_blocks_per_multiprocessor(threads, bytes as usize, None)
                .unwrap_or(0)
        };
        let natural = occupancy(0);
        let Ok(fixed) = function
            .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .map(|bytes| bytes.max(0) as u32)
        else {
            return RowSpread::default();
        };
        let mut padding = Vec::new();
        for cap in 1..natural {
            match memory.padding_for(cap, fixed) {
                Some(bytes) => padding.push(bytes),
                None => break,
            }
        }
        let Some(&largest) = padding.first() else {
            return RowSpread::default();
        };
        if let Err(error) = crate::launch::allow_dynamic_shared(stream, function, largest) {
            tracing::debug!(%error, "blocks will not be spread");
            return RowSpread::default();
        }
        // The driver's figure decides: a padding it counts otherwise is not used.
        for (cap, &bytes) in (1..).zip(&padding) {
            let resident = occupancy(bytes);
            if resident != cap {
                tracing::debug!(
                    cap,
                    bytes,
                    resident,
                    "the driver counts a padding otherwise; blocks will not be spread"
                );
                return RowSpread::default();
            }
        }
        RowSpread { padding }
    }

    /// The padding for a grid of `rows` blocks on `num_sms` SMs; `None` where the kernel's own
    /// occupancy already spreads them (or nothing is known).
    pub fn padding(&self, rows: usize, num_sms: usize) -> Option<u32> {
        let cap = rows.div_ceil(num_sms.max(1)).max(1);
        self.padding.get(cap - 1).copied()
    }
}

impl SharedMemory {
    fn of(stream: &Arc<CudaStream>) -> Option<Self> {
        let ctx = stream.context();
        let read = |attribute| ctx.attribute(attribute).ok().map(|v| v.max(0) as u32);
        Some(SharedMemory {
            per_sm: read(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )?,
            reserved_per_block: read(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK,
            )?,
            per_block: read(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?,
        })
    }

    /// Dynamic bytes so that at most `cap` blocks with `fixed` bytes of static shared memory fit
    /// an SM: each takes more than `1 / (cap + 1)` of it and at most `1 / cap`.
    fn padding_for(self, cap: u32, fixed: u32) -> Option<u32> {
        let share = self.per_sm / cap;
        let bytes = share
            .checked_sub(self.reserved_per_block + fixed)?
            .min(self.per_block.checked_sub(fixed)?);
        let bytes = bytes / GRANULE * GRANULE;
        let taken = bytes + fixed + self.reserved_per_block;
        (taken * (cap + 1) > self.per_sm && taken * cap <= self.per_sm).then_some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sm_90's figures: 228 KB per SM, 1 KB reserved per block, 227 KB per block.
    const HOPPER: SharedMemory = SharedMemory {
        per_sm: 233_472,
        reserved_per_block: 1024,
        per_block: 232_448,
    };

    #[test]
    fn a_padding_holds_exactly_its_cap_of_blocks_per_sm() {
        for fixed in [0, 4 * 1024, 9 * 1024 + 8] {
            for cap in 1..=8u32 {
                let bytes = HOPPER.padding_for(cap, fixed).unwrap();
                let per_block = bytes + fixed + HOPPER.reserved_per_block;
                assert_eq!(HOPPER.per_sm / per_block, cap, "cap {cap} static {fixed}");
                assert_eq!(bytes % GRANULE, 0);
                assert!(bytes + fixed <= HOPPER.per_block);
            }
        }
        // One block per SM takes everything a block may have.
        assert_eq!(HOPPER.padding_for(1, 0), Some(232_448));
    }

    #[test]
    fn no_padding_where_the_static_memory_alone_exceeds_the_share() {
        assert_eq!(HOPPER.padding_for(8, 40 * 1024), None);
        // Whole KB cannot separate 30 and 31 blocks per SM.
        assert_eq!(HOPPER.padding_for(30, 0), None);
    }

    #[test]
    fn the_cap_is_the_rows_per_sm_rounded_up() {
        let spread = RowSpread {
            padding: vec![100, 50, 30],
        };
        assert_eq!(spread.padding(64, 132), Some(100));
        assert_eq!(spread.padding(132, 132), Some(100));
        assert_eq!(spread.padding(133, 132), Some(50));
        assert_eq!(spread.padding(396, 132), Some(30));
        // Four or more rows per SM: the kernel's own occupancy (4 here) spreads them.
        assert_eq!(spread.padding(397, 132), None);
        assert_eq!(RowSpread::default().padding(8, 132), None);
    }
}
