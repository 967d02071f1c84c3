"""Paged decode attention (CUDA kernel): time per call and achieved KV bandwidth next to the card's copy rate.

    python benchmarks/bench_paged_attention.py [--max-context N] [--quick]

MiniMax-M1's softmax layers: 64 query heads, 8 kv heads, head_dim 128, bf16, block size 256, shuffled block
tables. Bytes per call: every context's K and V read once (the minimum; q and out are added, <0.1%). Each
case runs inside one CUDA graph of L calls on distinct caches (as the model's 10 softmax layers would;
together at least 256 MiB, so the L2 does not hold them); the time is per call. The copy rate is a 1 GiB
device-to-device copy in this process, counting bytes read plus written.

Measured on an NVIDIA H200 (copy 4.23 TB/s), max_context 131072, us per call (KV GB/s, % of copy):
batch 1 x 4096: 14.3 (1180, 28%); 64 x 4096: 248 (4333, 102%); 256 x 4096: 970 (4435, 105%);
16 x 4096: 77 (3494, 83%); 1 x 131072: 148 (3623, 86%); 8 x 32768: 251 (4271, 101%); 512 x 1024: 512 (4225, 100%).
Batch 1 at short contexts is latency-bound (context length -> block table -> K/V -> merge).
"""
import argparse

import torch

from minimax_m1.timing import copy_bandwidth, graph_time_ms
from minimax_m1.ops.paged_attention import cuda as pac

HQ, HKV, D, BLOCK = 64, 8, 128, 256


def decode_case(batch, ctx, max_context):
    blocks_per = -(-ctx // BLOCK)
    kv_bytes = batch * ctx * HKV * D * 2 * 2
    layers = max(2, min(16, -(-(256 << 20) // kv_bytes)))
    caches, tables = [], []
    for _ in range(layers):
        num_blocks = batch * blocks_per + 1
        caches.append(torch.randn(2, num_blocks, BLOCK, HKV, D, device="cuda").to(torch.bfloat16))
        tables.append((torch.randperm(num_blocks - 1, device="cuda")[: batch * blocks_per] + 1).int().view(batch, -1))
    q = torch.randn(batch, HQ, D, device="cuda").to(torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    pac.reserve(batch, HQ, D, max_context)

    def step():
        for kv, bt in zip(caches, tables):
            pac.paged_decode(q, kv, bt, lens, D ** -0.5, max_context)

    ms = graph_time_ms(step, reps=30) / layers
    nbytes = kv_bytes + 2 * batch * HQ * D * 2
    caches.clear()
    torch.cuda.empty_cache()
    return ms, nbytes, pac.num_splits(batch, HKV, D, max_context)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-context", type=int, default=131072, help="max_context passed to the kernel (max_model_len)")
    ap.add_argument("--quick", action="store_true", help="only the batch 1 / 64 / 256 x 4096 cases")
    args = ap.parse_args()
    if not pac.available():
        raise SystemExit(f"kernel not available: {pac.load_error()}")
    card = torch.cuda.get_device_name()
    gbs = copy_bandwidth() / 1e9
    cases = [(1, 4096), (64, 4096), (256, 4096)]
    if not args.quick:
        cases += [(16, 4096), (1, 131072), (8, 32768), (512, 1024)]
    rows = [(b, c, *decode_case(b, c, max(args.max_context, c))) for b, c in cases]
    print(f"card: {card}; D2D copy (read + write): {gbs:.0f} GB/s; Hq {HQ} Hkv {HKV} D {D} bf16, block {BLOCK}, "
          f"max_context {args.max_context}, CUDA graph")
    print(f"{'batch':>6s} {'context':>8s} {'splits':>6s} {'us/call':>9s} {'KV MB':>8s} {'GB/s':>7s} {'%copy':>6s}")
    for batch, ctx, ms, nbytes, splits in rows:
        bw = nbytes / ms / 1e6
        print(f"{batch:6d} {ctx:8d} {splits:6d} {1000 * ms:9.2f} {nbytes / 1e6:8.1f} {bw:7.0f} {100 * bw / gbs:5.1f}%")


if __name__ == "__main__":
    main()
