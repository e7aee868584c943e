#!/usr/bin/env python3
"""Writes a Qwen2.5-1.5B-Instruct-sized model with random weights (f16 safetensors, ~3.1 GB)
into the folder given, for `cargo bench --bench local_llm`: the architecture of the default
local LLM (config from the published Qwen/Qwen2.5-1.5B-Instruct config.json) with the tiny
fixture's tokenizer and chat template (the Hub tokenizer cannot be fetched here; ids stay
below its vocabulary, so the model is exercised at full size).

    python3 tools/make_llm_bench_model.py /tmp/qwen2.5-1.5b-random
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models" / "qwen2_tiny"
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "sliding_window": 32768, "max_window_layers": 21, "use_sliding_window": False,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = CONFIG
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (0.02 * torch.randn(*s, generator=g)).half()
    w = {"model.embed_tokens.weight": rnd(c["vocab_size"], h), "model.norm.weight": torch.ones(h).half()}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        w |= {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.q_proj.bias": rnd(h),
              p + "self_attn.k_proj.weight": rnd(kv, h), p + "self_attn.k_proj.bias": rnd(kv),
              p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.v_proj.bias": rnd(kv),
              p + "self_attn.o_proj.weight": rnd(h, h),
              p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
              p + "mlp.down_proj.weight": rnd(h, i),
              p + "input_layernorm.weight": torch.ones(h).half(),
              p + "post_attention_layernorm.weight": torch.ones(h).half()}
    save_file(w, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(c, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(FIXTURE / f, out / f)
    print(f"wrote {out}: {sum(v.numel() for v in w.values()) / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main(sys.argv[1])
