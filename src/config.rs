//! Settings: built-in defaults, overridden by the settings file, then by `DND_*` environment
//! variables, then by command-line flags. Every effective value remembers where it came from.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::device::{DTypeSpec, DeviceSpec};
use crate::error::{Error, Result};
use crate::hub::{HubOptions, ModelSource, Progress, Role};

/// Where an effective setting came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(var) => write!(f, "env {var}"),
            Source::Flag => f.write_str("flag"),
        }
    }
}

/// One line of `dnd config show`. `value` is already masked for secrets.
#[derive(Clone, Debug)]
pub struct Entry {
    pub key: &'static str,
    pub value: String,
    pub source: Source,
}

/// A secret (token, API key). Its `Display` and `Debug` never show the value, so it cannot
/// leak through logs, errors or `config show` by accident.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(from = "String")]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> Option<&str> {
        (!self.0.is_empty()).then_some(self.0.as_str())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s.trim().to_string())
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::from(s.to_string()))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.expose() {
            Some(s) if s.len() > 8 => write!(f, "{}…(set, {} chars)", &s[..3], s.len()),
            Some(_) => f.write_str("****(set)"),
            None => f.write_str("(not set)"),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An on/off setting that also accepts the `1`/`0`/`yes`/`no` spellings environment
/// variables use (`HF_HUB_OFFLINE=1`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(from = "bool")]
pub struct Switch(pub bool);

impl From<bool> for Switch {
    fn from(b: bool) -> Self {
        Switch(b)
    }
}

impl FromStr for Switch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Switch(true)),
            "0" | "false" | "no" | "off" | "" => Ok(Switch(false)),
            other => Err(format!(
                "{other:?} is not on/off (use true/false, 1/0, yes/no)"
            )),
        }
    }
}

impl fmt::Display for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A setting that is one of a few names: the enum, parsing (flags, environment, file) and
/// display, from one list.
macro_rules! choice {
    ($(#[$m:meta])* $name:ident, $what:literal {
        $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
        #[serde(try_from = "String")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.trim() {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        "{other:?} is not {}: use {}",
                        $what,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(Self::$variant => $text),+ })
            }
        }
    };
}

choice! {
    /// A set of defaults for the describe pipeline; any single setting still overrides it.
    Preset, "a preset" {
        /// SD-Turbo (Euler, trailing timesteps, 1 step, no guidance): seconds per neuron.
        #[default]
        Fast = "fast",
        /// The reference's defaults (METHOD.md): SD v1.4 with DPM-Solver++ at 50 steps and
        /// guidance 7.5, BLIP base.
        Paper = "paper",
    }
}

choice! {
    /// Which LLM writes the candidate concepts.
    LlmChoice, "an LLM choice" {
        /// The endpoint when one (or an API key) is configured, else the local model.
        #[default]
        Auto = "auto",
        Api = "api",
        Local = "local",
    }
}

choice! {
    /// What turns Stable Diffusion's latents into images.
    Decoder, "a decoder" {
        /// The model's own VAE, as the reference.
        #[default]
        Vae = "vae",
        /// A tiny autoencoder (`tiny_vae`, TAESD): far cheaper, close but not equal images.
        Tiny = "tiny",
        /// The tiny autoencoder for every image, which the target ranks; the VAE again for the
        /// images in the ranking's CLIP top, the only ones CLIP sees.
        Hybrid = "hybrid",
    }
}

impl Preset {
    fn captioner(self) -> ModelSource {
        match self {
            Preset::Fast => ModelSource::hub("Salesforce/blip-image-captioning-large"),
            // BLIP base's safetensors live on this revision of the repo.
            Preset::Paper => ModelSource::hub("Salesforce/blip-image-captioning-base@refs/pr/7"),
        }
    }
    fn synthesiser(self) -> ModelSource {
        match self {
            Preset::Fast => ModelSource::hub("stabilityai/sd-turbo"),
            Preset::Paper => ModelSource::hub("CompVis/stable-diffusion-v1-4"),
        }
    }
    fn steps(self) -> usize {
        match self {
            Preset::Fast => 1,
            Preset::Paper => 50,
        }
    }
    fn guidance(self) -> f64 {
        match self {
            Preset::Fast => 0.0,
            Preset::Paper => 7.5,
        }
    }
    fn scheduler(self) -> String {
        match self {
            Preset::Fast => "folder".into(),
            Preset::Paper => "dpm-solver++".into(),
        }
    }
    /// Images per Stable Diffusion batch. Paper: one candidate's 10 images, 20 UNet rows with
    /// guidance, as the reference's pipeline batches them, so a neuron's 50 images make 5 whole
    /// batches (8 left a batch of 2 whose 50 steps kept the GPU half idle).
    fn synthesis_batch(self) -> usize {
        match self {
            Preset::Fast => 8,
            Preset::Paper => 10,
        }
    }
}

