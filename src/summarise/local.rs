//! The LLM as a local model: an instruct model of the Qwen2 (Qwen2, Qwen2.5), Qwen3 or Llama
//! (Llama 3.x, SmolLM2, TinyLlama, ...) families from a Hub-layout folder, run through candle's
//! implementations, with the model's own chat template and stop tokens.
//!
//! One generation runs at a time (the model keeps its KV cache); calls queue on a lock and run
//! on the blocking pool, streaming their text as it is decoded.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::{llama, qwen2, qwen3};
use tokenizers::Tokenizer;

use super::{BoxFuture, Llm, LlmError, Message};
use crate::error::{Error, Result};
use crate::hub::ResolvedModel;
use crate::nn;

/// The parts of a transformers `config.json` of the three families we read, with
/// transformers' defaults; both the top-level `rope_theta` / `rope_scaling` of older files and
/// v5's `rope_parameters` are understood.
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
    #[serde(default)]
    head_dim: Option<usize>,
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
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    rope_theta: Option<f64>,
    /// v5: `rope_theta` with the scaling's own fields.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    /// Before v5: the scaling alone.
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "d_eps")]
    rms_norm_eps: f64,
    #[serde(default = "d_act")]
    hidden_act: candle_nn::Activation,
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

/// The families the local LLM runs, by `model_type`.
const FAMILIES: &str =
    "qwen2 (Qwen2, Qwen2.5), qwen3 (Qwen3) and llama (Llama 3.x, SmolLM2, TinyLlama)";

impl Config {
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r["rope_theta"].as_f64())
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// The RoPE scaling, `None` for plain RoPE, from whichever form the file has.
    fn rope_scaling(&self) -> Option<&serde_json::Value> {
        let scaled = |r: &&serde_json::Value| {
            !r.is_null() && r["rope_type"].as_str().or(r["type"].as_str()) != Some("default")
        };
        self.rope_parameters
            .as_ref()
            .filter(scaled)
            .or(self.rope_scaling.as_ref().filter(scaled))
    }

    fn unscaled(&self) -> std::result::Result<(), String> {
        match self.rope_scaling() {
            Some(s) => Err(format!(
                "scaled RoPE ({s}) is not supported for this family"
            )),
            None => Ok(()),
        }
    }

    fn qwen2(&self) -> std::result::Result<qwen2::Config, String> {
        self.unscaled()?;
        Ok(qwen2::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.kv_heads(),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: self.window(),
            max_window_layers: self.max_window_layers.unwrap_or(self.num_hidden_layers),
            tie_word_embeddings: self.tie_word_embeddings,
            rope_theta: self.rope_theta(),
            rms_norm_eps: self.rms_norm_eps,
            use_sliding_window: self.use_sliding_window,
            hidden_act: self.hidden_act,
        })
    }

    fn qwen3(&self) -> std::result::Result<qwen3::Config, String> {
        self.unscaled()?;
        Ok(qwen3::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            attention_bias: self.attention_bias,
            num_key_value_heads: self.kv_heads(),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: Some(self.window()),
            max_window_layers: self.max_window_layers.unwrap_or(self.num_hidden_layers),
            tie_word_embeddings: self.tie_word_embeddings,
            rope_theta: self.rope_theta(),
            rms_norm_eps: self.rms_norm_eps,
            use_sliding_window: self.use_sliding_window,
            hidden_act: self.hidden_act,
        })
    }

    fn llama(&self) -> std::result::Result<llama::Config, String> {
        // candle's Llama has neither biases nor a head size of its own.
        if self.attention_bias || self.mlp_bias {
            return Err(
                "attention_bias / mlp_bias: Llama variants with biases are not supported".into(),
            );
        }
        let head_dim = self.hidden_size / self.num_attention_heads;
        if self.head_dim.is_some_and(|d| d != head_dim) {
            return Err(format!(
                "head_dim {:?} differs from hidden_size / num_attention_heads ({head_dim}), which this family's implementation assumes",
                self.head_dim
            ));
        }
        if self.hidden_act != candle_nn::Activation::Silu {
            return Err("hidden_act: only silu is supported for this family".into());
        }
        let rope_scaling = match self.rope_scaling() {
            None => None,
            Some(s) if s["rope_type"] == "llama3" => Some(
                serde_json::from_value::<llama::Llama3RopeConfig>(s.clone())
                    .map_err(|e| format!("rope scaling {s}: {e}"))?,
            ),
            Some(s) => {
                return Err(format!(
                    "scaled RoPE ({s}) is not supported: only Llama 3's (rope_type llama3)"
                ))
            }
        };
        Ok(llama::Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.kv_heads(),
            use_flash_attn: false,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta() as f32,
            // Stop tokens come from generation_config.json and the tokenizer (`LocalLlm::load`).
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }

    /// Without sliding attention the window is the whole context.
    fn window(&self) -> usize {
        match (self.use_sliding_window, self.sliding_window) {
            (true, Some(w)) => w,
            _ => self.max_position_embeddings,
        }
    }

    /// The tensors candle's Llama reads, with their shapes: it panics on a missing or
    /// misshapen one, so they are checked first.
    fn llama_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let d = h / self.num_attention_heads;
        let (q, kv) = (self.num_attention_heads * d, self.kv_heads() * d);
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj", vec![q, h]),
                ("self_attn.k_proj", vec![kv, h]),
                ("self_attn.v_proj", vec![kv, h]),
                ("self_attn.o_proj", vec![h, q]),
                ("mlp.gate_proj", vec![i, h]),
                ("mlp.up_proj", vec![i, h]),
                ("mlp.down_proj", vec![h, i]),
                ("input_layernorm", vec![h]),
                ("post_attention_layernorm", vec![h]),
            ] {
                out.push((format!("{p}.{name}.weight"), shape));
            }
        }
        out
    }
}

