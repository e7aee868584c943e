//! Model resolution: a local folder in Hugging Face layout, or a Hub repo id with an optional
//! revision, downloaded through hf-hub into the standard HF cache (`HF_HOME`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hf_hub::{api::tokio::ApiBuilder, Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressDrawTarget};

use crate::error::{Error, Result};

/// Where a model's files come from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum ModelSource {
    Local(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl ModelSource {
    /// A Hub source from a literal known to be valid (the built-in defaults).
    pub fn hub(spec: &str) -> Self {
        spec.parse().expect("built-in Hub id is valid")
    }
}

fn is_hub_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 2 && parts.iter().all(|p| ok(p))
}

impl FromStr for ModelSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let looks_like_path = s.starts_with(['/', '.', '~']) || s.contains('\\');
        if looks_like_path || Path::new(s).is_dir() {
            let path = match s.strip_prefix("~/") {
                Some(rest) => directories::BaseDirs::new()
                    .map(|b| b.home_dir().join(rest))
                    .unwrap_or_else(|| PathBuf::from(s)),
                None => PathBuf::from(s),
            };
            return Ok(Self::Local(path));
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            Some(_) => return Err(format!("{s:?}: empty revision after '@'")),
            None => (s, None),
        };
        if !is_hub_id(repo) {
            return Err(format!(
                "{s:?} is neither an existing folder nor a Hub id (owner/name or owner/name@revision)"
            ));
        }
        Ok(Self::Hub {
            repo: repo.to_string(),
            revision,
        })
    }
}

impl TryFrom<String> for ModelSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub {
                repo,
                revision: Some(r),
            } => write!(f, "{repo}@{r}"),
            Self::Hub { repo, .. } => f.write_str(repo),
        }
    }
}

/// The models dnd uses, each with the files its loader reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Target,
    Captioner,
    Synthesiser,
    Clip,
    /// The local summariser LLM.
    Llm,
    /// The tiny autoencoder that may decode in place of the VAE.
    TinyVae,
}

/// A file of a model folder; optional files are used when present.
#[derive(Clone, Copy, Debug)]
pub struct FileSpec {
    pub name: &'static str,
    need: Need,
}

/// When a model folder must have a file.
#[derive(Clone, Copy, Debug)]
enum Need {
    Always,
    Optional,
    /// Unless the folder has this other file, which holds the same data in another form.
    Unless(&'static str),
}

impl FileSpec {
    /// Whether the folder must have this file, given which files it has.
    pub fn required(&self, has: impl Fn(&str) -> bool) -> bool {
        match self.need {
            Need::Always => true,
            Need::Optional => false,
            Need::Unless(other) => !has(other),
        }
    }
}

const fn req(name: &'static str) -> FileSpec {
    FileSpec {
        name,
        need: Need::Always,
    }
}
const fn opt(name: &'static str) -> FileSpec {
    FileSpec {
        name,
        need: Need::Optional,
    }
}
const fn unless(name: &'static str, other: &'static str) -> FileSpec {
    FileSpec {
        name,
        need: Need::Unless(other),
    }
}

/// How the index of a sharded weights file is named: `model.safetensors.index.json` lists the
/// shards (`model-00001-of-00004.safetensors`, ...) that transformers and diffusers save a large
/// checkpoint in. Each weights file's specs name its index as an optional file, and the weights
/// file as required unless that index is there.
const INDEX: &str = ".index.json";

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Target,
        Role::Captioner,
        Role::Synthesiser,
        Role::Clip,
        Role::Llm,
        Role::TinyVae,
    ];
    /// The models every `describe` loads (the LLM may be an endpoint instead).
    pub const PIPELINE: [Role; 4] = [Role::Target, Role::Captioner, Role::Synthesiser, Role::Clip];

    /// The settings key (and so the flag `--KEY` and variable `DND_KEY`) naming this model.
    pub fn setting(self) -> &'static str {
        match self {
            Role::Target => "target",
            Role::Captioner => "captioner",
            Role::Synthesiser => "synthesiser",
            Role::Clip => "clip",
            Role::Llm => "llm_local",
            Role::TinyVae => "tiny_vae",
        }
    }

    /// The command-line flag naming this model: `--llm-local`.
    pub fn flag(self) -> String {
        format!("--{}", self.setting().replace('_', "-"))
    }

    /// Each weights file of this role with the index of shards that may stand in for it.
    fn weights_indexes(self) -> impl Iterator<Item = (&'static str, &'static str)> {
        self.files().iter().filter_map(|s| match s.need {
            Need::Unless(index) if index.ends_with(INDEX) => Some((s.name, index)),
            _ => None,
        })
    }

    pub fn files(self) -> &'static [FileSpec] {
        match self {
            Role::Target => TARGET_FILES,
            Role::Captioner => CAPTIONER_FILES,
            Role::Synthesiser => SYNTHESISER_FILES,
            Role::Clip => CLIP_FILES,
            Role::Llm => LLM_FILES,
            Role::TinyVae => TINY_VAE_FILES,
        }
    }
}

