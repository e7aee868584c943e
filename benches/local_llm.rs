//! CPU speed of the local summariser at the default model's size (Qwen2.5-1.5B-Instruct
//! architecture, random weights): load time, prompt (prefill) tokens/s and generated tokens/s
//! on a DnD summary prompt. The model folder comes from tools/make_llm_bench_model.py; the
//! PyTorch side is tools/bench_llm_torch.py. docs/PERFORMANCE.md has the numbers.
//!
//!     python3 tools/make_llm_bench_model.py /tmp/qwen2.5-1.5b-random
//!     DND_BENCH_LLM=/tmp/qwen2.5-1.5b-random cargo bench --bench local_llm

use std::time::Instant;

use candle_core::{DType, Device};
use dnd::hub::{self, HubOptions, ModelSource, Role};
use dnd::summarise::{summary_prompt, LocalLlm, LocalOptions};

const NEW_TOKENS: usize = 32;
const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let Some(dir) = std::env::var_os("DND_BENCH_LLM") else {
        eprintln!("DND_BENCH_LLM is not set: make a model with tools/make_llm_bench_model.py DIR and point it there");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let src = ModelSource::Local(dir.into());
    let model = rt
        .block_on(hub::resolve(Role::Llm, &src, &HubOptions::default()))
        .unwrap();
    let t0 = Instant::now();
    let llm = LocalLlm::load(
        &model,
        &Device::Cpu,
        DType::F32,
        LocalOptions {
            max_new_tokens: NEW_TOKENS,
        },
    )
    .unwrap();
    let load = t0.elapsed().as_secs_f64();

    let captions: Vec<String> = [
        "a red background",
        "a striped shirt",
        "a dog on the grass",
        "blue sky",
        "a red car",
        "a wooden table",
        "a purple flower",
        "a brick wall",
        "a plate of food",
        "a white boat",
    ]
    .map(String::from)
    .to_vec();
    let prompt = llm
        .encode(&llm.render(&summary_prompt(&captions)).unwrap())
        .unwrap();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut first = None;
        let out = llm
            .generate(&prompt, 0.0, 0, &mut |ids| {
                if ids.len() == 1 {
                    first = Some(start.elapsed().as_secs_f64());
                }
            })
            .unwrap();
        let total = start.elapsed().as_secs_f64();
        let first = first.expect("one token at least");
        prefill.push(prompt.len() as f64 / first);
        decode.push((out.len() - 1) as f64 / (total - first));
    }
    println!(
        "local LLM (CPU f32, {} prompt tokens, {NEW_TOKENS} new): load {load:.1} s, prefill {:.0} tokens/s, generation {:.2} tokens/s (median of {RUNS})",
        prompt.len(),
        median(prefill),
        median(decode)
    );
}
