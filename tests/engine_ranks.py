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
    engine = dict(ENGINE, **spec.get("engine", {}))  # e.g. device cuda, distributed_backend gloo, all_reduce
    model = spec.get("model", "tiny")
    if model == "gpu":  # parallel_util's model at widths the CUDA kernels serve, split at 2 ranks
        import pathlib

        from parallel_util import gpu_config, write_checkpoint

        model = str(write_checkpoint(gpu_config(), pathlib.Path(path).with_suffix(".ckpt"), packed=False))
    llm = LLM(model, tensor_parallel_size=spec["tp"], enable_expert_parallel=spec.get("ep", False),
              **engine)
    peers = llm.engine.runner.peers
    result = {"pids": [p.pid for p in peers.procs] if peers is not None else [],
              "graphs": llm.engine.runner.graphs is not None}
    if spec.get("hang"):  # a worker stops answering (SIGSTOP): the collective times out
        llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=PARAMS)
        os.kill(result["pids"][0], signal.SIGSTOP)
        start = time.monotonic()
        try:
            llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=PARAMS)
            result["error"] = None
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"
        result["seconds"] = time.monotonic() - start
    elif spec.get("kill"):
        llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=PARAMS)  # the ranks work
        victim = result["pids"][0]
        threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()  # mid-generation
        start = time.monotonic()
        try:
            llm.generate(prompt_token_ids=PROMPTS * 20,
                         sampling_params=SamplingParams(max_tokens=4000, ignore_eos=True))
            result["error"] = None
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"
        result["seconds"] = time.monotonic() - start
    else:
        result.update(generate(llm))
    from minimax_m1 import distributed

    reducer = distributed._small_all_reduce  # noqa: SLF001
    result["small_all_reduce"] = None if reducer is None else dict(reducer.calls)
    llm.shutdown()
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
