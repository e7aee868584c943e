//! The API summariser against the in-process mock: Retry-After is honoured, refusals are
//! not retried, answers are cached, and the concepts come out cleaned.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::llm::{Fault, MockLlm};
use dnd::config::Secret;
use dnd::summarise::{
    self, AnswerCache, ApiLlm, ApiOptions, ConceptEvent, ConceptOptions, InFlight, Llm, LlmError,
    Summariser,
};

fn api(url: String, retries: u32) -> ApiLlm {
    ApiLlm::new(ApiOptions {
        url,
        model: "mock".into(),
        api_key: Secret::from("sk-test-secret-value".to_string()),
        timeout: Duration::from_millis(500),
        retries,
        backoff: Duration::from_millis(10),
        concurrency: 2,
    })
    .unwrap()
}

#[derive(Default)]
struct MemoryCache(Mutex<Vec<(String, String, String)>>);

impl AnswerCache for MemoryCache {
    fn get(&self, model: &str, prompt: &str) -> Option<String> {
        let v = self.0.lock().unwrap();
        v.iter()
            .find(|(m, p, _)| m == model && p == prompt)
            .map(|(_, _, a)| a.clone())
    }
    fn put(&self, model: &str, prompt: &str, answer: &str) {
        self.0
            .lock()
            .unwrap()
            .push((model.into(), prompt.into(), answer.into()));
    }
}

/// What a summariser borrows: the endpoint at `url` (no retries), an empty cache, no prompt
/// in flight.
struct Parts {
    llm: ApiLlm,
    cache: MemoryCache,
    in_flight: InFlight,
}

impl Parts {
    fn new(url: String) -> Self {
        Self {
            llm: api(url, 0),
            cache: MemoryCache::default(),
            in_flight: InFlight::default(),
        }
    }

