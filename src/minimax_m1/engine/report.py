"""What the engine says of itself while serving: one start-up line (dtype, device, parallel sizes, cache plan,
limits) and a throughput line every LOG_INTERVAL_S while there is work. Both are made where the engine lives,
the engine-core process; the server logs the start-up line it is sent."""
from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger("minimax_m1.server")

LOG_INTERVAL_S = 10.0


def engine_summary(engine, device_count: int = 1) -> str:
    """One line of the engine: dtype, device, parallel sizes, cache plan, limits."""
    runner, cache = engine.runner, engine.cache
    dtype = next(runner.model.parameters()).dtype
    kv = cache.num_blocks * cache.block_size
    peers = getattr(runner, "peers", None)  # rank 0 of several (engine/workers.py)
    tp = peers.world_size if peers is not None else device_count
    return (f"{str(dtype).removeprefix('torch.')} on {runner.device}"
            f"{' (' + torch.cuda.get_device_name(runner.device) + ')' if runner.device.type == 'cuda' else ''}, "
            f"tensor parallel {tp}; cache {cache.num_slots} state slots, {cache.num_blocks} KV blocks "
            f"({kv} tokens); max_model_len {engine.max_model_len}, max_num_seqs {engine.scheduler.max_num_seqs}, "
            f"decode {'CUDA graphs' if runner.graphs is not None else 'eager'}")


class ThroughputLog:
    """The periodic throughput line of one engine (the first call sets the baseline)."""

    def __init__(self):
        self._log_last = None

    def maybe_log(self, engine, pending: int = 0, now: float | None = None) -> str | None:
        """Every LOG_INTERVAL_S while there is work: one line with prompt and generation throughput since the
        last line, requests running and waiting, cache use. Returns the line (None when not yet due)."""
        now = time.monotonic() if now is None else now
        last = self._log_last
        if last is None:
            self._log_last = (now, engine.num_prompt_tokens, engine.num_generated_tokens)
            return None
        t0, prompt0, gen0 = last
        if now - t0 < LOG_INTERVAL_S:
            return None
        dt = now - t0
        prompt, gen = engine.num_prompt_tokens - prompt0, engine.num_generated_tokens - gen0
        self._log_last = (now, engine.num_prompt_tokens, engine.num_generated_tokens)
        s, usage = engine.scheduler, engine.cache.usage()
        if not (prompt or gen or s.running or s.waiting or pending):
            return None
        line = (f"throughput: {prompt / dt:.1f} prompt tokens/s, {gen / dt:.1f} generated tokens/s; "
                f"{len(s.running)} running, {len(s.waiting) + pending} waiting; state slots "
                f"{100 * usage.state_slots:.0f}% used, KV cache {100 * usage.kv_blocks:.0f}% used")
        logger.info(line)
        return line
