//! The LLM as a local model: a Qwen2-family instruct model (Qwen2 / Qwen2.5) from a Hub-layout
//! folder, run through candle, with the model's own chat template and stop tokens.
//!
//! One generation runs at a time (the model keeps its KV cache); calls queue on a lock and run
//! on the blocking pool, streaming their text as it is decoded.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::qwen2;
use tokenizers::Tokenizer;

use super::{BoxFuture, Llm, LlmError, Message};
use crate::error::{Error, Result};
use crate::hub::ResolvedModel;
use crate::nn;

/// The parts of a transformers Qwen2 `config.json` we read, with transformers' defaults;
/// both the top-level `rope_theta` of older files and v5's `rope_parameters` are understood.
#[derive(serde::Deserialize)]
struct Config {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default = "d_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    max_window_layers: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "d_eps")]
    rms_norm_eps: f64,
    #[serde(default = "d_act")]
    hidden_act: candle_nn::Activation,
}

#[derive(serde::Deserialize)]
struct RopeParameters {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_type: Option<String>,
}

fn d_max_pos() -> usize {
    32768
}
fn d_eps() -> f64 {
    1e-6
}
fn d_act() -> candle_nn::Activation {
    candle_nn::Activation::Silu
}

impl Config {
    fn to_candle(&self) -> std::result::Result<qwen2::Config, String> {
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "qwen2") {
            return Err(format!(
                "model_type {t:?}: the local LLM runs the Qwen2 family (Qwen2, Qwen2.5 instruct models)"
            ));
        }
        let scaled = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
            .is_some_and(|t| t != "default")
            || self.rope_scaling.as_ref().is_some_and(|s| !s.is_null());
        if scaled {
            return Err(
                "scaled RoPE (rope_scaling / rope_type other than default) is not supported".into(),
            );
        }
        let rope_theta = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        Ok(qwen2::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            max_position_embeddings: self.max_position_embeddings,
            // Without sliding attention the window is the whole context.
            sliding_window: match (self.use_sliding_window, self.sliding_window) {
                (true, Some(w)) => w,
                _ => self.max_position_embeddings,
            },
            max_window_layers: self.max_window_layers.unwrap_or(self.num_hidden_layers),
            tie_word_embeddings: self.tie_word_embeddings,
            rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            use_sliding_window: self.use_sliding_window,
            hidden_act: self.hidden_act,
        })
    }
}

/// A token id or a list of them (`generation_config.json`'s `eos_token_id`).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Ids {
    One(u32),
    Many(Vec<u32>),
}

#[derive(serde::Deserialize, Default)]
struct GenerationConfig {
    #[serde(default)]
    eos_token_id: Option<Ids>,
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .map(String::from)
        .or_else(|| v["content"].as_str().map(String::from))
}

/// The chat template, rendered as transformers does (Jinja with trim_blocks and
/// lstrip_blocks, Python string methods available).
struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    fn new(source: String, bos: String, eos: String) -> std::result::Result<Self, String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| format!("the chat template does not parse: {e}"))?;
        Ok(Self { env, bos, eos })
    }

    fn render(&self, messages: &[Message]) -> std::result::Result<String, String> {
        let t = self.env.get_template("chat").expect("added at load");
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| format!("the chat template failed: {e}"))
    }
}

/// How the local model generates.
#[derive(Clone, Copy, Debug)]
pub struct LocalOptions {
    /// New tokens per answer, at most (a concept is a few words).
    pub max_new_tokens: usize,
}

struct Generator {
    model: qwen2::ModelForCausalLM,
    device: Device,
}

/// The local LLM; cheap to share with the blocking task that generates.
pub struct LocalLlm {
    inner: Arc<LocalModel>,
}

/// The loaded model with its tokenizer, chat template and stop tokens.
pub struct LocalModel {
    name: String,
    template: ChatTemplate,
    tokenizer: Tokenizer,
    stops: Vec<u32>,
    /// Positions the model was trained for (prompt plus answer).
    context: usize,
    generator: Mutex<Generator>,
    opts: LocalOptions,
}

