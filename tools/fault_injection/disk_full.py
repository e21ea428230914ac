#!/usr/bin/env python3
"""Disk full during conversion and during archive import (needs root: tmpfs).

Two ways to run out of space:
  static   the tmpfs is too small from the start (the converter's up-front
           free-space check should refuse; import runs into ENOSPC mid-file);
  filling  the tmpfs is large enough when the tool starts, and another process
           fills it at a random moment while the tool writes (so the
           converter's up-front check passes and a write fails midway).
For a series of tmpfs sizes smaller than the pack, run layerpack-convert (and
`layerpack-pack import` of the same pack's archive) into the tmpfs. Each run
must exit non-zero by itself (no signal, no sanitizer report) with a message
that says the disk is full and names a file, and must leave nothing that
verifies as a complete pack. Then the tmpfs is grown and
`--resume` (conversion) / `import --resume` must finish into the very same
directory, byte-identical to an unconstrained run: nothing lost.

  sudo tools/fault_injection/disk_full.py --build build-asan
"""
import argparse
import random
import time
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def mount_tmpfs(path, size_bytes, remount=False):
    opts = f"size={size_bytes}" + (",remount" if remount else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "layerpack-diskfull", path], check=True)


def cmd_for(tools, kind, archive, out):
    if kind == "convert":
        return [tools["convert"], common.TEST_CHECKPOINT, "-o", out, "-q"]
    return [tools["pack"], "import", archive, "-o", out, "-q"]


def wait_for_dir(proc, path):
    deadline = time.monotonic() + 60
    while not os.path.isdir(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)


def write_span(cmd, out):
    """Seconds from the output directory appearing to the tool's exit."""
    proc = subprocess.Popen(cmd, env=common.REPRODUCIBLE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_dir(proc, out)
    t0 = time.monotonic()
    proc.wait()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed")
    return time.monotonic() - t0


def fill_disk(path):
    """Writes until ENOSPC, as another program on the same disk would."""
    chunk = b"\0" * 4096
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass


def says_disk_full(stderr):
    text = stderr.lower()
    return "disk_full" in text or "no space left" in text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(common.ROOT, "build-asan"))
    ap.add_argument("--steps", type=int, default=12, help="tmpfs sizes tried, spread below the pack size")
    ap.add_argument("--filling", type=int, default=40, help="trials where the disk fills while the tool runs")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("disk_full.py mounts a tmpfs: run it as root")
    tools = common.tools(args.build)
    work = tempfile.mkdtemp(prefix="layerpack_diskfull_")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    failures, trials = [], {"convert": 0, "import": 0, "resumed_identical": 0, "filling_finished_first": 0}
    rng = random.Random(args.seed)
    try:
        reference = os.path.join(work, "reference")
        r = common.run([tools["convert"], common.TEST_CHECKPOINT, "-o", reference, "-q"])
        if r.returncode != 0:
            sys.exit(f"reference conversion failed: {r.stderr}")
        archive = os.path.join(work, "reference.lpk.zst")
        r = common.run([tools["pack"], "export", reference, "-o", archive, "-q"])
        if r.returncode != 0:
            sys.exit(f"export failed: {r.stderr}")
        pack_bytes = sum(os.path.getsize(os.path.join(reference, f)) for f in os.listdir(reference))
        print(f"pack: {pack_bytes} bytes in {len(os.listdir(reference))} files", flush=True)
        # tmpfs sizes are whole pages; spread the limits from 1 page to just under the pack.
        pages = max(pack_bytes // 4096, 2)
        sizes = sorted({max(1, round(pages * (i + 0.5) / args.steps)) * 4096 for i in range(args.steps)})
        plan = [(kind, size, None) for size in sizes for kind in ("convert", "import")]
        # Filling: room for the pack and then some at the start, filled at a random moment
        # between the tool creating its output directory and the time it would finish.
        spans = {kind: max(write_span(cmd_for(tools, kind, archive, os.path.join(work, f"timing-{kind}-{i}")),
                                      os.path.join(work, f"timing-{kind}-{i}")) for i in range(3))
                 for kind in ("convert", "import")}
        print(f"write spans (output directory created -> exit): {spans}", flush=True)
        plan += [(kind, pack_bytes * 2, rng.uniform(0.0, spans[kind] / 3))
                 for i in range(args.filling) for kind in [("convert", "import")[i % 2]]]
        for kind, size, fill_after in plan:
            mount_tmpfs(mnt, size)
            try:
                out = os.path.join(mnt, "pack")
                cmd = cmd_for(tools, kind, archive, out)
                resume = cmd + ["--resume"]
                if fill_after is None:
                    r = common.run(cmd)
                    label = f"{kind} into {size // 1024} KiB"
                else:
                    label = f"{kind} with the disk filled after {fill_after:.3f} s"
                    proc = subprocess.Popen(cmd, env=common.REPRODUCIBLE_ENV, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
                    # Start the clock once the tool has created its output directory (past the
                    # up-front space check), then fill the disk at a random moment of the writing.
                    wait_for_dir(proc, out)
                    time.sleep(fill_after)
                    fill_disk(os.path.join(mnt, "filler"))
                    stdout, stderr = proc.communicate(timeout=300)
                    r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
                    if r.returncode == 0:
                        trials["filling_finished_first"] += 1  # done before the disk filled: must be whole
                        if common.differences(reference, out):
                            failures.append(f"{label}: finished but differs: {common.differences(reference, out)}")
                        print(f"  {label}: finished before the disk filled", flush=True)
                        continue
                trials[kind] += 1
                left = sorted(os.listdir(out)) if os.path.isdir(out) else []
                if r.returncode <= 0:
                    failures.append(f"{label}: exit {r.returncode} (expected a failure exit), stderr: {r.stderr[-300:]}")
                elif "Sanitizer" in r.stderr or "runtime error" in r.stderr:
                    failures.append(f"{label}: sanitizer report:\n{r.stderr}")
                elif not says_disk_full(r.stderr) or "/pack" not in r.stderr:
                    failures.append(f"{label}: unclear error: {r.stderr.strip()[-300:]}")
                if os.path.isdir(out) and common.verify_ok(tools["pack"], out):
                    failures.append(f"{label}: a partial pack verifies as complete: {left}")
                message = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
                print(f"  {label}: exit {r.returncode}, left {len(left)} files, '{message[:160]}'", flush=True)
                # Free the disk and finish into the same directory.
                if os.path.exists(os.path.join(mnt, "filler")):
                    os.remove(os.path.join(mnt, "filler"))
                mount_tmpfs(mnt, pack_bytes * 3, remount=True)
                r = common.run(resume)
                if r.returncode != 0:
                    failures.append(f"{label}: resume after freeing space failed: {r.stderr[-300:]}")
                elif common.differences(reference, out):
                    failures.append(f"{label}: resumed pack differs: {common.differences(reference, out)}")
                else:
                    trials["resumed_identical"] += 1
            finally:
                subprocess.run(["umount", mnt], check=True)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", mnt])
        shutil.rmtree(work, ignore_errors=True)
    print(f"disk full: {trials}")
    for f in failures:
        print("FAIL:", f)
    print(f"RESULT: {trials['convert'] + trials['import']} trials, {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
