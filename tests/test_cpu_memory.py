"""Bounded memory on the CPU path (issue 14): a 32K-token prompt through the tiny model stays under 2 GiB of peak
memory above the built engine. Before the attention reference worked in chunks of queries it built full score
matrices (11.8 GB at 32K tokens).

Measured in a fresh process: the peak resident set (ru_maxrss) after building the engine, and again after the
request; their difference is what the request added at its peak. The attention alone is quadratic work
(~2e9 scores at 32K), so the child is given minutes, not seconds.
"""
import json
import subprocess
import sys

TOKENS = 32768
LIMIT_BYTES = 2 << 30

CHILD = f"""
import json, resource
from minimax_m1 import LLM, SamplingParams

llm = LLM("tiny", device="cpu", max_model_len={TOKENS} + 16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = [(i * 37) % 256 for i in range({TOKENS})]
out = llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=1, ignore_eos=True))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"before_kib": before, "after_kib": after, "generated": len(out[0].outputs[0].token_ids)}}))
"""


def test_32k_prompt_peak_memory_on_cpu():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["generated"] == 1
    added = (result["after_kib"] - result["before_kib"]) * 1024  # Linux reports ru_maxrss in KiB
    assert added < LIMIT_BYTES, f"a {TOKENS}-token prompt added {added / 2**30:.2f} GiB at its peak"
