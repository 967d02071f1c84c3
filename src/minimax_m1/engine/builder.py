"""From engine arguments to a running engine: resolve the model, build it on the meta device, load
weights into place, size the state pool and KV cache from the memory budget."""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys

import torch

from ..config import (ConfigError, ModelConfig, ParallelConfig, QuantConfig, minimax_m1_config, minimax_m1_slice,
                      tiny_config)
from ..models.minimax_m1 import MiniMaxM1ForCausalLM
from ..quantization.checkpoint import checkpoint_quantization
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer, tiny_tokenizer
from ..weights import init_dummy, load_checkpoint
from .cache import CacheManager
from .llm_engine import LLMEngine
from .memory import check_fits
from .model_runner import ModelRunner
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence
from .step_channel import Capacity

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "minimax-m1", "minimax-m1:START-END")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclasses.dataclass
class EngineArgs:
    model: str
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | torch.dtype | None = None  # default: bf16 on cuda, fp32 on cpu; "auto" means the same
    load_format: str = "auto"  # "auto" (safetensors) or "dummy" (random weights of the real shapes)
    seed: int = 0  # dummy-weight seed
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    block_size: int = 256  # tokens per KV block (flash attention's paged kernel wants multiples of 256)
    gpu_memory_utilization: float = 0.9
    cpu_cache_memory_gb: float = 0.25  # cache budget when running on the CPU
    num_kv_blocks: int | None = None  # override the KV block count the memory budget gives (tests, tuning)
    lm_head_fp32: bool = False  # keep the output head's weights in fp32 (a fidelity option)
    enforce_eager: bool = False  # never capture decode steps in CUDA graphs
    # launch a decode step before the last one's tokens reach the host; None: on wherever it serves (one CUDA
    # device: on an H200 it took 1-stream TPOT from 2.39 to 2.24 ms, 256 streams from 4822 to 5013 tok/s)
    async_scheduling: bool | None = None
    progress: bool = True
    tokenizer: str | None = None  # a folder with tokenizer.json to use instead of the model's own
    quantization: str | None = None  # 8-bit routed experts: "fp8" or "experts_int8" (default: the checkpoint's)
    # parallelism (engine/workers.py): one process per rank, this one is rank 0
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # experts whole, num_local_experts / tensor_parallel_size per rank
    emulate_rank: int | None = None  # build only this rank's share, collectives skipped (the bench)
    distributed_backend: str | None = None  # default nccl on CUDA, gloo on the CPU; gloo lets ranks share a GPU
    all_reduce: str = "auto"  # the small decode all-reduces: "auto", "symm_mem" or "nccl" (small_all_reduce.py)
    collective_timeout_s: float = 300.0  # a collective (or a rank's step input) waited on longer fails the engine

    def __post_init__(self):
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"--device {self.device!r} is not a device: use cuda, cuda:N or cpu") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: " + (
                f"this torch ({torch.__version__}) has no CUDA support; install a CUDA build or use --device cpu"
                if torch.version.cuda is None else "no CUDA GPU is visible (see nvidia-smi and CUDA_VISIBLE_DEVICES); "
                "use --device cpu"))
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device {self.device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if self.dtype in (None, "auto"):
            self.dtype = torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32
        elif isinstance(self.dtype, str):
            if self.dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {self.dtype!r}: use one of {sorted(_DTYPES)}")
            self.dtype = _DTYPES[self.dtype]
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        QuantConfig.parse(self.quantization)  # a bad method name fails here, naming the choices
        self.parallel_config()  # a bad size fails here
        if self.distributed_backend is None:
            self.distributed_backend = "nccl" if device.type == "cuda" else "gloo"
        if self.distributed_backend not in ("nccl", "gloo"):
            raise ConfigError(f"distributed_backend must be 'nccl' or 'gloo', got {self.distributed_backend!r}")
        if self.distributed_backend == "nccl" and device.type != "cuda":
            raise ConfigError("distributed_backend='nccl' needs CUDA devices: use gloo on the CPU")
        if self.all_reduce not in ("auto", "symm_mem", "nccl"):
            raise ConfigError(f"all_reduce must be 'auto', 'symm_mem' or 'nccl', got {self.all_reduce!r}")
        n = self.tensor_parallel_size
        if self.async_scheduling is None:
            self.async_scheduling = device.type == "cuda" and (n == 1 or self.emulate_rank is not None)
        elif self.async_scheduling and n > 1 and self.emulate_rank is None:
            raise ConfigError("async_scheduling runs on one device for now: the other ranks would need each step's "
                              "sampled tokens before the host has them; leave it off with tensor_parallel_size > 1")
        if n > 1 and self.emulate_rank is None and self.distributed_backend == "nccl":
            have = torch.cuda.device_count() - (device.index or 0)
            if n > have:
                raise ConfigError(f"--tensor-parallel-size {n} needs {n} GPUs (one per rank) from {device}, but "
                                  f"{have} are visible; NCCL cannot put two ranks on one GPU")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.enable_expert_parallel, self.emulate_rank)

    @property
    def num_processes(self) -> int:
        """Processes this engine runs on: one per rank, one when emulating a rank."""
        return 1 if self.emulate_rank is not None else self.tensor_parallel_size