// torchvision/timm/transformers weights; timm's config.json carries the preprocessing and
// head count, transformers' config.json the head count and preprocessor_config.json the
// preprocessing (processor_config.json's image_processor, where transformers 5 saved the
// processor whole).
const TARGET_FILES: &[FileSpec] = &[
    opt("model.safetensors.index.json"),
    unless("model.safetensors", "model.safetensors.index.json"),
    opt("config.json"),
    opt("preprocessor_config.json"),
    opt("processor_config.json"),
];
const CAPTIONER_FILES: &[FileSpec] = &[
    req("config.json"),
    opt("model.safetensors.index.json"),
    unless("model.safetensors", "model.safetensors.index.json"),
    req("tokenizer.json"),
    opt("preprocessor_config.json"),
    opt("processor_config.json"),
];
// diffusers layout.
const SYNTHESISER_FILES: &[FileSpec] = &[
    req("model_index.json"),
    req("scheduler/scheduler_config.json"),
    req("text_encoder/config.json"),
    opt("text_encoder/model.safetensors.index.json"),
    unless(
        "text_encoder/model.safetensors",
        "text_encoder/model.safetensors.index.json",
    ),
    // Hub repos ship CLIP's vocab.json + merges.txt; a pipeline saved by transformers 5
    // writes tokenizer.json alone.
    opt("tokenizer/tokenizer.json"),
    unless("tokenizer/vocab.json", "tokenizer/tokenizer.json"),
    unless("tokenizer/merges.txt", "tokenizer/tokenizer.json"),
    opt("tokenizer/tokenizer_config.json"),
    opt("tokenizer/special_tokens_map.json"),
    req("unet/config.json"),
    opt("unet/diffusion_pytorch_model.safetensors.index.json"),
    unless(
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ),
    req("vae/config.json"),
    opt("vae/diffusion_pytorch_model.safetensors.index.json"),
    unless(
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.json",
    ),
];
// A transformers causal LM; transformers 5 keeps the chat template in its own file.
const LLM_FILES: &[FileSpec] = &[
    req("config.json"),
    opt("model.safetensors.index.json"),
    unless("model.safetensors", "model.safetensors.index.json"),
    req("tokenizer.json"),
    req("tokenizer_config.json"),
    opt("generation_config.json"),
    opt("chat_template.jinja"),
];
// diffusers' AutoencoderTiny.
const TINY_VAE_FILES: &[FileSpec] = &[
    req("config.json"),
    opt("diffusion_pytorch_model.safetensors.index.json"),
    unless(
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ),
];
const CLIP_FILES: &[FileSpec] = &[
    req("config.json"),
    opt("model.safetensors.index.json"),
    unless("model.safetensors", "model.safetensors.index.json"),
    opt("preprocessor_config.json"),
    opt("processor_config.json"),
];

/// How the Hub may be used.
#[derive(Clone, Debug, Default)]
pub struct HubOptions {
    pub offline: bool,
    pub token: Option<String>,
    pub progress: Progress,
}

/// Where download progress goes.
#[derive(Clone, Debug, Default)]
pub enum Progress {
    #[default]
    Hidden,
    /// A bar per file on stderr.
    Stderr,
    /// Every file advances this bar (length, position and the file name as its message),
    /// for a caller that draws progress itself.
    Bar(ProgressBar),
}

