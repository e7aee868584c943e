//! The DnD orchestration: for each neuron, top images and attention crops (step 1),
//! captions and LLM concepts (step 2), synthetic images and scores (step 3), stored and
//! reported as typed [`Event`]s.
//!
//! Neurons go through in waves. The model work of a wave is batched across its neurons; the
//! LLM calls of wave n run on the async runtime while the models work on the waves after it
//! (up to three waves wait for answers). The run can be cancelled between any two batches;
//! finished neurons are already stored.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::activations::{self, LayerActivations, Pool};
use crate::caption::{clean_caption, Blip, Generation};
use crate::clip::ClipVision;
use crate::config::{Decoder, Settings};
use crate::crops::{self, CropRules};
use crate::error::{Error, Result};
use crate::hub::ResolvedModel;
use crate::probe::{self, ProbeSet};
use crate::score::{self, RankScore};
use crate::store::{ImageSet, Row, Status, Store};
use crate::summarise::{
    self, Call, ConceptEvent, ConceptOptions, Concepts, InFlight, Llm, Summariser,
};
use crate::synthesise::{Kind, Sampling, StableDiffusion, TinyDecoder};
use crate::target::{LayerKind, Target};

/// A model as it was loaded: where from and which commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelId {
    pub source: String,
    pub revision: Option<String>,
}

impl ModelId {
    pub fn of(m: &ResolvedModel) -> Self {
        Self {
            source: m.source.to_string(),
            revision: m.revision(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIds {
    pub target: ModelId,
    pub captioner: ModelId,
    pub synthesiser: ModelId,
    pub clip: ModelId,
    pub llm: String,
    /// The tiny decoder, when it decodes in place of the VAE (absent from older records and
    /// from settings keys without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiny_vae: Option<ModelId>,
    /// `--decoder hybrid`: the VAE decodes again the images CLIP embeds (absent otherwise, so
    /// the keys of the other decoders stay as they were).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hybrid: bool,
}

/// What turns the synthesiser's latents into images, and which images.
pub enum Decoding {
    /// The synthesiser's VAE, as the reference.
    Vae,
    /// The tiny decoder for every image.
    Tiny(TinyDecoder),
    /// The tiny decoder for every image, the VAE again for those in each neuron's CLIP top:
    /// only they reach CLIP, so only they pay for the VAE.
    Hybrid(TinyDecoder),
}

impl Decoding {
    /// `decoder`'s decoding, loading the tiny decoder from `tiny_vae` where it takes part.
    pub fn load(
        decoder: Decoder,
        tiny_vae: Option<&ResolvedModel>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let tiny = || match tiny_vae {
            Some(m) => TinyDecoder::load(m, device, dtype),
            None => Err(Error::Setting {
                key: "tiny_vae".into(),
                reason: format!("--decoder {decoder} needs the tiny decoder's folder or Hub id"),
            }),
        };
        Ok(match decoder {
            Decoder::Vae => Decoding::Vae,
            Decoder::Tiny => Decoding::Tiny(tiny()?),
            Decoder::Hybrid => Decoding::Hybrid(tiny()?),
        })
    }
}

/// Every model of the pipeline, loaded once and used for every neuron.
pub struct Models {
    pub target: Target,
    pub captioner: Blip,
    pub synthesiser: StableDiffusion,
    pub clip: ClipVision,
    pub decoding: Decoding,
    pub ids: ModelIds,
}

/// How many items go through each model at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Batches {
    pub target: usize,
    pub caption: usize,
    pub synthesis: usize,
    pub clip: usize,
    /// Neurons per wave (their model work is batched together).
    pub neurons: usize,
}

/// Every parameter of the method. Together with the models and the probing set it decides
/// the result, so it is part of the key under which results are stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Params {
    /// K: top probing images per neuron.
    pub top_k: usize,
    pub crops: CropRules,
    /// Images (originals and crops) kept after re-scoring; they are captioned.
    pub top_images: usize,
    pub caption: Generation,
    pub concepts: ConceptOptions,
    /// Q: synthetic images per candidate.
    pub images_per_concept: usize,
    /// Text-to-image prompt; `{}` is replaced by the concept.
    pub prompt: String,
    pub sampling: Sampling,
    pub rank_score: RankScore,
    /// Synthetic images in the overall top this many count for the CLIP weight.
    pub clip_top: usize,
    pub pool: Pool,
    #[serde(skip)]
    pub batches: Batches,
}

impl Params {
    /// The parameters the settings ask for, checked.
    pub fn from_settings(s: &Settings, pool: Pool) -> Result<Self> {
        let bad = |key: &str, reason: String| Error::Setting {
            key: key.into(),
            reason,
        };
        let rank_score = RankScore::parse(&s.rank_score, s.beta).ok_or_else(|| {
            bad(
                "rank_score",
                format!(
                    "{:?} is not a rank score: use topk-sq-mean, mean, median or sq-mean",
                    s.rank_score
                ),
            )
        })?;
        let scheduler = match s.scheduler.as_str() {
            "folder" => None,
            name => Some(Kind::parse(name).ok_or_else(|| {
                bad(
                    "scheduler",
                    format!("{name:?} is not a scheduler: use folder, euler, ddim, dpm-solver++, pndm, unipc or lms"),
                )
            })?),
        };
        if !s.prompt.contains("{}") {
            return Err(bad(
                "prompt",
                format!("{:?} has no {{}} where the concept goes", s.prompt),
            ));
        }
        for (key, v) in [
            ("top_k", s.top_k),
            ("top_images", s.top_images),
            ("candidates", s.candidates),
            ("images_per_concept", s.images_per_concept),
            ("steps", s.steps),
            ("caption_tokens", s.caption_tokens),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        Ok(Self {
            top_k: s.top_k,
            crops: CropRules {
                max_crops: s.crops,
                ..CropRules::default()
            },
            top_images: s.top_images,
            caption: Generation {
                max_new_tokens: s.caption_tokens,
                min_length: s.caption_min_length,
            },
            concepts: ConceptOptions {
                summaries: s.candidates,
                temperature: s.temperature,
                seed: s.seed,
            },
            images_per_concept: s.images_per_concept,
            prompt: s.prompt.clone(),
            sampling: Sampling {
                steps: s.steps,
                guidance: s.guidance,
                scheduler,
                seed: s.seed,
                size: None,
            },
            rank_score,
            clip_top: s.clip_top,
            pool,
            batches: Batches {
                target: s.batch_size,
                caption: s.caption_batch,
                synthesis: s.synthesis_batch,
                clip: s.batch_size,
                neurons: s.wave,
            },
        })
    }
}

impl Models {
    /// Loads every model of the pipeline on `device`; `tiny_vae` is the tiny decoder's folder,
    /// which `decoder` tiny and hybrid need.
    pub fn load(
        resolved: &[ResolvedModel; 4],
        tiny_vae: Option<&ResolvedModel>,
        decoder: Decoder,
        llm: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let [target, captioner, synthesiser, clip] = resolved;
        let decoding = Decoding::load(decoder, tiny_vae, device, dtype)?;
        let tiny_vae = tiny_vae.filter(|_| decoder != Decoder::Vae);
        Ok(Self {
            target: Target::load(target, device, dtype)?,
            captioner: Blip::load(captioner, device, dtype)?,
            synthesiser: StableDiffusion::load(synthesiser, device, dtype)?,
            clip: ClipVision::load(clip, device, dtype)?,
            decoding,
            ids: ModelIds {
                target: ModelId::of(target),
                captioner: ModelId::of(captioner),
                synthesiser: ModelId::of(synthesiser),
                clip: ModelId::of(clip),
                llm: llm.to_string(),
                tiny_vae: tiny_vae.map(ModelId::of),
                hybrid: decoder == Decoder::Hybrid,
            },
        })
    }

    /// Latents to images in [0, 1] (B, 3, H, W), f32, left on the models' device: the tiny
    /// decoder when it decodes, else the synthesiser's VAE.
    pub fn decode_on_device(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.decoding {
            Decoding::Tiny(tiny) | Decoding::Hybrid(tiny) => tiny.decode_on_device(latents),
            Decoding::Vae => self.synthesiser.decode_on_device(latents),
        }
    }
}

/// Pipeline stages, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Activations,
    Crops,
    Captions,
    Concepts,
    Synthesis,
    Scoring,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Activations,
        Stage::Crops,
        Stage::Captions,
        Stage::Concepts,
        Stage::Synthesis,
        Stage::Scoring,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Activations => "activations",
            Stage::Crops => "crops",
            Stage::Captions => "captions",
            Stage::Concepts => "concepts",
            Stage::Synthesis => "synthesis",
            Stage::Scoring => "scoring",
        }
    }
}

