import json
import os
import pty
import shutil
import subprocess
import unicodedata
import sys

import pytest
import torch

from minimax_m1 import cli
from minimax_m1.engine import memory


def _run(*args, env=None, **kw):
    exe = shutil.which("minimax-m1")
    cmd = [exe] if exe else [sys.executable, "-m", "minimax_m1.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env}, **kw)


def test_generate_tiny_end_to_end():
    r = _run("generate", "--model", "tiny", "--prompt", "Hello there", "--max-tokens", "16", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip("\n")) > 0
    again = _run("generate", "--model", "tiny", "--prompt", "Hello there", "--max-tokens", "16", "--ignore-eos")
    assert again.stdout == r.stdout  # greedy by default: the same text


def test_first_output_is_clean():
    """The README's first command: nothing on stderr (no NumPy warning, no progress bar for tiny)."""
    r = _run("generate", "--model", "tiny", "--prompt", "Hello, MiniMax")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_sampling_flags():
    r = _run("generate", "--model", "tiny", "--prompt", "x", "--max-tokens", "8", "--temperature", "0.8",
             "--top-p", "0.9", "--top-k", "20", "--seed", "7", "--chat")
    assert r.returncode == 0, r.stderr


# ---- escaping what the model writes -------------------------------------------------------------

def test_escape_nonprintable():
    assert cli.escape_nonprintable("a\x1b[31mb\r\x07\x9b\u202e") == "a\\x1b[31mb\\x0d\\x07\\x9b\\u202e"
    kept = "line\n\ttab 中文\u3000emoji \U0001F468\u200d\U0001F469 \ufffd"  # spaces and joiners of any script stay
    assert cli.escape_nonprintable(kept) == kept


def _run_on_terminal(*args):
    """stdout on a pseudo-terminal, so that the CLI sees a tty; returns what the terminal received."""
    exe = shutil.which("minimax-m1")
    cmd = ([exe] if exe else [sys.executable, "-m", "minimax_m1.cli"]) + list(args)
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    return out.decode().replace("\r\n", "\n")  # the terminal's own newline translation


def test_terminal_gets_escaped_text():
    """The random tiny model writes control bytes (its byte tokens; for this prompt, among others 0x03 and 0x10): a
    terminal gets them escaped, `--raw` (and a pipe: test_generate_tiny_end_to_end reads one) the text as
    generated."""
    args = ("generate", "--model", "tiny", "--prompt", "Hello")
    raw = _run_on_terminal(*args, "--raw")
    controls = [c for c in raw if c != "\n" and (unicodedata.category(c) == "Cc" or c == "\ufffd")]
    assert controls, "the random model's output holds no control character to escape: pick another prompt"
    on_tty = _run_on_terminal(*args)
    assert on_tty == cli.escape_nonprintable(raw) and on_tty != raw
    assert not any(unicodedata.category(c) == "Cc" for c in on_tty.replace("\n", ""))


# ---- user mistakes: exit code 2, one line on stderr naming the file or flag, no traceback ----------

CONFIG = {"architectures": ["MiniMaxM1ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 16,
          "num_local_experts": 4, "num_experts_per_tok": 2, "attn_type_list": [0, 1], "rotary_dim": 8,
          "rope_theta": 1e4, "postnorm": True}


def _checkpoint(tmp_path, config_text: str, weights: bytes | None = None):
    (tmp_path / "config.json").write_text(config_text)
    if weights is not None:
        (tmp_path / "model.safetensors").write_bytes(weights)
    return str(tmp_path)


def _truncated_safetensors(tmp_path) -> bytes:
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(64, 32)}, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    return data[: len(data) // 2]  # an interrupted download


def _main(capsys, *argv):
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(rc, err, *names):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("minimax-m1: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.mark.parametrize("edit,names", [
    (lambda d: d.pop("num_attention_heads"), ["config.json", "num_attention_heads", "missing"]),
    (lambda d: d.update(hidden_size="6144"), ["config.json", "hidden_size", "'6144'", "without quotes"]),
    (lambda d: d.update(attn_type_list="0,1"), ["config.json", "attn_type_list", "list"]),
    (lambda d: d.update(postnorm="yes"), ["config.json", "postnorm", "true or false"]),
    (lambda d: d.update(num_attention_heads=0), ["config.json", "num_attention_heads", ">= 1"]),
])
def test_config_mistakes(tmp_path, capsys, edit, names):
    d = dict(CONFIG)
    edit(d)
    model = _checkpoint(tmp_path, json.dumps(d, indent=2))
    _one_line_error(*_main(capsys, "generate", "--model", model, "--prompt", "x"), *names)


def test_config_holding_a_list(tmp_path, capsys):
    model = _checkpoint(tmp_path, json.dumps([CONFIG]))
    _one_line_error(*_main(capsys, "generate", "--model", model, "--prompt", "x"), "config.json", "JSON object",
                    "list")


def test_config_invalid_json(tmp_path, capsys):
    text = json.dumps(CONFIG, indent=2).replace('"vocab_size": 64,', '"vocab_size": 64,,')
    model = _checkpoint(tmp_path, text)
    line = text[:text.index(",,")].count("\n") + 1
    _one_line_error(*_main(capsys, "generate", "--model", model, "--prompt", "x"),
                    str(tmp_path / "config.json"), "not valid JSON", f"line {line} column")


def test_truncated_weights(tmp_path, capsys):
    model = _checkpoint(tmp_path, json.dumps(CONFIG), _truncated_safetensors(tmp_path))
    (tmp_path / "whole.safetensors").unlink()
    _one_line_error(*_main(capsys, "generate", "--model", model, "--prompt", "x"),
                    str(tmp_path / "model.safetensors"), "truncated or corrupt", "download it again")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is unavailable")
def test_cuda_device_without_cuda(capsys):
    rc, err = _main(capsys, "generate", "--model", "tiny", "--prompt", "x", "--device", "cuda")
    _one_line_error(rc, err, "--device cuda", "--device cpu")
    if torch.version.cuda is None:
        assert "this torch" in err and "no CUDA support" in err and "install a CUDA build" in err


def test_not_a_device(capsys):
    _one_line_error(*_main(capsys, "generate", "--model", "tiny", "--prompt", "x", "--device", "gpu"),
                    "--device 'gpu'", "cpu")


def test_model_too_large_for_memory(capsys, monkeypatch):
    monkeypatch.setattr(memory, "device_memory", lambda device: (23 * 10**9, 24 * 10**9))
    _one_line_error(*_main(capsys, "generate", "--model", "minimax-m1", "--load-format", "dummy", "--dtype",
                           "bfloat16", "--device", "cpu", "--prompt", "x"),
                    "minimax-m1 needs 912 GB in bf16", "0.3 GB (one request's cache)", "23.0 GB free")


@pytest.mark.parametrize("args,match", [
    (["--model", "no/such/model", "--prompt", "x"], "neither a preset"),
    (["--model", "tiny", "--prompt", "x", "--temperature", "-1"], "temperature"),
])
def test_errors_are_clear(args, match):
    r = _run("generate", *args)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_mistake_through_the_installed_command(tmp_path):
    """The real entry point: one line and exit code 2; --debug or MINIMAX_M1_DEBUG=1 adds the traceback and keeps
    the exit code (`minimax-m1 --debug generate ...`: test_internal_error_is_short)."""
    d = dict(CONFIG)
    del d["num_attention_heads"]
    model = _checkpoint(tmp_path, json.dumps(d))
    args = ["generate", "--model", model, "--prompt", "x"]
    r = _run(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"minimax-m1: error: {tmp_path / 'config.json'}: the required key "
                                             "num_attention_heads is missing: add it, or download the model's "
                                             "config.json again"]
    for debug in (_run(*args, "--debug"), _run(*args, env={"MINIMAX_M1_DEBUG": "1"})):
        assert debug.returncode == 2 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1] == r.stderr.strip()


def test_internal_error_is_short(capsys, monkeypatch):
    import minimax_m1

    def broken(*a, **k):
        raise RuntimeError("something inside broke\nwith a second line")

    monkeypatch.setattr(minimax_m1, "LLM", broken)
    rc, err = _main(capsys, "generate", "--model", "tiny", "--prompt", "x")
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines() == ["minimax-m1: internal error: RuntimeError: something inside broke with a "
                                        "second line (re-run with --debug for the traceback)"]
    rc, err = _main(capsys, "--debug", "generate", "--model", "tiny", "--prompt", "x")
    assert rc == 1 and "Traceback" in err and "re-run" not in err
