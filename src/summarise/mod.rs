//! Candidate concepts (METHOD step 2.2-2.4): an LLM simplifies each caption to a short
//! concept, then summarises shuffled lists of the simplified captions several times; the
//! cleaned answers are the candidate concepts.
//!
//! The LLM sits behind [`Llm`] (an OpenAI-compatible endpoint here; a local model is the other
//! implementation). Every answer goes through an [`AnswerCache`] keyed by (model, prompt), so
//! a rerun with the same captions and seed asks nothing and gives the same concepts.

mod api;
mod local;
pub(crate) mod window;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;

pub use api::{ApiLlm, ApiOptions};
pub use local::{LocalLlm, LocalModel, LocalOptions};

/// Who speaks a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    System,
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: Speaker,
    pub content: String,
}

impl Message {
    fn user(content: impl Into<String>) -> Self {
        Self {
            role: Speaker::User,
            content: content.into(),
        }
    }
    fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Speaker::Assistant,
            content: content.into(),
        }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A chat model. Implementations retry transient failures themselves and return either a
/// non-empty answer or an error that says what to fix. `on_text` receives the answer as it
/// is produced, in pieces (all at once where the model does not stream).
pub trait Llm: Send + Sync {
    /// The model's name, part of every cache key.
    fn model(&self) -> &str;
    fn chat<'a>(
        &'a self,
        messages: &'a [Message],
        temperature: f32,
        on_text: &'a (dyn Fn(&str) + Send + Sync),
    ) -> BoxFuture<'a, Result<String, LlmError>>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    #[error("LLM endpoint {url} is unreachable after {attempts} attempts: {reason}.\n  fix: start the server, or point --llm-url at a running OpenAI-compatible endpoint")]
    Unreachable {
        url: String,
        attempts: u32,
        reason: String,
    },
    #[error("LLM endpoint {url} gave no answer within {seconds}s, {attempts} attempts.\n  fix: raise --llm-timeout, or use a faster model")]
    Timeout {
        url: String,
        seconds: f64,
        attempts: u32,
    },
    #[error("LLM endpoint {url} still answered HTTP {status} after {attempts} attempts: {message}.\n  fix: wait for the rate limit or the server to recover and rerun (finished neurons are kept), or lower --llm-concurrency")]
    Busy {
        url: String,
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("LLM endpoint {url} refused the request with HTTP {status}: {message}.\n  fix: {fix}")]
    Refused {
        url: String,
        status: u16,
        message: String,
        fix: String,
    },
    #[error("LLM endpoint {url} gave no usable answer in {attempts} attempts: {reason}")]
    Malformed {
        url: String,
        attempts: u32,
        reason: String,
    },
    #[error("local LLM {model}: {reason}")]
    Local { model: String, reason: String },
    #[error("every {0} the LLM gave was empty after clean-up.\n  fix: use an instruct (chat) model; a reasoning model, whose answers open with <think>, needs its reasoning turned off at the server or a larger --llm-max-tokens")]
    AllEmpty(&'static str),
    #[error("cancelled")]
    Cancelled,
}

/// Where answers are remembered across runs (the results store).
pub trait AnswerCache: Send + Sync {
    fn get(&self, model: &str, prompt: &str) -> Option<String>;
    fn put(&self, model: &str, prompt: &str, answer: &str);
}

/// How candidates are asked for. The defaults are the reference's.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ConceptOptions {
    /// How many summaries over shuffled captions (each one candidate).
    pub summaries: usize,
    pub temperature: f32,
    /// Seeds the shuffles, so a rerun asks the same prompts (and hits the cache).
    pub seed: u64,
}

impl Default for ConceptOptions {
    fn default() -> Self {
        Self {
            summaries: 5,
            temperature: 0.3,
            seed: 0,
        }
    }
}

/// What the LLM made of one neuron's captions.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Concepts {
    /// One per caption, in caption order; `None` where the answer was dropped.
    pub simplified: Vec<Option<String>>,
    /// The summaries as answered (after colon and comma handling), before clean-up.
    pub answers: Vec<String>,
    /// The cleaned, de-duplicated candidates.
    pub candidates: Vec<String>,
    /// Why answers were dropped, one line each.
    pub dropped: Vec<String>,
}

/// One LLM call of [`concepts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Simplifying caption i.
    Simplify(usize),
    /// Summary i.
    Summary(usize),
    /// Merging the comma-separated parts of summary i.
    Merge(usize),
}

/// Progress of [`concepts`], reported as answers arrive.
#[derive(Clone, Debug, PartialEq)]
pub enum ConceptEvent {
    /// A piece of an answer being generated (cached answers come whole).
    Text {
        call: Call,
        text: String,
    },
    Simplified {
        index: usize,
        text: String,
    },
    Summary {
        index: usize,
        text: String,
    },
}

/// An [`Llm`] with its answer cache.
pub struct Summariser<'a> {
    pub llm: &'a dyn Llm,
    pub cache: &'a dyn AnswerCache,
    pub in_flight: &'a InFlight,
}

/// Prompts being asked and not yet answered, shared by the summarisers of one run: a prompt
/// asked again meanwhile (a caption two neurons share, or one in two waves in flight) waits
/// for the first call's answer, as it would find it in the cache a moment later, instead of
/// paying for a second call. When that call fails, a waiting one asks in its turn.
#[derive(Default)]
pub struct InFlight(std::sync::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<String>>>>);

impl InFlight {
    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::OnceCell<String>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Summariser<'_> {
    /// One answer, from the cache when this exact prompt was asked of this model before, or
    /// from the call asking it now.
    pub async fn ask(
        &self,
        messages: &[Message],
        temperature: f32,
        on_text: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<String, LlmError> {
        let model = self.llm.model();
        let key =
            serde_json::json!({ "messages": messages, "temperature": temperature }).to_string();
        if let Some(hit) = self.cache.get(model, &key) {
            on_text(&hit);
            return Ok(one_line(after_reasoning(&hit)));
        }
        let slot = format!("{model}\n{key}");
        let cell = self
            .in_flight
            .map()
            .entry(slot.clone())
            .or_default()
            .clone();
        let asked = AtomicBool::new(false);
        let answer = cell
            .get_or_try_init(|| async {
                asked.store(true, Ordering::Relaxed);
                let answer = self.llm.chat(messages, temperature, on_text).await?;
                self.cache.put(model, &key, &answer);
                Ok::<_, LlmError>(answer)
            })
            .await?
            .clone();
        if asked.load(Ordering::Relaxed) {
            // Answered and cached: later askers find it there.
            self.in_flight.map().remove(&slot);
        } else {
            on_text(&answer);
        }
        Ok(one_line(after_reasoning(&answer)))
    }
}

/// What follows a reasoning model's `<think>...</think>` block: DeepSeek-R1's distilled models
/// and Qwen3's thinking models, served without a reasoning parser, answer with their reasoning
/// first. A block never closed (cut off by the token limit) leaves no answer.
fn after_reasoning(text: &str) -> &str {
    const END: &str = "</think>";
    match text.rfind(END) {
        Some(i) => &text[i + END.len()..],
        None if text.trim_start().starts_with("<think>") => "",
        None => text,
    }
}

/// `text` as one line of plain text: control characters (line breaks, tabs, a terminal's
/// escape codes) become spaces and runs of whitespace one space. An answer becomes a label
/// printed to terminals and files, and an endpoint may answer garbage; Stable Diffusion's
/// tokenizer folds whitespace the same way, so prompts are unchanged.
pub(crate) fn one_line(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

const SUMMARY_TASK: &str = "State one coherent and concise concept label that is 1-5 words long that can semantically summarize and represent most, not necessarily all, of the conceptual similarities in the following descriptions: ";

/// The simplify prompt: one few-shot pair, then the caption.
pub fn simplify_prompt(caption: &str) -> Vec<Message> {
    vec![
        Message::user("State one coherent and concise concept label that is 1-5 words long that simplifies the following description: a red background with a red background and a red background with a red background."),
        Message::assistant("A red background"),
        Message::user(format!(
            "Only state your answer without a period and quotation marks. Do not number your answer. State one coherent and concise concept label that simplifies the following description and deletes any unnecessary details: {caption}"
        )),
    ]
}

/// The summary prompt: the reference's two few-shot pairs (textures, red objects), then the
/// simplified captions in the order given.
pub fn summary_prompt(descriptions: &[String]) -> Vec<Message> {
    vec![
        Message::user(format!(
            "{SUMMARY_TASK}a purple background with a very soft texture., a brown background with a diagonal pattern of lines and lines., a white windmill with a red door and a red door in the middle of the picture., a beige background with a rough texture of linen., a beige background with a rough texture and a very soft texture."
        )),
        Message::assistant("multicolored textiles"),
        Message::user(format!(
            "{SUMMARY_TASK}a little girl is sitting in a red tractor with the word sofy on the front., a toy car sits on a red ottoman in a play room., a red dress with silver studs and a silver belt., a red chevrolet camaro is on display at a car show., a red spool of a cable with the word red on it."
        )),
        Message::assistant("red-themed scenes"),
        Message::user(format!(
            "Only state your answer without a period and quotation marks and do not simply repeat the descriptions. {SUMMARY_TASK}{}",
            descriptions.join(", ")
        )),
    ]
}

/// The re-ask when a summary lists several concepts: merge the parts into one.
pub fn merge_prompt(parts: &[&str]) -> Vec<Message> {
    vec![Message::user(format!(
        "Only state your answer without a period and do not simply repeat the descriptions. {SUMMARY_TASK}{}",
        parts.join(", ")
    ))]
}

/// What follows the first colon ("Concept: red cars" -> "red cars").
fn after_colon(answer: &str) -> &str {
    answer
        .split_once(':')
        .map_or(answer, |(_, rest)| rest)
        .trim()
}

/// Trims whitespace, quotes, a leading list number and a trailing period.
fn tidy(answer: &str) -> String {
    let t = answer
        .trim()
        .trim_matches(|c: char| matches!(c, '"' | '\'' | '`' | '“' | '”'));
    let t = t.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.' || c == ')');
    t.trim()
        .trim_end_matches('.')
        .trim_matches(|c: char| matches!(c, '"' | '\'' | '`' | '“' | '”'))
        .trim()
        .to_string()
}

/// METHOD step 2.4: lowercase, strip, de-duplicate (first seen wins); a candidate ending in
/// design(s)/graphic(s) also yields "`<candidate>` background".
pub fn clean_candidates(answers: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |c: String| {
        if !c.is_empty() && !out.contains(&c) {
            out.push(c);
        }
    };
    for a in answers {
        let c = tidy(&a.to_lowercase());
        let vague = c
            .split_whitespace()
            .last()
            .is_some_and(|w| matches!(w, "design" | "designs" | "graphic" | "graphics"));
        push(c.clone());
        if vague {
            push(format!("{c} background"));
        }
    }
    out
}

/// Simplifies every caption and summarises them `opts.summaries` times (METHOD step 2.2-2.4).
/// Calls run concurrently (the [`Llm`] limits how many are in flight). Failed or empty
/// answers are dropped and noted; it fails only when nothing usable is left.
pub async fn concepts(
    s: &Summariser<'_>,
    captions: &[String],
    opts: &ConceptOptions,
    on_event: &(dyn Fn(ConceptEvent) + Send + Sync),
) -> Result<Concepts, LlmError> {
    let mut out = Concepts::default();
    let simplified =
        futures::future::join_all(captions.iter().enumerate().map(|(i, c)| async move {
            let text = |t: &str| {
                on_event(ConceptEvent::Text {
                    call: Call::Simplify(i),
                    text: t.to_string(),
                })
            };
            let r = s.ask(&simplify_prompt(c), opts.temperature, &text).await;
            if let Ok(text) = &r {
                on_event(ConceptEvent::Simplified {
                    index: i,
                    text: tidy(text),
                });
            }
            r
        }))
        .await;
    let mut last_err = None;
    for (i, r) in simplified.into_iter().enumerate() {
        match r.map(|t| tidy(&t)) {
            Ok(t) if !t.is_empty() => out.simplified.push(Some(t)),
            Ok(_) => {
                out.dropped
                    .push(format!("caption {i}: empty simplification"));
                out.simplified.push(None);
            }
            Err(e) => {
                out.dropped.push(format!("caption {i}: {e}"));
                out.simplified.push(None);
                last_err = Some(e);
            }
        }
    }
    let kept: Vec<String> = out.simplified.iter().flatten().cloned().collect();
    if kept.is_empty() {
        return Err(last_err.unwrap_or(LlmError::AllEmpty("simplified caption")));
    }
    // The first summary sees the captions in order, each later one a fresh seeded shuffle,
    // as the reference does.
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut orders = Vec::with_capacity(opts.summaries);
    let mut order = kept;
    for _ in 0..opts.summaries {
        orders.push(order.clone());
        order.shuffle(&mut rng);
    }
    let summaries = futures::future::join_all(orders.iter().enumerate().map(|(i, o)| async move {
        let text = |call: Call| {
            move |t: &str| {
                on_event(ConceptEvent::Text {
                    call,
                    text: t.to_string(),
                })
            }
        };
        let first = s
            .ask(
                &summary_prompt(o),
                opts.temperature,
                &text(Call::Summary(i)),
            )
            .await?;
        let mut answer = after_colon(&first).to_string();
        if answer.contains(',') {
            let parts: Vec<&str> = answer.split(',').map(str::trim).collect();
            let merged = s
                .ask(
                    &merge_prompt(&parts),
                    opts.temperature,
                    &text(Call::Merge(i)),
                )
                .await?;
            answer = after_colon(&merged).to_string();
        }
        on_event(ConceptEvent::Summary {
            index: i,
            text: answer.clone(),
        });
        Ok::<_, LlmError>(answer)
    }))
    .await;
    for (i, r) in summaries.into_iter().enumerate() {
        match r {
            Ok(a) => out.answers.push(a),
            Err(e) => {
                out.dropped.push(format!("summary {i}: {e}"));
                last_err = Some(e);
            }
        }
    }
    out.candidates = clean_candidates(&out.answers);
    if out.candidates.is_empty() {
        return Err(last_err.unwrap_or(LlmError::AllEmpty("candidate concept")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_lowercases_dedupes_and_adds_backgrounds() {
        let answers: Vec<String> = [
            "Red Cars.",
            "\"red cars\"",
            "Floral Designs",
            "1. Blue sky",
            "",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            clean_candidates(&answers),
            vec![
                "red cars",
                "floral designs",
                "floral designs background",
                "blue sky"
            ]
        );
    }

    #[test]
    fn answers_become_one_line_without_control_characters() {
        assert_eq!(
            one_line("  red\ncars\x1b[31m\t and\u{7}  dogs \r\n"),
            "red cars [31m and dogs"
        );
        assert_eq!(one_line("striped fabric"), "striped fabric");
    }

    #[test]
    fn a_reasoning_block_is_not_the_answer() {
        assert_eq!(
            after_reasoning("<think>\nRed things, so...\n</think>\n\nred objects"),
            "\n\nred objects"
        );
        assert_eq!(
            after_reasoning("<think>\n\n</think>\n\nstripes"),
            "\n\nstripes"
        );
        assert_eq!(after_reasoning("  <think>it could be"), "");
        assert_eq!(after_reasoning("striped fabric"), "striped fabric");
    }

    #[test]
    fn colon_keeps_what_follows() {
        assert_eq!(after_colon("Concept: striped fabric"), "striped fabric");
        assert_eq!(after_colon("striped fabric"), "striped fabric");
    }

    #[test]
    fn summary_prompt_lists_descriptions_in_order() {
        let p = summary_prompt(&["a dog".into(), "a cat".into()]);
        assert_eq!(p.len(), 5);
        assert_eq!(p[1].content, "multicolored textiles");
        assert!(p[4].content.ends_with("descriptions: a dog, a cat"));
    }
}