/// Platform folders for dnd (XDG on Linux, ~/Library on macOS, AppData on Windows).
pub fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "dnd")
}

/// The settings file used when `--config` / `DND_CONFIG` is not given.
pub fn default_config_path() -> PathBuf {
    project_dirs()
        .map(|d| d.config_dir().join("config.toml"))
        .unwrap_or_else(|| PathBuf::from(".dnd/config.toml"))
}

fn default_data_dir() -> PathBuf {
    project_dirs()
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".dnd/data"))
}

fn default_cache_dir() -> PathBuf {
    project_dirs()
        .map(|d| d.cache_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".dnd/cache"))
}

/// Standard variables that users of the Hugging Face tools already set; honoured after `DND_*`.
fn env_alias(key: &str) -> Option<&'static str> {
    match key {
        "offline" => Some("HF_HUB_OFFLINE"),
        "hf_token" => Some("HF_TOKEN"),
        "llm_api_key" => Some("OPENAI_API_KEY"),
        "llm_url" => Some("OPENAI_BASE_URL"),
        _ => None,
    }
}

/// How a setting's value is printed by `config show`.
trait Show {
    fn show(&self) -> String;
}

macro_rules! show_via_display {
    ($($t:ty),*) => { $(impl Show for $t { fn show(&self) -> String { self.to_string() } })* };
}
show_via_display!(
    DeviceSpec,
    DTypeSpec,
    ModelSource,
    Preset,
    LlmChoice,
    Decoder,
    usize,
    u32,
    u64,
    f32,
    f64,
    Switch,
    Secret,
    String
);

impl Show for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
}

fn parse_env<T: FromStr>(key: &str, var: &str, raw: &str) -> Result<T>
where
    T::Err: fmt::Display,
{
    raw.parse().map_err(|e: T::Err| Error::Setting {
        key: key.to_string(),
        reason: format!("environment variable {var}={raw:?} is not valid: {e}"),
    })
}

