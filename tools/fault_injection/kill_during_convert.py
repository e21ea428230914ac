#!/usr/bin/env python3
"""kill -9 at random moments during layerpack-convert, then --resume.

For every trial: start a conversion into a fresh directory, SIGKILL it after a
random delay drawn over the whole conversion time, check that the interrupted
directory does NOT verify as a complete pack (unless the kill came after the
converter had finished), run `layerpack-convert --resume` into the same
directory (in some trials that resume is killed too and resumed again), and
require every file of the result to be byte-identical to an uninterrupted
conversion. Sources: a real tiny checkpoint (tests/data/runtime/llama_gqa) and a
synthetic pack. Exit status 1 on any failure; prints a summary line.

  tools/fault_injection/kill_during_convert.py --build build-asan --trials 30   # 2 sources: >= 60 kills
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def convert_command(tool, source, out, resume=False):
    cmd = [tool, "-o", out, "-q", "--threads", "2"]
    if source.endswith(".json"):  # synthetic weights for this config, the tokenizer next to it
        cmd += ["--synthetic", source, "--seed", "7", "--tokenizer", os.path.dirname(source)]
    else:
        cmd.append(source)
    if resume:
        cmd.append("--resume")
    return cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(common.ROOT, "build-asan"))
    ap.add_argument("--trials", type=int, default=30, help="conversions killed mid-run, per source")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    tools = common.tools(args.build)
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="layerpack_kill_", dir=args.workdir)
    # Synthetic: the tied, biased Qwen2 test model stretched to 8 layers, so kills land between many more files.
    synthetic_dir = os.path.join(work, "synthetic-source")
    shutil.copytree(os.path.join(common.ROOT, "tests", "data", "runtime", "qwen2_bias", "checkpoint"), synthetic_dir,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    config_path = os.path.join(synthetic_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 8
    config.pop("max_window_layers", None)
    config.pop("layer_types", None)
    with open(config_path, "w") as f:
        json.dump(config, f)
    sources = [common.TEST_CHECKPOINT, config_path]
    failures, stats = [], {"trials": 0, "killed_mid": 0, "killed_after_finish": 0, "exited_before_kill": 0,
                           "double_kill": 0, "resumed_identical": 0, "files_present_at_kill": []}
    try:
        for source in sources:
            name = "synthetic" if source.endswith(".json") else os.path.basename(os.path.dirname(source))
            reference = os.path.join(work, f"reference-{name}")
            durations = []
            for i in range(3):
                shutil.rmtree(reference, ignore_errors=True)
                t0 = time.monotonic()
                r = common.run(convert_command(tools["convert"], source, reference))
                durations.append(time.monotonic() - t0)
                if r.returncode != 0:
                    sys.exit(f"reference conversion failed: {r.stderr}")
            if not common.verify_ok(tools["pack"], reference):
                sys.exit(f"{reference}: reference pack does not verify")
            again = os.path.join(work, f"again-{name}")
            common.run(convert_command(tools["convert"], source, again))
            if common.differences(reference, again):
                sys.exit(f"two uninterrupted conversions differ: {common.differences(reference, again)}")
            shutil.rmtree(again)
            span, fastest = statistics.median(durations), min(durations)
            print(f"{name}: uninterrupted conversion {span:.2f} s; {len(os.listdir(reference))} files", flush=True)

            # Keep going until --trials conversions were killed while still running (a kill
            # that comes after the converter exited is not a trial); at most 4x attempts.
            killed_here, trial = 0, -1
            while killed_here < args.trials and trial < 4 * args.trials:
                trial += 1
                stats["trials"] += 1
                failures_at_start = len(failures)
                out = os.path.join(work, f"trial-{name}-{trial}")
                delay = rng.uniform(0.0, fastest)
                proc = subprocess.Popen(convert_command(tools["convert"], source, out), env=common.REPRODUCIBLE_ENV,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(delay)
                finished_before = proc.poll() is not None
                if not finished_before:
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = proc.returncode == -signal.SIGKILL
                killed_here += killed
                present = sorted(os.listdir(out)) if os.path.isdir(out) else []
                stats["files_present_at_kill"].append(len(present))
                complete = os.path.isdir(out) and common.verify_ok(tools["pack"], out)
                if not killed:
                    stats["exited_before_kill"] += 1
                    if proc.returncode != 0:
                        failures.append(f"{name} trial {trial}: conversion exited {proc.returncode} without a kill")
                elif complete:
                    # Killed after the manifest (written last) was durable: the pack is whole and must be
                    # exact. The converter's hidden resume state (.layerpack-convert.json) may still be
                    # there (it is removed after the manifest); --resume below must clean it up.
                    stats["killed_after_finish"] += 1
                    if [d for d in common.differences(reference, out) if not d.startswith("extra .")]:
                        failures.append(f"{name} trial {trial}: killed pack verifies but differs: "
                                        f"{common.differences(reference, out)}")
                else:
                    stats["killed_mid"] += 1
                    if "manifest.lpk" in present:
                        failures.append(f"{name} trial {trial}: manifest.lpk present in an incomplete pack {present}")
                # Resume; every fifth trial kills the resume too, once.
                if killed and trial % 5 == 0:
                    stats["double_kill"] += 1
                    proc = subprocess.Popen(convert_command(tools["convert"], source, out, resume=True),
                                            env=common.REPRODUCIBLE_ENV, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
                    time.sleep(rng.uniform(0.0, span * 0.8))
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                    proc.wait()
                r = common.run(convert_command(tools["convert"], source, out, resume=True))
                if r.returncode != 0:
                    failures.append(f"{name} trial {trial}: --resume failed ({r.returncode}): {r.stderr.strip()[-500:]}")
                else:
                    diff = common.differences(reference, out)
                    leftovers = [f for f in os.listdir(out) if f not in os.listdir(reference)]
                    if diff or leftovers:
                        failures.append(f"{name} trial {trial}: resumed pack differs from uninterrupted: {diff}")
                    elif not common.verify_ok(tools["pack"], out):
                        failures.append(f"{name} trial {trial}: resumed pack does not verify")
                    else:
                        stats["resumed_identical"] += 1
                if "Sanitizer" in r.stderr or "runtime error" in r.stderr:
                    failures.append(f"{name} trial {trial}: sanitizer report during resume:\n{r.stderr}")
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {name} trial {trial}: delay {delay:.3f}s killed={killed} files at kill={len(present)} "
                      f"complete={complete} -> {'FAIL' if len(failures) > failures_at_start else 'ok'}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts = stats.pop("files_present_at_kill")
    spread = {n: counts.count(n) for n in sorted(set(counts))}
    print(f"kill -9 during conversion: {stats}; files on disk at kill -> trials: {spread}")
    for f in failures:
        print("FAIL:", f)
    print(f"RESULT: {stats['trials']} trials ({stats['killed_mid'] + stats['killed_after_finish']} killed, "
          f"{stats['killed_mid']} mid-conversion), {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
