#!/usr/bin/env python3
"""The alternative users have today, measured on the same machine and shapes as
layerpack's benchmarks: Hugging Face transformers with accelerate offloading
(device_map="auto", max_memory capped at a VRAM budget; bf16, since
bitsandbytes is not installed on the GPU machine), and the same model fully
resident. Prints one JSON object per scenario (per-token seconds, load time,
peak GPU memory).

  python3 tools/bench/transformers_baseline.py --make-checkpoint /tmp/llama8b --shape llama-3-8b
  python3 tools/bench/transformers_baseline.py --checkpoint /tmp/llama8b --vram-gib 6 --tokens 8
"""
import argparse
import json
import os
import statistics
import sys
import time

SHAPES = {
    # Llama-3-8B: the shape the gpu-machine notes measured AirLLM and accelerate on.
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
}


def make_checkpoint(path, shape):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    # Built on the GPU when there is one (initialising 8B parameters on the CPU is slow).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Random, non-zero weights at a realistic scale.
    for p in model.parameters():
        p.data.normal_(0.0, 0.02)
    model.save_pretrained(path, max_shard_size="4GB")
    print(json.dumps({"made_checkpoint": path, "shape": shape}), flush=True)


def run(checkpoint, vram_gib, tokens, prompt_tokens, resident):
    import torch
    from transformers import AutoModelForCausalLM
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if resident:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map="cuda")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch.bfloat16, device_map="auto",
            max_memory={0: f"{vram_gib}GiB", "cpu": "100GiB"})
    torch.cuda.synchronize()
    load_seconds = time.perf_counter() - t0
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=g).to("cuda")
    step_times = []
    with torch.no_grad():
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        torch.cuda.synchronize()
        prefill_seconds = time.perf_counter() - t
        past = out.past_key_values
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(tokens):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(input_ids=next_id, past_key_values=past, use_cache=True)
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t)
            past = out.past_key_values
    steady = step_times[1:] if len(step_times) > 2 else step_times
    return {
        "tool": f"transformers {__import__('transformers').__version__}" + (" resident" if resident else " + accelerate offload"),
        "vram_gib_cap": None if resident else vram_gib,
        "load_seconds": round(load_seconds, 3),
        "prefill_seconds": round(prefill_seconds, 4),
        "prompt_tokens": prompt_tokens,
        "seconds_per_token_median": round(statistics.median(steady), 5),
        "decode_steps": tokens,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "gpu": torch.cuda.get_device_name(0),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-checkpoint", help="write a random bf16 checkpoint here and exit")
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--checkpoint")
    ap.add_argument("--vram-gib", type=float, default=6.0)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--resident", action="store_true", help="load the whole model on the GPU")
    a = ap.parse_args()
    if a.make_checkpoint:
        make_checkpoint(a.make_checkpoint, a.shape)
        return 0
    if not a.checkpoint:
        ap.error("--checkpoint or --make-checkpoint is required")
    print(json.dumps(run(a.checkpoint, a.vram_gib, a.tokens, a.prompt_tokens, a.resident)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