// One list of settings generates the effective struct, the command-line flags, the file layer
// and the provenance table, so a new setting cannot be forgotten in one of them.
macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $(#[arg($($extra:tt)*)])* $name:ident : $ty:ty = $default:expr; )*) => {
        /// The effective settings.
        // The docs are `--help` text, where `[env: X]` and `<db>` are not links or HTML.
        #[allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
        #[derive(Clone, Debug)]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        /// Settings given as command-line flags; each overrides the environment and the file.
        #[allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
        #[derive(clap::Args, Clone, Debug, Default)]
        pub struct SettingsArgs {
            $( $(#[doc = $doc])* #[arg(long, global = true, $($($extra)*)*)] pub $name: Option<$ty>, )*
        }

        #[derive(serde::Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct FileLayer {
            $( #[serde(default)] $name: Option<$ty>, )*
        }

        impl Settings {
            fn layered(
                file: FileLayer,
                file_path: &Path,
                env: &dyn Fn(&str) -> Option<String>,
                args: &SettingsArgs,
            ) -> Result<(Self, Vec<Entry>)> {
                let mut entries = Vec::new();
                $(
                    let key = stringify!($name);
                    let var = format!("DND_{}", key.to_uppercase());
                    let from_env = env(&var).map(|raw| (var.clone(), raw)).or_else(|| {
                        env_alias(key).and_then(|alias| env(alias).map(|raw| (alias.to_string(), raw)))
                    });
                    let (value, source): ($ty, Source) = if let Some(v) = args.$name.clone() {
                        (v, Source::Flag)
                    } else if let Some((var, raw)) = from_env {
                        (parse_env(key, &var, &raw)?, Source::Env(var))
                    } else if let Some(v) = file.$name {
                        (v, Source::File(file_path.to_path_buf()))
                    } else {
                        ($default, Source::Default)
                    };
                    entries.push(Entry { key, value: value.show(), source });
                    let $name = value;
                )*
                Ok((Settings { $($name,)* }, entries))
            }
        }
    };
}

settings! {
    /// Defaults for the describe pipeline: fast (SD-Turbo, 1 step) or paper (the reference's
    /// SD v1.4, DPM-Solver++ 50 steps, guidance 7.5, BLIP base) [env: DND_PRESET]
    #[arg(value_name = "fast|paper")]
    preset: Preset = Preset::Fast;
    /// Compute device: auto, cpu, cuda[:N] or metal [env: DND_DEVICE]
    device: DeviceSpec = DeviceSpec::Auto;
    /// Float type: auto (f32 on CPU, f16 on GPU), f32, f16 or bf16 [env: DND_DTYPE]
    dtype: DTypeSpec = DTypeSpec::Auto;
    /// Target network: a local folder in Hub layout or a Hub id[@revision]; a ResNet (wide,
    /// ResNeXt, timm's ResNet-D too), ConvNeXt or ViT by torchvision, timm or transformers
    /// (DINOv2 and CLIP image towers too), or torchvision's VGG or AlexNet [env: DND_TARGET]
    target: ModelSource = ModelSource::hub("timm/resnet50.tv_in1k");
    /// BLIP captioner: local folder or Hub id[@revision] [env: DND_CAPTIONER]
    captioner: ModelSource = preset.captioner();
    /// Stable Diffusion (diffusers layout): local folder or Hub id[@revision] [env: DND_SYNTHESISER]
    #[arg(alias = "synthesizer")]
    synthesiser: ModelSource = preset.synthesiser();
    /// What decodes SD's latents into images: vae (the model's own, as the reference), tiny
    /// (the tiny autoencoder below: much cheaper, close but not equal images) or hybrid (tiny
    /// for the ranking, the VAE again for the clip_top images CLIP compares) [env: DND_DECODER]
    #[arg(value_name = "vae|tiny|hybrid")]
    decoder: Decoder = Decoder::Vae;
    /// Tiny autoencoder for --decoder tiny or hybrid (diffusers AutoencoderTiny): folder or Hub id [env: DND_TINY_VAE]
    tiny_vae: ModelSource = ModelSource::hub("madebyollin/taesd");
    /// CLIP model for image-similarity weights: local folder or Hub id[@revision] [env: DND_CLIP]
    clip: ModelSource = ModelSource::hub("openai/clip-vit-base-patch16");
    /// Probing set: a folder of images, searched recursively [env: DND_PROBE]
    #[arg(value_name = "DIR")]
    probe: PathBuf = default_data_dir().join("probe");
    /// Images per forward pass of the target network [env: DND_BATCH_SIZE]
    batch_size: usize = 32;
    /// Where dnd keeps activation caches [env: DND_CACHE_DIR]
    #[arg(value_name = "DIR")]
    cache_dir: PathBuf = default_cache_dir();
    /// Never touch the network; use local folders and the HF cache only [env: DND_OFFLINE, HF_HUB_OFFLINE]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    offline: Switch = Switch(false);
    /// Hugging Face token for gated or private repos (never printed) [env: DND_HF_TOKEN, HF_TOKEN]
    #[arg(hide_env_values = true)]
    hf_token: Secret = Secret::default();
    /// Terminal UI colours: dark, light, high-contrast or a theme file (NO_COLOR turns colour off) [env: DND_THEME]
    theme: String = "dark".to_string();
    /// Log level for the log output: error, warn, info, debug or trace [env: DND_LOG_LEVEL]
    log_level: String = "warn".to_string();
    /// Results store (SQLite); crops and synthetic images go to <db>.images/ [env: DND_DB]
    #[arg(value_name = "FILE")]
    db: PathBuf = default_data_dir().join("dnd.sqlite");
    /// K: top probing images per neuron [env: DND_TOP_K]
    top_k: usize = 10;
    /// Attention crops per top image, at most [env: DND_CROPS]
    crops: usize = 4;
    /// Images (originals and crops) kept after re-scoring and captioned [env: DND_TOP_IMAGES]
    top_images: usize = 10;
    /// Most new tokens per caption [env: DND_CAPTION_TOKENS]
    caption_tokens: usize = 32;
    /// Shortest caption in tokens, start token included [env: DND_CAPTION_MIN_LENGTH]
    caption_min_length: usize = 5;
    /// Candidate concepts: LLM summaries over shuffled captions [env: DND_CANDIDATES]
    candidates: usize = 5;
    /// Q: synthetic images per candidate [env: DND_IMAGES_PER_CONCEPT]
    images_per_concept: usize = 10;
    /// Text-to-image prompt; {} is the concept [env: DND_PROMPT]
    prompt: String = "One realistic image of {}".to_string();
    /// Denoising steps [env: DND_STEPS]
    steps: usize = preset.steps();
    /// Classifier-free guidance scale (<= 1 turns it off) [env: DND_GUIDANCE]
    guidance: f64 = preset.guidance();
    /// Scheduler: folder (the model's own), euler, ddim, dpm-solver++, pndm, unipc or lms [env: DND_SCHEDULER]
    scheduler: String = preset.scheduler();
    /// Seed of the synthetic images' noise and of the caption shuffles [env: DND_SEED]
    seed: u64 = 0;
    /// Rank score: topk-sq-mean, mean, median or sq-mean [env: DND_RANK_SCORE]
    rank_score: String = "topk-sq-mean".to_string();
    /// beta: positions averaged by topk-sq-mean [env: DND_BETA]
    beta: usize = 5;
    /// Synthetic images in the overall top this many count for the CLIP weight [env: DND_CLIP_TOP]
    clip_top: usize = 10;
    /// Images per BLIP batch [env: DND_CAPTION_BATCH]
    caption_batch: usize = 16;
    /// Images per Stable Diffusion batch (with guidance, each takes two rows of the UNet) [env: DND_SYNTHESIS_BATCH]
    synthesis_batch: usize = preset.synthesis_batch();
    /// Neurons whose model work is batched together in `describe` [env: DND_WAVE]
    wave: usize = 4;
    /// LLM for candidate concepts: api (the endpoint below), local (llm_local, no key, no
    /// network) or auto: api when an endpoint or API key is configured, else local [env: DND_LLM]
    #[arg(value_name = "auto|api|local")]
    llm: LlmChoice = LlmChoice::Auto;
    /// Local LLM (Qwen2, Qwen3 or Llama-family instruct model, transformers layout): folder or Hub id[@revision] [env: DND_LLM_LOCAL]
    llm_local: ModelSource = ModelSource::hub("Qwen/Qwen2.5-1.5B-Instruct");
    /// New tokens per local LLM answer, at most [env: DND_LLM_MAX_TOKENS]
    llm_max_tokens: usize = 48;
    /// OpenAI-compatible endpoint, up to /v1 (OpenAI, vLLM, Ollama, llama.cpp) [env: DND_LLM_URL, OPENAI_BASE_URL]
    #[arg(value_name = "URL")]
    llm_url: String = "https://api.openai.com/v1".to_string();
    /// Model name at the endpoint [env: DND_LLM_MODEL]
    llm_model: String = "gpt-4o-mini".to_string();
    /// API key for the endpoint (never printed) [env: DND_LLM_API_KEY, OPENAI_API_KEY]
    #[arg(hide_env_values = true)]
    llm_api_key: Secret = Secret::default();
    /// Sampling temperature of the LLM [env: DND_TEMPERATURE]
    temperature: f32 = 0.3;
    /// Seconds one LLM call may take [env: DND_LLM_TIMEOUT]
    llm_timeout: f64 = 60.0;
    /// Retries of an LLM call after 429, 5xx, timeouts and unusable answers [env: DND_LLM_RETRIES]
    llm_retries: u32 = 4;
    /// LLM calls in flight at once, at most (halved while the endpoint answers 429, grown back as it keeps up) [env: DND_LLM_CONCURRENCY]
    llm_concurrency: usize = 32;
    /// Seconds before the first retry (doubled each time, with jitter) [env: DND_LLM_BACKOFF]
    llm_backoff: f64 = 1.0;
}

impl Settings {
    /// The setting naming the model of `role`.
    pub fn model(&self, role: Role) -> &ModelSource {
        match role {
            Role::Target => &self.target,
            Role::Captioner => &self.captioner,
            Role::Synthesiser => &self.synthesiser,
            Role::Clip => &self.clip,
            Role::Llm => &self.llm_local,
            Role::TinyVae => &self.tiny_vae,
        }
    }

    /// The models a run with these settings needs: the pipeline's four, the tiny decoder when
    /// it decodes, the local LLM when it writes the concepts.
    pub fn roles(&self, local_llm: bool) -> Vec<Role> {
        Role::ALL
            .into_iter()
            .filter(|&r| match r {
                Role::Llm => local_llm,
                Role::TinyVae => self.decoder != Decoder::Vae,
                _ => true,
            })
            .collect()
    }

    /// How these settings let the Hub be used.
    pub fn hub_options(&self, progress: Progress) -> HubOptions {
        HubOptions {
            offline: self.offline.0,
            token: self.hf_token.expose().map(String::from),
            progress,
        }
    }
}

/// The effective settings plus where each value came from.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub entries: Vec<Entry>,
    pub file: PathBuf,
    pub file_exists: bool,
}

