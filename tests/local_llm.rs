//! The local summariser against transformers on a tiny random Qwen2 written by transformers
//! (tools/gen_llm_fixtures.py): the chat template renders to the same text as
//! `apply_chat_template`, tokenizes to the same ids, and greedy decoding gives the same tokens,
//! stopping on the same stop token.

mod common;

use std::sync::Mutex;

use candle_core::{DType, Device};
use common::{fixtures, resolve_fixture};
use dnd::hub::Role;
use dnd::summarise::{Llm, LocalLlm, LocalOptions, Message, Speaker};

fn load() -> LocalLlm {
    let m = resolve_fixture(Role::Llm, "qwen2_tiny");
    LocalLlm::load(
        &m,
        &Device::Cpu,
        DType::F32,
        LocalOptions { max_new_tokens: 16 },
    )
    .unwrap()
}

fn reference() -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixtures().join("models/qwen2_tiny.reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn messages(v: &serde_json::Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            role: match m["role"].as_str().unwrap() {
                "system" => Speaker::System,
                "user" => Speaker::User,
                _ => Speaker::Assistant,
            },
            content: m["content"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn template_tokens_and_greedy_tokens_equal_transformers() {
    let llm = load();
    let reference = reference();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let mut stopped_early = 0;
    for case in cases {
        let text = llm.render(&messages(&case["messages"])).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap());
        let prompt = llm.encode(&text).unwrap();
        assert_eq!(prompt, ids(&case["ids"]));
        let generated = llm.generate(&prompt, 0.0, 0, &mut |_| {}).unwrap();
        let expected = ids(&case["generated"]);
        assert_eq!(generated, expected);
        stopped_early += usize::from(expected.len() < 16);
    }
    assert!(stopped_early >= 1, "the fixture exercises a stop token");
}

#[test]
fn chat_streams_the_answer_it_returns() {
    let llm = load();
    let reference = reference();
    let case = &reference["cases"][2];
    let msgs = messages(&case["messages"]);
    let pieces = Mutex::new(Vec::<String>::new());
    let on_text = |t: &str| pieces.lock().unwrap().push(t.to_string());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(llm.chat(&msgs, 0.0, &on_text)).unwrap();
    assert_eq!(answer, case["decoded"].as_str().unwrap());
    let pieces = pieces.into_inner().unwrap();
    assert!(pieces.len() > 1, "streamed in pieces: {pieces:?}");
    assert_eq!(pieces.concat(), answer);
    assert!(llm.model().starts_with("local:"));
    // Sampling is seeded by the prompt: the same prompt gives the same answer.
    let a = rt.block_on(llm.chat(&msgs, 0.7, &|_| {})).unwrap();
    let b = rt.block_on(llm.chat(&msgs, 0.7, &|_| {})).unwrap();
    assert_eq!(a, b);
}
