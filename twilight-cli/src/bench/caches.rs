//! The benchmark's caches: drawn by the realistic generator, appended through each variant's
//! append, and rotated between steps so that the L2 does not hold them. A shape's caches are
//! drawn once for every selector measured on it.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaStream;
use twilight::{KvElement, PageTable, PagedKvCache, Selector, SparseDecoder};
use twilight_synth::generator::{plan, GeneratorParams};

use super::bytes::selection_step_bytes;
use super::shape::BenchShape;

/// Requests whose keys make the calibration sample of `double_sparse`, and positions per request.
const CALIBRATION_REQUESTS: usize = 4;
const CALIBRATION_POSITIONS: usize = 256;

/// One rotated cache with the page table of its requests and their queries.
pub struct Instance<T: KvElement> {
    pub cache: PagedKvCache<T>,
    pub table: PageTable,
    pub q: cudarc::driver::CudaSlice<T>,
}

/// Caches of realistic attention: `rotations[s]` caches for decoder `s`, filled through its
/// variant's append. Every decoder's cache `i` holds the same drawn K and V, so each draw is
/// paid once however many selectors share it.
pub fn build_instances<T: KvElement>(
    stream: &Arc<CudaStream>,
    decoders: &[SparseDecoder],
    rotations: &[usize],
    generator: &GeneratorParams,
    shape: &BenchShape,
) -> Result<Vec<Vec<Instance<T>>>, Box<dyn std::error::Error>> {
    let lens = vec![shape.len; shape.batch];
    let layout = decoders
        .first()
        .ok_or("at least one decoder")?
        .spec()
        .kv_layout;
    let mut instances: Vec<Vec<Instance<T>>> = decoders.iter().map(|_| Vec::new()).collect();
    // double_sparse: channels calibrated once, on the first cache's activations, and kept for
    // every cache, as a model's calibration serves every request.
    let mut channels: Vec<Option<Vec<Vec<usize>>>> = vec![None; decoders.len()];
    let draws = rotations.iter().copied().max().unwrap_or(1).max(1);
    for i in 0..draws {
        let start = Instant::now();
        let mut g = generator.clone();
        g.seed = generator.seed + i as u64;
        // Planned, then drawn request by request: the host never holds a whole pool, so caches
        // far larger than host memory can be filled.
        let planned = plan::<T>(
            &g,
            &lens,
            shape.kv_heads,
            shape.qo_heads / shape.kv_heads,
            shape.page_size as usize,
            shape.head_dim as usize,
            layout,
        )?;
        // The decoders that rotate over at least i + 1 caches get this draw.
        let users: Vec<usize> = (0..decoders.len()).filter(|&s| rotations[s] > i).collect();
        let mut caches: Vec<Option<PagedKvCache<T>>> = users.iter().map(|_| None).collect();
        let mut ids: Vec<Vec<twilight::RequestId>> = users.iter().map(|_| Vec::new()).collect();
        // Requests are drawn in parallel groups (the draw is the slow part of a large cache)
        // and appended group by group, so the host holds one group's rows at a time.
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        let requests: Vec<usize> = (0..shape.batch).collect();
        for group in requests.chunks(threads) {
            let rows: Vec<(Vec<T>, Vec<T>)> = std::thread::scope(|scope| {
                let planned = &planned;
                let handles: Vec<_> = group
                    .iter()
                    .map(|&b| scope.spawn(move || planned.request_rows::<T>(b)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("drawing a request's rows does not panic"))
                    .collect::<twilight_synth::Result<_>>()
            })?;
            for (slot, &s) in users.iter().enumerate() {
                if caches[slot].is_some() {
                    continue;
                }
                let spec = decoders[s].spec();
                caches[slot] = Some(match spec.selector {
                    Selector::DoubleSparse { channels: r } => {
                        if channels[s].is_none() {
                            channels[s] = Some(calibrate(&planned.q, &rows, shape, r as usize)?);
                        }
                        let channels = channels[s].as_ref().expect("calibrated above");
                        PagedKvCache::<T>::for_double_sparse(stream, planned.shape, spec, channels)?
                    }
                    _ => PagedKvCache::<T>::for_variant(stream, planned.shape, spec)?,
                });
            }
            for (k, v) in rows {
                // Uploaded once, appended into every decoder's cache.
                let (k, v) = (stream.clone_htod(&k)?, stream.clone_htod(&v)?);
                for (slot, &s) in users.iter().enumerate() {
                    let cache = caches[slot].as_mut().expect("created above");
                    let id = cache.add_request();
                    decoders[s].append(cache, &[(id, shape.len)], &k, &v)?;
                    ids[slot].push(id);
                }
            }
        }
        let q = twilight_synth::synthetic::SyntheticStep::to_elements::<T>(&planned.q);
        for ((slot, &s), cache) in users.iter().enumerate().zip(caches) {
            let cache = cache.ok_or("a benchmark shape has at least one request")?;
            let table = cache.page_table(stream, &ids[slot])?;
            let q = stream.clone_htod(&q)?;
            instances[s].push(Instance { cache, table, q });
        }
        stream.synchronize()?;
        eprintln!(
            "  {}: cache {}/{draws} generated and appended for {} selector(s) in {:.1} s",
            shape.name,
            i + 1,
            users.len(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(instances)
}

/// Caches to rotate: `wanted`, or 1 when the selector's metadata alone (read at the start of
/// every step, before the estimate, compaction and attention touch anything else) exceeds four
/// times the L2 (`l2` bytes), so that nothing a step leaves there survives into the next.
/// Drawing the caches is most of a large shape's time.
pub fn rotation_for(l2: f64, shape: &BenchShape, selector: Selector, wanted: usize) -> usize {
    if l2 > 0.0 && selection_step_bytes(shape, selector) > 4.0 * l2 && wanted > 1 {
        1
    } else {
        wanted
    }
}

/// Device memory (GiB) the caches of `shape` take when each of `selectors` rotates over its
/// caches: K and V, plus the derived data (Quest bounds or Double Sparsity labels, and the
/// 4-bit copy: at most a third more) per cache.
pub fn caches_gib(l2: f64, shape: &BenchShape, selectors: &[Selector], wanted: usize) -> f64 {
    let caches: usize = selectors
        .iter()
        .map(|&s| rotation_for(l2, shape, s, wanted.max(1)))
        .sum();
    shape.kv_bytes() as f64 * 1.35 * caches as f64 / (1u64 << 30) as f64
}

/// `r` channels per KV head ranked by mean |q * k| (mode qk) over evenly spread positions of
/// the first drawn requests (`rows`: their K and V, `[len, kv_heads, head_dim]`), each request's
/// query standing for the query at every position (as `twilight demo` does).
fn calibrate<T: KvElement>(
    q: &[f32],
    rows: &[(Vec<T>, Vec<T>)],
    shape: &BenchShape,
    r: usize,
) -> Result<Vec<Vec<usize>>, Box<dyn std::error::Error>> {
    use twilight::calibration::{rank_channels, CalibrationMode, DecodeSample};
    let start = Instant::now();
    let (qo, kvh, d) = (shape.qo_heads, shape.kv_heads, shape.head_dim as usize);
    let mut sample = DecodeSample::new(qo, kvh, d, CALIBRATION_POSITIONS);
    let requests = rows.len().min(CALIBRATION_REQUESTS);
    for (b, (k, _)) in rows.iter().take(requests).enumerate() {
        let row = kvh * d;
        sample.add_request(&q[b * qo * d..][..qo * d], shape.len, |t| {
            std::borrow::Cow::Owned(k[t * row..][..row].iter().map(|x| x.to_f32()).collect())
        })?;
    }
    let channels = rank_channels(&sample.all(), CalibrationMode::Qk, r)?;
    eprintln!(
        "  {}: {r} channels per KV head calibrated (mode qk) on {} tokens of {} requests in {:.1} s",
        shape.name,
        sample.tokens(),
        requests,
        start.elapsed().as_secs_f64()
    );
    Ok(channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bench::shape::test_shape as shape;

    /// The H200's L2 as its driver reports it.
    const L2: f64 = 60.0 * (1 << 20) as f64;

    #[test]
    fn rotation_drops_to_one_cache_only_where_the_selection_alone_floods_the_l2() {
        let ds = Selector::DoubleSparse { channels: 32 };
        // Headline: Quest reads 64 MiB of bounds and Double Sparsity 128 MiB of labels per
        // step, both under 4 x 60 MiB.
        let headline = shape(8, 8, 32768);
        assert_eq!(
            selection_step_bytes(&headline, Selector::Quest),
            64.0 * (1 << 20) as f64
        );
        assert_eq!(rotation_for(L2, &headline, Selector::Quest, 2), 2);
        assert_eq!(rotation_for(L2, &headline, ds, 2), 2);
        // 32 KV heads at 32k: Quest 256 MiB, over 240 MiB.
        assert_eq!(
            rotation_for(L2, &shape(8, 32, 32768), Selector::Quest, 2),
            1
        );
        // b64 at 128k: gigabytes of metadata for either selector.
        let large = shape(64, 8, 131072);
        assert_eq!(rotation_for(L2, &large, Selector::Quest, 2), 1);
        assert_eq!(rotation_for(L2, &large, ds, 3), 1);
        // Where the selections differ: Double Sparsity's labels are twice Quest's bounds here.
        let between = shape(32, 8, 16384);
        assert_eq!(rotation_for(L2, &between, Selector::Quest, 2), 2);
        assert_eq!(rotation_for(L2, &between, ds, 2), 1);
        // An unknown L2 (0) or a single cache asked for: unchanged.
        assert_eq!(rotation_for(0.0, &large, Selector::Quest, 2), 2);
        assert_eq!(rotation_for(L2, &large, Selector::Quest, 1), 1);
    }

    /// The whole shape list, measured with both default selectors and 2 rotated caches, fits
    /// `bench grid`'s default --max-gib (100) on the H200: no shape is skipped.
    #[test]
    fn every_listed_shape_fits_the_default_device_budget() {
        #[derive(serde::Deserialize)]
        struct List {
            shapes: Vec<BenchShape>,
        }
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/shapes.json");
        let list: List = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(list.shapes.len(), 44, "the grid BENCHMARKS.md reports");
        let selectors = [Selector::Quest, Selector::DoubleSparse { channels: 32 }];
        for shape in &list.shapes {
            let gib = caches_gib(L2, shape, &selectors, 2);
            assert!(gib <= 100.0, "{}: {gib:.1} GiB", shape.name);
        }
        // The largest, b64 x 128k x 8 KV heads: one 32 GiB cache per selector.
        let large = shape(64, 8, 131072);
        assert!((caches_gib(L2, &large, &selectors, 2) - 2.0 * 32.0 * 1.35).abs() < 1e-9);
    }
}
