//! The append launch shared by every decoder and pool owner: new K/V rows and every structure
//! the variant derives from K, written by one kernel; or, for K an engine already wrote, the
//! derived structures alone, read from the keys in place.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use twilight_jit::params::{AppendParams, ConstPtr, Elem, MutPtr};
use twilight_jit::{LoadedProgram, Stage};

use crate::buffer::{DeviceRef, VECTOR_ALIGN};
use crate::decoder::check_pool_for;
use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::host::CacheShape;
use crate::kv_cache::{PagedKvCache, RequestId};
use crate::launch::{Grid, Launcher};
use crate::pool::{check_shape, KvPool, KvPoolMut, SidecarViewMut};
use crate::sidecar::Sidecar;

/// Groups the reserved slots (in token order) into one job per touched page:
/// `[page, first_offset, count, src_row]`. A page's new tokens are consecutive in the append, so
/// each page gets one job, and its block can update the page's metadata alone.
pub(crate) fn page_jobs(slots: &[i32], page_size: usize) -> Vec<i32> {
    let mut jobs: Vec<[i32; 4]> = Vec::new();
    for (row, &slot) in slots.iter().enumerate() {
        let page = slot / page_size as i32;
        let offset = slot % page_size as i32;
        match jobs.last_mut() {
            Some(job) if job[0] == page && job[1] + job[2] == offset => job[2] += 1,
            _ => jobs.push([page, offset, 1, row as i32]),
        }
    }
    jobs.concat()
}

/// Checks slots given by an engine (`page * page_size + offset`, one per new row) and groups
/// them into page jobs: every slot lies in the pool, and the slots of one page are consecutive
/// offsets given in one run, each page once, since one block owns a page and merges its Quest
/// bounds (two blocks on one page would race, and a gap would merge bounds over tokens that
/// were never written).
///
/// # Errors
/// [`Error::Parameter`] naming the first bad slot.
pub fn check_slots(slots: &[i32], shape: &CacheShape) -> Result<()> {
    jobs_of(slots, shape).map(drop)
}

fn jobs_of(slots: &[i32], shape: &CacheShape) -> Result<Vec<i32>> {
    check_shape(shape)?;
    if slots.len() > i32::MAX as usize {
        return Err(Error::Parameter(format!(
            "{} rows in one append overflow the kernel's 32-bit row index",
            slots.len()
        )));
    }
    // check_shape bounds the slot count by i32::MAX.
    let capacity = shape.num_pages * shape.page_size;
    if let Some((i, &slot)) = slots
        .iter()
        .enumerate()
        .find(|(_, &s)| s < 0 || s as usize >= capacity)
    {
        return Err(Error::Parameter(format!(
            "slot {slot} (row {i}) is outside the pool's slots 0..{capacity} ({} pages of {})",
            shape.num_pages, shape.page_size
        )));
    }
    let jobs = page_jobs(slots, shape.page_size);
    let mut seen = std::collections::HashMap::new();
    for job in jobs.chunks_exact(4) {
        if let Some(first_row) = seen.insert(job[0], job[3]) {
            return Err(Error::Parameter(format!(
                "page {} gets rows {first_row} and {} that are not one run of consecutive offsets; give each page's new slots consecutively, in offset order",
                job[0], job[3]
            )));
        }
    }
    Ok(jobs)
}

/// New K/V rows an append copies into the pool: `[tokens, num_kv_heads, head_dim]` each.
pub(crate) struct Rows<'a, T> {
    k_new: DeviceRef<'a, T>,
    v_new: DeviceRef<'a, T>,
}

impl<'a, T: KvElement> Rows<'a, T> {
    /// # Errors
    /// Rows of another length than `tokens` rows of the pool, or not on a 16-byte boundary.
    pub fn new(
        shape: CacheShape,
        tokens: usize,
        k_new: DeviceRef<'a, T>,
        v_new: DeviceRef<'a, T>,
    ) -> Result<Self> {
        let row = shape.num_kv_heads * shape.head_dim;
        for (what, t) in [("k_new", &k_new), ("v_new", &v_new)] {
            if tokens.checked_mul(row) != Some(t.len()) {
                return Err(Error::shape(
                    format!("{what} [tokens, num_kv_heads, head_dim]"),
                    format!("{tokens} x {} x {}", shape.num_kv_heads, shape.head_dim),
                    t.len(),
                ));
            }
            t.check_aligned(what, VECTOR_ALIGN)?;
        }
        Ok(Rows { k_new, v_new })
    }
}

