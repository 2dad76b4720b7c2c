//! A step over a KV pool an engine owns: one K and one V allocation holding four layers
//! (`[layers, pages, ...]`), written by the engine with plain cudarc copies, pages freed and
//! reused in no particular order, twilight's sidecars kept current from the engine's slots
//! (by `append_slots`, which also writes K/V, and by `update_sidecar`, from K already written),
//! and dense and sparse steps on layers reached through element offsets. Every sidecar equals
//! the reference metadata bit for bit, and every output the CPU reference on the host copy.
//! One layer is repeated through raw device pointers.

mod common;

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use rand::{Rng, SeedableRng};
use twilight::reference::step::{decode_step, StepInputs, StepParams as RefParams};
use twilight::reference::{attend, dense_decode, DsLabels, HostKv, Quant4Cache, QuestMeta};
use twilight::{
    CacheShape, Decoder, DeviceMut, DeviceRef, Dtype, HostPageTable, KvElement, KvLayout, KvPool,
    KvPoolMut, PageTableView, Pruning, Selector, Sidecar, StepOutputs, StepParams, VariantSpec,
};

type E = half::f16;

const LAYERS: usize = 4;
const DENSE_LAYER: usize = 1;
const QUEST_LAYER: usize = 2;
const DS_LAYER: usize = 3;
const R: u32 = 32;

fn spec(layout: KvLayout, selector: Selector, pruning: Pruning) -> VariantSpec {
    VariantSpec {
        page_size: 16,
        head_dim: 128,
        dtype: Dtype::F16,
        group_size: 4,
        kv_layout: layout,
        selector,
        pruning,
    }
}

/// What the engine keeps: its pool on the device and the same values on the host, its free
/// pages and its requests' pages and lengths.
struct Engine {
    shape: CacheShape,
    k: CudaSlice<E>,
    v: CudaSlice<E>,
    host_k: Vec<f32>,
    host_v: Vec<f32>,
    free: Vec<i32>,
    requests: Vec<Option<(Vec<i32>, usize)>>,
    rng: rand::rngs::StdRng,
}

