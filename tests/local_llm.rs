//! The local summariser against transformers on tiny random models of the three families it
//! runs, written by transformers (tools/gen_llm_fixtures.py): Qwen2, Qwen3 and Llama 3 (the
//! last with its weights in shards). For each, the chat template renders to the same text as
//! `apply_chat_template`, tokenizes to the same ids, and greedy decoding gives the same tokens,
//! stopping on the same stop token.

mod common;

use std::sync::Mutex;

use candle_core::{DType, Device};
use common::{fixtures, resolve_fixture};
use dnd::hub::Role;
use dnd::summarise::{Llm, LocalLlm, LocalOptions, Message, Speaker};

const FAMILIES: [&str; 3] = ["qwen2_tiny", "qwen3_tiny", "llama_tiny"];

fn load(name: &str) -> LocalLlm {
    let m = resolve_fixture(Role::Llm, name);
    LocalLlm::load(
        &m,
        &Device::Cpu,
        DType::F32,
        LocalOptions { max_new_tokens: 16 },
    )
    .unwrap()
}

fn reference(name: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixtures().join(format!("models/{name}.reference.json"))).unwrap();
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
    for name in FAMILIES {
        let llm = load(name);
        let reference = reference(name);
        let cases = reference["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 3);
        let mut stopped_early = 0;
        for case in cases {
            let text = llm.render(&messages(&case["messages"])).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{name}");
            let prompt = llm.encode(&text).unwrap();
            assert_eq!(prompt, ids(&case["ids"]), "{name}");
            let generated = llm.generate(&prompt, 0.0, 0, &mut |_| {}).unwrap();
            let expected = ids(&case["generated"]);
            assert_eq!(generated, expected, "{name}");
            stopped_early += usize::from(expected.len() < 16);
        }
        assert!(
            stopped_early >= 1,
            "{name}: the fixture exercises a stop token"
        );
    }
}

#[test]
fn chat_streams_the_answer_it_returns() {
    let llm = load("qwen2_tiny");
    let reference = reference("qwen2_tiny");
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

#[test]
fn a_model_of_another_family_or_unlike_its_config_is_a_clear_error() {
    let load_edited = |edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = tempfile::tempdir().unwrap();
        common::copy_dir(&fixtures().join("models/llama_tiny"), dir.path());
        let path = dir.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(&path, cfg.to_string()).unwrap();
        let m = common::resolve_dir(Role::Llm, dir.path());
        match LocalLlm::load(
            &m,
            &Device::Cpu,
            DType::F32,
            LocalOptions { max_new_tokens: 4 },
        ) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    };
    let msg = load_edited(&|c| c["model_type"] = "gemma2".into());
    assert!(
        msg.contains("\"gemma2\"") && msg.contains("qwen3") && msg.contains("config.json"),
        "{msg}"
    );
    // candle's Llama panics on a missing tensor: the layer config.json adds is named instead.
    let msg = load_edited(&|c| c["num_hidden_layers"] = 3.into());
    assert!(
        msg.contains("model.layers.2.self_attn.q_proj.weight is missing"),
        "{msg}"
    );
    let msg = load_edited(&|c| c["intermediate_size"] = 96.into());
    assert!(
        msg.contains("mlp.gate_proj.weight has shape [128, 64]"),
        "{msg}"
    );
    let msg = load_edited(&|c| c["rope_scaling"]["rope_type"] = "yarn".into());
    assert!(msg.contains("yarn") && msg.contains("llama3"), "{msg}");
}
