//! Step 0 of DnD: pooled activations of every neuron of a layer over the whole probing set,
//! computed in batches, several layers per forward pass, and cached on disk.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::probe::{self, ProbeSet};
use crate::target::{LayerKind, Target};

/// Bumped whenever the cache's content or layout changes, so old files are never misread.
const CACHE_VERSION: &str = "dnd-activations-1";

/// How a spatial map becomes one number per neuron (ViT token layers always use the CLS token).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    #[default]
    Mean,
    Max,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pool::Mean => "mean",
            Pool::Max => "max",
        })
    }
}

impl FromStr for Pool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mean" => Ok(Pool::Mean),
            "max" => Ok(Pool::Max),
            _ => Err(format!("{s:?} is not a pooling: use mean or max")),
        }
    }
}

/// `[B, ...]` layer output to `[B, neurons]` f32.
pub fn pool_output(kind: LayerKind, out: &Tensor, pool: Pool) -> Result<Tensor> {
    let pooled = match kind {
        LayerKind::Spatial => match pool {
            Pool::Mean => out.mean((2, 3))?,
            Pool::Max => out.flatten_from(2)?.max(2)?,
        },
        LayerKind::Tokens { .. } => out.narrow(1, 0, 1)?.squeeze(1)?,
        LayerKind::Vector => out.clone(),
    };
    Ok(pooled.to_dtype(DType::F32)?)
}

/// A neuron's spatial map on one image, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct NeuronMap {
    pub height: usize,
    pub width: usize,
    pub values: Vec<f32>,
}

/// `[B, ...]` layer output to each image's `h x w` map of `neuron`.
pub fn maps_of(kind: LayerKind, out: &Tensor, neuron: usize) -> Result<Vec<NeuronMap>> {
    let (maps, (h, w)) = match kind {
        LayerKind::Spatial => {
            let (_, _, h, w) = out.dims4()?;
            (out.narrow(1, neuron, 1)?.squeeze(1)?, (h, w))
        }
        LayerKind::Tokens { grid } => {
            let t = out.dim(1)?;
            let patches = out.narrow(1, 1, t - 1)?.narrow(2, neuron, 1)?.squeeze(2)?;
            (patches.reshape(((), grid.0, grid.1))?, grid)
        }
        LayerKind::Vector => return Ok(Vec::new()),
    };
    let rows = maps
        .to_dtype(DType::F32)?
        .flatten_from(1)?
        .to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .map(|values| NeuronMap {
            height: h,
            width: w,
            values,
        })
        .collect())
}

/// The numbers of a [`LayerActivations`]: computed in memory, or read straight from a cache
/// file's memory map (no copy of what can be hundreds of megabytes).
#[derive(Clone)]
enum Matrix {
    Owned(Vec<f32>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

impl Matrix {
    fn as_slice(&self) -> &[f32] {
        match self {
            Matrix::Owned(v) => v,
            Matrix::Mapped { map, offset, len } => {
                let bytes = &map[*offset..*offset + len * 4];
                // SAFETY: `mapped` checked alignment, length and a little-endian target.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), *len) }
            }
        }
    }

    /// Zero-copy view of little-endian f32 bytes at `offset` in `map`, when aligned.
    fn mapped(map: Arc<memmap2::Mmap>, offset: usize, len: usize) -> Option<Self> {
        let aligned = (map[offset..].as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>());
        (cfg!(target_endian = "little") && aligned && map.len() >= offset + len * 4)
            .then_some(Matrix::Mapped { map, offset, len })
    }
}

/// Pooled activations of one layer: a `neurons x images` matrix, neuron-major so one neuron's
/// values over the probing set are contiguous.
#[derive(Clone)]
pub struct LayerActivations {
    pub layer: String,
    pub pool: Pool,
    /// Relative paths of the images that decoded, in probing-set order.
    pub images: Vec<String>,
    pub neurons: usize,
    values: Matrix,
}

impl PartialEq for LayerActivations {
    fn eq(&self, other: &Self) -> bool {
        (&self.layer, self.pool, &self.images, self.neurons)
            == (&other.layer, other.pool, &other.images, other.neurons)
            && self.values.as_slice() == other.values.as_slice()
    }
}

impl fmt::Debug for LayerActivations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerActivations")
            .field("layer", &self.layer)
            .field("pool", &self.pool)
            .field("images", &self.images.len())
            .field("neurons", &self.neurons)
            .finish()
    }
}

