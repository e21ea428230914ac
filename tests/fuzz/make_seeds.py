#!/usr/bin/env python3
"""Writes the seed corpora in tests/fuzz/corpus/<harness>/ from real files.

Run by tools/fuzz.sh --make-seeds (needs layerpack-convert, layerpack-pack and
the fuzz_tokenizer_* harnesses built). Tokenizer seeds are the real Llama 2 /
Llama 3 files from /work/shared/tokenizers trimmed to a few hundred tokens so
that a fuzz iteration stays fast; packs are written by layerpack-convert from
the tiny checkpoints in tests/data/runtime; the archive seed is the
decompressed stream of a real `layerpack-pack export`.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

SEP = b"\n#tokenizer_config.json#\n"  # must match fuzz_tokenizer_import.cpp


def trim_hf_json(src, n):
    t = json.load(open(src, encoding="utf-8"))
    m = t["model"]
    vocab = {k: v for k, v in m["vocab"].items() if v < n}
    merges = []
    for merge in m["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(merge)
    m["vocab"], m["merges"] = vocab, merges
    new_ids = {}
    for i, added in enumerate(t["added_tokens"]):
        if added["id"] >= n:
            added["id"] = n + i
        new_ids[added["content"]] = added["id"]
    t["added_tokens"] = t["added_tokens"][:8]
    pp = t.get("post_processor") or {}
    for proc in [pp] + list(pp.get("processors", [])):
        for name, special in (proc.get("special_tokens") or {}).items():
            special["ids"] = [new_ids.get(tok, 0) for tok in special["tokens"]]
    return json.dumps(t, ensure_ascii=False).encode("utf-8")


def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]; i += 1
        value |= (b & 0x7F) << shift; shift += 7
        if b < 0x80:
            return value, i


def trim_sentencepiece(src, n):
    """Keeps the first n pieces (field 1) of a SentencePiece ModelProto and every other field."""
    buf = open(src, "rb").read()
    out, i, pieces = bytearray(), 0, 0
    while i < len(buf):
        start = i
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = varint(buf, i); i += length
        else:
            raise SystemExit(f"{src}: unexpected wire type {wire}")
        if field == 1:
            pieces += 1
            if pieces > n:
                continue
        out += buf[start:i]
    return bytes(out)


def write(dir_, name, data):
    os.makedirs(dir_, exist_ok=True)
    with open(os.path.join(dir_, name), "wb") as f:
        f.write(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True, help="build directory with the fuzz harnesses")
    ap.add_argument("--convert", required=True, help="layerpack-convert binary")
    ap.add_argument("--pack-tool", help="layerpack-pack binary (archive seeds)")
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.abspath(os.path.join(here, "..", ".."))
    corpus = os.path.join(here, "corpus")
    shared = os.path.abspath(os.path.join(root, "..", "shared", "tokenizers"))
    runtime_data = os.path.join(root, "tests", "data", "runtime")
    env = dict(os.environ, SOURCE_DATE_EPOCH="1704067200")

    # hf_config: every config.json / generation_config.json we have.
    d = os.path.join(corpus, "fuzz_hf_config")
    os.makedirs(d, exist_ok=True)
    for name in sorted(os.listdir(os.path.join(root, "tests/data/converter/configs"))):
        shutil.copy(os.path.join(root, "tests/data/converter/configs", name), os.path.join(d, name))
    for model in sorted(os.listdir(runtime_data)):
        for name in ("config.json", "generation_config.json"):
            p = os.path.join(runtime_data, model, "checkpoint", name)
            if os.path.exists(p):
                shutil.copy(p, os.path.join(d, f"{model}.{name}"))

    # safetensors: the converter's reference file and the smallest checkpoint's shard header + a few tensors.
    import numpy as np
    from safetensors.numpy import save
    d = os.path.join(corpus, "fuzz_safetensors")
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(root, "tests/data/converter/reference_writer.safetensors"), d)
    rng = np.random.default_rng(1)
    write(d, "mixed_dtypes.safetensors", save({
        "model.embed_tokens.weight": rng.standard_normal((8, 4)).astype(np.float16),
        "model.norm.weight": np.ones(4, np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.integers(0, 255, (4, 2), dtype=np.uint8),
        "scalar": np.array(3, np.int64),
        "empty": np.zeros((0, 4), np.float32),
    }, metadata={"format": "pt"}))

    # Tokenizer sources, trimmed.
    l2, l3 = os.path.join(shared, "llama2"), os.path.join(shared, "llama3")
    l2_config, l3_config = open(os.path.join(l2, "tokenizer_config.json"), "rb").read(), open(os.path.join(l3, "tokenizer_config.json"), "rb").read()
    d = os.path.join(corpus, "fuzz_tokenizer_json")
    write(d, "llama2_trimmed", trim_hf_json(os.path.join(l2, "tokenizer.json"), 400) + SEP + l2_config)
    write(d, "llama3_trimmed", trim_hf_json(os.path.join(l3, "tokenizer.json"), 400) + SEP + l3_config)
    write(d, "llama3_trimmed_no_config", trim_hf_json(os.path.join(l3, "tokenizer.json"), 300))
    tiny = os.path.join(runtime_data, "llama_gqa", "checkpoint")
    write(d, "llama_gqa_checkpoint", open(os.path.join(tiny, "tokenizer.json"), "rb").read() + SEP + open(os.path.join(tiny, "tokenizer_config.json"), "rb").read())
    d = os.path.join(corpus, "fuzz_sentencepiece_model")
    write(d, "llama2_trimmed", trim_sentencepiece(os.path.join(l2, "tokenizer.model"), 400) + SEP + l2_config)
    write(d, "llama2_trimmed_no_config", trim_sentencepiece(os.path.join(l2, "tokenizer.model"), 300))
    d = os.path.join(corpus, "fuzz_tiktoken_ranks")
    lines = open(os.path.join(l3, "tokenizer.model"), "rb").read().split(b"\n")
    write(d, "llama3_trimmed", b"\n".join(lines[:400]) + b"\n" + SEP + l3_config)
    write(d, "llama3_trimmed_no_config", b"\n".join(lines[:300]) + b"\n")

    # tokenizer.lpk: what the real importer writes for each trimmed source.
    d = os.path.join(corpus, "fuzz_tokenizer_lpk")
    os.makedirs(d, exist_ok=True)
    for harness in ("fuzz_tokenizer_json", "fuzz_sentencepiece_model", "fuzz_tiktoken_ranks"):
        for seed in sorted(os.listdir(os.path.join(corpus, harness))):
            keep = tempfile.mkdtemp()
            subprocess.run([os.path.join(args.build, "tests/fuzz", harness), os.path.join(corpus, harness, seed)],
                           env=dict(env, LAYERPACK_FUZZ_KEEP_DIR=keep), check=True, capture_output=True)
            out = os.path.join(keep, "tokenizer.lpk")
            if not os.path.exists(out):
                sys.exit(f"{harness} {seed}: importer wrote no tokenizer.lpk")
            shutil.copy(out, os.path.join(d, f"{harness[5:]}.{seed}.lpk"))
            shutil.rmtree(keep)

    # Packs from the tiny checkpoints: manifests and layer files.
    packs = tempfile.mkdtemp()
    dm, dl = os.path.join(corpus, "fuzz_manifest"), os.path.join(corpus, "fuzz_layer_header")
    os.makedirs(dm, exist_ok=True); os.makedirs(dl, exist_ok=True)
    shutil.copy(os.path.join(root, "tests/data/format/golden-output.lpk"), os.path.join(dl, "golden-output.lpk"))
    for model in ("qwen2_bias", "qwen3_qk_norm", "llama_mha_tied_linear", "mistral_sliding_window"):
        out = os.path.join(packs, model)
        subprocess.run([args.convert, os.path.join(runtime_data, model, "checkpoint"), "-o", out, "-q"], env=env, check=True)
        shutil.copy(os.path.join(out, "manifest.lpk"), os.path.join(dm, f"{model}.manifest.lpk"))
        for name in ("embedding.lpk", "layer-00000.lpk", "output.lpk"):
            shutil.copy(os.path.join(out, name), os.path.join(dl, f"{model}.{name}"))
    out = os.path.join(packs, "synthetic_no_double_quant")
    subprocess.run([args.convert, "--synthetic", os.path.join(runtime_data, "qwen2_bias", "checkpoint", "config.json"),
                    "--tokenizer", os.path.join(runtime_data, "qwen2_bias", "checkpoint"), "--no-double-quant", "-o", out, "-q"],
                   env=env, check=True)
    shutil.copy(os.path.join(out, "layer-00000.lpk"), os.path.join(dl, "synthetic_no_double_quant.layer-00000.lpk"))
    shutil.copy(os.path.join(out, "manifest.lpk"), os.path.join(dm, "synthetic_no_double_quant.manifest.lpk"))

    # Archive: decompressed stream of a real export.
    if args.pack_tool:
        da = os.path.join(corpus, "fuzz_archive_import")
        os.makedirs(da, exist_ok=True)
        for model in ("mistral_sliding_window",):
            archive = os.path.join(packs, model + ".lpk.zst")
            subprocess.run([args.pack_tool, "export", os.path.join(packs, model), "-o", archive], check=True, capture_output=True)
            raw = subprocess.run(["zstd", "-dc", archive], check=True, capture_output=True).stdout
            write(da, model + ".archive", raw)
    shutil.rmtree(packs)


if __name__ == "__main__":
    main()