impl Engine {
    fn new(stream: &Arc<CudaStream>, shape: CacheShape, seed: u64) -> Engine {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Pages handed out in a shuffled order, so page ids are never the identity.
        let mut free: Vec<i32> = (0..shape.num_pages as i32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.random_range(0..=i));
        }
        let n = LAYERS * shape.elements();
        Engine {
            shape,
            k: stream.alloc_zeros::<E>(n).unwrap(),
            v: stream.alloc_zeros::<E>(n).unwrap(),
            host_k: vec![0.0; n],
            host_v: vec![0.0; n],
            free,
            requests: Vec::new(),
            rng,
        }
    }

    fn layer_offset(&self, layer: usize) -> usize {
        layer * self.shape.elements()
    }

    fn add_request(&mut self) -> usize {
        self.requests.push(Some((Vec::new(), 0)));
        self.requests.len() - 1
    }

    fn remove_request(&mut self, id: usize) {
        let (pages, _) = self.requests[id].take().unwrap();
        self.free.extend(pages.iter().rev());
    }

    /// vLLM's slot mapping of `count` new tokens of a request.
    fn reserve(&mut self, id: usize, count: usize) -> Vec<i32> {
        let page_size = self.shape.page_size;
        let (pages, len) = self.requests[id].as_mut().unwrap();
        let mut slots = Vec::new();
        for _ in 0..count {
            if len.is_multiple_of(page_size) {
                pages.push(self.free.pop().expect("the test pool is large enough"));
            }
            let page = *pages.last().unwrap() as usize;
            slots.push((page * page_size + *len % page_size) as i32);
            *len += 1;
        }
        slots
    }

    /// Random rows `[slots, num_kv_heads, head_dim]` for K and V, already rounded to E; a few
    /// channels carry larger keys so that attention is peaked enough to prune.
    fn rows(&mut self, tokens: usize) -> (Vec<E>, Vec<E>) {
        let n = tokens * self.shape.num_kv_heads * self.shape.head_dim;
        let d = self.shape.head_dim;
        let k = (0..n)
            .map(|i| {
                let scale = if i % d < 8 { 3.0 } else { 1.0 };
                E::from_f32(scale * (self.rng.random::<f32>() * 2.0 - 1.0))
            })
            .collect();
        let v = (0..n)
            .map(|_| E::from_f32(self.rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        (k, v)
    }

    /// Puts rows at `slots` of `layer` in the host copy.
    fn write_host(&mut self, layer: usize, slots: &[i32], k: &[E], v: &[E]) {
        let (heads, d) = (self.shape.num_kv_heads, self.shape.head_dim);
        let base = self.layer_offset(layer);
        for (i, &slot) in slots.iter().enumerate() {
            for h in 0..heads {
                let src = (i * heads + h) * d;
                let dst = base + self.shape.try_offset(slot as usize, h).unwrap();
                for c in 0..d {
                    self.host_k[dst + c] = k[src + c].to_f32();
                    self.host_v[dst + c] = v[src + c].to_f32();
                }
            }
        }
    }

    /// The engine's own write of a layer: the host copy of the layer, copied into the layer's
    /// slice of the device allocation.
    fn upload_layer(&mut self, stream: &Arc<CudaStream>, layer: usize) {
        let range = self.layer_offset(layer)..self.layer_offset(layer + 1);
        let k: Vec<E> = self.host_k[range.clone()]
            .iter()
            .map(|&x| E::from_f32(x))
            .collect();
        let v: Vec<E> = self.host_v[range.clone()]
            .iter()
            .map(|&x| E::from_f32(x))
            .collect();
        stream
            .memcpy_htod(&k, &mut self.k.slice_mut(range.clone()))
            .unwrap();
        stream
            .memcpy_htod(&v, &mut self.v.slice_mut(range))
            .unwrap();
    }

    fn host_kv(&self, layer: usize) -> HostKv<'_> {
        let range = self.layer_offset(layer)..self.layer_offset(layer + 1);
        HostKv {
            shape: self.shape,
            k: &self.host_k[range.clone()],
            v: &self.host_v[range],
        }
    }

    fn host_table(&self, ids: &[usize]) -> HostPageTable {
        let rows: Vec<(&[i32], usize)> = ids
            .iter()
            .map(|&id| {
                let (pages, len) = self.requests[id].as_ref().unwrap();
                (pages.as_slice(), *len)
            })
            .collect();
        HostPageTable::from_requests(&rows, self.shape.page_size, self.shape.num_pages).unwrap()
    }
}

/// Decoders of the model's three kinds of layers and the sparse layers' sidecars.
struct Model {
    dense: Decoder,
    quest: Decoder,
    ds: Decoder,
    quest_sidecar: Sidecar<E>,
    ds_sidecar: Sidecar<E>,
    channels: Vec<Vec<usize>>,
}

/// How new tokens reach a sparse layer: the append writes K/V and the sidecar, or the engine
/// writes K/V and the sidecar is updated from them.
#[derive(Clone, Copy, Debug)]
enum Path {
    Append,
    Update,
}

/// Writes new tokens of every layer at `slots`: dense layers by the engine's copies, the
/// sparse layers by `quest_path` and `ds_path`.
fn write_tokens(
    stream: &Arc<CudaStream>,
    engine: &mut Engine,
    model: &mut Model,
    slots: &[i32],
    quest_path: Path,
    ds_path: Path,
) {
    for layer in 0..LAYERS {
        let (k, v) = engine.rows(slots.len());
        engine.write_host(layer, slots, &k, &v);
        let (decoder, sidecar, path) = match layer {
            QUEST_LAYER => (&model.quest, &mut model.quest_sidecar, quest_path),
            DS_LAYER => (&model.ds, &mut model.ds_sidecar, ds_path),
            _ => {
                engine.upload_layer(stream, layer);
                continue;
            }
        };
        let offset = engine.layer_offset(layer);
        match path {
            Path::Append => {
                let k_new = stream.clone_htod(&k).unwrap();
                let v_new = stream.clone_htod(&v).unwrap();
                let pool =
                    KvPoolMut::from_layer(engine.shape, &mut engine.k, &mut engine.v, offset)
                        .unwrap()
                        .with_sidecar(sidecar)
                        .unwrap();
                decoder.append_slots(pool, slots, &k_new, &v_new).unwrap();
            }
            Path::Update => {
                engine.upload_layer(stream, layer);
                let pool = KvPool::from_layer(engine.shape, &engine.k, &engine.v, offset).unwrap();
                decoder.update_sidecar(&pool, sidecar, slots).unwrap();
            }
        }
    }
}