/// A model's family with candle's config for it.
enum Family {
    Qwen2(qwen2::Config),
    Qwen3(qwen3::Config),
    /// With the tensors to check before candle's Llama reads them.
    Llama(llama::Config, Vec<(String, Vec<usize>)>),
}

impl Family {
    fn of(cfg: &Config) -> std::result::Result<Self, String> {
        match cfg.model_type.as_deref().unwrap_or("qwen2") {
            "qwen2" => Ok(Family::Qwen2(cfg.qwen2()?)),
            "qwen3" => Ok(Family::Qwen3(cfg.qwen3()?)),
            "llama" => Ok(Family::Llama(cfg.llama()?, cfg.llama_tensors())),
            t => Err(format!(
                "model_type {t:?}: the local LLM runs the {FAMILIES} families"
            )),
        }
    }
}

/// A loaded model of one of the families.
enum Net {
    Qwen2(qwen2::ModelForCausalLM),
    Qwen3(qwen3::ModelForCausalLM),
    /// candle's Llama keeps its KV cache outside the model: a fresh copy per generation.
    Llama {
        model: llama::Llama,
        fresh: llama::Cache,
        cache: llama::Cache,
    },
}

impl Net {
    fn load(
        family: &Family,
        model: &ResolvedModel,
        vb: VarBuilder<'static>,
    ) -> std::result::Result<Self, String> {
        let e = |e: candle_core::Error| e.to_string();
        match family {
            Family::Qwen2(c) => Ok(Net::Qwen2(qwen2::ModelForCausalLM::new(c, vb).map_err(e)?)),
            Family::Qwen3(c) => Ok(Net::Qwen3(qwen3::ModelForCausalLM::new(c, vb).map_err(e)?)),
            Family::Llama(c, tensors) => {
                if model.random_weights().is_none() {
                    check_tensors(model, tensors)?;
                }
                let fresh = llama::Cache::new(true, vb.dtype(), c, vb.device()).map_err(e)?;
                Ok(Net::Llama {
                    model: llama::Llama::load(vb, c).map_err(e)?,
                    cache: fresh.clone(),
                    fresh,
                })
            }
        }
    }

    fn clear_kv_cache(&mut self) {
        match self {
            Net::Qwen2(m) => m.clear_kv_cache(),
            Net::Qwen3(m) => m.clear_kv_cache(),
            Net::Llama { fresh, cache, .. } => *cache = fresh.clone(),
        }
    }

    /// The logits after the last token of `input` (1, T), continuing at position `pos`.
    fn forward(&mut self, input: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let logits = match self {
            Net::Qwen2(m) => m.forward(input, pos)?,
            Net::Qwen3(m) => m.forward(input, pos)?,
            Net::Llama { model, cache, .. } => model.forward(input, pos, cache)?,
        };
        logits.flatten_all()?.to_dtype(DType::F32)
    }
}

/// Checks that the weights files hold `tensors` with these shapes, from their headers alone.
fn check_tensors(
    model: &ResolvedModel,
    tensors: &[(String, Vec<usize>)],
) -> std::result::Result<(), String> {
    let (_, files) = model.weight_files("model.safetensors");
    // SAFETY: the files are not modified while mapped; dnd only ever reads model folders.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| format!("not a readable safetensors file ({e})"))?;
    for (name, shape) in tensors {
        match st.get(name) {
            Ok(t) if t.shape() == shape.as_slice() => {}
            Ok(t) => {
                return Err(format!(
                    "tensor {name} has shape {:?} where config.json implies {shape:?}",
                    t.shape()
                ))
            }
            Err(_) => return Err(format!("tensor {name} is missing")),
        }
    }
    Ok(())
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
            // Qwen3's hybrid models answer directly instead of reasoning first (which would
            // spend the few new tokens a concept gets); other templates ignore it.
            enable_thinking => false,
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
    model: Net,
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
        let family = Family::of(&cfg).map_err(|e| nn::mismatch(&label, Some(config_path), &e))?;
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
        let net =
            Net::load(&family, model, vb).map_err(|e| nn::mismatch(&label, Some(weights), &e))?;
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
            let next = sampler.sample(&logits)?;
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