impl Progress {
    /// The bar for the next file.
    pub(crate) fn bar(&self) -> ProgressBar {
        match self {
            Progress::Hidden => ProgressBar::hidden(),
            Progress::Stderr => {
                ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
            }
            Progress::Bar(bar) => {
                bar.set_position(0);
                bar.clone()
            }
        }
    }
}

/// A model whose files are all on local disk.
#[derive(Clone, Debug)]
pub struct ResolvedModel {
    pub role: Role,
    pub source: ModelSource,
    files: BTreeMap<&'static str, PathBuf>,
    /// The shards of each weights file saved in shards, by the weights file's name.
    shards: BTreeMap<&'static str, Vec<PathBuf>>,
    /// Weights drawn at random instead of read (for `dnd bench`).
    random_weights: Option<Draw>,
}

/// How random weights are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Draw {
    /// On the model's device, unseeded: fastest, for timing.
    Fast,
    /// On the CPU from a seed per tensor name, then moved: the same values on every device,
    /// for comparing devices.
    Seeded,
}

impl ResolvedModel {
    /// A model whose configs and tokenizers are in `dir` (Hugging Face layout) and whose
    /// weights are drawn at random when it loads, for `dnd bench`: the real architecture at
    /// its real size with no weights file to download.
    pub fn random(role: Role, dir: &Path, draw: Draw) -> Result<Self> {
        let source = ModelSource::Local(dir.to_path_buf());
        let mut files = BTreeMap::new();
        for spec in role.files() {
            let p = dir.join(spec.name);
            if p.is_file() || spec.name.ends_with(".safetensors") {
                files.insert(spec.name, p);
            } else if spec.required(|o| dir.join(o).is_file()) {
                return Err(Error::MissingModelFile {
                    model: label(role, &source),
                    file: spec.name.into(),
                    looked: dir.display().to_string(),
                    fix: "dnd bench writes this file itself; report it as a bug".into(),
                });
            }
        }
        Ok(Self {
            role,
            source,
            files,
            shards: BTreeMap::new(),
            random_weights: Some(draw),
        })
    }

    /// How the weights are drawn, when they are random rather than read from the files.
    pub fn random_weights(&self) -> Option<Draw> {
        self.random_weights
    }

    /// A human name for messages: `target (timm/resnet50.tv_in1k)`.
    pub fn label(&self) -> String {
        label(self.role, &self.source)
    }

    /// Path of a required file, or of an optional one when present.
    pub fn file(&self, name: &str) -> Option<&Path> {
        self.files.get(name).map(PathBuf::as_path)
    }

    /// The commit a Hub model was resolved to (its HF-cache snapshot folder); `None` for
    /// local folders.
    pub fn revision(&self) -> Option<String> {
        if !matches!(self.source, ModelSource::Hub { .. }) {
            return None;
        }
        let path = self.files.values().next()?;
        let mut parts = path.components().map(|c| c.as_os_str().to_string_lossy());
        parts.find(|c| c == "snapshots")?;
        parts.next().map(|c| c.into_owned())
    }

    /// Path of a file this folder must have: one its role always requires, or one required
    /// unless another is present, where that other is absent.
    pub fn required(&self, name: &str) -> &Path {
        self.file(name)
            .unwrap_or_else(|| panic!("{name} is not a required file of {:?}", self.role))
    }

    /// The files holding the weights file `name`: the file itself, or the shards its index
    /// lists; with the path that names them in messages (the file, or the index).
    pub fn weight_files(&self, name: &str) -> (&Path, Vec<&Path>) {
        match self.shards.get(name) {
            Some(shards) => {
                let index = self.required(&format!("{name}{INDEX}"));
                (index, shards.iter().map(PathBuf::as_path).collect())
            }
            None => {
                let p = self.required(name);
                (p, vec![p])
            }
        }
    }
}