fn to_f32<T: KvElement>(x: Vec<T>) -> Vec<f32> {
    x.into_iter().map(|e| e.to_f32()).collect()
}

/// The sidecar of a layer equals the reference metadata of its valid tokens, bit for bit.
fn check_sidecar(
    stream: &Arc<CudaStream>,
    sidecar: &Sidecar<E>,
    kv: &HostKv,
    table: &HostPageTable,
    channels: &[Vec<usize>],
    what: &str,
) -> (Option<QuestMeta>, Quant4Cache, Option<DsLabels>) {
    let heads = kv.shape.num_kv_heads;
    let quest = sidecar.page_bounds.as_ref().map(|bounds_dev| {
        let want = QuestMeta::build(kv, table).unwrap();
        let bounds = to_f32(stream.clone_dtoh(bounds_dev).unwrap());
        for page in table.kv_indices().iter().map(|&p| p as usize) {
            for g in 0..heads {
                // The device keeps (page, head)'s max row and then its min row.
                let at = 2 * want.try_offset(page, g).unwrap();
                let n = kv.shape.head_dim;
                assert_eq!(
                    &bounds[at..at + n],
                    want.try_max_row(page, g).unwrap(),
                    "{what}: page max of page {page} head {g}"
                );
                assert_eq!(
                    &bounds[at + n..at + 2 * n],
                    want.try_min_row(page, g).unwrap(),
                    "{what}: page min of page {page} head {g}"
                );
            }
        }
        want
    });
    let labels = sidecar.k_label.as_ref().map(|labels_dev| {
        let want = DsLabels::build(kv, table, channels.to_vec()).unwrap();
        let got = to_f32(stream.clone_dtoh(labels_dev).unwrap());
        for slot in table.valid_slots() {
            for g in 0..heads {
                let at = want.try_row(slot, g).unwrap() * want.r;
                assert_eq!(
                    &got[at..at + want.r],
                    want.try_label_row(slot, g).unwrap(),
                    "{what}: labels of slot {slot} head {g}"
                );
            }
        }
        want
    });
    let want = Quant4Cache::build(kv, table).unwrap();
    let codes = stream.clone_dtoh(sidecar.k_q4.as_ref().unwrap()).unwrap();
    let scales = stream
        .clone_dtoh(sidecar.k_q4_scale_min.as_ref().unwrap())
        .unwrap();
    let n = kv.shape.head_dim / 2;
    for slot in table.valid_slots() {
        for g in 0..heads {
            let row = want.try_row(slot, g).unwrap();
            assert_eq!(
                &codes[row * n..row * n + n],
                want.try_codes_row(slot, g).unwrap(),
                "{what}: 4-bit codes of slot {slot} head {g}"
            );
            assert_eq!(
                [scales[2 * row], scales[2 * row + 1]],
                want.try_scale_min_row(slot, g).unwrap(),
                "{what}: scale/min of slot {slot} head {g}"
            );
        }
    }
    (quest, want, labels)
}

/// Tolerances relative to the output's norm: f32 accumulation, then one rounding to f16.
fn assert_close_to_norm(what: &str, got: &[f32], want: &[f32]) {
    let norm = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    common::assert_close(what, got, want, 2e-3 * norm, 8e-3);
}

/// The engine's page table on the device.
struct DeviceTable {
    indptr: CudaSlice<i32>,
    indices: CudaSlice<i32>,
    last: CudaSlice<i32>,
    batch: usize,
    max_len: usize,
}

impl DeviceTable {
    fn upload(stream: &Arc<CudaStream>, host: &HostPageTable) -> DeviceTable {
        DeviceTable {
            indptr: stream.clone_htod(host.kv_indptr()).unwrap(),
            indices: stream.clone_htod(host.kv_indices()).unwrap(),
            last: stream.clone_htod(host.kv_last_page_len()).unwrap(),
            batch: host.batch(),
            max_len: host.max_len(),
        }
    }

    fn view(&self, shape: &CacheShape) -> PageTableView<'_> {
        // SAFETY: uploaded from a HostPageTable validated against this pool's pages, with its
        // own batch and longest request.
        unsafe {
            PageTableView::from_device(
                &self.indptr,
                &self.indices,
                &self.last,
                self.batch,
                self.max_len,
                shape,
            )
        }
        .unwrap()
    }
}

/// An engine's output buffers, poisoned before each step.
struct Outputs {
    o: CudaSlice<E>,
    lse: CudaSlice<f32>,
    counts: CudaSlice<i32>,
    kept: CudaSlice<i32>,
}

impl Outputs {
    fn poisoned(
        stream: &Arc<CudaStream>,
        heads: usize,
        d: usize,
        rows: usize,
        max_cands: usize,
    ) -> Outputs {
        Outputs {
            o: stream.clone_htod(&vec![E::poison(); heads * d]).unwrap(),
            lse: stream.clone_htod(&vec![f32::NAN; heads]).unwrap(),
            counts: stream.clone_htod(&vec![-1i32; rows.max(1)]).unwrap(),
            kept: stream
                .clone_htod(&vec![-7i32; (rows * max_cands).max(1)])
                .unwrap(),
        }
    }

    fn read(&self, stream: &Arc<CudaStream>) -> (Vec<f32>, Vec<f32>, Vec<i32>, Vec<i32>) {
        (
            to_f32(stream.clone_dtoh(&self.o).unwrap()),
            stream.clone_dtoh(&self.lse).unwrap(),
            stream.clone_dtoh(&self.counts).unwrap(),
            stream.clone_dtoh(&self.kept).unwrap(),
        )
    }
}

/// A sparse step's outputs against the reference step: the kept lists are tokens of their
/// request; attention is exact over what was kept; the kept sets are the reference's except
/// for rare near-ties of the selection or the threshold (at most one row here), which must
/// still carry the mass p when the candidates agree.
#[allow(clippy::too_many_arguments)]
fn check_sparse(
    spec: &VariantSpec,
    got: &(Vec<f32>, Vec<f32>, Vec<i32>, Vec<i32>),
    max_cands: usize,
    q: &[f32],
    kv: &HostKv,
    table: &HostPageTable,
    want: &twilight::reference::StepResult,
    sm_scale: f32,
    p: f32,
    what: &str,
) {
    let (o, lse, counts, kept) = got;
    let heads = kv.shape.num_kv_heads;
    let g_size = spec.group_size as usize;
    let d = kv.shape.head_dim;
    let mut differing = 0;
    for b in 0..table.batch() {
        let valid: std::collections::HashSet<usize> = (0..table.len_of(b))
            .map(|t| table.try_slot(b, t).unwrap())
            .collect();
        for g in 0..heads {
            let row = b * heads + g;
            let count = counts[row];
            assert!(
                count >= 1 && count as usize <= max_cands,
                "{what}: kept count {count} of row {row}"
            );
            let list: Vec<usize> = kept[row * max_cands..][..count as usize]
                .iter()
                .map(|&s| s as usize)
                .collect();
            let set: std::collections::BTreeSet<usize> = list.iter().copied().collect();
            assert_eq!(
                set.len(),
                list.len(),
                "{what}: row {row} keeps a slot twice"
            );
            assert!(
                set.iter().all(|s| valid.contains(s)),
                "{what}: row {row} keeps a slot outside request {b}"
            );
            let want_set: std::collections::BTreeSet<usize> =
                want.kept[row].iter().copied().collect();
            if set != want_set {
                differing += 1;
                let cands = &want.candidates[row];
                if set.iter().all(|s| cands.contains(s)) {
                    for h in 0..g_size {
                        let head = &want.heads[b * heads * g_size + g * g_size + h];
                        let weights = head.weights.as_ref().unwrap();
                        let mass: f64 = cands
                            .iter()
                            .zip(weights)
                            .filter(|(s, _)| set.contains(s))
                            .map(|(_, w)| w)
                            .sum();
                        assert!(
                            mass >= p as f64 * (1.0 - 1e-4),
                            "{what}: row {row} head {h} keeps mass {mass} < p"
                        );
                    }
                }
            }
            for h in 0..g_size {
                let head = (b * heads + g) * g_size + h;
                let (ref_o, ref_lse) =
                    attend(&q[head * d..][..d], kv, g, &list, sm_scale as f64).unwrap();
                assert_close_to_norm(
                    &format!("{what}: o of head {head}"),
                    &o[head * d..][..d],
                    &ref_o,
                );
                common::assert_close(
                    &format!("{what}: lse of head {head}"),
                    &lse[head..head + 1],
                    &[ref_lse],
                    1e-3,
                    1e-4,
                );
            }
        }
    }
    assert!(
        differing <= 1,
        "{what}: {differing} rows keep another set than the reference"
    );
    if differing == 0 {
        assert_close_to_norm(&format!("{what}: o vs the reference step"), o, &want.o);
        let counts: Vec<usize> = counts.iter().map(|&c| c as usize).collect();
        assert_eq!(counts, want.kept_counts, "{what}: kept counts");
    }
}

fn run_layout(stream: &Arc<CudaStream>, layout: KvLayout, seed: u64) {
    let what = format!("{layout:?} seed {seed}");
    let shape = CacheShape {
        num_pages: 96,
        num_kv_heads: 2,
        page_size: 16,
        head_dim: 128,
        layout,
    };
    let quest_spec = spec(layout, Selector::Quest, Pruning::TopP);
    let ds_spec = spec(
        layout,
        Selector::DoubleSparse { channels: R },
        Pruning::TopP,
    );
    let mut engine = Engine::new(stream, shape, seed);
    let channels: Vec<Vec<usize>> = (0..shape.num_kv_heads)
        .map(|h| {
            (0..R as usize)
                .map(|i| (i * 4 + h) % shape.head_dim)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        })
        .collect();
    let mut model = Model {
        dense: Decoder::new(stream.clone(), spec(layout, Selector::Full, Pruning::None)).unwrap(),
        quest: Decoder::new(stream.clone(), quest_spec).unwrap(),
        ds: Decoder::new(stream.clone(), ds_spec).unwrap(),
        quest_sidecar: Sidecar::for_variant(stream, shape, &quest_spec).unwrap(),
        ds_sidecar: Sidecar::for_double_sparse(stream, shape, &ds_spec, &channels).unwrap(),
        channels,
    };

    // Prefill three requests, the quest layer through the append and the ds layer from K the
    // engine wrote (all requests' slots in one call: each page is one run).
    let ids: Vec<usize> = (0..3).map(|_| engine.add_request()).collect();
    let mut slots = Vec::new();
    for &id in &ids {
        let len = engine.rng.random_range(40..=300);
        slots.extend(engine.reserve(id, len));
    }
    write_tokens(
        stream,
        &mut engine,
        &mut model,
        &slots,
        Path::Append,
        Path::Update,
    );
    // The second request ends; a fourth reuses its pages (freed last, handed out first).
    engine.remove_request(ids[1]);
    let late = engine.add_request();
    let len = engine.rng.random_range(20..=200);
    let slots = engine.reserve(late, len);
    write_tokens(
        stream,
        &mut engine,
        &mut model,
        &slots,
        Path::Update,
        Path::Append,
    );
    // Decode tokens round-robin, one per live request per step, alternating the paths.
    let live = [ids[0], ids[2], late];
    for step in 0..5 {
        let slots: Vec<i32> = live.iter().flat_map(|&id| engine.reserve(id, 1)).collect();
        let (a, b) = if step % 2 == 0 {
            (Path::Append, Path::Update)
        } else {
            (Path::Update, Path::Append)
        };
        write_tokens(stream, &mut engine, &mut model, &slots, a, b);
    }

    let host_table = engine.host_table(&live);
    let table = DeviceTable::upload(stream, &host_table);
    let batch = live.len();
    let heads = shape.num_kv_heads;
    let g_size = 4;
    let qo = heads * g_size;
    let d = shape.head_dim;
    let q_host: Vec<E> = (0..batch * qo * d)
        .map(|_| E::from_f32(engine.rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    let q_f32 = to_f32(q_host.clone());
    let q = stream.clone_htod(&q_host).unwrap();
    let sm_scale = 0.7 / (d as f32).sqrt();

    // Dense layer.
    let kv = engine.host_kv(DENSE_LAYER);
    let want = dense_decode(&q_f32, qo, &kv, &host_table, sm_scale).unwrap();
    let pool = KvPool::from_layer(
        shape,
        &engine.k,
        &engine.v,
        engine.layer_offset(DENSE_LAYER),
    )
    .unwrap();
    let plan = model.dense.plan(batch, heads, host_table.max_len(), 1);
    let mut ws = model.dense.alloc_workspace(&plan, batch, heads).unwrap();
    assert!(model.dense.workspace_bytes(&plan, batch, heads).unwrap() > 0);
    let mut out = Outputs::poisoned(stream, batch * qo, d, 0, 0);
    model
        .dense
        .run_into(
            &q,
            &pool,
            table.view(&shape),
            &StepParams::dense(Some(sm_scale)),
            StepOutputs::new(&mut out.o, &mut out.lse),
            &mut ws,
            &mut |_| Ok(()),
        )
        .unwrap();
    let (o, lse, _, _) = out.read(stream);
    assert_close_to_norm(&format!("dense layer o, {what}"), &o, &want.o);
    common::assert_close(
        &format!("dense layer lse, {what}"),
        &lse,
        &want.lse,
        1e-3,
        1e-4,
    );

    // Sparse layers.
    let mut quest_result = None;
    for (layer, decoder, sidecar, budget, p) in [
        (
            QUEST_LAYER,
            &model.quest,
            &model.quest_sidecar,
            64usize,
            0.9f32,
        ),
        (DS_LAYER, &model.ds, &model.ds_sidecar, 80, 0.85),
    ] {
        let what = format!("layer {layer} ({}), {what}", decoder.spec());
        let kv = engine.host_kv(layer);
        let (quest, quant, labels) =
            check_sidecar(stream, sidecar, &kv, &host_table, &model.channels, &what);
        let mut ref_params = RefParams::new(budget, p, sm_scale);
        ref_params.record_weights = true;
        let inputs = StepInputs {
            q: &q_f32,
            num_qo_heads: qo,
            kv,
            table: &host_table,
            quest: quest.as_ref(),
            quant: Some(&quant),
            ds: labels.as_ref(),
        };
        let want = decode_step(decoder.spec(), &ref_params, &inputs).unwrap();
        let params = StepParams {
            budget,
            p,
            sm_scale: Some(sm_scale),
        };
        let plan = decoder.plan(batch, heads, host_table.max_len(), budget);
        let mut ws = decoder.alloc_workspace(&plan, batch, heads).unwrap();
        let pool = KvPool::from_layer(shape, &engine.k, &engine.v, engine.layer_offset(layer))
            .unwrap()
            .with_sidecar(sidecar)
            .unwrap();
        let mut out = Outputs::poisoned(stream, batch * qo, d, batch * heads, plan.max_cands);
        let outputs =
            StepOutputs::new(&mut out.o, &mut out.lse).with_kept(&mut out.counts, &mut out.kept);
        decoder
            .run_into(
                &q,
                &pool,
                table.view(&shape),
                &params,
                outputs,
                &mut ws,
                &mut |_| Ok(()),
            )
            .unwrap();
        let got = out.read(stream);
        check_sparse(
            decoder.spec(),
            &got,
            plan.max_cands,
            &q_f32,
            &inputs.kv,
            &host_table,
            &want,
            sm_scale,
            p,
            &what,
        );
        if layer == QUEST_LAYER {
            quest_result = Some((got, params, plan));
        }
    }

    // The quest layer again, every buffer given as a raw device pointer: the same results.
    let (views_result, params, plan) = quest_result.unwrap();
    let address = |s: &CudaSlice<E>| {
        let (ptr, _guard) = s.device_ptr(stream);
        ptr
    };
    let address_i32 = |s: &CudaSlice<i32>| {
        let (ptr, _guard) = s.device_ptr(stream);
        ptr
    };
    let out = Outputs::poisoned(stream, batch * qo, d, batch * heads, plan.max_cands);
    let (o_ptr, lse_ptr, counts_ptr, kept_ptr) = {
        let (o, _g1) = out.o.device_ptr(stream);
        let (lse, _g2) = out.lse.device_ptr(stream);
        let (counts, _g3) = out.counts.device_ptr(stream);
        let (kept, _g4) = out.kept.device_ptr(stream);
        (o, lse, counts, kept)
    };
    let all = LAYERS * shape.elements();
    // SAFETY: every address is a live allocation of this test, used on its own stream (the
    // only one), with the lengths it was allocated with; the engine's buffers outlive the step.
    unsafe {
        let pool = KvPool::from_layer(
            shape,
            DeviceRef::<E>::from_raw(address(&engine.k), all),
            DeviceRef::<E>::from_raw(address(&engine.v), all),
            engine.layer_offset(QUEST_LAYER),
        )
        .unwrap()
        .with_sidecar(&model.quest_sidecar)
        .unwrap();
        let table = PageTableView::from_device(
            DeviceRef::from_raw(address_i32(&table.indptr), table.indptr.len()),
            DeviceRef::from_raw(address_i32(&table.indices), table.indices.len()),
            DeviceRef::from_raw(address_i32(&table.last), table.last.len()),
            batch,
            host_table.max_len(),
            &shape,
        )
        .unwrap();
        let outputs = StepOutputs::new(
            DeviceMut::<E>::from_raw(o_ptr, out.o.len()),
            DeviceMut::<f32>::from_raw(lse_ptr, out.lse.len()),
        )
        .with_kept(
            DeviceMut::<i32>::from_raw(counts_ptr, out.counts.len()),
            DeviceMut::<i32>::from_raw(kept_ptr, out.kept.len()),
        );
        let mut ws = model.quest.alloc_workspace(&plan, batch, heads).unwrap();
        model
            .quest
            .run_into(
                DeviceRef::from_raw(address(&q), q.len()),
                &pool,
                &table,
                &params,
                outputs,
                &mut ws,
                &mut |_| Ok(()),
            )
            .unwrap();
    }
    stream.synchronize().unwrap();
    let got = out.read(stream);
    // The same kernels on the same inputs: the same kept sets and counts; o and lse equal up
    // to the order in which a row's kept tokens were accumulated.
    assert_close_to_norm(&format!("raw pointers: o, {what}"), &got.0, &views_result.0);
    common::assert_close(
        &format!("raw pointers: lse, {what}"),
        &got.1,
        &views_result.1,
        1e-4,
        1e-5,
    );
    assert_eq!(got.2, views_result.2, "raw pointers: kept counts, {what}");
    let sorted = |kept: &[i32], row: usize, n: usize| {
        let mut list = kept[row * plan.max_cands..][..n].to_vec();
        list.sort_unstable();
        list
    };
    for row in 0..batch * heads {
        let n = got.2[row] as usize;
        assert_eq!(
            sorted(&got.3, row, n),
            sorted(&views_result.3, row, n),
            "raw pointers: kept slots of row {row}, {what}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_owned_pool_through_offsets_views_and_raw_pointers() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    for (n, layout) in [KvLayout::Hnd, KvLayout::Nhd].into_iter().enumerate() {
        run_layout(&stream, layout, seed.wrapping_add(n as u64));
    }
}
