#!/usr/bin/env python3
"""The PyTorch side of `cargo bench --bench local_llm`: transformers' Qwen2 on the same random
model folder, the same prompt (rendered by the folder's chat template), greedy, CPU f32.

    python3 tools/bench_llm_torch.py /tmp/qwen2.5-1.5b-random
"""
import sys
import time

import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

NEW_TOKENS, RUNS = 32, 3
CAPTIONS = ["a red background", "a striped shirt", "a dog on the grass", "blue sky", "a red car",
            "a wooden table", "a purple flower", "a brick wall", "a plate of food", "a white boat"]
TASK = ("State one coherent and concise concept label that is 1-5 words long that can semantically summarize "
        "and represent most, not necessarily all, of the conceptual similarities in the following descriptions: ")


def main(path):
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(path)
    msgs = [
        {"role": "user", "content": TASK + "a purple background with a very soft texture., a brown background with a diagonal pattern of lines and lines., a white windmill with a red door and a red door in the middle of the picture., a beige background with a rough texture of linen., a beige background with a rough texture and a very soft texture."},
        {"role": "assistant", "content": "multicolored textiles"},
        {"role": "user", "content": TASK + "a little girl is sitting in a red tractor with the word sofy on the front., a toy car sits on a red ottoman in a play room., a red dress with silver studs and a silver belt., a red chevrolet camaro is on display at a car show., a red spool of a cable with the word red on it."},
        {"role": "assistant", "content": "red-themed scenes"},
        {"role": "user", "content": "Only state your answer without a period and quotation marks and do not simply repeat the descriptions. " + TASK + ", ".join(CAPTIONS)},
    ]
    ids = torch.tensor([tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False).input_ids])
    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(RUNS):
            t = time.perf_counter()
            model(ids)
            p = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            g = time.perf_counter() - t
            prefill.append(ids.shape[1] / p)
            decode.append((out.shape[1] - ids.shape[1] - 1) / max(g - p, 1e-9))
    med = lambda v: sorted(v)[len(v) // 2]
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads: load {load:.1f} s, {ids.shape[1]} prompt tokens, "
          f"prefill {med(prefill):.0f} tokens/s, generation {med(decode):.2f} tokens/s")


if __name__ == "__main__":
    main(sys.argv[1])