impl Loaded {
    /// Whether the local LLM writes the concepts: chosen, or `auto` with neither an endpoint
    /// nor an API key configured anywhere (file, environment or flag).
    pub fn llm_is_local(&self) -> bool {
        match self.settings.llm {
            LlmChoice::Local => true,
            LlmChoice::Api => false,
            LlmChoice::Auto => !self.entries.iter().any(|e| {
                (e.key == "llm_url" || e.key == "llm_api_key") && e.source != Source::Default
            }),
        }
    }
}

/// Writes `values` (settings key, string value) into the settings file at `path`, keeping
/// everything else in it, comments included. The file is replaced whole, so a crash leaves
/// the old or the new one.
pub fn save(path: &Path, values: &[(&str, &str)]) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| Error::Setting {
        key: "settings file".into(),
        reason: format!(
            "{} is not valid TOML, so it is left as it is: {e}",
            path.display()
        ),
    })?;
    for (key, value) in values {
        doc[*key] = toml_edit::value(*value);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, doc.to_string()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Loads settings from `file` (the default path when `None`), the process environment and `args`.
pub fn load(file: Option<&Path>, args: &SettingsArgs) -> Result<Loaded> {
    load_with_env(file, args, &|k| std::env::var(k).ok())
}

/// As [`load`], with the environment given explicitly (tests never touch the process environment).
pub fn load_with_env(
    file: Option<&Path>,
    args: &SettingsArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded> {
    let explicit = file.is_some();
    let path = file
        .map(Path::to_path_buf)
        .unwrap_or_else(default_config_path);
    let (layer, exists) = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let layer: FileLayer = toml::from_str(&text).map_err(|e| Error::Setting {
                key: "settings file".into(),
                reason: format!("{} is not valid: {e}", path.display()),
            })?;
            (layer, true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            (FileLayer::default(), false)
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    let (settings, entries) = Settings::layered(layer, &path, env, args)?;
    Ok(Loaded {
        settings,
        entries,
        file: path,
        file_exists: exists,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn source_of(l: &Loaded, key: &str) -> Source {
        l.entries
            .iter()
            .find(|e| e.key == key)
            .unwrap()
            .source
            .clone()
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "batch_size = 8\ntarget = \"a/b\"\ndevice = \"cpu\"\n",
        )
        .unwrap();
        let args = SettingsArgs {
            batch_size: Some(4),
            ..Default::default()
        };
        let env = env_of(&[("DND_BATCH_SIZE", "6"), ("DND_TARGET", "c/d@v2")]);
        let l = load_with_env(Some(&file), &args, &env).unwrap();
        assert_eq!(l.settings.batch_size, 4);
        assert_eq!(source_of(&l, "batch_size"), Source::Flag);
        assert_eq!(l.settings.target.to_string(), "c/d@v2");
        assert_eq!(source_of(&l, "target"), Source::Env("DND_TARGET".into()));
        assert_eq!(l.settings.device, DeviceSpec::Cpu);
        assert_eq!(source_of(&l, "device"), Source::File(file.clone()));
        assert_eq!(source_of(&l, "offline"), Source::Default);
    }

    #[test]
    fn secrets_are_masked_and_aliases_apply() {
        let args = SettingsArgs::default();
        let env = env_of(&[("HF_TOKEN", "hf_abcdefghijklmnop"), ("HF_HUB_OFFLINE", "1")]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("empty.toml");
        std::fs::write(&file, "").unwrap();
        let l = load_with_env(Some(&file), &args, &env).unwrap();
        assert!(l.settings.offline.0);
        assert_eq!(
            source_of(&l, "offline"),
            Source::Env("HF_HUB_OFFLINE".into())
        );
        let err =
            load_with_env(Some(&file), &args, &env_of(&[("DND_OFFLINE", "maybe")])).unwrap_err();
        assert!(err.to_string().contains("DND_OFFLINE"), "{err}");
        let shown: String = l
            .entries
            .iter()
            .map(|e| format!("{} {}\n", e.key, e.value))
            .collect();
        assert!(!shown.contains("abcdefghijklmnop"), "{shown}");
        assert_eq!(l.settings.hf_token.expose(), Some("hf_abcdefghijklmnop"));
    }

    #[test]
    fn save_keeps_the_rest_of_the_file_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/config.toml");
        save(&file, &[("llm_model", "qwen")]).unwrap();
        std::fs::write(
            &file,
            format!(
                "# my notes\n{}steps = 4\n",
                std::fs::read_to_string(&file).unwrap()
            ),
        )
        .unwrap();
        save(&file, &[("llm_model", "llama"), ("llm", "api")]).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("# my notes\n"), "{text}");
        let s = load_with_env(Some(&file), &SettingsArgs::default(), &|_| None)
            .unwrap()
            .settings;
        assert_eq!((s.llm_model.as_str(), s.steps), ("llama", 4));
        assert_eq!(s.llm, LlmChoice::Api);
        std::fs::write(&file, "not = [toml").unwrap();
        let err = save(&file, &[("llm", "api")]).unwrap_err().to_string();
        assert!(err.contains("left as it is"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "not = [toml");
    }

    #[test]
    fn presets_set_defaults_and_anything_explicit_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "preset = \"paper\"\nguidance = 3.0\n").unwrap();
        let args = SettingsArgs {
            steps: Some(20),
            ..Default::default()
        };
        let l = load_with_env(Some(&file), &args, &env_of(&[])).unwrap();
        let s = &l.settings;
        assert_eq!(s.preset, Preset::Paper);
        assert_eq!(s.synthesiser.to_string(), "CompVis/stable-diffusion-v1-4");
        assert_eq!(s.scheduler, "dpm-solver++");
        assert_eq!((s.steps, s.guidance), (20, 3.0));
        assert_eq!(s.synthesis_batch, 10);
        let fast = load_with_env(
            Some(&file),
            &SettingsArgs::default(),
            &env_of(&[("DND_PRESET", "fast")]),
        )
        .unwrap();
        assert_eq!(
            fast.settings.synthesiser.to_string(),
            "stabilityai/sd-turbo"
        );
        assert_eq!((fast.settings.steps, fast.settings.guidance), (1, 3.0));
        assert_eq!(fast.settings.synthesis_batch, 8);
    }

    #[test]
    fn bad_file_and_unknown_key_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "no_such_setting = 1\n").unwrap();
        let err = load_with_env(Some(&file), &SettingsArgs::default(), &env_of(&[])).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("config.toml") && msg.contains("no_such_setting"),
            "{msg}"
        );
        let missing = dir.path().join("missing.toml");
        let err =
            load_with_env(Some(&missing), &SettingsArgs::default(), &env_of(&[])).unwrap_err();
        assert!(err.to_string().contains("missing.toml"));
    }
}
