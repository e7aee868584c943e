//! Target networks: the vision models being explained, with their layers addressed by the
//! PyTorch module names the weights use, and several layers tapped in one forward pass.

mod convnext;
mod resnet;
mod vgg;
mod vit;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::hub::ResolvedModel;
use crate::probe::Preprocess;

pub use convnext::ConvNext;
pub(crate) use resnet::stem_pool;
pub use resnet::{random_resnet_weights, ResNet};
pub use vgg::Vgg;
pub use vit::Vit;

/// How a layer's output maps to neurons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// `[C, H, W]`: one neuron per channel, pooled over H x W; the H x W map is its spatial map.
    Spatial,
    /// `[C]`: one value per neuron (pooled features, logits); no spatial map.
    Vector,
    /// ViT tokens `[1 + H*W, D]`: the CLS token is the neuron value, patch tokens its H x W map.
    Tokens { grid: (usize, usize) },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// PyTorch module name: `layer4`, `layer4.2`, `fc`, `blocks.7`, `head`.
    pub name: String,
    pub neurons: usize,
    /// Output shape for one image.
    pub shape: Vec<usize>,
    pub kind: LayerKind,
}

/// What every target network knows about itself.
#[derive(Clone, Debug)]
pub struct NetInfo {
    /// e.g. `resnet50 (bottleneck blocks [3, 4, 6, 3])`.
    pub architecture: String,
    /// Every tappable layer, in the order `dnd layers` lists them.
    pub layers: Vec<LayerInfo>,
    pub device: Device,
    pub dtype: DType,
}

/// A target network with named taps. One implementation per architecture family.
pub trait TargetNetwork: Send + Sync {
    fn info(&self) -> &NetInfo;
    /// Runs a preprocessed batch `[B, 3, H, W]` and returns the outputs of the layers at
    /// `taps` (indices into [`NetInfo::layers`]), in the order given, each `[B, ...shape]`.
    fn forward(&self, x: &Tensor, taps: &[usize]) -> Result<Vec<Tensor>>;
}

/// A loaded target: the network, how to preprocess for it, and what identifies its weights.
pub struct Target {
    pub net: Box<dyn TargetNetwork>,
    pub preprocess: Preprocess,
    /// Human name: the model source.
    pub name: String,
    /// blake3 of the weights file, for cache keys.
    pub weights_hash: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("architecture", &self.net.info().architecture)
            .finish()
    }
}

impl Target {
    /// Loads a ResNet, ConvNeXt, VGG, AlexNet or ViT from a resolved model folder: `model.safetensors` (torchvision,
    /// timm or transformers names) and, when present, `config.json` (timm's: preprocessing and
    /// head count; transformers': a ViT's head count, a ResNet's strides) and transformers'
    /// image processor (`preprocessor_config.json` or `processor_config.json`).
    pub fn load(model: &ResolvedModel, device: &Device, dtype: DType) -> Result<Self> {
        let label = model.label();
        let (weights_path, weight_files) = model.weight_files("model.safetensors");
        let config = match model.file("config.json") {
            Some(p) => Some(crate::nn::read_json::<serde_json::Value>(&label, p)?),
            None => None,
        };
        // timm's pretrained_cfg, else transformers' image processor, else torchvision's.
        let preprocess = match config.as_ref().and_then(Preprocess::from_timm_config) {
            Some(p) => p,
            None => Preprocess::of_model(model)?.unwrap_or_else(Preprocess::imagenet),
        };
        let mut weights = Weights::load(&label, weights_path, &weight_files)?;
        weights.convert(|t| Ok(without_data_parallel_prefix(t)))?;
        let layout = vit::Layout::of(|n| weights.contains(n));
        weights.convert(|t| layout.to_timm(t))?;
        let resnet_layout = resnet::Layout::of(|n| weights.contains(n));
        weights.convert(|t| Ok(resnet_layout.to_torchvision(t)))?;
        let convnext_layout = convnext::Layout::of(|n| weights.contains(n));
        weights.convert(|t| Ok(convnext_layout.to_timm(t)))?;
        let net: Box<dyn TargetNetwork> = if weights.contains("patch_embed.proj.weight") {
            Box::new(Vit::load(
                &weights,
                config.as_ref(),
                &preprocess,
                layout,
                device,
                dtype,
            )?)
        } else if weights.contains("layer1.0.conv1.weight") {
            Box::new(ResNet::load_as(
                &weights,
                config.as_ref(),
                resnet_layout,
                preprocess.crop as usize,
                device,
                dtype,
            )?)
        } else if convnext::Layout::is_convnext(|n| weights.contains(n)) {
            Box::new(ConvNext::load(
                &weights,
                config.as_ref(),
                convnext_layout,
                preprocess.crop as usize,
                device,
                dtype,
            )?)
        } else if vgg::is_vgg(|n| weights.contains(n)) {
            Box::new(Vgg::load(
                &weights,
                preprocess.crop as usize,
                device,
                dtype,
            )?)
        } else {
            return Err(weights.mismatch(
                "it holds no torchvision/timm or transformers ResNet (conv1, layer1.0.conv1, ...; embedder, encoder.stages, ...), no timm, torchvision or transformers ConvNeXt (stem, stages.N.blocks; features.N.M.block; embeddings.patch_embeddings, ...), no torchvision VGG or AlexNet (features.N, classifier.N) and no timm, torchvision or transformers ViT (patch_embed, blocks.N, ...; conv_proj, encoder.layers, ...; embeddings, encoder.layer, ...; vision_model.embeddings, ...)".into(),
            ));
        };
        weights.check_all_used(&net.info().architecture)?;
        Ok(Self {
            net,
            preprocess,
            name: model.source.to_string(),
            weights_hash: hash_files(&weight_files)?,
        })
    }

