"""The parallel engine (engine/workers.py, engine/step_channel.py) on the CPU with gloo: LLM and `minimax-m1 serve`
at 2 ranks give TP=1's greedy tokens; chunked prefill logits match TP=1's; a killed worker ends the engine with a
clear error within 60 s; no process is left behind. Each engine runs in a subprocess under a hard timeout
(engine_ranks.py), since an N-rank engine makes its process rank 0 of a process group."""
import json
import os
import pathlib
import subprocess
import sys
import time

import httpx
import pytest
import torch

import minimax_m1
from minimax_m1.engine.step_channel import RING, STEP, STOP, Capacity, ChannelClosed, ChannelTimeout, StepChannel
from minimax_m1.engine.step_inputs import StepInputs, StepShape
from server_util import ServeProcess

HERE = pathlib.Path(__file__).parent
TOL = 1e-5  # fp32: the ranks' partial sums add up in another order (~1e-6 on logits of size ~3)


def _env() -> dict:
    src = pathlib.Path(minimax_m1.__file__).resolve().parents[1]
    path = os.pathsep.join([str(src), str(HERE), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    if pathlib.Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _gone(pid: int) -> bool:
    """The process exited (or is a zombie waiting to be reaped): not an orphan still running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _run(tmp_path, spec: dict, timeout: float = 240) -> dict:
    out = tmp_path / f"result-{len(list(tmp_path.iterdir()))}.json"
    p = subprocess.run([sys.executable, str(HERE / "engine_ranks.py"), str(out), json.dumps(spec)], env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads(out.read_text())
    deadline = time.monotonic() + 10
    while not all(map(_gone, result["pids"])):
        assert time.monotonic() < deadline, f"worker processes left behind: {result['pids']}"
        time.sleep(0.1)
    result["stderr"] = p.stderr
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("tp1"), {"tp": 1})


@pytest.mark.parametrize("spec", [{"tp": 2}, {"tp": 2, "ep": True}], ids=["tp2", "tp2_ep"])
def test_llm_on_two_ranks_matches_one(tmp_path, reference, spec):
    got = _run(tmp_path, spec)
    assert len(got["pids"]) == 1
    assert got["tokens"] == reference["tokens"]
    diff = (torch.tensor(got["logits"]) - torch.tensor(reference["logits"])).abs().max().item()
    assert diff <= TOL, diff
    assert "Traceback" not in got["stderr"], got["stderr"]


def test_killed_worker_stops_the_engine_within_60s(tmp_path):
    got = _run(tmp_path, {"tp": 2, "kill": True}, timeout=180)
    assert got["error"] is not None and got["error"].startswith("ParallelFailure: rank 1 (pid"), got["error"]
    assert "killed by SIGKILL" in got["error"], got["error"]
    assert got["seconds"] < 60, got["seconds"]


def test_hung_worker_times_out(tmp_path):
    """A worker that stops answering (SIGSTOP): rank 0's collective times out (collective_timeout_s=5), the
    engine stops with an error that says so, and the stopped worker is killed."""
    got = _run(tmp_path, {"tp": 2, "hang": True, "engine": {"collective_timeout_s": 5}}, timeout=180)
    assert got["error"] is not None and "waited longer than collective_timeout_s=5 s" in got["error"], got["error"]
    assert got["seconds"] < 40, got["seconds"]  # the timeout, the monitor's grace, the stop


def test_serve_on_two_ranks(tmp_path, reference):
    """The server's greedy completion on 2 ranks is TP=1's (the same token ids through the OpenAI API); on
    SIGTERM it exits 0 and takes its worker with it."""
    from engine_ranks import PROMPTS

    with ServeProcess("-tp", "2", "--device", "cpu", "--max-num-batched-tokens", "16", log_path=tmp_path / "log",
                      env=_env()) as srv:
        srv.wait_healthy(timeout=180)
        r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 0})
        assert r.status_code == 200, r.text
        children = _children(srv.proc.pid)
        assert len(children) >= 1
        srv.signal()
        assert srv.proc.wait(30) == 0, srv.output()
        output = srv.output()
    ref_text = _tiny_text(reference["tokens"][0])
    assert r.json()["choices"][0]["text"] == ref_text
    deadline = time.monotonic() + 10  # the worker, and multiprocessing's resource tracker, exit with the server
    while not all(map(_gone, children)):
        assert time.monotonic() < deadline, f"processes left behind: {children}"
        time.sleep(0.1)
    assert "Traceback" not in output, output


def test_serve_exits_when_a_worker_dies(tmp_path):
    """A killed worker: the next request fails and the server exits non-zero within 60 s, naming the rank."""
    with ServeProcess("-tp", "2", "--device", "cpu", log_path=tmp_path / "log", env=_env()) as srv:
        srv.wait_healthy(timeout=180)
        _kill_worker(srv)
        start = time.monotonic()
        try:
            r = httpx.post(srv.url + "/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4})
            assert r.status_code >= 500, r.text
        except httpx.TransportError:
            pass  # the server may be gone before it answers
        code = srv.proc.wait(60)
        took = time.monotonic() - start
        output = srv.output()
    assert code != 0 and took < 60, (code, took)
    assert "rank 1 (pid" in output and "killed by SIGKILL" in output, output[-3000:]


def test_idle_serve_exits_when_a_worker_dies(tmp_path):
    """No request needed: the engine core hears of a dead worker from the workers' monitor and ends, and the
    server with it (non-zero, naming the rank) within 30 s."""
    with ServeProcess("-tp", "2", "--device", "cpu", log_path=tmp_path / "log", env=_env()) as srv:
        srv.wait_healthy(timeout=180)
        _kill_worker(srv)
        start = time.monotonic()
        code = srv.proc.wait(30)
        took = time.monotonic() - start
        output = srv.output()
    assert code != 0 and took < 30, (code, took)
    assert "rank 1 (pid" in output and "killed by SIGKILL" in output, output[-3000:]


def _kill_worker(srv) -> None:
    """SIGKILL rank 1: the server's child is the engine core (rank 0), and the worker is the core's child."""
    import signal

    core = next(c for c in _children(srv.proc.pid) if "resource_tracker" not in _cmdline(c))
    worker = next(c for c in _children(core) if "resource_tracker" not in _cmdline(c))
    os.kill(worker, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except FileNotFoundError:
        return ""


def _children(pid: int) -> list[int]:
    out = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _tiny_text(ids: list[int]) -> str:
    from minimax_m1.tokenizer import tiny_tokenizer

    return tiny_tokenizer().decode(ids)


# ---- the step channel ---------------------------------------------------------------------------

def _inputs(step: int, n: int, t: int, w: int) -> StepInputs:
    shape = StepShape(t, n, n, w)
    cu = [0] + [min(t, (i + 1) * t // n) for i in range(n)]
    seq_lens = [b - a for a, b in zip(cu, cu[1:])]
    ctx = [step + 10 * i + seq_lens[i] for i in range(n)]
    i64, i32 = shape.pack([[step * 1000 + j for j in range(t)], list(range(t)), list(range(t, 2 * t)),
                           [c - 1 for c in cu[1:]]],
                          [list(range(n)), ctx, cu, [step + j for j in range(n * w)]], pin=False)
    return StepInputs(shape, i64, i32, seq_lens, ctx)


def test_step_channel_round_trips():
    """Steps of every size up to the capacity (more than RING of them, so slots are reused), the graph flag and
    the fresh slots reach every reader unchanged; then STOP."""
    cap = Capacity(num_tokens=33, num_seqs=5, width=7)
    writer = StepChannel.create(cap, 2)
    readers = [StepChannel.attach(writer.name, cap, 2, r) for r in range(2)]
    try:
        for step in range(3 * RING):
            n, w = 1 + step % 5, 1 + step % 7
            t = n if step % 2 else min(33, n + 7 * step)
            sent = _inputs(step, n, t, w)
            writer.send_step(sent, graph=bool(step % 2), fresh_slots=list(range(step % 3)))
            for r in readers:
                got = r.recv()
                assert got.kind == STEP and got.graph == bool(step % 2) and got.fresh_slots == list(range(step % 3))
                assert got.inputs.shape == sent.shape
                assert torch.equal(got.inputs.i64, sent.i64) and torch.equal(got.inputs.i32, sent.i32)
                assert (got.inputs.seq_lens, got.inputs.context_lens) == (sent.seq_lens, sent.context_lens)
        writer.send_stop()
        assert [r.recv().kind for r in readers] == [STOP, STOP]
    finally:
        for r in readers:
            r.close()
        writer.close()


def test_step_channel_bounds_and_waits():
    cap = Capacity(num_tokens=8, num_seqs=2, width=3)
    writer = StepChannel.create(cap, 1)
    reader = StepChannel.attach(writer.name, cap, 1, 0)
    try:
        with pytest.raises(ValueError, match="exceeds the step channel's capacity"):
            writer.send_step(_inputs(0, 3, 3, 1), graph=False)
        with pytest.raises(ChannelClosed, match="gone"):  # nothing written: the reader gives up when told
            reader.recv(should_stop=lambda: "rank 0 is gone")
        for step in range(RING):  # the ring fills: the writer waits for the reader
            writer.send_step(_inputs(step, 1, 1, 1), graph=True)
        start = time.monotonic()
        with pytest.raises(ChannelTimeout):
            writer.send_step(_inputs(9, 1, 1, 1), graph=True, timeout_s=0.2)
        assert time.monotonic() - start < 2
        assert reader.recv().inputs.i64[0] == 0  # in order
    finally:
        reader.close()
        writer.close()


# ---- GPU: the CUDA kernels at per-rank shapes, and the NCCL / symmetric-memory paths -----------------

GPU_TOL = 3e-2  # bf16 (step 3.9e-3): the ranks' partial sums round once more than one device's (test_parallel.py)
GPU_MODEL = dict(model="gpu", engine=dict(device="cuda", dtype="bfloat16", max_num_batched_tokens=256,
                                           max_num_seqs=8, gpu_memory_utilization=0.3))


def _gpu_spec(tp: int, **engine) -> dict:
    spec = {"tp": tp, "model": GPU_MODEL["model"], "engine": dict(GPU_MODEL["engine"], **engine)}
    return spec


def _rel(got, ref) -> float:
    got, ref = torch.tensor(got), torch.tensor(ref)
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def gpu_reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("gpu_tp1"), _gpu_spec(1))


@pytest.mark.gpu
@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "tp2_ep"])
def test_two_gloo_ranks_on_one_gpu_match_one(tmp_path, gpu_reference, ep):
    """2 gloo ranks share the GPU (eager: gloo cannot be captured) and run the lightning, paged-attention and
    fused MoE kernels at per-rank shapes; their prompt logits match TP=1's on the same GPU."""
    spec = _gpu_spec(2, distributed_backend="gloo")
    spec["ep"] = ep
    got = _run(tmp_path, spec)
    assert not got["graphs"]
    assert _rel(got["logits"], gpu_reference["logits"]) < GPU_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("all_reduce", ["nccl", "symm_mem"])
def test_nccl_ranks_with_graphs_match_one(tmp_path, gpu_reference, all_reduce):
    """2 GPUs, NCCL, decode graphs captured with the collectives inside; the small all-reduces through NCCL or
    symmetric memory (which must then carry them)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    got = _run(tmp_path, _gpu_spec(2, all_reduce=all_reduce))
    assert got["graphs"]
    assert _rel(got["logits"], gpu_reference["logits"]) < GPU_TOL
    if all_reduce == "symm_mem":
        calls = got["small_all_reduce"]
        assert calls is not None and calls["one_shot"] > 0, calls
    else:
        assert got["small_all_reduce"] is None


@pytest.mark.gpu
def test_symm_mem_all_reduce_sums_exactly():
    """Integer-valued messages of every size class (one-shot, two-shot, too big: NCCL) sum exactly."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    p = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "bench_all_reduce.py"), "--check",
                        "--world-size", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "all sums exact" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


# ---- the rank-emulation bench ------------------------------------------------------------------------

@pytest.mark.parametrize("ep,quantization", [(False, None), (True, None), (False, "experts_int8")],
                         ids=["tp", "ep", "tp-int8"])
def test_emulated_rank_bench_runs_on_cpu(ep, quantization):
    """`minimax-m1 bench --emulate-tp 2` on the tiny model: one rank's share, every number labelled; a batch the
    cache cannot hold says why and where decode stops, then runs there; with 8-bit experts as well."""
    cmd = [sys.executable, "-m", "minimax_m1.cli", "bench", "--device", "cpu", "--model", "tiny", "--emulate-tp", "2",
           "--decode-batches", "1,4", "--context", "64", "--prefill", "128,1024", "--max-num-batched-tokens", "64",
           "--num-kv-blocks", "3"] + (["--enable-expert-parallel"] if ep else [])
    cmd += ["--quantization", quantization] if quantization else []
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "emulating rank 0 of 2" in out and out.count("[one rank, no communication]") == 2
    assert ("2 whole experts (each layer at its busiest rank)" if ep else "experts 64 wide") in out
    assert "2 lightning heads, 2 softmax heads, 1 KV head(s)" in out
    assert "4 does not fit: one rank's cache holds 3 KV blocks (1 a request); decode stops at batch 3" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["3"])]
    assert [r[0] for r in rows] == ["1", "3"] and all(float(r[1]) > 0 for r in rows)
    assert "1024 does not fit: one rank's cache holds 768 tokens of KV" in out
    assert ("routed experts experts_int8" in out) == (quantization is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("ep", [False, True], ids=["tp8", "ep8"])
def test_emulated_rank_bench_on_gpu(ep):
    """`minimax-m1 bench --emulate-tp 8` on a 5-layer slice at TP8 rank shapes (8 heads, 1 KV head, 1152-wide or 4
    whole experts), with graphs and the profile: batch 256 runs, the top kernels come with shares."""
    cmd = [sys.executable, "-m", "minimax_m1.cli", "bench", "--model", "minimax-m1:3-8", "--emulate-tp", "8",
           "--decode-batches", "1,256", "--prefill", "8192", "--profile"] + (["--enable-expert-parallel"] if ep else [])
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "8 lightning heads, 8 softmax heads, 1 KV head(s)" in out, out
    assert ("4 whole experts" if ep else "experts 1152 wide") in out and "decode graphs: True" in out, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["256"])}
    assert set(rows) == {"1", "256"} and "does not fit" not in out, out
    assert "profile of one eager decode step, batch 1" in out and "%" in out.split("profile of")[1], out