impl LocalLlm {
    pub fn load(
        model: &ResolvedModel,
        device: &Device,
        dtype: DType,
        opts: LocalOptions,
    ) -> Result<Self> {
        let label = model.label();
        let config_path = model.required("config.json");
        let cfg: Config = nn::read_json(&label, config_path)?;
        let cfg = cfg
            .to_candle()
            .map_err(|e| nn::mismatch(&label, Some(config_path), &e))?;
        let tok_path = model.required("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(tok_path).map_err(|e| nn::mismatch(&label, Some(tok_path), &e))?;
        let tc_path = model.required("tokenizer_config.json");
        let tc: serde_json::Value = nn::read_json(&label, tc_path)?;
        // transformers 5 writes the template to its own file; older folders keep it inside
        // tokenizer_config.json, as a string or a list of named templates.
        let template = match model.file("chat_template.jinja") {
            Some(p) => std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
            None => match &tc["chat_template"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            },
        };
        if template.is_empty() {
            return Err(nn::mismatch(
                &label,
                Some(tc_path),
                &"it has no chat_template (an instruct model's folder has one)",
            ));
        }
        let eos = token_text(&tc["eos_token"]).unwrap_or_default();
        let bos = token_text(&tc["bos_token"]).unwrap_or_default();
        let template = ChatTemplate::new(template, bos, eos.clone())
            .map_err(|e| nn::mismatch(&label, Some(tc_path), &e))?;
        let gen: GenerationConfig = match model.file("generation_config.json") {
            Some(p) => nn::read_json(&label, p)?,
            None => GenerationConfig::default(),
        };
        let mut stops = match gen.eos_token_id {
            Some(Ids::One(i)) => vec![i],
            Some(Ids::Many(v)) => v,
            None => Vec::new(),
        };
        if let Some(id) = tokenizer.token_to_id(&eos) {
            if !stops.contains(&id) {
                stops.push(id);
            }
        }
        if stops.is_empty() {
            return Err(nn::mismatch(
                &label,
                Some(tc_path),
                &"no end-of-turn token (eos_token) is named",
            ));
        }
        let (vb, weights) = nn::weights(model, "model.safetensors", dtype, device)?;
        let net = qwen2::ModelForCausalLM::new(&cfg, vb)
            .map_err(|e| nn::mismatch(&label, Some(weights), &e))?;
        Ok(Self {
            inner: Arc::new(LocalModel {
                name: format!("local:{}", model.source),
                template,
                tokenizer,
                stops,
                context: cfg.max_position_embeddings,
                generator: Mutex::new(Generator {
                    model: net,
                    device: device.clone(),
                }),
                opts,
            }),
        })
    }
}

impl std::ops::Deref for LocalLlm {
    type Target = LocalModel;
    fn deref(&self) -> &LocalModel {
        &self.inner
    }
}

impl LocalModel {
    /// The prompt text the model sees for `messages`.
    pub fn render(&self, messages: &[Message]) -> std::result::Result<String, LlmError> {
        self.template
            .render(messages)
            .map_err(|reason| self.fail(reason))
    }

    /// Token ids of rendered prompt text (special tokens in the text are recognised).
    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, LlmError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.fail(format!("cannot tokenize the prompt: {e}")))
    }

    /// New token ids after `prompt` (the stop token included when one ends it), greedy when
    /// `temperature` is 0, else sampled with `seed`; `on_ids` sees the ids so far after each.
    pub fn generate(
        &self,
        prompt: &[u32],
        temperature: f32,
        seed: u64,
        on_ids: &mut dyn FnMut(&[u32]),
    ) -> std::result::Result<Vec<u32>, LlmError> {
        if prompt.len() + self.opts.max_new_tokens > self.context {
            return Err(self.fail(format!(
                "the prompt has {} tokens; with {} new ones that exceeds the model's context of {}",
                prompt.len(),
                self.opts.max_new_tokens,
                self.context
            )));
        }
        let mut g = self.generator.lock().unwrap_or_else(|p| p.into_inner());
        self.run(&mut g, prompt, temperature, seed, on_ids)
            .map_err(|e| self.fail(e.to_string()))
    }

    fn run(
        &self,
        g: &mut Generator,
        prompt: &[u32],
        temperature: f32,
        seed: u64,
        on_ids: &mut dyn FnMut(&[u32]),
    ) -> candle_core::Result<Vec<u32>> {
        g.model.clear_kv_cache();
        let mut sampler = LogitsProcessor::new(
            seed,
            (temperature > 0.0).then_some(temperature as f64),
            None,
        );
        let mut input = Tensor::new(prompt, &g.device)?.unsqueeze(0)?;
        let mut pos = 0;
        let mut out = Vec::new();
        for _ in 0..self.opts.max_new_tokens {
            let logits = g.model.forward(&input, pos)?;
            pos += input.dim(1)?;
            let next = sampler.sample(&logits.squeeze(0)?.squeeze(0)?.to_dtype(DType::F32)?)?;
            out.push(next);
            on_ids(&out);
            if self.stops.contains(&next) {
                break;
            }
            input = Tensor::new(&[next], &g.device)?.unsqueeze(0)?;
        }
        Ok(out)
    }

    /// Text of generated ids, without stop and other special tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    fn fail(&self, reason: String) -> LlmError {
        LlmError::Local {
            model: self.name.clone(),
            reason,
        }
    }
}

impl Llm for LocalLlm {
    fn model(&self) -> &str {
        &self.inner.name
    }

    fn chat<'a>(
        &'a self,
        messages: &'a [Message],
        temperature: f32,
        on_text: &'a (dyn Fn(&str) + Send + Sync),
    ) -> BoxFuture<'a, std::result::Result<String, LlmError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let text = inner.render(messages)?;
            let prompt = inner.encode(&text)?;
            // The sampling seed comes from the prompt, so an answer is reproducible.
            let hash = blake3::hash(text.as_bytes());
            let seed = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
            // The model runs on the blocking pool; its text streams back as it is decoded.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let worker = inner.clone();
            let job = tokio::task::spawn_blocking(move || {
                let mut shown = String::new();
                worker.generate(&prompt, temperature, seed, &mut |ids| {
                    let now = worker.decode(ids);
                    if let Some(delta) = now.strip_prefix(shown.as_str()).filter(|d| !d.is_empty())
                    {
                        let _ = tx.send(delta.to_string());
                        shown = now;
                    }
                })
            });
            while let Some(delta) = rx.recv().await {
                on_text(&delta);
            }
            let ids = job
                .await
                .map_err(|e| inner.fail(format!("generation stopped: {e}")))??;
            let answer = inner.decode(&ids);
            if answer.trim().is_empty() {
                return Err(inner.fail("the answer was empty".into()));
            }
            Ok(answer)
        })
    }
}