    fn summariser(&self) -> Summariser<'_> {
        Summariser {
            llm: &self.llm,
            cache: &self.cache,
            in_flight: &self.in_flight,
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

#[test]
fn retry_after_is_honoured() {
    let mock = MockLlm::start(&[(0, Fault::RateLimited)], None, Duration::ZERO);
    let llm = api(mock.url(), 2);
    let msgs = summarise::simplify_prompt("a red car");
    let t0 = Instant::now();
    let answer = block_on(llm.chat(&msgs, 0.3, &|_| {})).unwrap();
    // The mock asks for 1 s; our own backoff would have waited ~10 ms.
    assert!(
        t0.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t0.elapsed()
    );
    assert!(!answer.is_empty());
    assert_eq!(mock.requests(), 2);
}

#[test]
fn failures_say_what_to_fix_and_only_transient_ones_are_retried() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let llm = api(format!("http://127.0.0.1:{port}/nothing"), 0);
    let err = block_on(llm.chat(&summarise::simplify_prompt("x"), 0.3, &|_| {})).unwrap_err();
    assert!(
        matches!(err, LlmError::Unreachable { attempts: 1, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("--llm-url") && !msg.contains("sk-test"),
        "{msg}"
    );

    // Every request 500: retried, then reported with the status and the attempts.
    let mock = MockLlm::start(&[], Some(Fault::ServerError), Duration::ZERO);
    let err = block_on(api(mock.url(), 2).chat(&summarise::simplify_prompt("x"), 0.3, &|_| {}))
        .unwrap_err();
    assert!(
        matches!(
            err,
            LlmError::Busy {
                status: 500,
                attempts: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(mock.requests(), 3);

    // A wrong key is final at once, and the key never shows.
    let mock = MockLlm::start(&[], Some(Fault::Unauthorized), Duration::ZERO);
    let err = block_on(api(mock.url(), 3).chat(&summarise::simplify_prompt("x"), 0.3, &|_| {}))
        .unwrap_err();
    assert!(
        matches!(err, LlmError::Refused { status: 401, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("OPENAI_API_KEY") && !msg.contains("sk-test"),
        "{msg}"
    );
    assert_eq!(mock.requests(), 1);
}

#[test]
fn concepts_are_cleaned_and_answers_cached() {
    let mock = MockLlm::start(&[], None, Duration::ZERO);
    let parts = Parts::new(mock.url());
    let s = parts.summariser();
    let captions: Vec<String> = [
        "a red car on a road",
        "a striped shirt",
        "a dog on grass",
        "blue sky over a field",
    ]
    .map(String::from)
    .to_vec();
    let opts = ConceptOptions::default();
    let events = Mutex::new(Vec::new());
    let on_event = |e| events.lock().unwrap().push(e);
    let first = block_on(summarise::concepts(&s, &captions, &opts, &on_event)).unwrap();
    assert_eq!(first.simplified.len(), 4);
    assert!(first.simplified.iter().all(|s| s
        .as_deref()
        .is_some_and(|s| !s.contains('"') && !s.ends_with('.'))));
    assert_eq!(first.answers.len(), 5);
    assert!(!first.candidates.is_empty());
    for c in &first.candidates {
        assert_eq!(c, &c.to_lowercase());
        assert!(
            !c.contains(':') && !c.contains(',') && !c.ends_with('.'),
            "{c}"
        );
    }
    if first.candidates.iter().any(|c| c == "floral designs") {
        assert!(first
            .candidates
            .iter()
            .any(|c| c == "floral designs background"));
    }
    let events = events.into_inner().unwrap();
    let finished = |e: &&ConceptEvent| !matches!(e, ConceptEvent::Text { .. });
    assert_eq!(events.iter().filter(finished).count(), 4 + 5);
    // Every call's text arrived before its result: one piece per answer from an endpoint.
    let texts = events.len() - 4 - 5;
    assert!((4 + 5..=4 + 5 + 5).contains(&texts), "{texts} text events");
    let asked = mock.requests();
    let second = block_on(summarise::concepts(&s, &captions, &opts, &|_| {})).unwrap();
    assert_eq!(second, first);
    assert_eq!(mock.requests(), asked, "a rerun asks nothing");
}

#[test]
fn a_reasoning_models_thinking_is_not_a_concept() {
    let mock = MockLlm::start(&[], Some(Fault::Reasoning), Duration::ZERO);
    let parts = Parts::new(mock.url());
    let s = parts.summariser();
    let captions = vec!["a red car".to_string(), "a red dress".to_string()];
    let out = block_on(summarise::concepts(
        &s,
        &captions,
        &ConceptOptions::default(),
        &|_| {},
    ))
    .unwrap();
    assert!(
        out.simplified
            .iter()
            .all(|s| s.as_deref() == Some("Red objects")),
        "{out:?}"
    );
    assert_eq!(out.candidates, ["red objects"]);
    // Reasoning the token limit cut off answers nothing, and the error says what to do.
    let mock = MockLlm::start(&[], Some(Fault::ReasoningCutOff), Duration::ZERO);
    let parts = Parts::new(mock.url());
    let s = parts.summariser();
    let msg = block_on(summarise::concepts(
        &s,
        &captions,
        &ConceptOptions::default(),
        &|_| {},
    ))
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("empty") && msg.contains("--llm-max-tokens"),
        "{msg}"
    );
}

#[test]
fn a_prompt_asked_again_while_in_flight_waits_for_that_answer() {
    let prompt = summarise::simplify_prompt("a dog on grass");
    let asked = |mock: &MockLlm, callers: usize| {
        let parts = Parts::new(mock.url());
        let s = parts.summariser();
        let seen = Mutex::new(Vec::new());
        let on_text = |t: &str| seen.lock().unwrap().push(t.to_string());
        let answers = block_on(futures::future::join_all(
            (0..callers).map(|_| s.ask(&prompt, 0.3, &on_text)),
        ));
        (answers, seen.into_inner().unwrap())
    };
    // Three at once: one call, three answers, each streamed to its caller.
    let mock = MockLlm::start(&[], None, Duration::from_millis(200));
    let (answers, seen) = asked(&mock, 3);
    assert_eq!(mock.requests(), 1);
    let first = answers[0].as_ref().unwrap();
    assert!(answers.iter().all(|a| a.as_ref().ok() == Some(first)));
    assert_eq!(seen, vec![first.clone(); 3]);
    // The first call refused: the one waiting asks in its turn and gets its answer.
    let mock = MockLlm::start(
        &[(0, Fault::Unauthorized)],
        None,
        Duration::from_millis(200),
    );
    let (answers, _) = asked(&mock, 2);
    assert_eq!(mock.requests(), 2);
    assert!(
        matches!(answers[0], Err(LlmError::Refused { .. })),
        "{answers:?}"
    );
    assert!(answers[1].is_ok(), "{answers:?}");
}