/// One of a neuron's top images: a probing image or a crop of one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopImage {
    /// The probing image, relative to the probe folder.
    pub image: String,
    /// Set for a crop: its box in the original's pixels and its file (relative to the
    /// store's image folder).
    pub crop: Option<CropRef>,
    pub activation: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CropRef {
    /// [x0, y0, x1, y1]
    #[serde(rename = "box")]
    pub bbox: [u32; 4],
    pub file: String,
}

/// A crop of one of the neuron's top probing images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Crop {
    pub source: String,
    #[serde(rename = "box")]
    pub bbox: [u32; 4],
    pub file: String,
    pub activation: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateScore {
    pub concept: String,
    pub rank_score: f64,
    pub weight: f64,
    pub final_score: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub label: String,
    pub score: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSet {
    pub concept: String,
    /// Relative to the store's image folder.
    pub files: Vec<String>,
    pub activations: Vec<f32>,
    /// `--decoder hybrid`: by index into `files` (the tiny decoder's images, which the target
    /// ranked), the VAE's decode of each of this set's images in the CLIP top, which CLIP
    /// embedded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vae_files: BTreeMap<usize, String>,
}

/// Everything known about one neuron: the `describe --format json` line and the stored record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Description {
    pub target: String,
    pub layer: String,
    pub neuron: usize,
    pub status: Status,
    /// The best three, best first.
    pub labels: Vec<Label>,
    /// Every candidate, best first.
    pub candidates: Vec<CandidateScore>,
    pub top_images: Vec<TopImage>,
    pub crops: Vec<Crop>,
    pub captions: Vec<String>,
    /// One per caption; `null` where the LLM's answer was dropped.
    pub simplified: Vec<Option<String>>,
    pub synthetic: Vec<SyntheticSet>,
    /// Seconds per stage.
    pub timings: BTreeMap<String, f64>,
    pub models: ModelIds,
    pub seed: u64,
    pub error: Option<String>,
    /// LLM answers that were dropped, and why.
    pub dropped: Vec<String>,
}

/// What the pipeline reports while it runs.
#[derive(Clone, Debug)]
pub enum Event {
    /// Progress of the layer-wide activation pass (once per layer, cached afterwards).
    Activations {
        done: usize,
        total: usize,
    },
    /// The neurons that will run and those skipped as already described.
    Plan {
        run: Vec<usize>,
        skipped: Vec<usize>,
    },
    StageStarted {
        neuron: usize,
        stage: Stage,
    },
    StageFinished {
        neuron: usize,
        stage: Stage,
        seconds: f64,
    },
    /// The neuron's top images after re-scoring crops with originals.
    TopImages {
        neuron: usize,
        images: Vec<TopImage>,
    },
    Crops {
        neuron: usize,
        crops: Vec<Crop>,
    },
    Caption {
        neuron: usize,
        index: usize,
        text: String,
    },
    /// A piece of an LLM answer as it is generated (a local model streams token by token).
    LlmText {
        neuron: usize,
        call: Call,
        text: String,
    },
    Simplified {
        neuron: usize,
        index: usize,
        text: String,
    },
    Summary {
        neuron: usize,
        index: usize,
        text: String,
    },
    Candidates {
        neuron: usize,
        candidates: Vec<String>,
    },
    Synthetic {
        neuron: usize,
        concept: String,
        files: Vec<String>,
    },
    Scores {
        neuron: usize,
        scores: Vec<CandidateScore>,
    },
    /// A job of the engine ended: what it did, or why it stopped.
    JobFinished(std::result::Result<Summary, String>),
    /// The neuron is stored: described, or failed with the reason in `error`.
    Finished {
        neuron: usize,
        description: Box<Description>,
    },
    Warning {
        message: String,
    },
}

/// One `describe` job: neurons of one layer.
#[derive(Clone, Debug)]
pub struct Job {
    pub layer: String,
    pub neurons: Vec<usize>,
    pub params: Params,
    /// Redo neurons already described with the same settings.
    pub force: bool,
}

/// What a finished job did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub described: Vec<usize>,
    pub failed: Vec<usize>,
    pub skipped: Vec<usize>,
    /// Synthetic images generated.
    pub images_made: usize,
    /// Synthetic images copied from those made for the same concept before (in this job, or
    /// in an earlier one on the same store), rather than generated again.
    pub images_reused: usize,
}

/// What a run needs besides the job.
pub struct Context<'a> {
    pub models: &'a Models,
    pub probe: &'a ProbeSet,
    pub store: &'a Arc<Store>,
    pub llm: &'a Arc<dyn Llm>,
    /// Where activation caches live (`None`: always recompute).
    pub cache: Option<&'a activations::ActivationCache>,
    pub runtime: &'a tokio::runtime::Handle,
    pub events: &'a UnboundedSender<Event>,
    pub cancel: &'a AtomicBool,
}

/// What a prompt's synthetic images depend on besides the prompt: the synthesiser, the decoder,
/// the sampling and Q. Not the target, the probing set or the other parameters, so a concept
/// made for one layer or network is copied for another.
pub fn images_key(ids: &ModelIds, params: &Params) -> String {
    let key = serde_json::json!({
        "synthesiser": ids.synthesiser,
        "tiny_vae": ids.tiny_vae,
        "hybrid": ids.hybrid,
        "sampling": params.sampling,
        "images_per_concept": params.images_per_concept,
    });
    hash_key(&key)
}