pub(crate) fn append<T: KvElement>(
    stream: &Arc<CudaStream>,
    program: &LoadedProgram,
    cache: &mut PagedKvCache<T>,
    appends: &[(RequestId, usize)],
    k_new: &CudaSlice<T>,
    v_new: &CudaSlice<T>,
) -> Result<()> {
    let spec = program.spec;
    let shape = cache.shape();
    check_pool_for(&spec, shape, T::DTYPE)?;
    cache.check_derived_for(&spec)?;
    let tokens = appends
        .iter()
        .try_fold(0usize, |n, a| n.checked_add(a.1))
        .ok_or_else(|| Error::Parameter("the appended token counts overflow".into()))?;
    let rows = Rows::new(shape, tokens, k_new.into(), v_new.into())?;
    if tokens == 0 {
        return Ok(());
    }
    let slots = cache.reserve(appends)?;
    write_slots(stream, program, cache.pool_mut(), &slots, rows)
}

/// Writes `rows` into `slots` (one per row, in order) of a pool, with every structure of its
/// sidecar, in one launch. The caller matched the pool and its sidecar to the variant.
pub(crate) fn write_slots<T: KvElement>(
    stream: &Arc<CudaStream>,
    program: &LoadedProgram,
    pool: KvPoolMut<'_, T>,
    slots: &[i32],
    rows: Rows<'_, T>,
) -> Result<()> {
    let jobs = jobs_of(slots, &pool.shape)?;
    if slots.is_empty() {
        return Ok(());
    }
    let jobs = upload_jobs(stream, &jobs)?;
    let KvPoolMut {
        shape,
        mut k,
        mut v,
        mut sidecar,
    } = pool;
    let mut l = Launcher::new(stream, false);
    let pointers = AppendPointers {
        k_new: l.read_ref_elem(&rows.k_new),
        v_new: l.read_ref_elem(&rows.v_new),
        k_cache: l.write_mut_elem(&mut k),
        v_cache: l.write_mut_elem(&mut v),
    };
    // SAFETY: the new rows hold one row per slot (checked by `Rows::new`) and every job's
    // page lies inside the pool (checked by `jobs_of`).
    unsafe { launch(program, shape, &jobs, l, pointers, &mut sidecar) }
}

/// Updates a sidecar from the keys already in the pool at `slots`: the append kernel reads
/// each key where it lies and writes no K or V.
pub(crate) fn update_in_place<T: KvElement>(
    stream: &Arc<CudaStream>,
    program: &LoadedProgram,
    pool: &KvPool<'_, T>,
    sidecar: &mut Sidecar<T>,
    slots: &[i32],
) -> Result<()> {
    let jobs = jobs_of(slots, &pool.shape)?;
    if slots.is_empty() {
        return Ok(());
    }
    let jobs = upload_jobs(stream, &jobs)?;
    let mut sidecar = sidecar.view_mut();
    let mut l = Launcher::new(stream, false);
    let k_cache = l.read_ref_elem(&pool.k);
    let pointers = AppendPointers {
        k_new: ConstPtr::NULL,
        v_new: ConstPtr::NULL,
        // SAFETY: with null new rows the kernel reads K through this pointer and never writes
        // it (nor V, which stays null).
        k_cache: unsafe { MutPtr::from_raw(k_cache.address()) },
        v_cache: MutPtr::NULL,
    };
    // SAFETY: every job's page lies inside the pool (checked by `jobs_of`), whose keys the
    // kernel reads in place.
    unsafe { launch(program, pool.shape, &jobs, l, pointers, &mut sidecar) }
}

