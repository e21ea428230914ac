#!/usr/bin/env python3
"""Writes tests/data/nf4/bitsandbytes_fixtures.bin: inputs and bitsandbytes' exact outputs
(packed NF4 bytes, absmax, double-quant codes, nested absmax, offset, map) for the C++ NF4
tests (tests/nf4/nf4_fixture_test.cpp) to compare against bit for bit.

Needs torch and bitsandbytes (CPU). Usage: python3 tools/make_nf4_fixtures.py [out_path]

File layout (little endian):
  "LPNF4FX1"                      magic, 8 bytes
  u32 meta_len, meta              JSON: bitsandbytes / torch versions, CPU capability
  u32 case_count, then per case:
    u32 name_len, name            utf-8
    u32 array_count, then per array:
      u32 name_len, name
      u32 dtype                   0 f32, 1 u8, 2 bf16 (raw u16), 3 u64
      u64 count                   elements
      count * element bytes
Kinds (array "kind", u64): 0 = NF4 quantize_4bit of "input" (f32 or bf16, "blocksize"),
with or without double quant ("double_quant"); 1 = quantize_blockwise(absmax - mean,
blocksize 256) of a bare "absmax" array, i.e. double quantization alone.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch
import bitsandbytes
import bitsandbytes.functional as F

F32, U8, BF16, U64 = 0, 1, 2, 3

# fp32 thresholds bitsandbytes compares against, and the float64 midpoints of the spec.
CODE = np.array(F.get_4bit_type("nf4", device="cpu").tolist(), dtype=np.float32)
THRESHOLDS32 = (CODE[:-1] + CODE[1:]) / np.float32(2)
THRESHOLDS64 = (CODE[:-1].astype(np.float64) + CODE[1:].astype(np.float64)) / 2


def threshold_probes() -> np.ndarray:
    """Values at and one or two ulps around every threshold and code value, both signs."""
    points = []
    for t in list(THRESHOLDS32) + [np.float32(t) for t in THRESHOLDS64] + list(CODE):
        t = np.float32(t)
        below = np.nextafter(t, np.float32(-2))
        above = np.nextafter(t, np.float32(2))
        points += [t, below, above, np.nextafter(below, np.float32(-2)), np.nextafter(above, np.float32(2))]
    points += [np.float32(0.0), np.float32(-0.0)]
    return np.clip(np.array(points, dtype=np.float32), -1, 1)


def make_input(n: int, blocksize: int, rng: np.random.Generator, probes: bool) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
    if probes:
        # Each block holds a power-of-two absmax, so x / absmax lands exactly on the probes.
        probe = threshold_probes()
        for start in range(0, n, blocksize):
            end = min(start + blocksize, n)
            scale = np.float32(2.0) ** int(rng.integers(-8, 3))
            count = end - start
            values = rng.choice(probe, size=count) * scale
            values[int(rng.integers(0, count))] = scale * (1 if rng.random() < 0.5 else -1)
            x[start:end] = values
    return x


def division_sensitive_values(absmax: np.float32) -> np.ndarray:
    """Values x in [-absmax, absmax] whose code differs between x / absmax and x * (1 / absmax).
    bitsandbytes 0.50 multiplies by the reciprocal in full blocks and divides in the partial
    last block; these values tell the two apart."""
    reciprocal = np.float32(1) / absmax
    found = []
    for t in THRESHOLDS32:
        x = np.float32(t * absmax)
        for _ in range(16):
            x = np.nextafter(x, np.float32(-np.inf))
        for _ in range(32):
            if (np.float32(x / absmax) > t) != (np.float32(x * reciprocal) > t):
                found.append(x)
            x = np.nextafter(x, np.float32(np.inf))
    return np.array(found, dtype=np.float32)


def division_sensitive_input(blocksize: int, partial_len: int, rng: np.random.Generator) -> np.ndarray:
    """One full block and a partial last block, both packed with division-sensitive values."""
    blocks = []
    for length in (blocksize, partial_len):
        for _ in range(1000):
            absmax = np.float32(rng.uniform(0.01, 0.1))
            values = division_sensitive_values(absmax)
            if len(values) >= 4:
                break
        block = rng.choice(values, size=length).astype(np.float32)
        block[0] = absmax
        blocks.append(block)
    return np.concatenate(blocks)


def array(name, dtype, values):
    return (name, dtype, values)


def nf4_case(name, x_np, blocksize, double_quant, as_bf16):
    x = torch.from_numpy(x_np.copy())
    if as_bf16:
        x = x.to(torch.bfloat16)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    raw_packed, raw_absmax = torch.ops.bitsandbytes.quantize_4bit.default(x, blocksize, "nf4", torch.uint8)
    assert torch.equal(raw_packed, packed)
    out = F.dequantize_4bit(packed, state, quant_type="nf4").float()
    arrays = [
        array("kind", U64, [0]),
        array("blocksize", U64, [blocksize]),
        array("double_quant", U64, [int(double_quant)]),
        array("input", BF16 if as_bf16 else F32, x),
        array("packed", U8, packed.reshape(-1)),
        array("absmax", F32, raw_absmax),
        array("dequantized", F32, out.reshape(-1)),
    ]
    if double_quant:
        arrays += [
            array("absmax_codes", U8, state.absmax),
            array("nested_absmax", F32, state.state2.absmax),
            array("offset", F32, [float(state.offset)]),
            array("map", F32, state.state2.code),
            # bitsandbytes' own reconstruction: dequantize_blockwise(codes) + offset
            array("absmax_reconstructed", F32, F.dequantize_blockwise(state.absmax, state.state2) + state.offset),
        ]
    return (name, arrays)


def double_quant_case(name, absmax_np):
    absmax = torch.from_numpy(absmax_np.copy())
    offset = absmax.mean()
    codes, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    return (name, [
        array("kind", U64, [1]),
        array("absmax", F32, absmax),
        array("absmax_codes", U8, codes),
        array("nested_absmax", F32, state2.absmax),
        array("offset", F32, [float(offset)]),
        array("map", F32, state2.code),
    ])


def encode(dtype, values) -> bytes:
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu().contiguous().reshape(-1)
        if dtype == BF16:
            return t.view(torch.int16).numpy().astype("<i2").tobytes(), t.numel()
        values = t.numpy()
    np_type = {F32: "<f4", U8: "u1", U64: "<u8"}[dtype]
    a = np.asarray(values).astype(np_type).reshape(-1)
    return a.tobytes(), a.size


def write(path: Path, cases, meta):
    with open(path, "wb") as f:
        f.write(b"LPNF4FX1")
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        f.write(struct.pack("<I", len(meta_bytes)) + meta_bytes)
        f.write(struct.pack("<I", len(cases)))
        for name, arrays in cases:
            f.write(struct.pack("<I", len(name)) + name.encode())
            f.write(struct.pack("<I", len(arrays)))
            for array_name, dtype, values in arrays:
                data, count = encode(dtype, values)
                f.write(struct.pack("<I", len(array_name)) + array_name.encode())
                f.write(struct.pack("<IQ", dtype, count))
                f.write(data)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests/data/nf4/bitsandbytes_fixtures.bin"
    # Single-threaded torch: its multi-threaded mean (the double-quant offset) splits the sum per thread.
    torch.set_num_threads(1)
    rng = np.random.default_rng(20240611)
    cases = []
    for n in (1, 3, 7, 63, 64, 65, 733, 4097):
        for blocksize in (32, 64, 128, 4096):
            if blocksize > 64 and n < 64:
                continue
            for double_quant in (False, True):
                probes = bool(rng.random() < 0.6)
                x = make_input(n, blocksize, rng, probes)
                tag = f"n{n}_bs{blocksize}_{'dq' if double_quant else 'fp32absmax'}_{'probes' if probes else 'randn'}"
                cases.append(nf4_case(tag, x, blocksize, double_quant, as_bf16=False))
    for n, blocksize in ((733, 64), (4097, 32), (20000, 64)):
        x = make_input(n, blocksize, rng, probes=False)
        cases.append(nf4_case(f"bf16_n{n}_bs{blocksize}_dq", x, blocksize, True, as_bf16=True))
    # Values whose code depends on dividing vs multiplying by the reciprocal.
    for blocksize, partial_len in ((64, 37), (32, 31), (256, 100)):
        x = division_sensitive_input(blocksize, partial_len, rng)
        cases.append(nf4_case(f"division_sensitive_bs{blocksize}", x, blocksize, False, as_bf16=False))
    # An all-zero block (absmax 0) in the middle of a tensor, and negative zeros.
    x = make_input(200, 64, rng, probes=False)
    x[64:128] = 0.0
    x[130:140] = -0.0
    cases.append(nf4_case("zero_block_n200_bs64", x, 64, False, as_bf16=False))
    cases.append(nf4_case("zero_block_n200_bs64_dq", x, 64, True, as_bf16=False))
    # Double quantization alone over several nested blocks (nb > 256), realistic absmax values.
    for nb in (1, 255, 256, 257, 1025, 3000, 20000):
        absmax = np.abs(rng.standard_normal(nb).astype(np.float32)) * np.float32(0.01) + np.float32(0.02)
        cases.append(double_quant_case(f"double_quant_nb{nb}", absmax))
    absmax = np.full(300, 0.125, dtype=np.float32)  # every absmax equal: nested absmax 0
    cases.append(double_quant_case("double_quant_constant_nb300", absmax))
    meta = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "generator": "tools/make_nf4_fixtures.py",
    }
    write(out, cases, meta)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(cases)} cases) with {meta}")


if __name__ == "__main__":
    main()