/// The key under which results of this job are stored: models, probing set and parameters.
pub fn settings_key(models: &Models, probe: &ProbeSet, params: &Params) -> String {
    let key = serde_json::json!({
        "models": models.ids,
        "target_weights": models.target.weights_hash,
        "probe": probe.fingerprint,
        "params": params,
    });
    hash_key(&key)
}

/// A key's fields as 32 hex digits of their blake3 hash.
fn hash_key(fields: &serde_json::Value) -> String {
    blake3::hash(fields.to_string().as_bytes()).to_hex()[..32].to_string()
}

fn check(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

/// A neuron between stage A (images and captions) and stage B (synthesis and scores).
struct Neuron {
    n: usize,
    top: Vec<TopImage>,
    /// Decoded pixels of `top`, same order.
    pixels: Vec<RgbImage>,
    crops: Vec<Crop>,
    captions: Vec<String>,
    timings: BTreeMap<String, f64>,
}

/// Runs `job`. Per-neuron failures (nothing usable from the LLM, an unreadable image) are
/// stored and reported and the job goes on; model errors and cancellation end it.
pub fn run(ctx: &Context<'_>, job: &Job) -> Result<Summary> {
    let target = &ctx.models.target;
    let layer = target.layer_index(&job.layer)?;
    for &n in &job.neurons {
        target.check_neuron(layer, n)?;
    }
    let key = settings_key(ctx.models, ctx.probe, &job.params);
    let mut summary = Summary::default();
    let mut todo = Vec::new();
    for &n in &job.neurons {
        if !job.force && ctx.store.is_described(&target.name, &job.layer, n, &key)? {
            summary.skipped.push(n);
        } else if !todo.contains(&n) {
            todo.push(n);
        }
    }
    let _ = ctx.events.send(Event::Plan {
        run: todo.clone(),
        skipped: summary.skipped.clone(),
    });
    if todo.is_empty() {
        return Ok(summary);
    }
    for &neuron in &todo {
        let _ = ctx.events.send(Event::StageStarted {
            neuron,
            stage: Stage::Activations,
        });
    }
    let t0 = Instant::now();
    let (mut all, _) = activations::extract(
        target,
        ctx.probe,
        &[layer],
        activations::ExtractOptions {
            pool: job.params.pool,
            batch_size: job.params.batches.target,
            cache: ctx.cache,
        },
        &mut |p| {
            let _ = ctx.events.send(Event::Activations {
                done: p.done,
                total: p.total,
            });
        },
        ctx.cancel,
    )?;
    let acts = all.remove(0);
    // One pass (or a cache hit) for the whole layer, shared by every neuron of the job.
    let seconds = t0.elapsed().as_secs_f64();
    for &neuron in &todo {
        let _ = ctx.events.send(Event::StageFinished {
            neuron,
            stage: Stage::Activations,
            seconds,
        });
    }
    let runner = Runner {
        ctx,
        job,
        layer,
        key,
        images_key: images_key(&ctx.models.ids, &job.params),
        in_flight: Arc::default(),
        captions: Default::default(),
    };

    // Waves go through stage A (images, crops, captions), then wait for their LLM answers
    // before stage B (synthesis, scores), in order. A wave's stage B starts only once the next
    // wave's stage A is done, so that wave's LLM calls run during it; and while the oldest
    // wave's answers are not in, the models do further waves' stage A rather than wait, up to
    // MAX_WAITING waves, so a slow endpoint hides behind more than one wave of model work.
    const MAX_WAITING: usize = 3;
    let mut waves = todo.chunks(job.params.batches.neurons.max(1));
    let mut waiting = Waiting(VecDeque::new());
    loop {
        let answered = waiting
            .0
            .front()
            .is_some_and(|(_, task)| task.is_finished());
        if waiting.0.len() < 2 || (!answered && waiting.0.len() < MAX_WAITING) {
            if let Some(wave) = waves.next() {
                check(ctx.cancel)?;
                let ready = runner.images_and_captions(&acts, wave)?;
                let task = runner.spawn_concepts(&ready);
                waiting.0.push_back((ready, task));
                continue;
            }
        }
        match waiting.0.pop_front() {
            Some((wave, task)) => runner.finish(wave, task, &mut summary)?,
            None => return Ok(summary),
        }
    }
}

/// Waves waiting for their LLM answers, oldest first. A run that ends early (cancelled, or a
/// model error) stops their calls.
struct Waiting(VecDeque<(Vec<Neuron>, LlmTask)>);

impl Drop for Waiting {
    fn drop(&mut self) {
        for (_, task) in &self.0 {
            task.abort();
        }
    }
}

/// Per neuron of a wave: its concepts or why there are none, and the seconds it took.
type Answers = Vec<(std::result::Result<Concepts, String>, f64)>;
type LlmTask = tokio::task::JoinHandle<Answers>;

struct Runner<'a> {
    ctx: &'a Context<'a>,
    job: &'a Job,
    layer: usize,
    key: String,
    /// [`images_key`] of the job.
    images_key: String,
    /// The LLM prompts of the run being asked now (waves overlap).
    in_flight: Arc<InFlight>,
    /// Captions made so far in this job: an image in several neurons' tops is captioned once.
    captions: std::sync::Mutex<HashMap<ImageKey, String>>,
}

/// A top image: the probing image and, for a crop, its box.
type ImageKey = (String, Option<[u32; 4]>);

