#!/usr/bin/env python3
"""Convert a llama.cpp GGUF file of a Llama-architecture model (with a GPT-2
style byte-level BPE tokenizer) into a Hugging Face checkpoint directory:

  config.json, generation_config.json, model.safetensors (bf16),
  tokenizer.json, tokenizer_config.json

Every tensor is dequantized to float32 with gguf.quants.dequantize and rounded
to bf16 (round-to-nearest-even). llama.cpp's converter permutes the rows of
the Q and K projections for its interleaved rotary layout; this tool undoes
that, so the checkpoint uses Hugging Face's rotate-half convention.

Needs the PyPI packages gguf, numpy and tokenizers (no torch).

Usage: gguf_to_hf.py MODEL.gguf OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
    from gguf.quants import dequantize
except ImportError as error:  # pragma: no cover - environment problem
    sys.exit(f"gguf_to_hf: the 'gguf' Python package is missing or too old ({error}); "
             "install it with: python3 -m pip install gguf")

try:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
except ImportError as error:  # pragma: no cover - environment problem
    sys.exit(f"gguf_to_hf: the 'tokenizers' Python package is missing ({error}); "
             "install it with: python3 -m pip install tokenizers")


class ConversionError(Exception):
    """A problem with the input file; the message names the file and what is wrong."""


# GGUF token types (llama.cpp's llama_token_type / gguf.TokenType).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

BLOCK_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


# --------------------------------------------------------------------------
# Rotary layout
# --------------------------------------------------------------------------

def permute_rows_like_llama_cpp(weight: np.ndarray, head_count: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows: within
    each head, rows [first half | second half] become interleaved pairs
    (row 2j <- j, row 2j+1 <- j + head_dim/2). Used for checks only."""
    rows = weight.shape[0]
    return (weight.reshape(head_count, 2, rows // head_count // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def unpermute_rows_from_llama_cpp(weight: np.ndarray, head_count: int) -> np.ndarray:
    """Inverse of permute_rows_like_llama_cpp: interleaved pairs back to
    Hugging Face's rotate-half layout (first half of each head, then second)."""
    rows = weight.shape[0]
    if rows % (2 * head_count) != 0:
        raise ValueError(f"{rows} rows cannot be split into {head_count} heads of even size")
    return (weight.reshape(head_count, rows // head_count // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


# --------------------------------------------------------------------------
# bf16 and safetensors
# --------------------------------------------------------------------------

def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (nearest, ties to even), returned as uint16 bits."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError("tensor has NaN or infinite values")
    bits = values.view(np.uint32)
    rounding_bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding_bias) >> 16).astype(np.uint16)


def write_safetensors_bf16(path: Path, tensors: list[tuple[str, tuple[int, ...], object]]) -> None:
    """Writes a safetensors file of bf16 tensors, one tensor in memory at a time.

    tensors: (name, shape, produce) where produce() returns the float32 array.
    Written by hand because the safetensors package's numpy API cannot express
    bf16 (numpy has no bf16 dtype) and torch is not a dependency of this tool.
    Layout: u64 little-endian header length, JSON header (padded with spaces to
    a multiple of 8), then the raw little-endian data in header order.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        byte_count = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + byte_count]}
        offset += byte_count
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    partial_path = path.with_name(path.name + ".partial")
    with open(partial_path, "wb") as out:
        out.write(len(header_bytes).to_bytes(8, "little"))
        out.write(header_bytes)
        for name, shape, produce in tensors:
            values = produce()
            if tuple(values.shape) != tuple(shape):
                raise ConversionError(f"internal: {name} produced shape {values.shape}, expected {shape}")
            out.write(float32_to_bfloat16_bits(values).astype("<u2").tobytes())
    os.replace(partial_path, path)


# --------------------------------------------------------------------------
# GGUF reading
# --------------------------------------------------------------------------

class GgufModel:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as error:  # gguf raises ValueError/struct errors on bad files
            raise ConversionError(f"{path}: not a readable GGUF file ({error})") from error
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def field(self, key: str, default=None, required: bool = True):
        field = self.reader.fields.get(key)
        if field is None:
            if required and default is None:
                raise ConversionError(f"{self.path}: metadata key '{key}' is missing")
            return default
        return field.contents()

    def tensor_float32(self, name: str) -> np.ndarray:
        """Dequantized tensor in numpy (row-major) order: GGUF lists dims
        fastest-first (ne0 = input features), so numpy shape is reversed."""
        tensor = self.tensors[name]
        expected_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ConversionError(f"{self.path}: tensor {name} has type {tensor.tensor_type.name}, "
                                  f"which gguf cannot dequantize ({error})") from error
        values = np.asarray(values, dtype=np.float32)
        if values.size != int(np.prod(expected_shape)):
            raise ConversionError(f"{self.path}: tensor {name} dequantized to {values.size} values, "
                                  f"expected shape {expected_shape}")
        return values.reshape(expected_shape)


def read_hyperparameters(model: GgufModel) -> dict:
    architecture = model.field("general.architecture")
    if architecture != "llama":
        raise ConversionError(f"{model.path}: general.architecture is '{architecture}'; only 'llama' is supported")
    prefix = "llama."
    hidden_size = int(model.field(prefix + "embedding_length"))
    head_count = int(model.field(prefix + "attention.head_count"))
    head_count_kv = int(model.field(prefix + "attention.head_count_kv", default=head_count))
    head_dim = int(model.field(prefix + "attention.key_length", default=hidden_size // head_count))
    rope_dims = int(model.field(prefix + "rope.dimension_count", default=head_dim))
    if hidden_size % head_count != 0 or head_dim != hidden_size // head_count:
        raise ConversionError(f"{model.path}: head_dim {head_dim} with hidden {hidden_size} and "
                              f"{head_count} heads is not supported")
    if rope_dims != head_dim:
        raise ConversionError(f"{model.path}: partial rotary ({rope_dims} of {head_dim} dims) is not supported")
    if head_count % head_count_kv != 0:
        raise ConversionError(f"{model.path}: {head_count} heads are not a multiple of {head_count_kv} KV heads")
    if model.field(prefix + "rope.scaling.type", required=False) not in (None, "none"):
        raise ConversionError(f"{model.path}: rope scaling is not supported by this tool")
    tokens = model.field("tokenizer.ggml.tokens")
    vocab_size = int(model.field(prefix + "vocab_size", default=len(tokens)))
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": int(model.field(prefix + "block_count")),
        "num_attention_heads": head_count,
        "num_key_value_heads": head_count_kv,
        "head_dim": head_dim,
        "intermediate_size": int(model.field(prefix + "feed_forward_length")),
        "vocab_size": vocab_size,
        "max_position_embeddings": int(model.field(prefix + "context_length")),
        "rope_theta": float(model.field(prefix + "rope.freq_base", default=10000.0)),
        # GGUF stores f32 (1e-5 reads back as 9.9999997e-06): keep the shortest
        # decimal that rounds to the same f32, i.e. the value the model was trained with.
        "rms_norm_eps": float(str(np.float32(model.field(prefix + "attention.layer_norm_rms_epsilon")))),
    }


def tensor_plan(model: GgufModel, hyper: dict, undo_rotary_permutation: bool):
    """(hf_name, numpy shape, produce) for every tensor, checking names and shapes."""
    hidden = hyper["hidden_size"]
    head_dim = hyper["head_dim"]
    heads = hyper["num_attention_heads"]
    kv_heads = hyper["num_key_value_heads"]
    intermediate = hyper["intermediate_size"]
    vocab = hyper["vocab_size"]
    expected_shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
        "attn_norm.weight": (hidden,),
        "attn_q.weight": (heads * head_dim, hidden),
        "attn_k.weight": (kv_heads * head_dim, hidden),
        "attn_v.weight": (kv_heads * head_dim, hidden),
        "attn_output.weight": (hidden, heads * head_dim),
        "ffn_norm.weight": (hidden,),
        "ffn_gate.weight": (intermediate, hidden),
        "ffn_up.weight": (intermediate, hidden),
        "ffn_down.weight": (hidden, intermediate),
    }
    required = ["token_embd.weight", "output_norm.weight"]
    for layer in range(hyper["num_hidden_layers"]):
        required += [f"blk.{layer}.{suffix}" for suffix in BLOCK_TENSOR_NAMES]
    missing = [name for name in required if name not in model.tensors]
    if missing:
        raise ConversionError(f"{model.path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    plan = []
    for name, tensor in model.tensors.items():
        if name in GLOBAL_TENSOR_NAMES:
            hf_name, kind = GLOBAL_TENSOR_NAMES[name], name
        else:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in BLOCK_TENSOR_NAMES \
                    or int(parts[1]) >= hyper["num_hidden_layers"]:
                raise ConversionError(f"{model.path}: tensor '{name}' has no Hugging Face Llama equivalent")
            hf_name, kind = f"model.layers.{parts[1]}.{BLOCK_TENSOR_NAMES[parts[2]]}", parts[2]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != expected_shapes[kind]:
            raise ConversionError(f"{model.path}: tensor {name} has shape {shape} (rows, columns), "
                                  f"expected {expected_shapes[kind]}")
        head_count = {"attn_q.weight": heads, "attn_k.weight": kv_heads}.get(kind)

        def produce(name=name, head_count=head_count):
            values = model.tensor_float32(name)
            if head_count is not None and undo_rotary_permutation:
                values = unpermute_rows_from_llama_cpp(values, head_count)
            return values

        plan.append((hf_name, shape, produce))
    plan.sort(key=lambda item: item[0])
    return plan


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def build_tokenizer(model: GgufModel) -> tuple[Tokenizer, dict]:
    tokenizer_model = model.field("tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise ConversionError(f"{model.path}: tokenizer.ggml.model is '{tokenizer_model}'; "
                              "only 'gpt2' (byte-level BPE) is supported")
    pre = model.field("tokenizer.ggml.pre", default="default")
    tokens = list(model.field("tokenizer.ggml.tokens"))
    token_types = [int(t) for t in model.field("tokenizer.ggml.token_type")]
    merge_strings = list(model.field("tokenizer.ggml.merges"))
    if len(token_types) != len(tokens):
        raise ConversionError(f"{model.path}: {len(tokens)} tokens but {len(token_types)} token types")

    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if token in vocab:
            raise ConversionError(f"{model.path}: token {token!r} appears twice (ids {vocab[token]} and {token_id})")
        vocab[token] = token_id
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    missing_bytes = [c for c in byte_alphabet if c not in vocab]
    if len(missing_bytes) > 64:
        raise ConversionError(f"{model.path}: {len(missing_bytes)} of the 256 byte-level characters are missing "
                              "from the vocabulary; this is not a byte-level BPE vocabulary")
    if missing_bytes:
        # SmolLM2's real vocabulary lacks 21 bytes (bytes that never occur in
        # UTF-8 such as 0xC0, 0xF5-0xFF, and a few control characters).
        print(f"gguf_to_hf: note: {len(missing_bytes)} byte-level characters are not in the vocabulary "
              "(bytes the tokenizer was never trained on)", file=sys.stderr)
    merges = []
    for rank, merge in enumerate(merge_strings):
        pair = merge.split(" ")
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise ConversionError(f"{model.path}: merge {rank} {merge!r} is not a pair of vocabulary tokens "
                                  "whose concatenation is in the vocabulary")
        merges.append((pair[0], pair[1]))

    # The pre-tokenizer llama.cpp names 'smollm' (also starcoder, refact, ...):
    # regexes "\p{N}" then the GPT-2 pattern, i.e. single digits + byte-level.
    # SmolLM2's own tokenizer.json expresses it as Digits + ByteLevel.
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    elif pre in ("gpt-2", "default"):
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        raise ConversionError(f"{model.path}: tokenizer.ggml.pre '{pre}' is not a pre-tokenizer this tool knows")

    # No unk token, no byte fallback: as in SmolLM2's tokenizer.json.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens are special added tokens; user-defined ones are added but
    # not special (as Hugging Face lays out converted vocabularies).
    added = []
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            added.append((token_id, AddedToken(token, special=token_type == TOKEN_TYPE_CONTROL, normalized=False,
                                               lstrip=False, rstrip=False, single_word=False)))
        elif token_type not in (TOKEN_TYPE_NORMAL,):
            raise ConversionError(f"{model.path}: token {token_id} {token!r} has token type {token_type}, "
                                  "which a byte-level BPE vocabulary should not contain")
    tokenizer.add_special_tokens([token for _, token in added if token.special])
    tokenizer.add_tokens([token for _, token in added if not token.special])

    info = {
        "tokens": tokens,
        "added": added,
        "bos_token_id": model.field("tokenizer.ggml.bos_token_id", required=False),
        "eos_token_id": model.field("tokenizer.ggml.eos_token_id", required=False),
        "unknown_token_id": model.field("tokenizer.ggml.unknown_token_id", required=False),
        "padding_token_id": model.field("tokenizer.ggml.padding_token_id", required=False),
        "add_bos_token": bool(model.field("tokenizer.ggml.add_bos_token", default=False, required=False)),
        "add_eos_token": bool(model.field("tokenizer.ggml.add_eos_token", default=False, required=False)),
        "chat_template": model.field("tokenizer.chat_template", required=False),
    }
    return tokenizer, info


def check_tokenizer_file(path: Path, tokens: list[str], added: list) -> None:
    """Reloads tokenizer.json and checks ids and strings against the GGUF list."""
    reloaded = Tokenizer.from_file(str(path))
    if reloaded.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ConversionError(f"{path}: vocabulary size {reloaded.get_vocab_size(with_added_tokens=True)} "
                              f"differs from the GGUF's {len(tokens)} tokens")
    for token_id, token in enumerate(tokens):
        if reloaded.id_to_token(token_id) != token or reloaded.token_to_id(token) != token_id:
            raise ConversionError(f"{path}: token {token_id} {token!r} does not round-trip "
                                  f"(got {reloaded.id_to_token(token_id)!r})")
    added_decoder = reloaded.get_added_tokens_decoder()
    for token_id, token in added:
        if token_id not in added_decoder or added_decoder[token_id].content != token.content:
            raise ConversionError(f"{path}: added token {token.content!r} is not at id {token_id}")
    sample = "Hello world! 1234 <|im_start|>user\n  Ünïcødé 🙂\t end<|im_end|>"
    encoding = reloaded.encode(sample, add_special_tokens=False)
    if reloaded.decode(encoding.ids, skip_special_tokens=False) != sample:
        raise ConversionError(f"{path}: encode/decode does not round-trip {sample!r}")


def tokenizer_config(info: dict, max_length: int) -> dict:
    tokens = info["tokens"]

    def token_at(key):
        token_id = info[key]
        if token_id is None:
            return None
        if not 0 <= int(token_id) < len(tokens):
            raise ConversionError(f"{key} {token_id} is outside the vocabulary")
        return tokens[int(token_id)]

    chat_template = info["chat_template"] or ""
    special_added = [token.content for _, token in info["added"] if token.special]
    config = {
        "add_bos_token": info["add_bos_token"],
        "add_eos_token": info["add_eos_token"],
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {"content": token.content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": token.special}
            for token_id, token in info["added"]
        },
        # As in SmolLM2's tokenizer_config: the control tokens the chat format uses.
        "additional_special_tokens": [t for t in special_added if t in chat_template],
        "bos_token": token_at("bos_token_id"),
        "chat_template": info["chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": token_at("eos_token_id"),
        "model_max_length": max_length,
        "pad_token": token_at("padding_token_id"),
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": token_at("unknown_token_id"),
        "vocab_size": len(tokens),
    }
    return {key: value for key, value in config.items() if value is not None}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def write_json(path: Path, value: dict) -> None:
    partial_path = path.with_name(path.name + ".partial")
    partial_path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial_path, path)


def convert(gguf_path: Path, output_dir: Path, undo_rotary_permutation: bool = True) -> None:
    model = GgufModel(gguf_path)
    hyper = read_hyperparameters(model)
    tokenizer, token_info = build_tokenizer(model)
    if len(token_info["tokens"]) != hyper["vocab_size"]:
        raise ConversionError(f"{gguf_path}: {len(token_info['tokens'])} tokens but vocab_size {hyper['vocab_size']}")
    tied = "output.weight" not in model.tensors
    plan = tensor_plan(model, hyper, undo_rotary_permutation)

    output_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": token_info["bos_token_id"],
        "eos_token_id": token_info["eos_token_id"],
        "hidden_act": "silu",
        "hidden_size": hyper["hidden_size"],
        "head_dim": hyper["head_dim"],
        "initializer_range": 0.02,
        "intermediate_size": hyper["intermediate_size"],
        "max_position_embeddings": hyper["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": hyper["num_attention_heads"],
        "num_hidden_layers": hyper["num_hidden_layers"],
        "num_key_value_heads": hyper["num_key_value_heads"],
        "pad_token_id": token_info["padding_token_id"],
        "pretraining_tp": 1,
        "rms_norm_eps": hyper["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": hyper["rope_theta"],
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": hyper["vocab_size"],
    }
    generation_config = {
        "_from_model_config": True,
        "bos_token_id": token_info["bos_token_id"],
        "eos_token_id": token_info["eos_token_id"],
        "pad_token_id": token_info["padding_token_id"],
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config[key] is None:
            del config[key]
            generation_config.pop(key, None)

    tokenizer_path = output_dir / "tokenizer.json"
    tokenizer.save(str(tokenizer_path.with_name("tokenizer.json.partial")), pretty=True)
    os.replace(tokenizer_path.with_name("tokenizer.json.partial"), tokenizer_path)
    check_tokenizer_file(tokenizer_path, token_info["tokens"], token_info["added"])
    write_json(output_dir / "tokenizer_config.json", tokenizer_config(token_info, hyper["max_position_embeddings"]))

    write_safetensors_bf16(output_dir / "model.safetensors", plan)
    write_json(output_dir / "generation_config.json", generation_config)
    write_json(output_dir / "config.json", config)  # last: its presence means the rest is written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path, help="input .gguf file")
    parser.add_argument("output_dir", type=Path, help="directory for the Hugging Face checkpoint")
    parser.add_argument("--keep-llama-cpp-rotary-layout", action="store_true",
                        help="do NOT undo llama.cpp's Q/K row permutation (for demonstrating that it is needed)")
    args = parser.parse_args()
    if not args.gguf.is_file():
        print(f"gguf_to_hf: {args.gguf}: no such file", file=sys.stderr)
        return 1
    try:
        convert(args.gguf, args.output_dir, undo_rotary_permutation=not args.keep_llama_cpp_rotary_layout)
    except (ConversionError, ValueError, OSError) as error:
        print(f"gguf_to_hf: {error}", file=sys.stderr)
        return 1
    print(f"gguf_to_hf: wrote {args.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
