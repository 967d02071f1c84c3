import shutil
import subprocess
import sys

import pytest


def _run(*args):
    exe = shutil.which("minimax-m1")
    cmd = [exe] if exe else [sys.executable, "-m", "minimax_m1.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300)


def test_generate_tiny_end_to_end():
    r = _run("generate", "--model", "tiny", "--prompt", "Hello there", "--max-tokens", "16", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip("\n")) > 0
    again = _run("generate", "--model", "tiny", "--prompt", "Hello there", "--max-tokens", "16", "--ignore-eos")
    assert again.stdout == r.stdout  # greedy by default: the same text


def test_sampling_flags():
    r = _run("generate", "--model", "tiny", "--prompt", "x", "--max-tokens", "8", "--temperature", "0.8",
             "--top-p", "0.9", "--top-k", "20", "--seed", "7", "--chat")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,match", [
    (["--model", "no/such/model", "--prompt", "x"], "neither a preset"),
    (["--model", "tiny", "--prompt", "x", "--temperature", "-1"], "temperature"),
])
def test_errors_are_clear(args, match):
    r = _run("generate", *args)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr
