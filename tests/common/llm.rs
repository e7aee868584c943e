//! An in-process OpenAI-compatible chat-completions server for the tests: deterministic
//! answers to the DnD prompts, and scripted faults (429 with Retry-After, 500, a hang,
//! malformed JSON, empty content, a reasoning model's thinking).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

#[derive(Clone, Debug)]
pub enum Fault {
    RateLimited,
    ServerError,
    Hang(Duration),
    Malformed,
    Empty,
    Unauthorized,
    /// A reasoning model's answer: its reasoning in a `<think>` block, then the answer.
    Reasoning,
    /// A reasoning model cut off by the token limit while still reasoning.
    ReasoningCutOff,
}

impl Fault {
    fn response(&self) -> ResponseTemplate {
        match self {
            Fault::RateLimited => ResponseTemplate::new(429)
                .insert_header("Retry-After", "1")
                .set_body_string(r#"{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":null}}"#),
            Fault::ServerError => ResponseTemplate::new(500).set_body_string("upstream exploded"),
            Fault::Hang(d) => completion("too late").set_delay(*d),
            Fault::Malformed => ResponseTemplate::new(200)
                .insert_header("content-type", "application/json")
                .set_body_string("{\"choices\": [ this is not json"),
            Fault::Empty => completion(""),
            Fault::Reasoning => completion(
                "<think>\nThe captions all show something red, so...\n</think>\n\nRed objects",
            ),
            Fault::Unauthorized => ResponseTemplate::new(401).set_body_string(
                r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
            ),
            Fault::ReasoningCutOff => completion("<think>\nThe captions all show something red, and"),
        }
    }
}

fn completion(text: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000u32,
        "model": "mock",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop"
        }]
    }))
}

fn pick<'a>(key: &str, options: &[&'a str]) -> &'a str {
    let h = key
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    options[(h % options.len() as u64) as usize]
}

/// Deterministic answers: a concept per caption, a summary per list (sometimes with a
/// colon or a comma, which the pipeline must handle), a fixed merge.
fn answer(messages: &[serde_json::Value]) -> String {
    let last = messages
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    if messages.len() == 1 {
        return "small animals".into();
    }
    if last.contains("simplifies the following description") {
        return pick(last, &["red stripes", "\"blue sky\"", "a dog."]).into();
    }
    pick(
        last,
        &[
            "Red Stripes.",
            "Concept: blue sky",
            "dogs, cats",
            "floral designs",
            "sky",
        ],
    )
    .into()
}

struct Answerer {
    count: Arc<AtomicUsize>,
    faults: HashMap<usize, Fault>,
    always: Option<Fault>,
    delay: Duration,
}

impl Respond for Answerer {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let k = self.count.fetch_add(1, Ordering::SeqCst);
        if let Some(f) = self.always.as_ref().or(self.faults.get(&k)) {
            return f.response();
        }
        let body: serde_json::Value = serde_json::from_slice(&req.body).expect("JSON request");
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        completion(&answer(&messages)).set_delay(self.delay)
    }
}

pub struct MockLlm {
    server: MockServer,
    requests: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl MockLlm {
    /// `faults[i]` answers the i-th request (from 0); `always` answers every request.
    pub fn start(faults: &[(usize, Fault)], always: Option<Fault>, delay: Duration) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let server = rt.block_on(async {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .and(path("/v1/chat/completions"))
                .respond_with(Answerer {
                    count: count.clone(),
                    faults: faults.iter().cloned().collect(),
                    always,
                    delay,
                })
                .mount(&server)
                .await;
            server
        });
        Self {
            server,
            requests: count,
            _rt: rt,
        }
    }

    pub fn url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }

    /// Chat requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}
