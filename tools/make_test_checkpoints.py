#!/usr/bin/env python3
"""Fixtures for the converter tests, written with the reference libraries.

  reference_writer  tests/data/converter/reference_writer.safetensors, written by
                    safetensors.numpy.save_file, so the C++ reader is checked
                    against the official writer, not only against our own.
  configs           tests/data/converter/configs/*.json: config.json files as
                    transformers itself serializes them (4.x-style rope_scaling
                    and, with transformers >= 5, rope_parameters).
  large             a 70B-shaped checkpoint with only the first N layers (for the
                    bounded-memory / throughput measurement; not committed).
"""
import argparse
import json
import os
import sys

import numpy as np


def reference_writer(out_dir):
    from safetensors.numpy import save_file
    tensors = {
        "weight_f32": (np.arange(12, dtype=np.float32) * 0.5).reshape(3, 4),
        "weight_f16": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3),
        "bytes_u8": np.arange(7, dtype=np.uint8),
    }
    path = os.path.join(out_dir, "reference_writer.safetensors")
    save_file(tensors, path, metadata={"producer": "make_test_checkpoints.py"})
    print("wrote", path)


def configs(out_dir):
    import transformers
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, MistralConfig
    os.makedirs(os.path.join(out_dir, "configs"), exist_ok=True)
    major = int(transformers.__version__.split(".")[0])
    llama31 = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=1000, max_position_embeddings=131072,
                          rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                          tie_word_embeddings=False,
                          **({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}}
                             if major >= 5 else
                             {"rope_theta": 500000.0,
                              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    llama31.architectures = ["LlamaForCausalLM"]
    qwen2 = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    qwen2.architectures = ["Qwen2ForCausalLM"]
    qwen3 = Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=1000)
    qwen3.architectures = ["Qwen3ForCausalLM"]
    mistral = MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1000, sliding_window=4096)
    mistral.architectures = ["MistralForCausalLM"]
    for name, cfg in [("llama31", llama31), ("qwen2", qwen2), ("qwen3", qwen3), ("mistral", mistral)]:
        path = os.path.join(out_dir, "configs", f"{name}.transformers{major}.json")
        cfg.to_json_file(path)
        print("wrote", path)


def large(out_dir, layers, preset):
    """70B-shaped (Llama 3.1 70B) checkpoint with `layers` decoder layers, bf16, one shard per layer."""
    import torch
    from safetensors.torch import save_file
    shapes = {"llama-3.1-70b": (8192, 28672, 64, 8, 128256), "llama-3-8b": (4096, 14336, 32, 8, 128256)}[preset]
    hidden, inter, heads, kv, vocab = shapes
    hd = hidden // heads
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    weight_map = {}
    total = 0
    n_shards = layers + 2

    def save(idx, tensors):
        nonlocal total
        name = f"model-{idx:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        print("wrote", name, flush=True)

    save(1, {"model.embed_tokens.weight": rnd(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        save(i + 2, {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(heads * hd, hidden),
            p + "self_attn.k_proj.weight": rnd(kv * hd, hidden),
            p + "self_attn.v_proj.weight": rnd(kv * hd, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
            p + "mlp.gate_proj.weight": rnd(inter, hidden),
            p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
        })
    save(n_shards, {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": rnd(vocab, hidden)})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
              "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
              "torch_dtype": "bfloat16"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["reference_writer", "configs", "large"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "converter"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--preset", default="llama-3.1-70b")
    args = parser.parse_args()
    if args.what == "reference_writer":
        reference_writer(args.out)
    elif args.what == "configs":
        configs(args.out)
    else:
        large(args.out, args.layers, args.preset)


if __name__ == "__main__":
    sys.exit(main())
