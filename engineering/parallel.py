"""
Data parallelism: the policy under DDP (a full copy per rank) or FSDP2 (--fsdp, sharded per transformer block).

The scripts call wrap_models once and then no_sync around each micro-batch; with one process both do nothing.
eval_micro_batches splits the eval set across ranks, and example_logps runs a network over every rank's share
(the initial reference's eval log-probs).
The networks are common.SequenceLogps modules, whose forward is the whole log-prob computation: what DDP's hooks
and FSDP2's weight gathering act through. A reader needs this file to change how a model is sharded; the arithmetic
of a step is the same with one process or many (tested).
"""
import inspect
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import Dist, all_reduce_sum, to_device
from engineering.adapters import AdapterReference


def wrap_models(policy, ref, d: Dist, fsdp=False):
    """The policy's training forward: policy under DDP when distributed, else policy itself (with fsdp, policy after
    sharding it in place). policy and ref (common.SequenceLogps, make_reference's) are moved to d.device first.

    DDP keeps a full policy, gradients and AdamW state on every rank; policy(**batch) itself runs without DDP's
    collectives (evaluation). fsdp shards policy and reference in place per transformer block (the model's
    _no_split_modules) with FSDP2's fully_shard, bf16 compute with fp32 reduction on GPU, fp32 on CPU; the wrapper
    is the root, so its forward gathers the embeddings and head too.
    A model on the meta device (models.load_on_rank0) is built sharded: fully_shard on the meta device, each rank
    allocates its own shards only, rank 0's weights (model.full_weights) fill them through set_model_state_dict's
    broadcast, and the reference (a meta copy) is filled from the policy's shards on each rank, in its own dtype
    (fill_shards): no rank ever holds a full model on its device.
    Call before creating the optimizer (FSDP2 replaces the parameters by sharded DTensors). ref=None: SFT.
    """
    meta = any(p.is_meta for p in policy.parameters())
    if not meta:
        policy.to(d.device)
        if ref is not None and not isinstance(ref, AdapterReference):  # a LoRA reference is the policy's module
            ref.to(d.device)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if d.device.type == "cuda" else MixedPrecisionPolicy())
        for net in (policy, ref) if ref is not None else (policy,):
            for m in net.modules():
                if type(m).__name__ in (policy.lm._no_split_modules or []):
                    fully_shard(m, mp_policy=mp)
            fully_shard(net, mp_policy=mp)
            if meta:
                net.to_empty(device=d.device)  # this rank's shards only, uninitialised
        if meta:
            fill_shards(policy.lm, None if ref is None else ref.lm)
        # FSDP2 keeps the root's parameters gathered after a forward, expecting a backward; the reference never
        # has one, so reshard it explicitly: it frees the memory and keeps its shards aligned with the policy's.
        if ref is not None:
            ref.register_forward_hook(lambda module, inputs, output: module.reshard())
        return policy
    if d.world_size > 1:
        # no buffer sync per forward: buffers never change here, and the broadcast is a collective per forward.
        # Newer PyTorch (2.13 here) names the flag forward_sync_buffers and warns on broadcast_buffers; the new flag
        # still syncs once at init, which changes nothing for buffers that are equal on every rank.
        new = "forward_sync_buffers" in inspect.signature(DDP).parameters
        return DDP(policy, **{"forward_sync_buffers" if new else "broadcast_buffers": False})
    return policy


@torch.no_grad()
def fill_shards(model, ref):
    """The weights of a model built sharded on the meta device: rank 0's full copy (model.full_weights, read by
    models.load_on_rank0) is broadcast into every rank's shards, one tensor at a time, and dropped; the buffers
    (not sharded; some are not in the state dict, like rotary frequencies) are broadcast whole. The reference
    (ref, sharded alike) is the policy's shards, in its own dtype."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    weights, buffers = model.full_weights.weights or ({}, {})
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, b in model.named_buffers():
        if dist.get_rank() == 0:
            b.copy_(buffers[name])
        dist.broadcast(b, src=0)
    model.full_weights.weights = None  # the reference's meta copy shares the object (models.FullWeights): both drop it
    if ref is not None:  # shard by shard (policy and reference are sharded alike), rounded to the reference's dtype
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        policy_tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, r in (*ref.named_parameters(), *ref.named_buffers()):
            local(r).copy_(local(policy_tensors[name]))


def no_sync(ddp, fsdp, last):
    """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step (ddp: wrap_models's)."""
    if fsdp:
        ddp.set_requires_gradient_sync(last)
        return nullcontext()
    return ddp.no_sync() if isinstance(ddp, DDP) and not last else nullcontext()


def eval_micro_batches(n_examples, d: Dist, micro_batch_size):
    """This rank's eval micro-batches (lists of indices): every world_size-th of the first n_examples - n_examples %
    world_size, an equal share, so that under FSDP every rank runs the same number of forwards."""
    mine = list(range(n_examples - n_examples % d.world_size))[d.rank::d.world_size]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


@torch.no_grad()
def example_logps(net, examples, batches, collate, pad_id, per_example, device, amp):
    """Summed log-probs under `net` (a common.SequenceLogps) of every sequence of `examples`, as a (per_example,
    len(examples)) float32 tensor on `device` holding the rows of all ranks, so that [:, ids].flatten() is laid out
    as net's output for the micro-batch ids (per_example = 2 for pairs: chosen, then rejected; 1 for unpaired
    examples). `batches` are this rank's micro-batches (lists of indices), collated and run as the caller's own loop
    runs them, so every value is bit for bit what that loop gets from the same weights. The scripts keep the initial
    reference's eval log-probs this way, once at step 0. Every rank must call it (one all-reduce; FSDP forwards)."""
    out = torch.zeros(per_example, len(examples), device=device)
    for ids in batches:
        batch = to_device(collate([examples[j] for j in ids], pad_id), device)
        with amp():
            logps, _ = net(**batch)
        out[:, ids] = logps.view(per_example, len(ids))
    return all_reduce_sum(out)
