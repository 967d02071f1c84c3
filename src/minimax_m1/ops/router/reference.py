"""The MoE router in plain torch: what CPU and every case the kernels do not take run, and the kernels' oracle."""
import torch
import torch.nn.functional as F


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] -> (weights [T, k] fp32 summing to 1, expert ids [T, k] int64): the top_k of
    softmax(x @ weight^T) in fp32 (the logits in x's dtype, as F.linear returns them), descending."""
    probs = torch.softmax(F.linear(x, weight).float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts
