#!/usr/bin/env python3
"""One flipped bit anywhere in a pack: verify and the runtime must both catch it.

Each trial hard-links a known-good pack into a fresh directory, replaces one
file by a copy with a single bit flipped (file chosen uniformly; the byte
uniformly over the file, or over its preamble + header in half the trials so
the small structural part gets as many hits as the payload), then requires:
  * `layerpack-pack verify` exits non-zero and names the damaged file;
  * `layerpack-run PACK --verify-hashes` (CPU backend, a one-token prompt)
    exits non-zero by itself (no signal, no sanitizer report) and names the file
    -- except for a flip in a byte format/SPEC.md says readers ignore (the
    reserved preamble word, the padding between header and payload), which no
    header or payload hash covers: there the run may succeed but its output must
    be identical to the intact pack's (counted separately).
Exit status 1 on any miss; prints per-file counts.

  tools/fault_injection/bit_flip.py --build build-asan --trials 1000
"""
import argparse
import collections
import json
import os
import random
import shutil
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def ignored_by_readers(data, offset):
    """Bytes format/SPEC.md tells readers to ignore: the reserved preamble word and
    the zero padding between the header and the payload. Only the manifest's
    whole-file hash covers them, so only verify can notice a flip there."""
    if 20 <= offset < 24:
        return True
    if len(data) >= 48:
        header_end = 48 + struct.unpack_from("<I", data, 16)[0]
        payload_offset = struct.unpack_from("<Q", data, 32)[0]
        return header_end <= offset < payload_offset
    return False


def header_region(data):
    """Bytes [0, end of the FlatBuffer header) of a pack file (format.h preamble)."""
    if len(data) < 48:
        return len(data)
    header_size = struct.unpack_from("<I", data, 16)[0]
    return min(len(data), 48 + header_size)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(common.ROOT, "build-asan"))
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--checkpoint", default=common.TEST_CHECKPOINT)
    args = ap.parse_args()
    tools = common.tools(args.build)
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="layerpack_bitflip_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    failures = []
    per_file = collections.Counter()
    caught = collections.Counter()
    try:
        reference = os.path.join(work, "reference")
        r = common.run([tools["convert"], args.checkpoint, "-o", reference, "-q"])
        if r.returncode != 0 or not common.verify_ok(tools["pack"], reference):
            sys.exit(f"reference pack failed: {r.stderr}")
        run_cmd = ["--verify-hashes", "--prompt-ids", "1,2", "-n", "1", "--backend", "cpu", "--threads", "1", "--json"]
        r = common.run([tools["run"], reference] + run_cmd)
        if r.returncode != 0:
            sys.exit(f"layerpack-run on the intact pack failed: {r.stderr}")
        intact_ids = json.loads(r.stdout).get("ids")
        names = sorted(os.listdir(reference))
        originals = {n: open(os.path.join(reference, n), "rb").read() for n in names}
        for trial in range(args.trials):
            name = rng.choice(names)
            data = bytearray(originals[name])
            region = "header" if trial % 2 == 0 else "anywhere"
            limit = header_region(data) if region == "header" else len(data)
            offset, bit = rng.randrange(limit), rng.randrange(8)
            data[offset] ^= 1 << bit
            pack = os.path.join(work, "trial")
            shutil.rmtree(pack, ignore_errors=True)
            os.makedirs(pack)
            for n in names:
                if n != name:
                    os.link(os.path.join(reference, n), os.path.join(pack, n))
            with open(os.path.join(pack, name), "wb") as f:
                f.write(data)
            per_file[name] += 1
            where = f"{name} byte {offset} bit {bit} ({region})"

            v = common.run([tools["pack"], "verify", pack])
            if v.returncode == 0:
                failures.append(f"verify accepted a flipped bit: {where}")
            elif v.returncode < 0 or "Sanitizer" in v.stderr:
                failures.append(f"verify crashed on {where}: {v.stderr[-400:]}")
            elif name not in v.stdout + v.stderr:
                failures.append(f"verify did not name {name}: {where}: {(v.stdout + v.stderr)[-300:]}")
            else:
                caught["verify"] += 1

            x = common.run([tools["run"], pack] + run_cmd)
            if x.returncode == 0 and ignored_by_readers(originals[name], offset):
                # Nothing the runtime reads changed; its output must be exactly the intact pack's.
                if json.loads(x.stdout).get("ids") != intact_ids:
                    failures.append(f"layerpack-run output changed by a flip in an ignored byte: {where}")
                else:
                    caught["ignored_bytes_harmless"] += 1
            elif x.returncode == 0:
                failures.append(f"layerpack-run --verify-hashes accepted a flipped bit: {where}")
            elif x.returncode < 0 or "Sanitizer" in x.stderr or "runtime error" in x.stderr:
                failures.append(f"layerpack-run crashed (exit {x.returncode}) on {where}: {x.stderr[-400:]}")
            elif name not in x.stdout + x.stderr:
                failures.append(f"layerpack-run did not name {name}: {where}: {(x.stdout + x.stderr)[-300:]}")
            else:
                caught["run"] += 1
            if trial % 100 == 99:
                print(f"  {trial + 1} trials, {len(failures)} failures", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"bit flips per file: {dict(per_file)}")
    print(f"caught with the file named: verify {caught['verify']}/{args.trials}, runtime {caught['run']}/{args.trials}; "
          f"flips in bytes readers ignore (reserved word, header-payload padding) that the runtime accepted "
          f"with unchanged output: {caught['ignored_bytes_harmless']}")
    for f in failures[:50]:
        print("FAIL:", f)
    if len(failures) > 50:
        print(f"... {len(failures) - 50} more")
    print(f"RESULT: {args.trials} trials, {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
