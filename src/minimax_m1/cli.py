"""Command line: `minimax-m1 generate ...` (more subcommands join as they are built)."""
from __future__ import annotations

import argparse
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or preset name (tiny, minimax-m1)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)


def _engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(device=a.device, dtype=a.dtype, load_format=a.load_format, max_model_len=a.max_model_len,
                max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                gpu_memory_utilization=a.gpu_memory_utilization)


def _generate(a: argparse.Namespace) -> int:
    from . import LLM, SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed, ignore_eos=a.ignore_eos)
    llm = LLM(a.model, progress=True, **_engine_kwargs(a))
    prompt = a.prompt
    if a.chat:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minimax-m1", description="Run the MiniMax-M1 language model.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    _add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.set_defaults(func=_generate)

    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"minimax-m1: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