def worker_args(args: EngineArgs, rank: int, backend: str) -> EngineArgs:
    """Rank `rank`'s EngineArgs: rank 0's, on that rank's device."""
    from .workers import rank_device

    return dataclasses.replace(args, device=str(rank_device(torch.device(args.device), rank, backend)))


def load_model(args: EngineArgs, parallel: ParallelConfig | None = None
               ) -> tuple[ModelConfig, MiniMaxM1ForCausalLM, Tokenizer | None, list[int]]:
    """Returns (config, this rank's model with weights, tokenizer or None, EOS token ids). `parallel`: how the
    model splits over ranks (default: one rank); see distributed.py for the process group it needs."""
    path = pathlib.Path(args.model)
    tokenizer, eos = None, []
    config = model_config(args)
    if args.model == "tiny":
        tokenizer = tiny_tokenizer()
    elif path.is_dir():
        if (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_dir(path)
        gen = path / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text()).get("eos_token_id")
            eos += [] if e is None else [e] if isinstance(e, int) else list(e)
    tokenizer = Tokenizer.from_dir(args.tokenizer) if args.tokenizer is not None else tokenizer
    eos = sorted(set(eos + config.eos_token_id + (tokenizer.eos_token_ids if tokenizer else [])))

    par = parallel or ParallelConfig()
    par.check(config)
    quant = quant_config(args)
    check_fits(config, args.model, args.dtype, args.device, tp=par.tensor_parallel_size,
               ep=par.enable_expert_parallel, expert_bits=quant and quant.expert_bits, head_fp32=args.lm_head_fp32,
               block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization, options=vars(args))
    model = build_model(config, args, parallel, quant)
    if args.model == "tiny" or args.load_format == "dummy":
        init_dummy(model, seed=args.seed, progress=args.progress)  # the same model on every device and rank
    else:
        load_checkpoint(model, path, progress=args.progress)
    model.eval()
    return config, model, tokenizer, eos


def model_config(args: EngineArgs) -> ModelConfig:
    """The model's configuration alone (a preset's, or a checkpoint directory's config.json)."""
    if args.model == "tiny":
        return tiny_config(tiny_tokenizer().vocab_size)
    if args.model == "minimax-m1" or args.model.startswith("minimax-m1:"):
        if args.load_format != "dummy":
            raise ValueError(f"the {args.model!r} preset has shapes but no weights: pass load_format='dummy', "
                             "or a checkpoint directory")
        return _real_shapes(args.model)
    if pathlib.Path(args.model).is_dir():
        return ModelConfig.from_file(args.model)
    raise FileNotFoundError(f"model {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
                            f"directory with config.json")


def load_tokenizer(args: EngineArgs) -> Tokenizer | None:
    """The tokenizer load_model gives, without the model (the server's copy, beside the engine core's)."""
    if args.tokenizer is not None:
        return Tokenizer.from_dir(args.tokenizer)
    if args.model == "tiny":
        return tiny_tokenizer()
    path = pathlib.Path(args.model)
    return Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None


