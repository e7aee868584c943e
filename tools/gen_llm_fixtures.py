#!/usr/bin/env python3
"""Writes the local-LLM fixtures under tests/fixtures/models: qwen2_tiny, qwen3_tiny and
llama_tiny, tiny random causal LMs of the three families dnd runs, saved by transformers in Hub
layout (config.json, the weights, generation_config.json, tokenizer.json, tokenizer_config.json
and the chat template; llama_tiny's weights in shards with their index), and beside each
NAME.reference.json with what transformers computes on it: each conversation rendered by
`apply_chat_template(add_generation_prompt=True)`, its token ids, and greedy `generate`.

Each tokenizer is a byte-level BPE trained here on the DnD prompts (the Hub's tokenizers cannot
be fetched on these machines) with its family's special tokens, and carries its family's chat
template: Qwen2.5-style, and Qwen3's and Llama 3.2's as their Hub folders ship them. One extra stop token is chosen so that `generate` stops on it for the first
conversation: our stop-token handling is checked against transformers'.

    pip install torch transformers tokenizers safetensors
    python3 tools/gen_llm_fixtures.py
"""
import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

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

# Qwen3's hybrid-thinking template as its Hub folders ship it (Qwen/Qwen3-0.6B ... 32B).
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Llama 3.2 Instruct's template as its Hub folders ship it.
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
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


def trained_bpe(specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def tokenizer(specials, template, **special_tokens):
    return PreTrainedTokenizerFast(tokenizer_object=trained_bpe(specials), chat_template=template,
                                   **special_tokens)


def scramble(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # Wider than the default init, so greedy decoding is far from ties.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def write(name, model, tok, stops, template_kwargs=None, shard=None):
    """Saves `model` and `tok` under `name`, with greedy generations of every conversation as
    name.reference.json. `stops` are the model's own end tokens; one more is chosen so that
    `generate` stops on it for the first conversation: our stop-token handling is checked
    against transformers'."""
    out = ROOT / name
    template_kwargs = template_kwargs or {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    prompts = []
    for conv in CONVERSATIONS:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **template_kwargs)
        ids = tok(text, add_special_tokens=False).input_ids
        prompts.append((conv, text, ids))
    # A stop token that greedy decoding of the first conversation reaches at its 4th new token.
    with torch.no_grad():
        free = model.generate(torch.tensor([prompts[0][2]]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=pad)
    stop = int(free[0, len(prompts[0][2]) + 3])
    eos = stops + ([stop] if stop not in stops else [])
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad,
                                               bos_token_id=model.config.bos_token_id, do_sample=False)
    cases = []
    for conv, text, ids in prompts:
        with torch.no_grad():
            out_ids = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        new = out_ids[0, len(ids):].tolist()
        cases.append({"messages": conv, "text": text, "ids": ids, "generated": new,
                      "decoded": tok.decode(new, skip_special_tokens=True)})
    if out.exists():
        shutil.rmtree(out)
    if shard:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    else:
        model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (ROOT / f"{name}.reference.json").write_text(json.dumps({"eos": eos, "cases": cases}, indent=1) + "\n")
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir())} bytes); stop token {stop}")
    for c in cases:
        print(len(c["generated"]), repr(c["decoded"]))
    return out


def write_qwen2():
    torch.manual_seed(0)
    tok = tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], TEMPLATE,
                    eos_token="<|im_end|>", pad_token="<|endoftext|>")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
                      rms_norm_eps=1e-6, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      bos_token_id=None, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    scramble(model)
    ids = tok.convert_tokens_to_ids
    write("qwen2_tiny", model, tok, [ids("<|im_end|>"), ids("<|endoftext|>")])


def write_qwen3():
    """Qwen3: q/k RMSNorm, a head size that is not hidden / heads, its hybrid-thinking template
    rendered with thinking off (as dnd renders it), untied output layer."""
    torch.manual_seed(0)
    tok = tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], QWEN3_TEMPLATE,
                    eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = tok.convert_tokens_to_ids
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=False,
                      rms_norm_eps=1e-6, eos_token_id=ids("<|im_end|>"), bos_token_id=ids("<|endoftext|>"),
                      pad_token_id=tok.pad_token_id)
    model = Qwen3ForCausalLM(cfg).eval()
    scramble(model)
    write("qwen3_tiny", model, tok, [ids("<|im_end|>"), ids("<|endoftext|>")],
          template_kwargs={"enable_thinking": False})


def write_llama():
    """Llama 3.x: its chat template (with the template's own date when none is given, as dnd
    renders it), Llama 3's scaled RoPE, an untied output layer, weights in shards, and the
    config in the form transformers 4 wrote for the Hub's Llama 3.2 (rope_scaling and a
    top-level rope_theta), which transformers 5 reads too."""
    torch.manual_seed(0)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = tokenizer(specials, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    ids = tok.convert_tokens_to_ids
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_parameters=rope, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      bos_token_id=ids("<|begin_of_text|>"), eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")])
    model = LlamaForCausalLM(cfg).eval()
    scramble(model)
    out = write("llama_tiny", model, tok, [ids("<|end_of_text|>"), ids("<|eot_id|>")],
                template_kwargs={"date_string": "26 Jul 2024"}, shard="150KB")
    config = json.loads((out / "config.json").read_text())
    theta = config.pop("rope_parameters").pop("rope_theta")
    config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config["rope_theta"] = theta
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    again = LlamaForCausalLM.from_pretrained(out).eval()
    probe = torch.tensor([list(range(40))])
    with torch.no_grad():
        assert torch.equal(again(probe).logits, model(probe).logits), "the rewritten config reads back the same"
    assert len(list(out.glob("model-*.safetensors"))) > 1, "the weights are sharded"


def main():
    write_qwen2()
    write_qwen3()
    write_llama()


if __name__ == "__main__":
    main()