impl Runner<'_> {
    fn send(&self, e: Event) {
        // A consumer that went away (a closed TUI) does not stop the work being stored.
        let _ = self.ctx.events.send(e);
    }

    fn params(&self) -> &Params {
        &self.job.params
    }

    /// `--decoder hybrid`: the VAE decodes again, from their latents, the images CLIP embeds.
    fn hybrid(&self) -> bool {
        matches!(self.ctx.models.decoding, Decoding::Hybrid(_))
    }

    fn target(&self) -> &Target {
        &self.ctx.models.target
    }

    /// Folder (relative to the store's images) of one neuron's files.
    fn neuron_dir(&self, n: usize) -> PathBuf {
        let slug: String = self
            .target()
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Path::new(&slug).join(&self.job.layer).join(n.to_string())
    }

    /// Runs the target on `images` and hands each batch's layer output to `f` with the
    /// index of its first image.
    fn forward(
        &self,
        images: &[&RgbImage],
        mut f: impl FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let target = self.target();
        for (i, chunk) in images
            .chunks(self.params().batches.target.max(1))
            .enumerate()
        {
            check(self.ctx.cancel)?;
            let info = target.net.info();
            let x = target.preprocess.batch(chunk, &info.device, info.dtype)?;
            let out = target.net.forward(&x, &[self.layer])?.remove(0);
            f(i * self.params().batches.target.max(1), &out)?;
        }
        Ok(())
    }

    /// The pooled activation of neuron `neurons[i]` on `images[i]`.
    fn activations_of(&self, images: &[&RgbImage], neurons: &[usize]) -> Result<Vec<f32>> {
        let kind = self.target().layer(self.layer).kind;
        let mut out = Vec::with_capacity(images.len());
        self.forward(images, |start, t| {
            let pooled = activations::pool_output(kind, t, self.params().pool)?.to_vec2::<f32>()?;
            for (j, row) in pooled.iter().enumerate() {
                out.push(row[neurons[start + j]]);
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn timed<T>(
        &self,
        n: &[usize],
        stage: Stage,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, f64)> {
        for &neuron in n {
            self.send(Event::StageStarted { neuron, stage });
        }
        let t0 = Instant::now();
        let r = f()?;
        // A wave's batched work is shared; each neuron is charged its share.
        let seconds = t0.elapsed().as_secs_f64() / n.len().max(1) as f64;
        for &neuron in n {
            self.send(Event::StageFinished {
                neuron,
                stage,
                seconds,
            });
        }
        Ok((r, seconds))
    }

    /// Step 1 and captions (step 2.1) for a wave of neurons.
    fn images_and_captions(&self, acts: &LayerActivations, wave: &[usize]) -> Result<Vec<Neuron>> {
        let p = self.params();
        let probe = self.ctx.probe;
        let ((mut neurons, spatial), crop_secs) = self.timed(wave, Stage::Crops, || {
            // Top probing images, decoded once at their own resolution.
            let mut neurons: Vec<Neuron> = Vec::with_capacity(wave.len());
            for &n in wave {
                let tops = acts.top_k(n, p.top_k);
                let decoded: Vec<(TopImage, std::result::Result<RgbImage, String>)> = tops
                    .par_iter()
                    .map(|&(i, a)| {
                        let rel = acts.images[i].clone();
                        let img = probe::decode(&probe.root.join(&rel));
                        (
                            TopImage {
                                image: rel,
                                crop: None,
                                activation: a,
                            },
                            img,
                        )
                    })
                    .collect();
                let mut neuron = Neuron {
                    n,
                    top: Vec::new(),
                    pixels: Vec::new(),
                    crops: Vec::new(),
                    captions: Vec::new(),
                    timings: BTreeMap::new(),
                };
                for (t, img) in decoded {
                    match img {
                        Ok(img) => {
                            neuron.top.push(t);
                            neuron.pixels.push(img);
                        }
                        Err(reason) => self.send(Event::Warning {
                            message: format!(
                                "neuron {n}: top image {} left out: {reason}",
                                t.image
                            ),
                        }),
                    }
                }
                neurons.push(neuron);
            }
            let spatial = self.target().layer(self.layer).kind == LayerKind::Spatial;
            if spatial {
                self.add_crops(&mut neurons)?;
            }
            Ok((neurons, spatial))
        })?;
        for nr in &mut neurons {
            nr.timings.insert(Stage::Crops.name().into(), crop_secs);
            if spatial {
                self.send(Event::Crops {
                    neuron: nr.n,
                    crops: nr.crops.clone(),
                });
            }
            self.send(Event::TopImages {
                neuron: nr.n,
                images: nr.top.clone(),
            });
        }

        let ids: Vec<usize> = neurons.iter().map(|n| n.n).collect();
        let (captions, secs) = self.timed(&ids, Stage::Captions, || {
            let all: Vec<&RgbImage> = neurons.iter().flat_map(|n| &n.pixels).collect();
            let keys: Vec<ImageKey> = neurons
                .iter()
                .flat_map(|n| &n.top)
                .map(|t| (t.image.clone(), t.crop.as_ref().map(|c| c.bbox)))
                .collect();
            let mut known = self.captions.lock().unwrap_or_else(|e| e.into_inner());
            // Each image not captioned yet, once (a caption does not depend on its batch).
            let mut queued = std::collections::HashSet::new();
            let todo: Vec<usize> = (0..keys.len())
                .filter(|&i| !known.contains_key(&keys[i]) && queued.insert(&keys[i]))
                .collect();
            let blip = &self.ctx.models.captioner;
            for chunk in todo.chunks(p.batches.caption.max(1)) {
                check(self.ctx.cancel)?;
                let images: Vec<&RgbImage> = chunk.iter().map(|&i| all[i]).collect();
                let px = blip.pixels(&images)?;
                for (&i, ids) in chunk.iter().zip(blip.generate(&px, &p.caption)?) {
                    known.insert(keys[i].clone(), clean_caption(&blip.decode(&ids)?));
                }
            }
            Ok(keys.iter().map(|k| known[k].clone()).collect::<Vec<_>>())
        })?;
        let mut it = captions.into_iter();
        for nr in &mut neurons {
            nr.captions = it.by_ref().take(nr.pixels.len()).collect();
            nr.timings.insert(Stage::Captions.name().into(), secs);
            for (index, text) in nr.captions.iter().enumerate() {
                self.send(Event::Caption {
                    neuron: nr.n,
                    index,
                    text: text.clone(),
                });
            }
        }
        Ok(neurons)
    }

    /// Attention crops of each neuron's top images, re-scored with the originals; each
    /// neuron keeps its best `top_images`.
    fn add_crops(&self, neurons: &mut [Neuron]) -> Result<()> {
        let p = self.params();
        let kind = self.target().layer(self.layer).kind;
        // Neuron maps of every top image of the wave, one batched pass.
        let all: Vec<&RgbImage> = neurons.iter().flat_map(|n| &n.pixels).collect();
        let owner: Vec<usize> = neurons
            .iter()
            .flat_map(|n| std::iter::repeat_n(n.n, n.pixels.len()))
            .collect();
        let mut maps = Vec::with_capacity(all.len());
        self.forward(&all, |start, out| {
            for j in 0..out.dim(0)? {
                let one = out.narrow(0, j, 1)?;
                maps.extend(activations::maps_of(kind, &one, owner[start + j])?);
            }
            Ok(())
        })?;
        // Each image's heat map, threshold, contours, crops and their PNG files on every core:
        // one image at a time they held the device up for the whole wave.
        let images: Vec<(usize, usize)> = neurons
            .iter()
            .enumerate()
            .flat_map(|(w, nr)| (0..nr.pixels.len()).map(move |i| (w, i)))
            .collect();
        let (store, rules) = (self.ctx.store, &p.crops);
        let dirs: Vec<PathBuf> = neurons
            .iter()
            .map(|nr| self.neuron_dir(nr.n).join("crops"))
            .collect();
        let cut: Vec<Vec<(crops::CropBox, RgbImage, PathBuf)>> = images
            .par_iter()
            .zip(maps)
            .map(|(&(w, i), map)| {
                let img = &neurons[w].pixels[i];
                let boxes = crops::attention_boxes(
                    &map.values,
                    (map.width as u32, map.height as u32),
                    img.dimensions(),
                    rules,
                );
                boxes
                    .into_iter()
                    .enumerate()
                    .map(|(c, b)| {
                        let piece = crops::cut(img, &b);
                        let file = dirs[w].join(format!("{i:02}_{c}.png"));
                        store.save_image(&file, &piece)?;
                        Ok((b, piece, file))
                    })
                    .collect::<Result<_>>()
            })
            .collect::<Result<_>>()?;
        let mut pieces: Vec<RgbImage> = Vec::new();
        let mut piece_owner: Vec<usize> = Vec::new();
        for (&(w, i), image_crops) in images.iter().zip(cut) {
            let nr = &mut neurons[w];
            for (b, piece, file) in image_crops {
                nr.crops.push(Crop {
                    source: nr.top[i].image.clone(),
                    bbox: b.as_array(),
                    file: file.to_string_lossy().into_owned(),
                    activation: f32::NAN,
                });
                pieces.push(piece);
                piece_owner.push(w);
            }
        }
        let ns: Vec<usize> = piece_owner.iter().map(|&w| neurons[w].n).collect();
        let scores = self.activations_of(&pieces.iter().collect::<Vec<_>>(), &ns)?;
        let mut cursor = vec![0usize; neurons.len()];
        let mut crop_pixels: Vec<Vec<RgbImage>> = vec![Vec::new(); neurons.len()];
        for ((w, a), piece) in piece_owner.iter().zip(scores).zip(pieces) {
            neurons[*w].crops[cursor[*w]].activation = a;
            cursor[*w] += 1;
            crop_pixels[*w].push(piece);
        }
        // Originals and crops together, best first (stable: originals win ties).
        for (nr, cp) in neurons.iter_mut().zip(crop_pixels) {
            let mut pool: Vec<(TopImage, RgbImage)> = nr
                .top
                .drain(..)
                .zip(nr.pixels.drain(..))
                .chain(nr.crops.iter().zip(cp).map(|(c, px)| {
                    (
                        TopImage {
                            image: c.source.clone(),
                            crop: Some(CropRef {
                                bbox: c.bbox,
                                file: c.file.clone(),
                            }),
                            activation: c.activation,
                        },
                        px,
                    )
                }))
                .collect();
            pool.sort_by(|a, b| b.0.activation.total_cmp(&a.0.activation));
            pool.truncate(p.top_images);
            (nr.top, nr.pixels) = pool.into_iter().unzip();
        }
        Ok(())
    }

    /// Starts the LLM work of a wave on the runtime; it runs while the models do the next one.
    fn spawn_concepts(&self, wave: &[Neuron]) -> LlmTask {
        let llm = self.ctx.llm.clone();
        let store = self.ctx.store.clone();
        let events = self.ctx.events.clone();
        let base = self.params().concepts.clone();
        let jobs: Vec<(usize, Vec<String>)> =
            wave.iter().map(|n| (n.n, n.captions.clone())).collect();
        for (n, _) in &jobs {
            self.send(Event::StageStarted {
                neuron: *n,
                stage: Stage::Concepts,
            });
        }
        let in_flight = self.in_flight.clone();
        self.ctx.runtime.spawn(async move {
            let s = Summariser {
                llm: &*llm,
                cache: &*store,
                in_flight: &in_flight,
            };
            let calls = jobs.iter().map(|(n, captions)| {
                let events = events.clone();
                // Each neuron shuffles with its own seed, so its prompts do not depend on
                // which other neurons share the run.
                let opts = ConceptOptions {
                    seed: base.seed ^ (*n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ..base.clone()
                };
                let s = &s;
                async move {
                    let t0 = Instant::now();
                    let neuron = *n;
                    let on_event = move |e: ConceptEvent| {
                        let _ = events.send(match e {
                            ConceptEvent::Text { call, text } => {
                                Event::LlmText { neuron, call, text }
                            }
                            ConceptEvent::Simplified { index, text } => Event::Simplified {
                                neuron,
                                index,
                                text,
                            },
                            ConceptEvent::Summary { index, text } => Event::Summary {
                                neuron,
                                index,
                                text,
                            },
                        });
                    };
                    let r = if captions.is_empty() {
                        Err("none of its top images could be read (see the warnings)".into())
                    } else {
                        summarise::concepts(s, captions, &opts, &on_event)
                            .await
                            .map_err(|e| e.to_string())
                    };
                    (r, t0.elapsed().as_secs_f64())
                }
            });
            futures::future::join_all(calls).await
        })
    }

    /// Waits for a wave's LLM answers (cancellable), then synthesises, scores and stores it.
    fn finish(&self, wave: Vec<Neuron>, task: LlmTask, summary: &mut Summary) -> Result<()> {
        let answers = self.wait(task)?;
        let mut ready = Vec::new();
        for (mut nr, (r, secs)) in wave.into_iter().zip(answers) {
            nr.timings.insert(Stage::Concepts.name().into(), secs);
            self.send(Event::StageFinished {
                neuron: nr.n,
                stage: Stage::Concepts,
                seconds: secs,
            });
            let n = nr.n;
            match r {
                Ok(c) => {
                    self.send(Event::Candidates {
                        neuron: nr.n,
                        candidates: c.candidates.clone(),
                    });
                    ready.push((nr, c));
                }
                Err(e) => {
                    self.store_failure(nr, &e)?;
                    summary.failed.push(n);
                }
            }
        }
        if ready.is_empty() {
            return Ok(());
        }
        let (sets, secs) = self.synthesise(&ready, summary)?;
        for (nr, _) in &mut ready {
            nr.timings.insert(Stage::Synthesis.name().into(), secs);
        }
        self.score_and_store(ready, sets, summary)
    }

    fn wait(&self, mut task: LlmTask) -> Result<Answers> {
        self.ctx.runtime.block_on(async {
            loop {
                match tokio::time::timeout(Duration::from_millis(100), &mut task).await {
                    Ok(joined) => {
                        return joined.map_err(|e| Error::Model {
                            model: "summariser".into(),
                            detail: format!("the LLM task stopped: {e}"),
                        })
                    }
                    Err(_) if self.ctx.cancel.load(Ordering::Relaxed) => {
                        task.abort();
                        return Err(Error::Cancelled);
                    }
                    Err(_) => {}
                }
            }
        })
    }

    fn store_failure(&self, nr: Neuron, error: &str) -> Result<()> {
        let description = Description {
            status: Status::Failed,
            error: Some(error.to_string()),
            ..self.describe(&nr, None, Vec::new(), Vec::new())
        };
        self.ctx.store.put(&self.row(&description))?;
        self.send(Event::Finished {
            neuron: nr.n,
            description: Box::new(description),
        });
        Ok(())
    }

    fn describe(
        &self,
        nr: &Neuron,
        concepts: Option<&Concepts>,
        candidates: Vec<CandidateScore>,
        synthetic: Vec<SyntheticSet>,
    ) -> Description {
        let labels = candidates
            .iter()
            .take(3)
            .map(|c| Label {
                label: c.concept.clone(),
                score: c.final_score,
            })
            .collect();
        Description {
            target: self.target().name.clone(),
            layer: self.job.layer.clone(),
            neuron: nr.n,
            status: Status::Described,
            labels,
            candidates,
            top_images: nr.top.clone(),
            crops: nr.crops.clone(),
            captions: nr.captions.clone(),
            simplified: concepts.map(|c| c.simplified.clone()).unwrap_or_default(),
            synthetic,
            timings: nr.timings.clone(),
            models: self.ctx.models.ids.clone(),
            seed: self.params().sampling.seed,
            error: None,
            dropped: concepts.map(|c| c.dropped.clone()).unwrap_or_default(),
        }
    }

    fn row(&self, d: &Description) -> Row {
        Row {
            target: d.target.clone(),
            layer: d.layer.clone(),
            neuron: d.neuron,
            settings_key: self.key.clone(),
            status: d.status,
            label: d.labels.first().map(|l| l.label.clone()),
            record: serde_json::to_value(d).expect("descriptions serialise"),
            error: d.error.clone(),
            review: Default::default(),
            curated_label: None,
        }
    }

    /// Q images per candidate of every neuron of the wave, batched across neurons. Every
    /// candidate starts from the same seeded noise, so candidates differ only by prompt, and a
    /// prompt gives the same images whichever neuron asks: a concept already made (neurons of
    /// a layer can share one, and so can layers and networks) takes copies of its images, found
    /// through the store's index, rather than going through Stable Diffusion again. Both are
    /// counted in `summary`.
    fn synthesise(
        &self,
        ready: &[(Neuron, Concepts)],
        summary: &mut Summary,
    ) -> Result<(Vec<Vec<Synthesised>>, f64)> {
        let p = self.params();
        let q = p.images_per_concept;
        let ids: Vec<usize> = ready.iter().map(|(n, _)| n.n).collect();
        let (sets, secs) = self.timed(&ids, Stage::Synthesis, || {
            let prompts: Vec<Vec<String>> = ready
                .iter()
                .map(|(_, c)| {
                    let fill = |concept: &String| p.prompt.replace("{}", concept);
                    c.candidates.iter().map(fill).collect()
                })
                .collect();
            let mut sets: Vec<Vec<Synthesised>> = ready
                .iter()
                .map(|(_, c)| {
                    c.candidates
                        .iter()
                        .map(|concept| Synthesised {
                            set: SyntheticSet {
                                concept: concept.clone(),
                                files: Vec::new(),
                                activations: Vec::new(),
                                vae_files: BTreeMap::new(),
                            },
                            images: Vec::new(),
                            hashes: Vec::new(),
                            latents: Vec::new(),
                            latents_file: None,
                        })
                        .collect()
                })
                .collect();
            // Each (wave index, candidate index) is made here, recalled through the index, or
            // repeats a candidate of this wave with the same prompt (`repeats`: to, from).
            let mut first: HashMap<&str, (usize, usize)> = HashMap::new();
            let (mut to_make, mut repeats) = (Vec::new(), Vec::new());
            for (w, ps) in prompts.iter().enumerate() {
                for (ci, prompt) in ps.iter().enumerate() {
                    if let Some(&from) = first.get(prompt.as_str()) {
                        repeats.push(((w, ci), from));
                    } else {
                        first.insert(prompt, (w, ci));
                        if self.recall(prompt, ready[w].0.n, ci, &mut sets[w][ci])? {
                            summary.images_reused += q;
                        } else {
                            to_make.push((w, ci));
                        }
                    }
                }
            }
            self.make(ready, &prompts, &to_make, &mut sets)?;
            summary.images_made += to_make.len() * q;
            for &(w, ci) in &to_make {
                self.save_latents(ready[w].0.n, ci, &mut sets[w][ci])?;
                self.index(&prompts[w][ci], &sets[w][ci]);
            }
            for &((w, ci), (w0, ci0)) in &repeats {
                let from = sets[w0][ci0].clone();
                self.take_copies(&mut sets[w][ci], ready[w].0.n, ci, from)?;
                summary.images_reused += q;
            }
            Ok(sets)
        })?;
        for ((nr, _), s) in ready.iter().zip(&sets) {
            for x in s {
                self.send(Event::Synthetic {
                    neuron: nr.n,
                    concept: x.set.concept.clone(),
                    files: x.set.files.clone(),
                });
            }
        }
        Ok((sets, secs))
    }

    /// Runs Stable Diffusion for the candidates `to_make` (wave index, candidate index) of the
    /// wave, in batches across neurons, and saves their images.
    fn make(
        &self,
        ready: &[(Neuron, Concepts)],
        prompts: &[Vec<String>],
        to_make: &[(usize, usize)],
        sets: &mut [Vec<Synthesised>],
    ) -> Result<()> {
        let p = self.params();
        let q = p.images_per_concept;
        let sd = &self.ctx.models.synthesiser;
        let noise = sd.noise(q, &p.sampling)?;
        // (wave index, candidate index, image index) of every image to make.
        let items: Vec<(usize, usize, usize)> = to_make
            .iter()
            .flat_map(|&(w, ci)| (0..q).map(move |j| (w, ci, j)))
            .collect();
        let hybrid = self.hybrid();
        for chunk in items.chunks(p.batches.synthesis.max(1)) {
            check(self.ctx.cancel)?;
            let prompt_refs: Vec<&str> = chunk
                .iter()
                .map(|&(w, ci, _)| prompts[w][ci].as_str())
                .collect();
            let rows: Vec<Tensor> = chunk
                .iter()
                .map(|&(_, _, j)| noise.narrow(0, j, 1))
                .collect::<candle_core::Result<_>>()?;
            let latents = Tensor::cat(&rows, 0)?;
            let mut sched = sd.scheduler(&p.sampling)?;
            let out = sd.denoise(&latents, &prompt_refs, &mut sched, p.sampling.guidance)?;
            let images = crate::synthesise::to_rgb(&self.ctx.models.decode_on_device(&out)?)?;
            let files: Vec<PathBuf> = chunk
                .iter()
                .map(|&(w, ci, j)| self.synthetic_file(ready[w].0.n, ci, j))
                .collect();
            let hashes = self.save_images(&files, &images)?;
            let made = chunk.iter().zip(images).zip(files).zip(hashes);
            for (i, (((&(w, ci, _), img), file), hash)) in made.enumerate() {
                let s = &mut sets[w][ci];
                s.set.files.push(path_string(&file));
                s.images.push(img);
                s.hashes.push(hash);
                if hybrid {
                    s.latents.push(out.narrow(0, i, 1)?);
                }
            }
        }
        Ok(())
    }

    /// Where neuron `n`'s image `j` of candidate `ci` is saved.
    fn synthetic_file(&self, n: usize, ci: usize, j: usize) -> PathBuf {
        self.neuron_dir(n)
            .join("synthetic")
            .join(format!("{ci}_{j:02}.png"))
    }

    /// Where `--decoder hybrid` keeps the latents of neuron `n`'s candidate `ci`.
    fn latents_file(&self, n: usize, ci: usize) -> PathBuf {
        self.neuron_dir(n)
            .join("synthetic")
            .join(format!("{ci}.latents.safetensors"))
    }

    /// Fills `s` (neuron `n`'s candidate `ci`) with copies of the images made before for
    /// `prompt` with this job's images key (earlier in this job, or in an earlier one on this
    /// store), if the store's index lists them and their files still hold them; false when they
    /// are to be made.
    fn recall(&self, prompt: &str, n: usize, ci: usize, s: &mut Synthesised) -> Result<bool> {
        let store = self.ctx.store;
        let Some(set) = store.recall_images(&self.images_key, prompt) else {
            return Ok(false);
        };
        if self.copy_set(set, n, ci, s)? {
            // The newest copy is the one indexed: it outlives the older ones longest.
            self.index(prompt, s);
            Ok(true)
        } else {
            // Routine: the neuron that owned them was described again, or its files removed.
            tracing::info!("the images of {prompt:?} are gone or changed: making them again");
            store.forget_images(&self.images_key, prompt);
            Ok(false)
        }
    }

    /// Copies the files of `set` to neuron `n`'s candidate `ci` and fills `s` with them: the
    /// images decoded and, with `--decoder hybrid`, their latents on the device. False when a
    /// file no longer holds what the index says, or the set is not one this job makes.
    fn copy_set(&self, set: ImageSet, n: usize, ci: usize, s: &mut Synthesised) -> Result<bool> {
        let store = self.ctx.store;
        let q = self.params().images_per_concept;
        let hybrid = self.hybrid();
        if set.files.len() != q || set.hashes.len() != q || set.latents.is_some() != hybrid {
            return Ok(false);
        }
        let files: Vec<PathBuf> = (0..q).map(|j| self.synthetic_file(n, ci, j)).collect();
        let images: Vec<Option<RgbImage>> = set
            .files
            .par_iter()
            .zip(&set.hashes)
            .zip(&files)
            .map(|((from, hash), to)| store.take_image(Path::new(from), hash, to))
            .collect::<Result<_>>()?;
        let Some(images) = images.into_iter().collect::<Option<Vec<RgbImage>>>() else {
            return Ok(false);
        };
        if let Some((from, hash)) = &set.latents {
            let to = self.latents_file(n, ci);
            let device = self.ctx.models.synthesiser.device();
            let bytes = store.take_file(Path::new(from), hash, &to)?;
            let Some(rows) = bytes.and_then(|b| latent_rows(&b, q, device)) else {
                return Ok(false);
            };
            s.latents = rows;
            s.latents_file = Some((path_string(&to), hash.clone()));
        }
        s.set.files = files.iter().map(|f| path_string(f)).collect();
        s.images = images;
        s.hashes = set.hashes;
        Ok(true)
    }

    /// Records where `s`'s images for `prompt` are in the store's index, for later candidates
    /// with the same prompt.
    fn index(&self, prompt: &str, s: &Synthesised) {
        let set = ImageSet {
            files: s.set.files.clone(),
            hashes: s.hashes.clone(),
            latents: s.latents_file.clone(),
        };
        self.ctx
            .store
            .remember_images(&self.images_key, prompt, &set);
    }

    /// `--decoder hybrid`: saves the latents of `s` (neuron `n`'s candidate `ci`, just made),
    /// which a later copy of its images needs, as one safetensors file.
    fn save_latents(&self, n: usize, ci: usize, s: &mut Synthesised) -> Result<()> {
        if s.latents.is_empty() {
            return Ok(());
        }
        let rows = Tensor::cat(&s.latents, 0)?.to_device(&Device::Cpu)?;
        let bytes =
            safetensors::serialize([("latents", &rows)], None).map_err(candle_core::Error::wrap)?;
        let file = self.latents_file(n, ci);
        let hash = self.ctx.store.save_file(&file, &bytes)?;
        s.latents_file = Some((path_string(&file), hash));
        Ok(())
    }

    /// `s` (neuron `n`'s candidate `ci`) takes the images of `from`, a candidate of the same
    /// wave with the same prompt; the files are copied to the neuron's own, so every record
    /// owns the files it lists.
    fn take_copies(
        &self,
        s: &mut Synthesised,
        n: usize,
        ci: usize,
        from: Synthesised,
    ) -> Result<()> {
        let files: Vec<PathBuf> = (0..from.set.files.len())
            .map(|j| self.synthetic_file(n, ci, j))
            .collect();
        let store = self.ctx.store;
        from.set
            .files
            .par_iter()
            .zip(files.par_iter())
            .try_for_each(|(a, b)| store.copy_image(Path::new(a), b))?;
        s.set.files = files.iter().map(|f| path_string(f)).collect();
        s.images = from.images;
        s.hashes = from.hashes;
        s.latents = from.latents;
        Ok(())
    }

    /// Writes synthetic images as PNG files under the store, on every core: one at a time (1.3
    /// ms for a 512 px image on a 2-core EPYC) they held the device up some 65 ms a neuron at
    /// 50 images. Returns each file's hash ([`Store::save_image`]).
    fn save_images(&self, files: &[PathBuf], images: &[RgbImage]) -> Result<Vec<String>> {
        let store = self.ctx.store;
        files
            .par_iter()
            .zip(images.par_iter())
            .map(|(file, img)| store.save_image(file, img))
            .collect()
    }

    /// `--decoder hybrid`, once the target has ranked the tiny decoder's images: the VAE decodes
    /// again those in each neuron's CLIP top (`tops[w][c]`: indices into `sets[w][c]`), which
    /// take their place for CLIP. Saved beside the tiny decoder's (`<name>.vae.png`), which
    /// stay what the target ranked.
    fn decode_top_again(
        &self,
        sets: &mut [Vec<Synthesised>],
        tops: &[&[Vec<usize>]],
    ) -> Result<()> {
        let picks: Vec<(usize, usize, usize)> = tops
            .iter()
            .enumerate()
            .flat_map(|(w, top)| {
                top.iter()
                    .enumerate()
                    .flat_map(move |(c, js)| js.iter().map(move |&j| (w, c, j)))
            })
            .collect();
        for chunk in picks.chunks(self.params().batches.synthesis.max(1)) {
            check(self.ctx.cancel)?;
            let latents: Vec<&Tensor> = chunk
                .iter()
                .map(|&(w, c, j)| &sets[w][c].latents[j])
                .collect();
            let decoded = self
                .ctx
                .models
                .synthesiser
                .decode_on_device(&Tensor::cat(&latents, 0)?)?;
            let images = crate::synthesise::to_rgb(&decoded)?;
            let files: Vec<PathBuf> = chunk
                .iter()
                .map(|&(w, c, j)| Path::new(&sets[w][c].set.files[j]).with_extension("vae.png"))
                .collect();
            self.save_images(&files, &images)?;
            for ((&(w, c, j), img), file) in chunk.iter().zip(images).zip(files) {
                let s = &mut sets[w][c];
                s.images[j] = img;
                s.set
                    .vae_files
                    .insert(j, file.to_string_lossy().into_owned());
            }
        }
        Ok(())
    }

    /// Step 3.2-3.5 for every neuron of the wave, then one stored row per neuron.
    fn score_and_store(
        &self,
        ready: Vec<(Neuron, Concepts)>,
        mut sets: Vec<Vec<Synthesised>>,
        summary: &mut Summary,
    ) -> Result<()> {
        let p = self.params();
        let ids: Vec<usize> = ready.iter().map(|(n, _)| n.n).collect();
        let (scored, secs) = self.timed(&ids, Stage::Scoring, || {
            // The target on every synthetic image of the wave, one batched pass.
            let images: Vec<&RgbImage> = sets.iter().flatten().flat_map(|x| &x.images).collect();
            let owners: Vec<usize> = ready
                .iter()
                .zip(&sets)
                .flat_map(|((nr, _), s)| {
                    std::iter::repeat_n(nr.n, s.iter().map(|x| x.images.len()).sum())
                })
                .collect();
            let mut acts = self.activations_of(&images, &owners)?.into_iter();
            let mut ranked = Vec::with_capacity(ready.len());
            for s in sets.iter_mut() {
                for x in s.iter_mut() {
                    x.set.activations = acts.by_ref().take(x.images.len()).collect();
                }
                let per: Vec<Vec<f32>> = s.iter().map(|x| x.set.activations.clone()).collect();
                let ranking = score::rank(&per, p.clip_top);
                ranked.push((per, ranking));
            }
            if self.hybrid() {
                let tops: Vec<&[Vec<usize>]> = ranked.iter().map(|(_, r)| &r.in_top[..]).collect();
                self.decode_top_again(&mut sets, &tops)?;
            }
            // CLIP on the whole wave in one pass: each neuron's probing images, then each of its
            // candidates' images in the top (a pass per neuron and candidate was six small
            // batches a neuron).
            let mut clip_images: Vec<&RgbImage> = Vec::new();
            for (((nr, _), s), (_, ranking)) in ready.iter().zip(&sets).zip(&ranked) {
                clip_images.extend(&nr.pixels);
                for (x, in_top) in s.iter().zip(&ranking.in_top) {
                    clip_images.extend(in_top.iter().map(|&j| &x.images[j]));
                }
            }
            let clip = &self.ctx.models.clip;
            let mut embeddings = clip.embed_images(&clip_images, p.batches.clip)?.into_iter();
            let mut out = Vec::with_capacity(ready.len());
            for (((nr, _), s), (per, ranking)) in ready.iter().zip(&sets).zip(ranked) {
                let rank_scores: Vec<f64> = ranking
                    .positions
                    .iter()
                    .map(|pos| p.rank_score.score(pos, per.len()))
                    .collect();
                let probe_emb: Vec<Vec<f32>> = embeddings.by_ref().take(nr.pixels.len()).collect();
                let weights: Vec<f64> = ranking
                    .in_top
                    .iter()
                    .map(|in_top| {
                        let emb: Vec<Vec<f32>> = embeddings.by_ref().take(in_top.len()).collect();
                        score::clip_weight(&probe_emb, &emb)
                    })
                    .collect();
                let scores: Vec<CandidateScore> = score::combine(&rank_scores, &weights)
                    .into_iter()
                    .map(|sc| CandidateScore {
                        concept: s[sc.candidate].set.concept.clone(),
                        rank_score: sc.rank_score,
                        weight: sc.weight,
                        final_score: sc.final_score,
                    })
                    .collect();
                self.send(Event::Scores {
                    neuron: nr.n,
                    scores: scores.clone(),
                });
                out.push(scores);
            }
            Ok(out)
        })?;
        for (((mut nr, c), s), scores) in ready.into_iter().zip(sets).zip(scored) {
            nr.timings.insert(Stage::Scoring.name().into(), secs);
            let sets = s.into_iter().map(|x| x.set).collect();
            let d = self.describe(&nr, Some(&c), scores, sets);
            self.ctx.store.put(&self.row(&d))?;
            summary.described.push(nr.n);
            self.send(Event::Finished {
                neuron: nr.n,
                description: Box::new(d),
            });
        }
        Ok(())
    }
}

/// A path as records list it.
fn path_string(file: &Path) -> String {
    file.to_string_lossy().into_owned()
}

/// The `q` latents (1, C, h, w) of a file [`Runner::save_latents`] wrote, on `device`; `None`
/// when it does not hold them.
fn latent_rows(bytes: &[u8], q: usize, device: &Device) -> Option<Vec<Tensor>> {
    let mut tensors = candle_core::safetensors::load_buffer(bytes, device).ok()?;
    let rows = tensors.remove("latents")?;
    if rows.dim(0).ok()? != q {
        return None;
    }
    (0..q).map(|j| rows.narrow(0, j, 1).ok()).collect()
}

/// A candidate's synthetic images, kept in memory for scoring.
#[derive(Clone)]
struct Synthesised {
    set: SyntheticSet,
    images: Vec<RgbImage>,
    /// The blake3 hash of each image's file, for the store's index.
    hashes: Vec<String>,
    /// Each image's latents (1, C, h, w) on the device, kept for `--decoder hybrid` only.
    latents: Vec<Tensor>,
    /// `--decoder hybrid`: the file `latents` are saved in, and its hash.
    latents_file: Option<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_images_key_holds_what_the_images_depend_on_and_nothing_else() {
        let settings = crate::config::load_with_env(None, &Default::default(), &|_| None)
            .unwrap()
            .settings;
        let params = Params::from_settings(&settings, Pool::Mean).unwrap();
        let id = |source: &str| ModelId {
            source: source.into(),
            revision: None,
        };
        let ids = ModelIds {
            target: id("resnet"),
            captioner: id("blip"),
            synthesiser: id("sd"),
            clip: id("clip"),
            llm: "llm".into(),
            tiny_vae: None,
            hybrid: false,
        };
        let key = images_key(&ids, &params);
        // Another target, captioner, CLIP, LLM or top-K: the same images.
        let others = ModelIds {
            target: id("vit"),
            captioner: id("blip-large"),
            clip: id("clip-l"),
            llm: "other".into(),
            ..ids.clone()
        };
        let mut more_images = params.clone();
        more_images.top_k += 1;
        assert_eq!(images_key(&others, &more_images), key);
        // Another synthesiser, decoder, step count, seed or Q: other images.
        let mut changed = vec![
            images_key(
                &ModelIds {
                    synthesiser: id("sd2"),
                    ..ids.clone()
                },
                &params,
            ),
            images_key(
                &ModelIds {
                    tiny_vae: Some(id("taesd")),
                    ..ids.clone()
                },
                &params,
            ),
        ];
        for change in [
            |p: &mut Params| p.sampling.steps += 1,
            |p: &mut Params| p.sampling.seed += 1,
            |p: &mut Params| p.images_per_concept += 1,
        ] {
            let mut p = params.clone();
            change(&mut p);
            changed.push(images_key(&ids, &p));
        }
        assert!(changed.iter().all(|k| k != &key), "{changed:?} vs {key}");
    }
}
