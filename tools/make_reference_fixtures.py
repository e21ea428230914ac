#!/usr/bin/env python3
"""Builds tiny random Llama-family checkpoints and Hugging Face reference logits.

For every variant this writes, under tests/data/runtime/<variant>/:
  checkpoint/            a real Hugging Face checkpoint (config.json, model.safetensors,
                         generation_config.json; the first variant also a trained
                         byte-level BPE tokenizer.json + tokenizer_config.json)
  reference.json         prompt ids, greedy continuation, shapes, tolerances' inputs
  reference_logits.f32   float32 little-endian logits [positions, vocab]

The reference runs transformers in float32 with every matrix the pack stores as NF4
replaced by its NF4-dequantized value (bitsandbytes rules, /work/shared/docs/nf4.md,
double quant included) and the embedding rounded to bf16, exactly what the converter
writes (notes/design.md). Quantization is therefore not part of the comparison.

Usage: tools/make_reference_fixtures.py [--out tests/data/runtime] [--only NAME ...]
"""
import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

from fixture_common import NF4_CODE

PROMPT_LENGTH = 32
DECODE_STEPS = 16
# Greedy steps must not hinge on a near tie: a top-2 gap below this fraction of
# the logits' standard deviation makes the fixture fragile (the CUDA backend's
# bf16 activations move logits by about 1% of their spread), so the builder
# tries another seed.
MIN_GREEDY_MARGIN = 0.05

NF4_THRESHOLDS = np.array([
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011], dtype=np.float64)
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
NF4_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dynamic_map_signed():
    """bitsandbytes functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)."""
    data = []
    max_exponent_bits, total_bits = 7, 8
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2 ** total_bits
    data.sort()
    return np.array(data, dtype=np.float32)


def nf4_dequantized(weight, double_quant=True):
    """Value of weight after NF4 quantization + dequantization (fp32), bitsandbytes rules."""
    flat = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
    n = flat.size
    nb = (n + BLOCKSIZE - 1) // BLOCKSIZE
    padded = np.zeros(nb * BLOCKSIZE, dtype=np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nb, BLOCKSIZE)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(absmax > 0, np.float32(1.0) / absmax, np.float32(0.0)).astype(np.float32)
    normalized = np.clip(blocks * inverse[:, None], np.float32(-1), np.float32(1)).astype(np.float32)
    codes = (normalized.astype(np.float64)[:, :, None] > NF4_THRESHOLDS[None, None, :]).sum(axis=2)
    if double_quant:
        offset = np.float32(np.mean(absmax.astype(np.float64)))
        centered = (absmax - offset).astype(np.float32)
        nnb = (nb + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE
        cpad = np.zeros(nnb * NESTED_BLOCKSIZE, dtype=np.float32)
        cpad[:nb] = centered
        cblocks = cpad.reshape(nnb, NESTED_BLOCKSIZE)
        nested_absmax = np.abs(cblocks).max(axis=1).astype(np.float32)
        with np.errstate(divide="ignore"):
            ninv = np.where(nested_absmax > 0, np.float32(1.0) / nested_absmax, np.float32(0.0)).astype(np.float32)
        cnorm = (cblocks * ninv[:, None]).astype(np.float32).reshape(-1)[:nb]
        dmap = dynamic_map_signed()
        midpoints = (dmap[:-1].astype(np.float64) + dmap[1:].astype(np.float64)) / 2
        nested_codes = np.searchsorted(midpoints, cnorm.astype(np.float64), side="left")
        absmax = (dmap[nested_codes] * nested_absmax[np.arange(nb) // NESTED_BLOCKSIZE] + offset).astype(np.float32)
    values = (NF4_CODE[codes] * absmax[:, None]).astype(np.float32).reshape(-1)[:n]
    return values.reshape(weight.shape)


def bf16_round(array):
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16).float().numpy()


# ---- variants -----------------------------------------------------------------

def variants():
    return [
        # Every checkpoint carries a real byte-level BPE tokenizer trained to its vocabulary
        # (the converter requires one); the first also gets a text-prompt reference.
        # GQA, untied, default RoPE, bf16 checkpoint.
        dict(name="llama_gqa", cls="LlamaForCausalLM", dtype="bfloat16", text_test=True,
             config=dict(hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=384, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=256)),
        # MHA, tied head, linear RoPE scaling, float32 checkpoint (converter rounds the embedding).
        dict(name="llama_mha_tied_linear", cls="LlamaForCausalLM", dtype="float32",
             config=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=288, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         rope_theta=10000.0, max_position_embeddings=256,
                         rope_scaling=dict(rope_type="linear", factor=2.0))),
        # llama3 RoPE scaling with wavelengths in all three regions (original context 64).
        dict(name="llama3_rope", cls="LlamaForCausalLM", dtype="bfloat16",
             config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         rope_theta=500000.0, max_position_embeddings=512,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=64))),
        # Qwen2: q/k/v biases, tied head.
        dict(name="qwen2_bias", cls="Qwen2ForCausalLM", dtype="bfloat16",
             config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=288, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, max_position_embeddings=256, use_sliding_window=False)),
        # Qwen3: q/k RMSNorm per head, head_dim * heads != hidden.
        dict(name="qwen3_qk_norm", cls="Qwen3ForCausalLM", dtype="bfloat16",
             config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=300, tie_word_embeddings=False,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=256,
                         use_sliding_window=False)),
        # Mistral with a sliding window shorter than the 48 positions compared.
        dict(name="mistral_sliding_window", cls="MistralForCausalLM", dtype="bfloat16",
             config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=296, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=256, sliding_window=16)),
    ]