fn upload_jobs(stream: &Arc<CudaStream>, jobs: &[i32]) -> Result<CudaSlice<i32>> {
    stream
        .clone_htod(jobs)
        .map_err(|e| Error::driver("uploading append jobs", e))
}

/// Where the append kernel reads new rows (null: from the cache itself) and writes K/V.
struct AppendPointers {
    k_new: ConstPtr<Elem>,
    v_new: ConstPtr<Elem>,
    k_cache: MutPtr<Elem>,
    v_cache: MutPtr<Elem>,
}

/// Queues the append kernel over `jobs` with the sidecar's pointers.
///
/// # Safety
/// `pointers` address the pool of `shape` and, when not null, one new row per slot of the
/// jobs; every job's page lies inside the pool; the sidecar was matched to the variant.
unsafe fn launch<'a, T: KvElement>(
    program: &LoadedProgram,
    shape: CacheShape,
    jobs: &'a CudaSlice<i32>,
    mut l: Launcher<'a>,
    pointers: AppendPointers,
    sidecar: &'a mut SidecarViewMut<'_, T>,
) -> Result<()> {
    let function = crate::stages::function(program, &program.spec, Stage::Append)?;
    let num_jobs = jobs.len() / 4;
    let SidecarViewMut {
        page_bounds,
        k_q4,
        k_q4_scale_min,
        k_label,
        ds_channels,
        ..
    } = sidecar;
    // The kernel skips every structure whose pointer is null: those the variant does not keep.
    let params = AppendParams {
        k_new: pointers.k_new,
        v_new: pointers.v_new,
        jobs: l.read(jobs),
        k_cache: pointers.k_cache,
        v_cache: pointers.v_cache,
        page_bounds: page_bounds
            .as_mut()
            .map_or(MutPtr::NULL, |b| l.write_elem(b)),
        k_q4: k_q4.as_mut().map_or(MutPtr::NULL, |b| l.write(b)),
        k_q4_scale_min: k_q4_scale_min.as_mut().map_or(MutPtr::NULL, |b| l.write(b)),
        k_label: k_label.as_mut().map_or(MutPtr::NULL, |b| l.write_elem(b)),
        ds_channels: ds_channels.as_ref().map_or(ConstPtr::NULL, |b| l.read(b)),
        num_jobs: num_jobs as i32,
        num_kv_heads: shape.num_kv_heads as i32,
    };
    let grid = Grid::jobs(num_jobs, program.tiling.append_threads);
    // SAFETY: `function` is `_append`; the rest is the caller's contract.
    unsafe { l.launch(function, grid, params, "append") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twilight_jit::KvLayout;

    fn shape() -> CacheShape {
        CacheShape {
            num_pages: 8,
            num_kv_heads: 2,
            page_size: 4,
            head_dim: 64,
            layout: KvLayout::Hnd,
        }
    }

    #[test]
    fn engine_slots_are_checked() {
        let s = shape();
        // Two requests: page 5 from offset 2, then page 1 from 0, then page 3 reused at 0.
        assert!(check_slots(&[22, 23, 4, 5, 6, 12], &s).is_ok());
        assert!(check_slots(&[], &s).is_ok());
        for (slots, needle) in [
            (vec![32], "outside the pool's slots 0..32"),
            (vec![-1], "outside"),
            (vec![4, 6], "not one run"),
            (vec![4, 5, 8, 6], "not one run"),
            (vec![4, 4], "not one run"),
            (vec![5, 4], "not one run"),
        ] {
            let err = check_slots(&slots, &s).unwrap_err();
            assert!(
                matches!(err, Error::Parameter(_)) && err.to_string().contains(needle),
                "{slots:?}: {err}"
            );
        }
    }

    #[test]
    fn jobs_group_consecutive_slots_of_a_page() {
        // page size 4: request A fills page 2 from offset 3 then page 5; request B starts page 7.
        let slots = [2 * 4 + 3, 5 * 4, 5 * 4 + 1, 7 * 4];
        assert_eq!(
            page_jobs(&slots, 4),
            vec![2, 3, 1, 0, 5, 0, 2, 1, 7, 0, 1, 3]
        );
    }
}