def quant_config(args: EngineArgs) -> QuantConfig | None:
    """args.quantization, else the method a checkpoint directory's config.json names (an 8-bit checkpoint loads
    as what it is). A checkpoint in one method asked for in the other is read as values and quantised again."""
    saved = None
    if args.model not in ("tiny", "minimax-m1") and not args.model.startswith("minimax-m1:"):
        saved = checkpoint_quantization(args.model)
    method = args.quantization or saved
    if saved is not None and args.quantization is None:
        logger.info("%s holds %s experts: loading them as such", args.model, saved)
    elif saved is not None and saved != method:
        logger.warning("%s holds %s experts; --quantization %s quantises their dequantised values again (two "
                       "roundings)", args.model, saved, method)
    return QuantConfig.parse(method)


def build_model(config: ModelConfig, args: EngineArgs, parallel: ParallelConfig | None = None,
                quant: QuantConfig | None = None) -> MiniMaxM1ForCausalLM:
    """This rank's model, parameters allocated (uninitialised) straight on the device in args.dtype (8-bit
    experts in their own types). Not on the meta device: each parameter carries its weight loader, which moving
    off meta would drop."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with torch.device(args.device):
            model = MiniMaxM1ForCausalLM(config, parallel, quant=quant)
    finally:
        torch.set_default_dtype(previous)
    if args.lm_head_fp32 and not config.tie_word_embeddings:
        model.lm_head.float()
    return model


def _real_shapes(name: str) -> ModelConfig:
    """"minimax-m1" (all 80 layers) or "minimax-m1:START-END" (layers START..END-1, e.g. minimax-m1:3-8)."""
    if name == "minimax-m1":
        return minimax_m1_config()
    try:
        start, end = (int(x) for x in name.split(":", 1)[1].split("-"))
    except ValueError:
        raise ValueError(f"bad slice {name!r}: write minimax-m1:START-END, e.g. minimax-m1:3-8") from None
    return minimax_m1_slice(start, end)


def _requested_max_len(config: ModelConfig, args: EngineArgs) -> int:
    """max_model_len as asked (capped by the model's positions), before the KV blocks cap it."""
    return min(config.max_position_embeddings, args.max_model_len or config.max_position_embeddings)


def plan_caches(config: ModelConfig, args: EngineArgs, budget_bytes: int, tp: int = 1) -> tuple[int, int]:
    """Split one rank's cache budget: up to max_num_seqs state slots from at most half of it, KV blocks from the
    rest (tp: the rank's share of the heads)."""
    slot_bytes = CacheManager.bytes_per_slot(config, tp)
    block_bytes = CacheManager.bytes_per_block(config, args.block_size, args.dtype, tp)
    if args.num_kv_blocks is not None:  # KV blocks fixed (tests, benchmarks): the rest of the budget holds slots
        left = budget_bytes - args.num_kv_blocks * block_bytes
        slots = args.max_num_seqs if slot_bytes == 0 else min(args.max_num_seqs, max(left, 0) // slot_bytes)
        if slots < 1:
            raise MemoryError(f"the cache budget ({budget_bytes / 2**30:.2f} GiB) holds {args.num_kv_blocks} KV blocks "
                              f"({args.num_kv_blocks * block_bytes / 2**30:.2f} GiB) but then not one request's "
                              f"lightning state ({slot_bytes / 2**20:.1f} MiB)")
        return slots, args.num_kv_blocks
    slots = args.max_num_seqs if slot_bytes == 0 else min(args.max_num_seqs, budget_bytes // 2 // slot_bytes)
    if slots < 1:
        raise MemoryError(f"the cache budget ({budget_bytes / 2**30:.2f} GiB) cannot hold one request's lightning "
                          f"state ({slot_bytes / 2**20:.1f} MiB): lower max_num_batched_tokens or raise the budget")
    if block_bytes == 0:
        blocks = slots * -(-_requested_max_len(config, args) // args.block_size)  # no softmax layers: blocks cost nothing
    else:
        blocks = (budget_bytes - slots * slot_bytes) // block_bytes
    if blocks < 1:
        raise MemoryError(f"the cache budget ({budget_bytes / 2**30:.2f} GiB) leaves no room for KV blocks")
    return slots, blocks


@torch.inference_mode()
def _profile_activation_bytes(model, config: ModelConfig, args: EngineArgs) -> int:
    """Peak memory of one full-budget prefill step, run on throwaway caches."""
    device = torch.device(args.device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    n = min(args.max_num_batched_tokens, config.max_position_embeddings - 1)
    cache = CacheManager.for_model(config, 1, -(-n // args.block_size), args.block_size, args.dtype, device,
                                   tp=model.parallel.tensor_parallel_size)
    runner = ModelRunner(model, cache, device)
    seq = Sequence("profile", [0] * n, SamplingParams(max_tokens=1))
    taken = cache.allocate(seq, n)  # the cache was sized for exactly this
    assert taken
    runner.run([ScheduledChunk(seq, n)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del runner, cache
    torch.cuda.empty_cache()
    return peak


def build_engine(args: EngineArgs) -> LLMEngine:
    """The engine; with tensor_parallel_size N > 1 this process becomes rank 0 of N and spawns the others."""
    parallel = args.parallel_config()
    workers = None
    if args.num_processes > 1:
        from .workers import Workers

        parallel.check(model_config(args))  # before any process starts: a size that cannot split fails once

        workers = Workers(args, args.tensor_parallel_size, args.distributed_backend, args.collective_timeout_s)
    try:
        config, model, tokenizer, eos = load_model(args, parallel)
        runner, max_model_len = build_runner(config, model, args, parallel, workers.link if workers else None)
        if workers is not None:
            width = min(runner.cache.num_blocks, runner.cache.blocks_needed(max_model_len) + 1)
            workers.open_channel(Capacity(max(args.max_num_batched_tokens, runner.cache.num_slots),
                                          runner.cache.num_slots, max(width, 1)))
            runner.peers = workers
    except BaseException:
        if workers is not None:
            workers.shutdown()
        raise
    scheduler = Scheduler(runner.cache, runner.cache.num_slots, args.max_num_batched_tokens)
    return LLMEngine(runner, scheduler, tokenizer, eos, config.vocab_size, max_model_len, args.async_scheduling)


def build_runner(config: ModelConfig, model, args: EngineArgs, parallel: ParallelConfig,
                 link=None) -> tuple[ModelRunner, int]:
    """This rank's runner: the cache plan (the same on every rank: `link` makes them agree on the smallest
    budget) and the decode graphs (captured by all ranks together). Returns (runner, max_model_len)."""
    from .workers import SINGLE_LINK

    link = link or SINGLE_LINK
    link.barrier()  # every rank has its weights: collectives from here on
    tp = parallel.tensor_parallel_size
    device = torch.device(args.device)
    if model.group.communicates:
        from .. import small_all_reduce

        small_all_reduce.install(model.group, args.all_reduce, device, [args.dtype, torch.float32])
    if device.type == "cuda":
        activations = _profile_activation_bytes(model, config, args)
        free, total = torch.cuda.mem_get_info(device)
        budget = int(free - (1 - args.gpu_memory_utilization) * total - activations)
        budget //= _ranks_per_device(args)
    else:
        budget = int(args.cpu_cache_memory_gb * 2**30)
    budget = link.agree_min(max(budget, 0))
    slots, blocks = plan_caches(config, args, budget, tp)
    cache = CacheManager.for_model(config, slots, blocks, args.block_size, args.dtype, device, tp=tp)
    assert not config.linear_layers or cache.state_pool.states.shape[2] == model.num_lightning_heads
    assert not config.softmax_layers or cache.kv_cache.kv.shape[4] == model.num_kv_heads
    if link.rank == 0 and args.num_processes > 1:
        cache.state_pool.fresh = []  # the slots to zero on the other ranks too (step_channel.py)
    max_model_len = _requested_max_len(config, args)
    if config.softmax_layers:
        max_model_len = min(max_model_len, blocks * args.block_size)
    if link.rank == 0:
        _report_plan(model, config, args, parallel, slots, blocks, max_model_len)
    runner = ModelRunner(model, cache, device)
    why_eager = _why_eager(args, config, model.quant)
    if why_eager:
        if link.rank == 0:
            logger.info("decode runs eagerly: %s", why_eager)
    else:
        runner.capture_decode_graphs(slots, max_model_len)  # plan_caches keeps slots <= max_num_seqs
    link.barrier()
    return runner, max_model_len


def _ranks_per_device(args: EngineArgs) -> int:
    """Ranks sharing one GPU (gloo ranks on fewer GPUs than ranks): each takes its share of the budget."""
    if args.num_processes == 1:
        return 1
    return -(-args.tensor_parallel_size // max(1, torch.cuda.device_count() - (torch.device(args.device).index or 0)))


def _report_plan(model, config: ModelConfig, args: EngineArgs, parallel: ParallelConfig, slots: int, blocks: int,
                 max_model_len: int) -> None:
    """The memory plan, on rank 0: weights per rank, state slots, KV blocks, the longest context that fits."""
    from .memory import gb

    tp = parallel.tensor_parallel_size
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    who = ("one rank (emulated rank %d of %d)" % (parallel.emulate_rank, tp) if parallel.emulate_rank is not None
           else f"per rank of {tp}{' (expert parallel)' if parallel.enable_expert_parallel else ''}" if tp > 1
           else "one device")
    slot = CacheManager.bytes_per_slot(config, tp)
    block = CacheManager.bytes_per_block(config, args.block_size, args.dtype, tp)
    longest = (f"{blocks * args.block_size} tokens" if config.softmax_layers
               else "any (no softmax layer: context costs no memory)")
    text = (f"memory plan, {who}: weights {gb(weights)}; {slots} lightning state slots of {slot / 2**20:.1f} MiB "
            f"({gb(slots * slot)}); {blocks} KV blocks of {args.block_size} tokens ({gb(blocks * block)}); longest "
            f"context that fits: {longest}; max_model_len {max_model_len}")
    logger.info("%s", text)
    if args.progress and (args.num_processes > 1 or weights >= 2**30):  # not for the README's tiny model
        print(f"minimax-m1: {text}", file=sys.stderr, flush=True)


def _why_eager(args: EngineArgs, config: ModelConfig, quant: QuantConfig | None = None) -> str | None:
    """Why decode steps cannot be captured in CUDA graphs here (None when they can): each op answers for the
    layers that use it."""
    from ..ops import lightning_attn, moe, paged_attention

    if args.enforce_eager:
        return "enforce_eager is set"
    device = torch.device(args.device)
    if device.type != "cuda":
        return "not on a CUDA device"
    if args.num_processes > 1 and args.distributed_backend == "gloo":
        return "gloo collectives cannot be captured in CUDA graphs (use NCCL)"
    config = rank_shapes(config, args.parallel_config())
    reasons = [
        config.linear_layers and lightning_attn.why_not_capturable(config.head_dim, args.dtype),
        config.softmax_layers and paged_attention.why_not_capturable(
            config.num_attention_heads, config.num_key_value_heads, config.head_dim, args.block_size, args.dtype),
        moe.why_not_capturable(config.num_local_experts, config.hidden_size, config.intermediate_size,
                               config.num_experts_per_tok, args.max_num_seqs, args.dtype, device,
                               quant and quant.method),
    ]
    return next((r for r in reasons if r), None)


def rank_shapes(config: ModelConfig, parallel: ParallelConfig) -> ModelConfig:
    """The shapes one rank's kernels see: its heads, KV heads (1 once replicated), experts or expert width."""
    n = parallel.tensor_parallel_size
    if n == 1:
        return config
    experts, width = config.num_local_experts, config.intermediate_size
    if parallel.enable_expert_parallel:
        experts //= n
    else:
        width //= n
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // n,
                               num_key_value_heads=max(1, config.num_key_value_heads // n),
                               num_local_experts=experts, intermediate_size=width)