TOKENIZER_CORPUS = """
The quick brown fox jumps over the lazy dog. A layer pack keeps one file per layer, so a
runtime can stream the weights of a model that does not fit in memory. Each layer is read
with one call, copied with one transfer, and used in place. Numbers like 12, 345 and 6789
appear too, as do questions: what is the capital of France? Paris is the capital of France.
Hello, world! Hello again, friend. Once upon a time there was a small model that learned to
count: one, two, three, four, five, six, seven, eight, nine, ten.
"""
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def build_tokenizer(vocab_size, directory):
    """A real byte-level BPE tokenizer (Llama 3 style), trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([TOKENIZER_CORPUS] * 4, trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)])
    assert tokenizer.get_vocab_size() <= vocab_size
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_bos_token=True,
                  chat_template=CHAT_TEMPLATE, model_max_length=256, tokenizer_class="PreTrainedTokenizerFast",
                  clean_up_tokenization_spaces=False)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tokenizer


def randomize_(model, seed):
    """Random weights with enough spread that logits are well separated; norms and biases
    random too so that a runtime ignoring them fails."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith(".bias"):
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
            elif "embed_tokens" in name:
                parameter.copy_(1.0 * torch.randn(parameter.shape, generator=generator))
            else:
                fan_in = parameter.shape[-1]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in))


def hf_v4_config_keys(config_path, variant):
    """transformers 5 writes rope_parameters; published checkpoints carry rope_theta /
    rope_scaling / torch_dtype. Write both so the converter sees what real checkpoints have."""
    with open(config_path) as f:
        config = json.load(f)
    config["rope_theta"] = variant["config"]["rope_theta"]
    scaling = variant["config"].get("rope_scaling")
    if scaling:
        config["rope_scaling"] = dict(scaling, type=scaling["rope_type"])
    else:
        config["rope_scaling"] = None
    config["torch_dtype"] = variant["dtype"]
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def build_variant(variant, out_root, seed):
    import transformers
    name = variant["name"]
    directory = os.path.join(out_root, name)
    checkpoint = os.path.join(directory, "checkpoint")
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(checkpoint)

    config_kwargs = dict(variant["config"])
    rope_scaling = config_kwargs.pop("rope_scaling", None)
    rope_parameters = dict(rope_type="default", rope_theta=config_kwargs.pop("rope_theta"))
    if rope_scaling:
        rope_parameters.update(rope_scaling)
    config_class = getattr(transformers, variant["cls"].replace("ForCausalLM", "Config"))
    tokenizer = build_tokenizer(config_kwargs["vocab_size"], checkpoint)
    bos, eos = tokenizer.token_to_id("<|begin_of_text|>"), tokenizer.token_to_id("<|eot_id|>")
    config = config_class(**config_kwargs, rope_parameters=rope_parameters, bos_token_id=bos, eos_token_id=eos,
                          pad_token_id=None, attention_dropout=0.0)
    if variant["cls"].startswith("Qwen2"):
        config.attention_bias = True  # informational; Qwen2 always has q/k/v biases
    torch.manual_seed(seed)
    model = getattr(transformers, variant["cls"])(config)
    randomize_(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    dtype = getattr(torch, variant["dtype"])
    model = model.to(dtype)
    model.save_pretrained(checkpoint, safe_serialization=True)
    with open(os.path.join(checkpoint, "generation_config.json"), "w") as f:
        json.dump(dict(bos_token_id=bos, eos_token_id=[eos], do_sample=False), f, indent=2)
    hf_v4_config_keys(os.path.join(checkpoint, "config.json"), variant)

    # Reference model: float32, the pack's values substituted.
    reference = getattr(transformers, variant["cls"])(config).float()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False)
    with torch.no_grad():
        for module_name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear):
                role = module_name.split(".")[-1]
                quantized = role in NF4_ROLES or (role == "lm_head" and not config.tie_word_embeddings)
                if quantized:
                    module.weight.copy_(torch.from_numpy(nf4_dequantized(module.weight.numpy())))
        embedding = reference.get_input_embeddings().weight
        embedding.copy_(torch.from_numpy(bf16_round(embedding.numpy())))
        if config.tie_word_embeddings:
            assert reference.lm_head.weight.data_ptr() == embedding.data_ptr()
    reference.config._attn_implementation = "eager"
    reference.eval()

    rng = np.random.default_rng(seed)
    prompt = [int(x) for x in rng.integers(0, config.vocab_size, PROMPT_LENGTH)]
    logits_rows, generated, margins = greedy_reference(reference, prompt)
    result = dict(
        variant=name, architecture=variant["cls"], source_dtype=variant["dtype"], seed=seed,
        transformers_version=transformers.__version__, torch_version=torch.__version__,
        prompt_ids=prompt, generated_ids=generated, vocab_size=config.vocab_size,
        positions=len(logits_rows), logits_file="reference_logits.f32",
        min_greedy_margin=float(min(margins)),
        min_greedy_margin_over_logit_std=float(min(margins) / np.std(logits_rows)),
        note="logits row i = next-token logits after feeding token i of prompt_ids + generated_ids; "
             "float32, NF4-dequantized matrices, bf16 embedding")
    if variant.get("text_test"):
        result["text_test"] = text_reference(reference, tokenizer, checkpoint)
    np.asarray(logits_rows, dtype="<f4").tofile(os.path.join(directory, "reference_logits.f32"))
    with open(os.path.join(directory, "reference.json"), "w") as f:
        json.dump(result, f, indent=1)
    return min(margins) / float(np.std(logits_rows))


