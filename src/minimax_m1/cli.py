"""Command line: `minimax-m1 generate ...` streams one prompt; `minimax-m1 serve ...` runs the OpenAI-compatible
HTTP server; `minimax-m1 quantize SRC DST --quantization METHOD` writes a checkpoint with 8-bit experts."""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import traceback
import unicodedata

from .config import QUANT_METHODS, UserError


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, where it has one worth saying (not None or off) and its help does not
    already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not _worth_saying(action) or "default" in text:
            return text
        return super()._get_help_string(action)

    def _format_action(self, action):
        if action.help is None and _worth_saying(action):  # a flag without help still shows its default
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _worth_saying(action) -> bool:
    d = action.default
    return bool(action.option_strings) and not (d is None or d is False or d == argparse.SUPPRESS)


def _add_engine_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="checkpoint directory or preset name (tiny, minimax-m1)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--tokenizer", default=None,
                   help="a folder with tokenizer.json to use instead of the model's (for a checkpoint without one)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--quantization", default=None, choices=QUANT_METHODS,
                   help="8-bit routed experts: fp8 (W8A8 e4m3) or experts_int8 (W8A16); bf16 checkpoints are "
                        "quantised while loading (default: as the checkpoint is, see `minimax-m1 quantize`)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before the previous one's tokens reach the host, so the device "
                        "does not idle through the host's work (one device; greedy and seeded sampling, no "
                        "logprobs, penalties, logit bias or grammars in the batch, else steps run as usual; "
                        "default: on with one CUDA device)")
    add_parallel_args(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Tensor/expert parallelism: one process per rank on this machine (README: several machines)."""
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N ranks, one GPU each (this process is rank 0 and starts the others)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="give each rank whole experts (num_local_experts / N) instead of 1/N of every expert")
    p.add_argument("--all-reduce", default="auto", choices=["auto", "symm_mem", "nccl"],
                   help="the decode step's small all-reduces: PyTorch symmetric memory where it runs (auto), "
                        "always it (symm_mem), or NCCL for all")


def _add_limit_args(s: argparse.ArgumentParser) -> None:
    from .server.args import ServerArgs

    d = ServerArgs(max_connections=1)  # the defaults (max_connections's comes from the open-file limit)
    s.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="Host header names accepted besides localhost/127.0.0.1/[::1] when bound to loopback "
                        "(DNS-rebinding protection); '*' turns the check off")
    s.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="browser origins allowed by CORS (default: none, no CORS headers)")
    s.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"largest request body; larger gets 413")
    s.add_argument("--max-request-seconds", type=float, default=d.max_request_seconds,
                   help="longest generation of one request: then it ends with finish_reason 'length' and "
                        f"stop_reason 'max_request_seconds' (0: no limit)")
    s.add_argument("--max-num-seqs-per-request", type=int, default=d.max_num_seqs_per_request,
                   help="most sequences (prompts x n) one request may ask for")
    s.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="on SIGTERM/SIGINT, seconds in-flight requests get to finish before they are aborted; "
                        "a second signal exits at once")
    s.add_argument("--max-connections", type=int, default=None,
                   help="open connections allowed; more are refused with 503 (default: the open-file limit "
                        "less a reserve, at most 4096)")
    s.add_argument("--timeout-keep-alive", type=float, default=d.timeout_keep_alive,
                   help="close a keep-alive connection idle this long (seconds)")
    s.add_argument("--timeout-header", type=float, default=d.timeout_header,
                   help="a request's headers must arrive within this (seconds)")
    s.add_argument("--timeout-body", type=float, default=d.timeout_body,
                   help="a request's body must arrive within this after its headers (seconds)")


def _engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(device=a.device, dtype=a.dtype, load_format=a.load_format, tokenizer=a.tokenizer,
                max_model_len=a.max_model_len,
                max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                gpu_memory_utilization=a.gpu_memory_utilization, quantization=a.quantization,
                tensor_parallel_size=a.tensor_parallel_size, enable_expert_parallel=a.enable_expert_parallel,
                all_reduce=a.all_reduce, async_scheduling=a.async_scheduling)


def _generate(a: argparse.Namespace) -> int:
    from . import LLM, SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            min_p=a.min_p, seed=a.seed, ignore_eos=a.ignore_eos, stop=a.stop, logprobs=a.logprobs)
    llm = LLM(a.model, progress=True, **_engine_kwargs(a))
    prompt = a.prompt
    if a.chat:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    escape = not a.raw and sys.stdout.isatty()

    def write(text: str, stream=sys.stdout) -> None:
        stream.write(escape_nonprintable(text) if escape or stream is not sys.stdout else text)
        stream.flush()

    if a.logprobs is None:
        for piece in llm.stream(prompt, params):
            write(piece)
        sys.stdout.write("\n")
        return 0
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    write(out.text)
    sys.stdout.write("\n")
    # the logprobs on stderr, one token a line: its text, logprob, rank, then the top alternatives
    for token, entry in zip(out.token_ids, out.logprobs):
        lp = entry[token]
        alts = "  ".join(f"{v.decoded_token!r} {v.logprob:.4f}" for t, v in entry.items() if t != token)
        write(f"{lp.decoded_token!r}\t{lp.logprob:.4f}\trank {lp.rank or '>' + str(a.logprobs)}"
              f"{chr(9) + alts if alts else ''}\n", sys.stderr)
    write(f"cumulative logprob {out.cumulative_logprob:.4f}\n", sys.stderr)
    return 0


# Bidirectional embedding, override and isolate controls: they reorder how a terminal shows what follows.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape_nonprintable(text: str) -> str:
    """Control characters (Unicode Cc: ESC, CR, BEL, ...; not newline or tab), lone surrogates and the bidi
    controls as Python escapes (ESC -> \\x1b, U+202E -> \\u202e), so that a model's raw output cannot drive the
    terminal. Everything else, spaces and joiners of any script included, stays as it is."""
    def escape(c: str) -> str:
        if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs") and c not in _BIDI_CONTROLS:
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return "".join(map(escape, text))


def _quantize(a: argparse.Namespace) -> int:
    from .quantization.convert import quantize_checkpoint

    dst = quantize_checkpoint(a.src, a.dst, a.quantization, progress=True)
    print(f"wrote {dst} with {a.quantization} experts: load it with --model {dst} --quantization {a.quantization}")
    return 0


def _serve(a: argparse.Namespace) -> int:
    from .engine.builder import EngineArgs, load_tokenizer
    from .server.api import build_app
    from .server.async_engine import AsyncEngine
    from .server.args import ServerArgs
    from .server.launch import run_server

    from .server.startup import check_chat_template, reserve_port

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.model_tag is not None and a.model is not None and a.model_tag != a.model:
        raise ValueError(f"the model is given twice ({a.model_tag!r} and --model {a.model!r}): give it once")
    a.model = a.model_tag or a.model
    if a.model is None:
        raise ValueError("serve needs a model: `minimax-m1 serve MODEL` (a checkpoint directory or a preset: tiny, "
                         "minimax-m1)")
    if a.chat_template is not None:
        a.chat_template = _read_template(a.chat_template)
        check_chat_template(a.chat_template)  # before the model loads: a broken template fails now
    args = ServerArgs(
        host=a.host, port=a.port, api_key=_api_key(a), reasoning_parser=a.reasoning_parser != "none",
        tool_call_parser=a.tool_call_parser != "none", model_root=a.model, allowed_hosts=a.allowed_hosts or [], allowed_origins=a.allowed_origins or [],
        max_request_bytes=a.max_request_bytes, max_request_seconds=a.max_request_seconds or None,
        max_num_seqs_per_request=a.max_num_seqs_per_request, shutdown_timeout=a.shutdown_timeout,
        max_connections=a.max_connections, timeout_keep_alive=a.timeout_keep_alive, timeout_header=a.timeout_header,
        timeout_body=a.timeout_body, log_level=a.uvicorn_log_level)
    sock = reserve_port(a.host, a.port)  # a port in use is found now, not after the model has loaded
    try:
        engine_args = EngineArgs(model=a.model, progress=True, **_engine_kwargs(a))
        tokenizer = load_tokenizer(engine_args)
        if tokenizer is None:
            raise ValueError(f"the model {a.model!r} has no tokenizer (tokenizer.json): the server needs one to "
                             f"read and write text; pass --tokenizer DIR")
        if a.chat_template is not None:
            check_chat_template(a.chat_template, tokenizer)
            tokenizer.chat_template = a.chat_template
        # the engine core: a process of its own that builds the engine (and any parallel workers)
        engine = AsyncEngine.in_process(engine_args, tokenizer, max_request_seconds=args.max_request_seconds)
        try:
            served = a.served_model_name or [a.model]
            log = logging.getLogger("minimax_m1.server")
            log.info("serving %s as %s: %s", a.model, ", ".join(served), engine.engine.summary)
            host = f"[{a.host}]" if ":" in a.host else a.host
            log.info("listening on http://%s:%d", host, sock.getsockname()[1])
            return run_server(build_app(engine, served, args), args, sock)
        finally:
            engine.shutdown()
    finally:
        sock.close()


def _api_key(a: argparse.Namespace) -> str | None:
    """--api-key, else the first line of --api-key-file, else $MINIMAX_M1_API_KEY."""
    if a.api_key and a.api_key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    if a.api_key_file:
        with open(a.api_key_file, encoding="utf-8") as f:
            key = f.readline().strip()
        if not key:
            raise ValueError(f"--api-key-file {a.api_key_file!r} is empty")
        return key
    return a.api_key or os.environ.get("MINIMAX_M1_API_KEY") or None


def _read_template(value: str) -> str:
    """--chat-template: a file, or the template itself (as vLLM takes it)."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise FileNotFoundError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def _debug_requested() -> bool:
    return os.environ.get("MINIMAX_M1_DEBUG", "").lower() not in ("", "0", "false", "no", "off")


def _report(e: BaseException, debug: bool) -> int:
    """One line on stderr for an error (the traceback too with --debug); the exit code: 2 for a mistake the
    user can fix (a bad file, flag or setting, too little memory), 1 for anything else."""
    user = isinstance(e, (UserError, ValueError, OSError, MemoryError))
    if debug:
        traceback.print_exc()
    text = " ".join(str(e).split()) or type(e).__name__
    if user:
        print(f"minimax-m1: error: {text}", file=sys.stderr)
    else:
        if len(text) > 300:
            text = text[:300] + "..."
        print(f"minimax-m1: internal error: {type(e).__name__}: {text}"
              + ("" if debug else " (re-run with --debug for the traceback)"), file=sys.stderr)
    return 2 if user else 1


def main(argv: list[str] | None = None) -> int:
    """The `minimax-m1` command. A user's mistake prints one line on stderr and exits with code 2; `--debug`
    (or MINIMAX_M1_DEBUG=1) adds the traceback."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="minimax-m1", description="Run the MiniMax-M1 language model.")
    parser.add_argument("--version", action="version", version=f"minimax-m1 {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also MINIMAX_M1_DEBUG=1)")
    # --debug also after the subcommand (SUPPRESS: absent there, it does not hide the global flag)
    debug_flag = argparse.ArgumentParser(add_help=False)
    debug_flag.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    shows_defaults = _ShowDefaults
    g = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout", parents=[debug_flag],
                       formatter_class=shows_defaults)
    _add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text where this string appears (repeat for several)")
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="print each token's logprob and the N most likely alternatives on stderr (the text is then "
                        "printed at the end, not streamed)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--raw", action="store_true", help="write the text as generated; by default a terminal gets "
                   "non-printable characters escaped (\\x1b), a pipe or file the raw text")
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="serve the OpenAI API (/v1/completions, /v1/chat/completions) over HTTP",
                       parents=[debug_flag], formatter_class=shows_defaults)
    s.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint directory or preset name (as --model)")
    _add_engine_args(s, model_required=False)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes. A key given here shows in `ps`: "
                        "prefer --api-key-file or $MINIMAX_M1_API_KEY")
    s.add_argument("--api-key-file", default=None, help="read the API key from the first line of this file")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model name(s) requests use; the first is reported (default: the model)")
    s.add_argument("--chat-template", default=None, help="a Jinja chat template (file or text) to use instead "
                   "of the checkpoint's")
    s.add_argument("--reasoning-parser", default="minimax_m1", choices=["minimax_m1", "none"],
                   help="split <think>...</think> into reasoning_content (none: return the raw text)")
    s.add_argument("--tool-call-parser", default="minimax_m1", choices=["minimax_m1", "none"],
                   help="read MiniMax-M1's <tool_calls> block into tool_calls for tool_choice auto (none: leave it "
                        "in the content; required and named choices are parsed anyway)")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    _add_limit_args(s)
    s.set_defaults(func=_serve)

    q = sub.add_parser("quantize", help="write a copy of a checkpoint with 8-bit routed experts (loads skip the "
                                        "conversion)", parents=[debug_flag])
    q.add_argument("src", help="checkpoint directory (bf16, or fp8 with block scales)")
    q.add_argument("dst", help="new or empty directory for the quantised checkpoint")
    q.add_argument("--quantization", required=True, choices=QUANT_METHODS)
    q.set_defaults(func=_quantize)

    # the benchmark has its own flags (minimax_m1.bench): everything after `bench` goes to it
    sub.add_parser("bench", help="decode/prefill speed of a real-shape MiniMax-M1 slice on one GPU "
                                 "(see `minimax-m1 bench --help`)", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _debug_requested()
    if argv[:2] == ["--debug", "bench"]:
        debug, argv = True, argv[1:]
    try:
        if argv[:1] == ["bench"]:
            from .bench import main as bench_main
            return bench_main(argv[1:])
        a = parser.parse_args(argv)
        debug = debug or a.debug
        return a.func(a)
    except KeyboardInterrupt:
        print("minimax-m1: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minimax-m1 generate ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
        return 141
    except Exception as e:
        return _report(e, debug)


if __name__ == "__main__":
    sys.exit(main())