impl LayerActivations {
    /// Builds from a neuron-major matrix (`values.len() == neurons * images.len()`).
    pub fn new(
        layer: String,
        pool: Pool,
        images: Vec<String>,
        neurons: usize,
        values: Vec<f32>,
    ) -> Self {
        assert_eq!(
            values.len(),
            neurons * images.len(),
            "activation matrix shape"
        );
        Self {
            layer,
            pool,
            images,
            neurons,
            values: Matrix::Owned(values),
        }
    }

    /// This neuron's pooled activation on every image.
    pub fn neuron(&self, n: usize) -> &[f32] {
        let m = self.images.len();
        &self.values.as_slice()[n * m..(n + 1) * m]
    }

    /// The `k` highest-activating images of neuron `n`, best first, as (image index, value).
    /// Ties keep probing-set order; NaN never ranks.
    pub fn top_k(&self, n: usize, k: usize) -> Vec<(usize, f32)> {
        top_k(self.neuron(n), k)
    }

    /// [`Self::top_k`] for every neuron, in parallel.
    pub fn top_k_all(&self, k: usize) -> Vec<Vec<(usize, f32)>> {
        (0..self.neurons)
            .into_par_iter()
            .map(|n| self.top_k(n, k))
            .collect()
    }
}

/// One pass keeping a small sorted list: most values fail the threshold test at once, which is
/// far cheaper than sorting or selecting over all images.
pub fn top_k(values: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut best: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &v) in values.iter().enumerate() {
        if v.is_nan() || (best.len() == k && v <= best[k - 1].1) {
            continue;
        }
        let pos = best.partition_point(|&(_, b)| b >= v);
        best.insert(pos, (i, v));
        best.truncate(k);
    }
    best
}

/// Progress of an extraction, reported after every batch.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
}

/// What happened besides the numbers.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Images that could not be decoded: (relative path, reason).
    pub skipped: Vec<(String, String)>,
    /// Layers served from the cache.
    pub cached: Vec<String>,
}

/// The on-disk cache of pooled activations, one safetensors file per (weights, layer, pooling,
/// probing set, preprocessing). Files are written to a temporary name and renamed, so an
/// interrupted run never leaves a partial cache behind.
#[derive(Clone, Debug)]
pub struct ActivationCache {
    dir: PathBuf,
}

impl ActivationCache {
    pub fn new(cache_dir: &Path) -> Self {
        Self {
            dir: cache_dir.join("activations"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache file for a layer of `target` over `probe`.
    pub fn path_for(&self, target: &Target, layer: &str, pool: Pool, probe: &ProbeSet) -> PathBuf {
        let mut h = blake3::Hasher::new();
        for part in [
            CACHE_VERSION,
            &target.weights_hash,
            layer,
            &pool.to_string(),
            &probe.fingerprint,
            &format!("{:?}", target.preprocess),
        ] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        self.dir
            .join(format!("{}.safetensors", &h.finalize().to_hex()[..32]))
    }

    /// Reads a cache file; `Ok(None)` when absent. A damaged file is reported and removed.
    pub fn load(
        &self,
        path: &Path,
        layer: &str,
        pool: Pool,
    ) -> Option<(LayerActivations, Vec<(String, String)>)> {
        if !path.exists() {
            return None;
        }
        match read_cache(path, layer, pool) {
            Ok(v) => Some(v),
            Err(reason) => {
                tracing::warn!("activation cache {}: {reason}; recomputing", path.display());
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// Writes atomically: temporary file in the same folder, fsync, rename.
    pub fn store(
        &self,
        path: &Path,
        acts: &LayerActivations,
        skipped: &[(String, String)],
    ) -> Result<()> {
        let err = |reason: String| Error::Cache {
            path: path.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let bytes: Vec<u8> = acts
            .values
            .as_slice()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![acts.neurons, acts.images.len()],
            &bytes,
        )
        .map_err(|e| err(e.to_string()))?;
        let meta: HashMap<String, String> = [
            ("version".to_string(), CACHE_VERSION.to_string()),
            ("layer".to_string(), acts.layer.clone()),
            ("pool".to_string(), acts.pool.to_string()),
            (
                "images".to_string(),
                serde_json::to_string(&acts.images).expect("strings serialise"),
            ),
            (
                "skipped".to_string(),
                serde_json::to_string(skipped).expect("strings serialise"),
            ),
        ]
        .into_iter()
        .collect();
        let tmp = path.with_extension(format!("safetensors.tmp.{}", std::process::id()));
        let data = safetensors::serialize(vec![("activations", view)], Some(meta))
            .map_err(|e| err(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(format!("cannot write: {e}"))
        })
    }

    /// Removes temporary files left by runs killed mid-write (older than an hour, so a
    /// concurrent writer is never disturbed).
    pub fn remove_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for e in entries.flatten() {
            let name = e.file_name();
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < hour_ago);
            if name.to_string_lossy().contains(".safetensors.tmp.") && stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn read_cache(
    path: &Path,
    layer: &str,
    pool: Pool,
) -> Result<(LayerActivations, Vec<(String, String)>), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: cache files are only ever replaced by rename, never modified in place.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| e.to_string())?;
    let meta = meta.metadata().clone().ok_or("no metadata")?;
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| format!("metadata has no {k}"))
    };
    if get("version")? != CACHE_VERSION
        || get("layer")? != layer
        || get("pool")? != pool.to_string()
    {
        return Err("written for another layer, pooling or dnd version".into());
    }
    let images: Vec<String> = serde_json::from_str(&get("images")?).map_err(|e| e.to_string())?;
    let skipped: Vec<(String, String)> =
        serde_json::from_str(&get("skipped")?).map_err(|e| e.to_string())?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| e.to_string())?;
    let t = st.tensor("activations").map_err(|e| e.to_string())?;
    let shape = t.shape();
    if t.dtype() != safetensors::Dtype::F32 || shape.len() != 2 || shape[1] != images.len() {
        return Err(format!("unexpected tensor {:?} {:?}", t.dtype(), shape));
    }
    let (neurons, data) = (shape[0], t.data());
    let len = neurons * images.len();
    let offset = data.as_ptr() as usize - mmap.as_ptr() as usize;
    let mmap = Arc::new(mmap);
    let values = Matrix::mapped(mmap.clone(), offset, len).unwrap_or_else(|| {
        Matrix::Owned(
            mmap[offset..offset + len * 4]
                .par_chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    });
    let acts = LayerActivations {
        layer: layer.to_string(),
        pool,
        images,
        neurons,
        values,
    };
    Ok((acts, skipped))
}

/// How [`extract`] runs.
#[derive(Clone, Copy, Debug)]
pub struct ExtractOptions<'a> {
    pub pool: Pool,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Where results are cached; `None` always recomputes and stores nothing.
    pub cache: Option<&'a ActivationCache>,
}

/// Computes (or loads from the cache) the pooled activations of `layers` (indices into the
/// target's layers) over the probing set. Layers not cached share one pass over the images.
pub fn extract(
    target: &Target,
    probe_set: &ProbeSet,
    layers: &[usize],
    opts: ExtractOptions<'_>,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<(Vec<LayerActivations>, Report)> {
    let ExtractOptions {
        pool,
        batch_size,
        cache,
    } = opts;
    let mut report = Report::default();
    let mut results: Vec<Option<LayerActivations>> = vec![None; layers.len()];
    if let Some(c) = cache {
        c.remove_stale_temporaries();
        for (slot, &l) in results.iter_mut().zip(layers) {
            let name = &target.layer(l).name;
            if let Some((acts, skipped)) =
                c.load(&c.path_for(target, name, pool, probe_set), name, pool)
            {
                report.cached.push(name.clone());
                report.skipped = skipped;
                *slot = Some(acts);
            }
        }
    }
    let mut todo: Vec<usize> = Vec::new();
    for (&l, r) in layers.iter().zip(&results) {
        if r.is_none() && !todo.contains(&l) {
            todo.push(l);
        }
    }
    if todo.is_empty() {
        return Ok((results.into_iter().flatten().collect(), report));
    }

    let pre = &target.preprocess;
    let info = target.net.info();
    // Image-major rows while streaming; transposed to neuron-major at the end.
    let mut rows: Vec<Vec<f32>> = vec![Vec::new(); todo.len()];
    let mut kept: Vec<String> = Vec::with_capacity(probe_set.len());
    let mut skipped = Vec::new();
    let mut done = 0;
    let total = probe_set.len();
    progress(Progress { done, total });
    probe::for_each_batch(&probe_set.images, pre, batch_size, cancel, |batch| {
        done += batch.indices.len() + batch.skipped.len();
        for (i, reason) in batch.skipped {
            skipped.push((probe_set.images[i].rel.clone(), reason));
        }
        if !batch.indices.is_empty() {
            let x = pre.input(&batch.pixels, &info.device, info.dtype)?;
            let outs = target.net.forward(&x, &todo)?;
            for ((out, acc), &l) in outs.iter().zip(rows.iter_mut()).zip(&todo) {
                let pooled = pool_output(target.layer(l).kind, out, pool)?;
                acc.extend(pooled.flatten_all()?.to_vec1::<f32>()?);
            }
            kept.extend(
                batch
                    .indices
                    .iter()
                    .map(|&i| probe_set.images[i].rel.clone()),
            );
        }
        progress(Progress { done, total });
        Ok(())
    })?;
    if kept.is_empty() {
        return Err(Error::Probe {
            path: probe_set.root.clone(),
            reason: format!("none of its {total} images could be decoded (see the warnings above)"),
        });
    }
    for (acc, &l) in rows.into_iter().zip(&todo) {
        let info = target.layer(l);
        let acts = LayerActivations::new(
            info.name.clone(),
            pool,
            kept.clone(),
            info.neurons,
            transpose(&acc, kept.len(), info.neurons),
        );
        if let Some(c) = cache {
            c.store(
                &c.path_for(target, &info.name, pool, probe_set),
                &acts,
                &skipped,
            )?;
        }
        // Every slot asking for this layer (a layer named twice is computed once).
        let slots: Vec<usize> = (0..layers.len()).filter(|&i| layers[i] == l).collect();
        let (&last, rest) = slots.split_last().expect("todo comes from layers");
        for &i in rest {
            results[i] = Some(acts.clone());
        }
        results[last] = Some(acts);
    }
    report.skipped = skipped;
    Ok((results.into_iter().flatten().collect(), report))
}

/// `[rows, cols]` row-major to `[cols, rows]` row-major.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    out.par_chunks_mut(rows).enumerate().for_each(|(c, dst)| {
        for (r, d) in dst.iter_mut().enumerate() {
            *d = data[r * cols + c];
        }
    });
    out
}

