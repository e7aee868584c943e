#!/usr/bin/env python3
"""Writes the local-LLM fixture under tests/fixtures/models/qwen2_tiny: a tiny random Qwen2
causal LM saved by transformers in Hub layout (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json and the chat template), and
qwen2_tiny.reference.json with what transformers computes on it: each conversation rendered by
`apply_chat_template(add_generation_prompt=True)`, its token ids, and greedy `generate`.

The tokenizer is a byte-level BPE trained here on the DnD prompts (the Hub's Qwen tokenizer
cannot be fetched on these machines) with Qwen's special tokens, and carries a Qwen2.5-style
chat template. One extra stop token is chosen so that `generate` stops on it for the first
conversation: our stop-token handling is checked against transformers'.

    pip install torch transformers tokenizers safetensors
    python3 tools/gen_llm_fixtures.py
"""
import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
OUT = ROOT / "qwen2_tiny"

TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

CORPUS = [
    "State one coherent and concise concept label that is 1-5 words long that simplifies the following description",
    "Only state your answer without a period and quotation marks. Do not number your answer.",
    "semantically summarize and represent most, not necessarily all, of the conceptual similarities",
    "a purple background with a very soft texture. a brown background with a diagonal pattern of lines",
    "a little girl is sitting in a red tractor. a toy car sits on a red ottoman in a play room.",
    "multicolored textiles, red-themed scenes, a red background, a dog on the grass, blue sky",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
]

CONVERSATIONS = [
    [
        {"role": "user", "content": "State one coherent and concise concept label that simplifies: a red background with a red background."},
        {"role": "assistant", "content": "A red background"},
        {"role": "user", "content": "Only state your answer without a period and quotation marks. Simplify: a dog on the grass"},
    ],
    [
        {"role": "user", "content": "Summarize the conceptual similarities in the following descriptions: red cars, a red dress, a red spool"},
    ],
    [
        {"role": "system", "content": "You label neurons."},
        {"role": "user", "content": "blue sky, a white windmill, multicolored textiles"},
        {"role": "assistant", "content": "multicolored textiles"},
        {"role": "user", "content": "a beige background with a rough texture of linen"},
    ],
]


def tokenizer():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=TEMPLATE)


def main():
    torch.manual_seed(0)
    tok = tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
                      rms_norm_eps=1e-6, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      bos_token_id=None, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # Wider than the default init, so greedy decoding is far from ties.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    cases = []
    prompts = []
    for conv in CONVERSATIONS:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        prompts.append((conv, text, ids))
    # A stop token that greedy decoding of the first conversation reaches at its 4th new token.
    with torch.no_grad():
        free = model.generate(torch.tensor([prompts[0][2]]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=endoftext)
    stop = int(free[0, len(prompts[0][2]) + 3])
    eos = [im_end, endoftext] + ([stop] if stop not in (im_end, endoftext) else [])
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=endoftext,
                                               bos_token_id=None, do_sample=False)
    for conv, text, ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        new = out[0, len(ids):].tolist()
        cases.append({"messages": conv, "text": text, "ids": ids, "generated": new,
                      "decoded": tok.decode(new, skip_special_tokens=True)})

    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT, safe_serialization=True)
    tok.save_pretrained(OUT)
    (ROOT / "qwen2_tiny.reference.json").write_text(json.dumps({"eos": eos, "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT} ({sum(f.stat().st_size for f in OUT.iterdir())} bytes); stop token {stop}")
    for c in cases:
        print(len(c["generated"]), repr(c["decoded"]))


if __name__ == "__main__":
    main()