/// The weights files of `role` saved in shards (their index found in `files`, the weights
/// file itself not), each with the shard files its index lists, as paths in the model folder.
fn sharded(
    role: Role,
    source: &ModelSource,
    files: &BTreeMap<&'static str, PathBuf>,
) -> Result<Vec<(&'static str, Vec<String>)>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let mut out = Vec::new();
    for (weights, index) in role.weights_indexes() {
        let Some(path) = files.get(index).filter(|_| !files.contains_key(weights)) else {
            continue;
        };
        let label = label(role, source);
        let bad = |detail: String| Error::ModelMismatch {
            model: label.clone(),
            file: path.display().to_string(),
            detail,
            fix: format!(
                "re-download the model (`dnd models fetch`), or {}",
                fix_for(role)
            ),
        };
        let parsed: Index = crate::nn::read_json(&label, path)?;
        let mut names: Vec<String> = parsed.weight_map.into_values().collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(bad("it lists no shards".into()));
        }
        // Shards lie beside their index: a name reaching elsewhere is not one.
        if let Some(n) = names
            .iter()
            .find(|n| n.contains(['/', '\\']) || !n.ends_with(".safetensors"))
        {
            return Err(bad(format!(
                "it lists {n:?} as a shard, which is not a .safetensors file beside it"
            )));
        }
        let folder = index.rfind('/').map_or("", |i| &index[..=i]);
        out.push((
            weights,
            names.iter().map(|n| format!("{folder}{n}")).collect(),
        ));
    }
    Ok(out)
}

fn label(role: Role, source: &ModelSource) -> String {
    format!("{} ({source})", role.setting())
}