def greedy_reference(model, prompt):
    """Prefill the prompt, then DECODE_STEPS greedy steps with the KV cache; logits at every
    position (prompt + generated: PROMPT_LENGTH + DECODE_STEPS rows)."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        rows = [r.numpy().copy() for r in out.logits[0].float()]
        cache = out.past_key_values
        generated, margins = [], []
        for step in range(DECODE_STEPS):
            last = torch.from_numpy(rows[-1])
            top2 = torch.topk(last, 2).values
            margins.append(float(top2[0] - top2[1]))
            token = int(torch.argmax(last))
            generated.append(token)
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[0, -1].float().numpy().copy())
        # Same logits from a full forward pass without the cache: guards the reference itself.
        full = model(torch.tensor([prompt + generated])).logits[0].float().numpy()
        stacked = np.stack(rows)
        error = np.linalg.norm(full - stacked) / np.linalg.norm(full)
        assert error < 1e-5, f"reference cache/no-cache mismatch {error}"
    return stacked, generated, margins


def text_reference(model, tokenizer, checkpoint):
    """For the command-line test: a text prompt, its ids (tokenizers library), the greedy
    continuation and its decoded text."""
    from tokenizers import Tokenizer
    hf_tokenizer = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
    text = "Once upon a time there was a small model"
    ids = hf_tokenizer.encode(text, add_special_tokens=True).ids
    steps = 12
    with torch.no_grad():
        sequence = list(ids)
        for _ in range(steps):
            logits = model(torch.tensor([sequence])).logits[0, -1]
            sequence.append(int(torch.argmax(logits)))
    generated = sequence[len(ids):]
    eos = hf_tokenizer.token_to_id("<|eot_id|>")
    shown = generated[:generated.index(eos)] if eos in generated else generated
    return dict(prompt=text, prompt_ids=ids, steps=steps, generated_ids=generated, eos_ids=[eos],
                generated_text=hf_tokenizer.decode(shown, skip_special_tokens=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "..", "tests", "data", "runtime"))
    parser.add_argument("--only", nargs="*", help="variant names to rebuild")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    for variant in variants():
        if args.only and variant["name"] not in args.only:
            continue
        for attempt in range(60):
            seed = 1234 + 97 * attempt
            margin = build_variant(variant, args.out, seed)
            if margin >= MIN_GREEDY_MARGIN:
                break
            print(f"{variant['name']}: seed {seed} has a greedy margin of {margin:.2e} logit std; trying another", file=sys.stderr)
        else:
            raise SystemExit(f"{variant['name']}: no seed with a safe greedy margin")
        print(f"{variant['name']}: seed {seed}, min greedy margin {margin:.3g} logit std")


if __name__ == "__main__":
    main()