    /// Index of the layer called `name`, or an error listing the valid names.
    pub fn layer_index(&self, name: &str) -> Result<usize> {
        let layers = self.layers();
        layers
            .iter()
            .position(|l| l.name == name)
            .ok_or_else(|| Error::UnknownLayer {
                layer: name.to_string(),
                target: self.name.clone(),
                valid: layers
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn layers(&self) -> &[LayerInfo] {
        &self.net.info().layers
    }

    pub fn layer(&self, index: usize) -> &LayerInfo {
        &self.layers()[index]
    }

    /// Errors unless `neuron` exists in layer `index`.
    pub fn check_neuron(&self, index: usize, neuron: usize) -> Result<()> {
        let l = self.layer(index);
        if neuron >= l.neurons {
            return Err(Error::NeuronOutOfRange {
                layer: l.name.clone(),
                neuron,
                count: l.neurons,
            });
        }
        Ok(())
    }
}

/// blake3 of files one after the other (a weights file, or its shards in order), each
/// memory-mapped and hashed on all cores.
pub fn hash_files(paths: &[&Path]) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for path in paths {
        h.update_mmap_rayon(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(h.finalize().to_hex()[..32].to_string())
}

/// The tensors under their own names where a `DataParallel` wrapper prefixed every one with
/// `module.`, as research checkpoints (the Places365 CNNs, ...) often keep them.
fn without_data_parallel_prefix(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    const PREFIX: &str = "module.";
    if tensors.is_empty() || !tensors.keys().all(|k| k.starts_with(PREFIX)) {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, t)| (k[PREFIX.len()..].to_string(), t))
        .collect()
}

/// A safetensors weights file read to f32 on the CPU, with lookups that fail with messages
/// naming the model, the file and the tensor.
pub struct Weights {
    label: String,
    file: String,
    tensors: HashMap<String, Tensor>,
    /// Names read so far, for [`Weights::check_all_used`].
    used: Mutex<HashSet<String>>,
}

impl Weights {
    /// Reads a weights file, or every shard of one; `name` is the path messages give (the
    /// file, or the shards' index).
    pub fn load(label: &str, name: &Path, paths: &[&Path]) -> Result<Self> {
        let mut raw = HashMap::new();
        for path in paths {
            raw.extend(
                candle_core::safetensors::load(path, &Device::Cpu)
                    .map_err(|e| crate::nn::unreadable(label, path, &e))?,
            );
        }
        Self::from_tensors(label, &name.display().to_string(), raw)
    }

    /// Wraps tensors already in memory (random weights for benchmarks, tests).
    pub fn from_tensors(label: &str, file: &str, raw: HashMap<String, Tensor>) -> Result<Self> {
        let mut tensors = HashMap::with_capacity(raw.len());
        for (k, t) in raw {
            // Integer buffers such as BatchNorm's num_batches_tracked are not weights.
            if t.dtype().is_float() {
                tensors.insert(k, t.to_dtype(DType::F32)?);
            }
        }
        Ok(Self {
            label: label.to_string(),
            file: file.to_string(),
            tensors,
            used: Mutex::new(HashSet::new()),
        })
    }

    /// Fails when a tensor was never read, as PyTorch's strict `load_state_dict` does: weights
    /// of a variant with parts this architecture lacks (squeeze-excitation, layer scale, extra
    /// tokens) would otherwise load and compute something else without a word.
    pub fn check_all_used(&self, architecture: &str) -> Result<()> {
        let used = self.used.lock().expect("no panic while holding the lock");
        let mut unused: Vec<&String> = self.tensors.keys().filter(|k| !used.contains(*k)).collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        let shown: Vec<&str> = unused.iter().take(4).map(|s| s.as_str()).collect();
        let more = match unused.len() - shown.len() {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        Err(self.mismatch(format!(
            "{} tensors are not part of {architecture}: {}{more}. This is a variant with parts dnd does not implement, so its activations would be wrong",
            unused.len(),
            shown.join(", "),
        )))
    }

    /// Replaces the tensors by what `to` makes of them (another layout's names for the same
    /// network); its failure is a mismatch of this file.
    pub fn convert(
        &mut self,
        to: impl FnOnce(HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>>,
    ) -> Result<()> {
        self.tensors =
            to(std::mem::take(&mut self.tensors)).map_err(|e| self.mismatch(e.to_string()))?;
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn mismatch(&self, detail: String) -> Error {
        Error::ModelMismatch {
            model: self.label.clone(),
            file: self.file.clone(),
            detail,
            fix: "use weights of a supported architecture in safetensors: a torchvision/timm or transformers ResNet-18/34/50/101/152 (wide, ResNeXt, timm's ResNet-D too), ConvNeXt, ViT (DINOv2 and CLIP image towers too), or a torchvision VGG or AlexNet".into(),
        }
    }

    /// The tensor `name`, which must have `shape` when one is given.
    pub fn get(&self, name: &str, shape: Option<&[usize]>) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| self.mismatch(format!("tensor {name} is missing")))?;
        self.used
            .lock()
            .expect("no panic while holding the lock")
            .insert(name.to_string());
        if let Some(s) = shape {
            if t.dims() != s {
                return Err(self.mismatch(format!(
                    "tensor {name} has shape {:?}, expected {s:?}",
                    t.dims()
                )));
            }
        }
        Ok(t.clone())
    }

    /// `{p}.weight` and `{p}.bias` of `d` as a LayerNorm on `dev` in `dt`.
    pub(crate) fn layer_norm(
        &self,
        p: &str,
        d: usize,
        eps: f64,
        dev: &Device,
        dt: DType,
    ) -> Result<crate::nn::LayerNorm> {
        let get = |name: &str| -> Result<Tensor> {
            Ok(self
                .get(&format!("{p}.{name}"), Some(&[d]))?
                .to_device(dev)?
                .to_dtype(dt)?)
        };
        Ok(crate::nn::LayerNorm::new(get("weight")?, get("bias")?, eps))
    }

    /// BatchNorm `bn` of `channels` in eval mode (PyTorch's epsilon, 1e-5) as
    /// `x * scale + shift`, to fold into the convolution before it.
    pub(crate) fn batch_norm(&self, bn: &str, channels: usize) -> Result<(Tensor, Tensor)> {
        let s = [channels];
        let get = |p: &str| self.get(&format!("{bn}.{p}"), Some(&s));
        let (gamma, beta) = (get("weight")?, get("bias")?);
        let (mean, var) = (get("running_mean")?, get("running_var")?);
        let scale = gamma.div(&(var + 1e-5)?.sqrt()?)?;
        let shift = (beta - mean.mul(&scale)?)?;
        Ok((scale, shift))
    }

    /// Fails when transformers' config.json sets an activation other than `want`, the one
    /// dnd's `net` runs.
    pub(crate) fn check_hidden_act(
        &self,
        config: Option<&serde_json::Value>,
        want: &str,
        net: &str,
    ) -> Result<()> {
        match config
            .and_then(|c| c.get("hidden_act"))
            .and_then(|v| v.as_str())
        {
            Some(act) if act != want => Err(self.mismatch(format!(
                "config.json sets hidden_act \"{act}\"; dnd's {net} runs {want} only"
            ))),
            _ => Ok(()),
        }
    }

    /// Shape of `name`, or the missing-tensor error.
    pub fn dims(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.get(name, None)?.dims().to_vec())
    }
}

/// Collects the tapped outputs of a forward pass, so the pass can stop at the last one needed.
pub(crate) struct Recorder<'a> {
    taps: &'a [usize],
    found: HashMap<usize, Tensor>,
}

impl<'a> Recorder<'a> {
    pub(crate) fn new(taps: &'a [usize]) -> Self {
        Self {
            taps,
            found: HashMap::new(),
        }
    }

    /// Whether layer `idx` is tapped, for outputs that cost something to make.
    pub(crate) fn wants(&self, idx: usize) -> bool {
        self.taps.contains(&idx)
    }

    /// Keeps `t` if layer `idx` is tapped; true once every tap has been seen.
    pub(crate) fn record(&mut self, idx: usize, t: &Tensor) -> bool {
        if self.taps.contains(&idx) {
            self.found.insert(idx, t.clone());
        }
        self.taps.iter().all(|i| self.found.contains_key(i))
    }

    /// The tapped outputs in the order of `taps`.
    pub(crate) fn finish(self) -> Result<Vec<Tensor>> {
        self.taps
            .iter()
            .map(|i| {
                self.found.get(i).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("layer index {i} is not in this network"))
                        .into()
                })
            })
            .collect()
    }
}
