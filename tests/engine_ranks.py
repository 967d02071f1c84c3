"""An N-rank engine in a process of its own (run as a script by test_parallel_engine.py, under a timeout):
`python engine_ranks.py OUT.json SPEC_JSON`. It writes the greedy tokens and prompt logits it got, the worker
pids, and for spec "kill": what killing a worker did."""
import json
import os
import signal
import sys
import threading
import time

import torch

from minimax_m1 import LLM, SamplingParams

PROMPTS = [[(7 * i + 3) % 250 for i in range(37)], [5, 4, 3], [(11 * i + 1) % 250 for i in range(20)]]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
# 16 tokens a step: the 37- and 20-token prompts prefill in chunks, then all decode together
ENGINE = dict(max_num_batched_tokens=16, progress=False, device="cpu")


def generate(llm: LLM) -> dict:
    out = llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)
    return {"tokens": [o.outputs[0].token_ids for o in out],
            "logits": llm.prompt_logits(PROMPTS[0]).tolist()}  # chunked prefill, all positions


def main() -> None:
    path, spec = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    llm = LLM("tiny", tensor_parallel_size=spec["tp"], enable_expert_parallel=spec.get("ep", False), **ENGINE)
    result = {"pids": [p.pid for p in llm.engine.runner.peers.procs] if spec["tp"] > 1 else []}
    if spec.get("kill"):
        llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=PARAMS)  # the ranks work
        victim = result["pids"][0]
        threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()  # mid-generation
        start = time.monotonic()
        try:
            llm.generate(prompt_token_ids=PROMPTS * 20, sampling_params=SamplingParams(max_tokens=4000, ignore_eos=True))
            result["error"] = None
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"
        result["seconds"] = time.monotonic() - start
    else:
        result.update(generate(llm))
    llm.shutdown()
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