/// PyTorch's pickled weights beside a missing safetensors file `wanted` (`pytorch_model.bin`,
/// `diffusion_pytorch_model.bin`, a torchvision `.pth`, a training checkpoint `.pth.tar`), when
/// `wanted` is weights.
fn pickled_beside(wanted: &Path) -> Option<PathBuf> {
    if wanted.extension()? != "safetensors" {
        return None;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(wanted.parent()?)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            p.is_file()
                && (p
                    .extension()
                    .is_some_and(|x| ["bin", "pth", "pt", "ckpt"].iter().any(|e| x == *e))
                    || p.to_string_lossy().ends_with(".pth.tar"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

fn fix_for(role: Role) -> String {
    format!(
        "pass {flag} with a folder in Hugging Face layout or a Hub id (or set {key} in the settings file)",
        flag = role.flag(),
        key = role.setting()
    )
}

fn cache_repo(repo: &str, revision: &Option<String>) -> Repo {
    Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.clone().unwrap_or_else(|| "main".into()),
    )
}

/// Finds every file of `role` locally, downloading missing Hub files unless offline.
pub async fn resolve(role: Role, source: &ModelSource, opts: &HubOptions) -> Result<ResolvedModel> {
    let mut files = BTreeMap::new();
    let mut shards = BTreeMap::new();
    match source {
        ModelSource::Local(dir) => {
            if !dir.is_dir() {
                return Err(Error::MissingModelFile {
                    model: label(role, source),
                    file: "the model folder".into(),
                    looked: dir.display().to_string(),
                    fix: fix_for(role),
                });
            }
            for spec in role.files() {
                let p = dir.join(spec.name);
                if p.is_file() {
                    files.insert(spec.name, p);
                } else if spec.required(|o| dir.join(o).is_file()) {
                    let fix = match pickled_beside(&p) {
                        // A training checkpoint keeps its weights under `state_dict` (or
                        // `model`), named `module.*` when saved from DataParallel.
                        Some(pickle) => format!(
                            "dnd reads weights from safetensors only (a pickle can run code as it loads); convert {} beside it: python3 -c \"import torch; from safetensors.torch import save_file; d = torch.load('{}', map_location='cpu', weights_only=True); d = d.get('state_dict', d.get('model', d)); save_file({{k.removeprefix('module.'): v.clone().contiguous() for k, v in d.items() if torch.is_tensor(v)}}, '{}')\"",
                            pickle.display(),
                            pickle.display(),
                            p.display()
                        ),
                        None => format!(
                            "put {} into that folder (Hugging Face layout), or {}",
                            spec.name,
                            fix_for(role)
                        ),
                    };
                    return Err(Error::MissingModelFile {
                        model: label(role, source),
                        file: spec.name.into(),
                        looked: dir.display().to_string(),
                        fix,
                    });
                }
            }
            for (weights, names) in sharded(role, source, &files)? {
                let mut paths = Vec::with_capacity(names.len());
                for name in names {
                    let p = dir.join(&name);
                    if !p.is_file() {
                        return Err(Error::MissingModelFile {
                            model: label(role, source),
                            file: name,
                            looked: dir.display().to_string(),
                            fix: format!(
                                "the index {weights}{INDEX} lists this shard: copy every shard into that folder, or {}",
                                fix_for(role)
                            ),
                        });
                    }
                    paths.push(p);
                }
                shards.insert(weights, paths);
            }
        }
        ModelSource::Hub { repo, revision } => {
            let cache = Cache::from_env();
            let cached = cache.repo(cache_repo(repo, revision));
            let mut missing = Vec::new();
            for spec in role.files() {
                match cached.get(spec.name) {
                    Some(p) => {
                        files.insert(spec.name, p);
                    }
                    None => missing.push(*spec),
                }
            }
            // The network is used only when a required file is missing: optional files come
            // along then, and a repo without them is not asked again on every run.
            if let Some(first) = missing
                .iter()
                .find(|s| s.required(|o| files.contains_key(o)))
            {
                if opts.offline {
                    return Err(offline(role, source, first.name, &cache));
                }
                download_missing(role, source, repo, revision, &missing, opts, &mut files).await?;
            }
            for (weights, names) in sharded(role, source, &files)? {
                let mut paths = Vec::with_capacity(names.len());
                for name in names {
                    let path = match cached.get(&name) {
                        Some(p) => p,
                        None if opts.offline => return Err(offline(role, source, &name, &cache)),
                        None => download(role, source, repo, revision, &name, opts).await?,
                    };
                    paths.push(path);
                }
                shards.insert(weights, paths);
            }
        }
    }
    Ok(ResolvedModel {
        role,
        source: source.clone(),
        files,
        shards,
        random_weights: None,
    })
}

/// A file of a Hub model that is not in the cache, offline.
fn offline(role: Role, source: &ModelSource, file: &str, cache: &Cache) -> Error {
    Error::MissingModelFile {
        model: label(role, source),
        file: file.into(),
        looked: format!("the Hugging Face cache at {}", cache.path().display()),
        fix: format!("you are offline (--offline or HF_HUB_OFFLINE): run `dnd models fetch` where the Hub can be reached, or {}", fix_for(role)),
    }
}

/// A Hub client honouring `HF_HOME`, `HF_ENDPOINT` and the token, without its own progress bars.
pub(crate) fn api(opts: &HubOptions) -> Result<hf_hub::api::tokio::Api, String> {
    let mut b = ApiBuilder::from_env().with_progress(false);
    if let Some(t) = &opts.token {
        b = b.with_token(Some(t.clone()));
    }
    b.build().map_err(|e| e.to_string())
}

async fn download_missing(
    role: Role,
    source: &ModelSource,
    repo: &str,
    revision: &Option<String>,
    missing: &[FileSpec],
    opts: &HubOptions,
    files: &mut BTreeMap<&'static str, PathBuf>,
) -> Result<()> {
    let api = api(opts).map_err(|r| download_error(role, source, "(all files)", r))?;
    let listing = api
        .repo(cache_repo(repo, revision))
        .info()
        .await
        .map_err(|e| download_error(role, source, "the file list", e.to_string()))?;
    let present: Vec<&str> = listing
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .collect();
    let has = |name: &str| present.contains(&name);
    for spec in missing {
        if !has(spec.name) {
            if spec.required(|o| has(o) || files.contains_key(o)) {
                return Err(Error::MissingModelFile {
                    model: label(role, source),
                    file: spec.name.into(),
                    looked: format!("the Hub repo {repo} at revision {}", revision.as_deref().unwrap_or("main")),
                    fix: format!("this repo is not in the layout dnd expects (safetensors weights); try another revision with {repo}@REV, or {}", fix_for(role)),
                });
            }
            continue;
        }
        let path = download(role, source, repo, revision, spec.name, opts).await?;
        files.insert(spec.name, path);
    }
    Ok(())
}

/// Downloads one file of a Hub model into the HF cache, with its progress bar.
async fn download(
    role: Role,
    source: &ModelSource,
    repo: &str,
    revision: &Option<String>,
    name: &str,
    opts: &HubOptions,
) -> Result<PathBuf> {
    let fail = |reason: String| download_error(role, source, name, reason);
    api(opts)
        .map_err(fail)?
        .repo(cache_repo(repo, revision))
        .download_with_progress(name, opts.progress.bar())
        .await
        .map_err(|e| fail(e.to_string()))
}

fn download_error(role: Role, source: &ModelSource, file: &str, reason: String) -> Error {
    Error::Download {
        model: label(role, source),
        file: file.into(),
        flag: role.flag(),
        reason,
    }
}

/// What `dnd models` shows for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelStatus {
    pub role: Role,
    pub source: ModelSource,
    /// Required files not on local disk.
    pub missing: Vec<String>,
    /// Bytes of the model's files on disk.
    pub local_bytes: u64,
    /// Bytes still to download, when the Hub told us.
    pub remote_bytes: Option<u64>,
}

/// Inspects a model without downloading anything; asks the Hub for sizes unless offline.
pub async fn status(role: Role, source: &ModelSource, opts: &HubOptions) -> ModelStatus {
    let mut missing = Vec::new();
    let mut local_bytes = 0;
    let mut not_local = Vec::new();
    let local = |name: &str| match source {
        ModelSource::Local(dir) => Some(dir.join(name)).filter(|p| p.is_file()),
        ModelSource::Hub { repo, revision } => {
            Cache::from_env().repo(cache_repo(repo, revision)).get(name)
        }
    };
    let mut here = BTreeMap::new();
    for spec in role.files() {
        match local(spec.name) {
            Some(p) => {
                local_bytes += std::fs::metadata(&p).map_or(0, |m| m.len());
                here.insert(spec.name, p);
            }
            None => {
                not_local.push(spec.name.to_string());
                if spec.required(|o| local(o).is_some()) {
                    missing.push(spec.name.to_string());
                }
            }
        }
    }
    // A bad index is left for `resolve` to report; here its shards just go uncounted.
    for (_, names) in sharded(role, source, &here).unwrap_or_default() {
        for name in names {
            match local(&name) {
                Some(p) => local_bytes += std::fs::metadata(&p).map_or(0, |m| m.len()),
                None => {
                    missing.push(name.clone());
                    not_local.push(name);
                }
            }
        }
    }
    let remote_bytes = match source {
        ModelSource::Hub { repo, revision } if !missing.is_empty() && !opts.offline => {
            remote_sizes(repo, revision, opts).await.map(|sizes| {
                // Shards whose index is not here yet: named as transformers and diffusers
                // name them, beside a weights file the repo does not have.
                let unlisted_shard = |f: &str| {
                    role.weights_indexes().any(|(weights, index)| {
                        !here.contains_key(index)
                            && !sizes.contains_key(weights)
                            && f.strip_prefix(weights.trim_end_matches(".safetensors"))
                                .and_then(|rest| rest.strip_prefix('-'))
                                .is_some_and(|rest| {
                                    rest.ends_with(".safetensors") && !rest.contains('/')
                                })
                    })
                };
                sizes
                    .iter()
                    .filter(|(f, _)| not_local.contains(f) || unlisted_shard(f))
                    .map(|(_, b)| b)
                    .sum::<u64>()
            })
        }
        _ => None,
    };
    ModelStatus {
        role,
        source: source.clone(),
        missing,
        local_bytes,
        remote_bytes,
    }
}

impl ModelStatus {
    /// The size column of `dnd models` and the set-up screen.
    pub fn size(&self, offline: bool) -> String {
        if self.missing.is_empty() {
            return human_bytes(self.local_bytes);
        }
        match self.remote_bytes {
            Some(b) => format!("{} to download", human_bytes(b)),
            None if offline => "unknown (offline)".into(),
            None => "unknown (Hub unreachable)".into(),
        }
    }
}

/// `1536` -> `1.5 KiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

async fn remote_sizes(
    repo: &str,
    revision: &Option<String>,
    opts: &HubOptions,
) -> Option<BTreeMap<String, u64>> {
    #[derive(serde::Deserialize)]
    struct Sibling {
        rfilename: String,
        size: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Info {
        siblings: Vec<Sibling>,
    }
    let api = api(opts).ok()?;
    let text = api
        .repo(cache_repo(repo, revision))
        .info_request()
        .query(&[("blobs", "true")])
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()?;
    let info: Info = serde_json::from_str(&text).ok()?;
    Some(
        info.siblings
            .into_iter()
            .filter_map(|s| Some((s.rfilename, s.size?)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            "timm/resnet50.tv_in1k".parse::<ModelSource>().unwrap(),
            ModelSource::Hub {
                repo: "timm/resnet50.tv_in1k".into(),
                revision: None
            }
        );
        let s: ModelSource = "Salesforce/blip-image-captioning-large@refs/pr/18"
            .parse()
            .unwrap();
        assert_eq!(
            s.to_string(),
            "Salesforce/blip-image-captioning-large@refs/pr/18"
        );
        assert!(matches!(
            "./models/x".parse::<ModelSource>().unwrap(),
            ModelSource::Local(_)
        ));
        assert!(matches!(
            "/abs/x".parse::<ModelSource>().unwrap(),
            ModelSource::Local(_)
        ));
        assert!("a/b/c"
            .parse::<ModelSource>()
            .unwrap_err()
            .contains("neither"));
        assert!("a/b@".parse::<ModelSource>().is_err());
    }

    #[tokio::test]
    async fn missing_local_file_names_model_file_folder_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let src = ModelSource::Local(dir.path().to_path_buf());
        let err = resolve(Role::Target, &src, &HubOptions::default())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("model.safetensors"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains("--target"), "{msg}");
    }

    #[tokio::test]
    async fn offline_hub_model_not_in_cache_is_a_clear_error() {
        let src = ModelSource::hub("nobody-here/not-a-model-xyz");
        let opts = HubOptions {
            offline: true,
            ..Default::default()
        };
        let msg = resolve(Role::Target, &src, &opts)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("offline") && msg.contains("dnd models fetch"),
            "{msg}"
        );
        let st = status(Role::Target, &src, &opts).await;
        assert_eq!(st.missing, vec!["model.safetensors"]);
        assert_eq!(st.remote_bytes, None);
    }

    #[tokio::test]
    async fn sharded_weights_resolve_to_their_shards_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let index = |map: &str| {
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                format!(r#"{{"metadata": {{}}, "weight_map": {map}}}"#),
            )
            .unwrap()
        };
        index(
            r#"{"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}"#,
        );
        std::fs::write(dir.path().join("model-00001-of-00002.safetensors"), b"123").unwrap();
        let src = ModelSource::Local(dir.path().to_path_buf());
        let opts = HubOptions::default();
        let msg = resolve(Role::Target, &src, &opts)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("model-00002-of-00002.safetensors") && msg.contains("copy every shard"),
            "{msg}"
        );
        let st = status(Role::Target, &src, &opts).await;
        assert_eq!(st.missing, vec!["model-00002-of-00002.safetensors"]);

        std::fs::write(dir.path().join("model-00002-of-00002.safetensors"), b"45").unwrap();
        let m = resolve(Role::Target, &src, &opts).await.unwrap();
        let (named, files) = m.weight_files("model.safetensors");
        assert!(named.ends_with("model.safetensors.index.json"));
        let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let st = status(Role::Target, &src, &opts).await;
        assert!(st.missing.is_empty());
        let index_bytes = std::fs::metadata(named).unwrap().len();
        assert_eq!(st.local_bytes, index_bytes + 5);

        // A single weights file beside an index wins; an index naming a file elsewhere is refused.
        index(r#"{"a": "../elsewhere.safetensors"}"#);
        let msg = resolve(Role::Target, &src, &opts)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("elsewhere") && msg.contains("not a .safetensors file beside it"),
            "{msg}"
        );
        std::fs::write(dir.path().join("model.safetensors"), b"6").unwrap();
        let m = resolve(Role::Target, &src, &opts).await.unwrap();
        assert!(m
            .weight_files("model.safetensors")
            .0
            .ends_with("model.safetensors"));
    }
}