/// The spatial maps of `neuron` of layer `layer` on chosen image files (cropping needs them).
/// Layers without a map (fc, head, avgpool) give an empty list.
pub fn neuron_maps(
    target: &Target,
    layer: usize,
    neuron: usize,
    images: &[PathBuf],
    batch_size: usize,
) -> Result<Vec<NeuronMap>> {
    target.check_neuron(layer, neuron)?;
    let kind = target.layer(layer).kind;
    if kind == LayerKind::Vector {
        return Ok(Vec::new());
    }
    let (pre, info) = (&target.preprocess, target.net.info());
    let mut maps = Vec::with_capacity(images.len());
    for chunk in images.chunks(batch_size.max(1)) {
        let pixels = probe::load_images(chunk, pre)?;
        let x = pre.input(&pixels, &info.device, info.dtype)?;
        let out = target.net.forward(&x, &[layer])?.remove(0);
        maps.extend(maps_of(kind, &out, neuron)?);
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_ordered_stable_and_ignores_nan() {
        let v = [1.0, 5.0, f32::NAN, 5.0, 3.0, -1.0];
        assert_eq!(top_k(&v, 3), vec![(1, 5.0), (3, 5.0), (4, 3.0)]);
        assert_eq!(top_k(&v, 0), vec![]);
        assert_eq!(top_k(&v, 10).len(), 5);
    }

    #[test]
    fn transpose_round_trips() {
        let d: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let t = transpose(&d, 2, 3);
        assert_eq!(t, vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(transpose(&t, 3, 2), d);
    }
}
