"""Shared helpers of the fault-injection scripts: finding the built tools,
comparing pack directories byte for byte, running a command with a timeout."""
import filecmp
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TEST_CHECKPOINT = os.path.join(ROOT, "tests", "data", "runtime", "llama_gqa", "checkpoint")
# Fixed manifest timestamp so two conversions of one source are byte-identical.
REPRODUCIBLE_ENV = dict(os.environ, SOURCE_DATE_EPOCH="1704067200")


def find_tool(build, name, subdir):
    path = os.path.join(build, subdir, name)
    if not os.access(path, os.X_OK):
        sys.exit(f"{path}: not built (cmake --build {build} --target {name})")
    return path


def tools(build):
    return {
        "convert": find_tool(build, "layerpack-convert", "converter"),
        "pack": find_tool(build, "layerpack-pack", "tools/pack"),
        "run": find_tool(build, "layerpack-run", "runtime"),
    }


def run(cmd, timeout=300, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or REPRODUCIBLE_ENV)


def verify_ok(pack_tool, pack_dir):
    """True when `layerpack-pack verify` accepts the directory as a complete pack."""
    result = run([pack_tool, "verify", pack_dir])
    if result.returncode < 0 or "Sanitizer" in result.stderr:
        raise SystemExit(f"layerpack-pack verify {pack_dir} crashed:\n{result.stderr}")
    return result.returncode == 0


def differences(expected_dir, actual_dir):
    """Names of files that differ, are missing or are extra (byte comparison)."""
    expected, actual = sorted(os.listdir(expected_dir)), sorted(os.listdir(actual_dir))
    problems = [f"missing {n}" for n in expected if n not in actual]
    problems += [f"extra {n}" for n in actual if n not in expected]
    for name in expected:
        if name in actual and not filecmp.cmp(os.path.join(expected_dir, name), os.path.join(actual_dir, name), shallow=False):
            problems.append(f"differs {name}")
    return problems
