"""
Speed paths a reader can skip: --share_prompt (run each prompt once and reuse its KV cache for chosen and rejected)
and the sort keys of --group_by_length (batches of similar length, less padding).

Neither changes what is computed: --share_prompt gives the plain forward's log-probs and gradients up to float
rounding, and length grouping only reorders which examples share a global batch (both tested in test_perf.py;
bench.py measures what they buy). The scripts choose these paths (common.py never imports this file); read it when
a run is too slow, or to see how a KV cache carries gradients.
"""
import inspect

import torch
import torch.nn.functional as F

from common import collate_pairs, keep_mask, sequence_logps, summed_logps
from engineering.cli import InputError, first_line

# -----------------------------------------------------------------------------
# --share_prompt: each prompt once, its KV cache reused for every response


def shared_prompt_layout(model):
    """(collate, logps) of --share_prompt for the preference-pair scripts, in place of common.collate_pairs and
    common.sequence_logps: collate_shared_prompt and shared_prompt_logps below, once check_share_prompt(model) has
    passed (a model whose cache cannot be shared exactly is refused in one line)."""
    check_share_prompt(model)
    return collate_shared_prompt, shared_prompt_logps


def collate_shared_prompt(examples, pad_id, keys=("chosen", "rejected")):
    """common.collate_pairs() with each prompt once (--share_prompt), for shared_prompt_logps: prompts LEFT-padded
    to (B, P), so that every prompt ends at column P - 1, and len(keys) * B responses right-padded to (K * B, R),
    rows [k * B, (k + 1) * B) holding keys[k].
    "positions" (CPU) holds the flat indices n * R + t of the response tokens t + 1 >= 1 (token 0 is predicted by
    the prompt's last position). Every response has at least one token (EOS)."""
    P = max(len(e["prompt"]) for e in examples)
    prompt_ids = torch.full((len(examples), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(examples), P), dtype=torch.long)
    for i, e in enumerate(examples):
        prompt_ids[i, P - len(e["prompt"]):] = torch.tensor(e["prompt"], dtype=torch.long)
        prompt_mask[i, P - len(e["prompt"]):] = 1
    responses = [e[k] for k in keys for e in examples]
    assert min(map(len, responses)) >= 1, "every response ends with EOS"
    R = max(map(len, responses))
    response_ids = torch.full((len(responses), R), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), R), dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = 1
    positions = F.pad(response_mask[:, 1:] == 1, (0, 1)).flatten().nonzero().squeeze(1)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask, "positions": positions}


def _kv_per_layer(cache):
    """[(keys, values)] of a filled DynamicCache, each (B, heads, P, head_dim), across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def shared_prompt_logps(model, prompt_ids, prompt_mask, response_ids, response_mask, positions=None):
    """sequence_logps() for K responses per prompt, running each prompt once (--share_prompt).

    Shapes: prompt_ids, prompt_mask (B, P), left-padded; response_ids, response_mask (K*B, R), right-padded, row
    k*B + i answering prompt i (collate_shared_prompt) -> logps (K*B,) float32, n_tokens (K*B,) long.
    A prompt-only forward fills a KV cache; its keys and values are repeated K times, and the responses attend to
    them (and to nothing the mask hides) at positions that continue each prompt's own length: the attention and
    rotary positions of the plain forward of prompt + response, so the log-probs agree up to float rounding
    (test_perf.py). The cache stays in the autograd graph, so gradients reach the prompt through its keys and
    values. Not under gradient checkpointing: transformers drops the cache inside checkpointed layers.
    Both passes run the model's body and the LM head follows at the rows the loss reads, or, for a model whose fast
    path is not its own computation (model.logps_path, engineering/logits.py), its own forward, logits and all.
    """
    from transformers import DynamicCache
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if checkpointed and model.training and torch.is_grad_enabled():
        raise ValueError("shared_prompt_logps: the KV cache is dropped under gradient checkpointing; use one or the other")
    path = getattr(model, "logps_path", "forward")
    lm = model.base_model if path == "head" else model
    K, R = len(response_ids) // len(prompt_ids), response_ids.shape[1]
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    N = len(response_ids)
    if positions is None:
        positions = F.pad(response_mask[:, 1:] == 1, (0, 1)).flatten().nonzero().squeeze(1)

    keep = path == "forward_keep"  # then logits only at the rows read below: each prompt's last column (left
    # padding puts every prompt's last token in column P - 1) and the response positions
    P = prompt_ids.shape[1]
    last_column = (torch.arange(P, device=prompt_ids.device) == P - 1).repeat(len(prompt_ids), 1) if keep else None

    def run(ids, mask, position_ids, cache, rows):
        """The body's hidden states (n, T, H) or the model's logits (n, T, V), or the logits at `rows` only, an
        (n, T) boolean mask: (M, V)."""
        extra = {} if rows is None else {"logits_to_keep": rows}
        out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{name: cache},
                 **extra)
        return out.last_hidden_state if path == "head" else out.logits

    cache = DynamicCache()
    last = run(prompt_ids, prompt_mask, (prompt_mask.cumsum(1) - 1).clamp(min=0), cache, last_column)
    shared = DynamicCache()
    for i, (k, v) in enumerate(_kv_per_layer(cache)):
        shared.update(k.repeat(K, 1, 1, 1), v.repeat(K, 1, 1, 1), i)
    position_ids = prompt_mask.sum(1, keepdim=True).repeat(K, 1) + torch.arange(R, device=response_ids.device)
    rest = run(response_ids, torch.cat([prompt_mask.repeat(K, 1), response_mask], 1), position_ids, shared,
               keep_mask(positions, response_ids.shape) if keep else None)
    if not keep:  # (B, H or V) at the last column; the M rows at `positions`
        last, rest = last[:, -1], rest.flatten(0, 1).index_select(0, positions)
    # token 0 of every response is predicted by its prompt's last position, token t + 1 by response position t
    h = torch.cat([last.repeat(K, 1), rest])
    logits = model.get_output_embeddings()(h) if path == "head" else h
    targets = torch.cat([response_ids[:, 0], response_ids.flatten().index_select(0, positions + 1)])
    rows = torch.cat([torch.arange(N, device=h.device), positions // R])
    return summed_logps(logits, targets, rows, N), response_mask.sum(1)


@torch.no_grad()
def check_share_prompt(model):
    """InputError unless shared_prompt_logps gives sequence_logps's log-probs on a probe batch (shared_prompt_layout
    calls it). A model whose cache is not a plain per-layer KV cache (RWKV, Mamba, RecurrentGemma, ...) cannot share
    its prompts: it fails, or its numbers differ. A model on the meta device
    (models.load_on_rank0) carries rank 0's outcome of this check as model.share_prompt_error."""
    if next(model.parameters()).is_meta:
        if model.share_prompt_error:
            raise InputError(model.share_prompt_error)
        return
    g, vocab = torch.Generator().manual_seed(0), model.get_input_embeddings().num_embeddings
    ids = lambda n: torch.randint(vocab, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt": ids(3), "chosen": ids(2), "rejected": ids(4)},
                {"prompt": ids(5), "chosen": ids(3), "rejected": ids(1)}]
    device = next(model.parameters()).device
    to = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    was_training, problem = model.training, None
    model.eval()
    try:
        plain = sequence_logps(model, **to(collate_pairs(examples, 0)))[0]
        try:
            shared = shared_prompt_logps(model, **to(collate_shared_prompt(examples, 0)))[0]
            if not torch.allclose(shared, plain, rtol=1e-4, atol=1e-4):
                worst = (shared - plain).abs().max()
                problem = f"its log-probs differ from the plain forward's by up to {worst:.2g} nats"
        except Exception as e:  # noqa: BLE001  (a cache of another kind fails somewhere inside the model)
            problem = f"it fails ({type(e).__name__}: {first_line(e)})"
    finally:
        model.train(was_training)
    if problem:
        raise InputError(f"--share_prompt cannot reuse {type(model).__name__}'s cache exactly: {problem}; run without "
                         "--share_prompt")

# -----------------------------------------------------------------------------
# --group_by_length: the sort keys (common.global_batch does the grouping)


def example_lengths(examples, share_prompt=False):
    """Sort keys for --group_by_length, (N,) long: the padded length of each tokenised example, prompt + its
    longest response. With share_prompt, prompts and responses are padded apart (collate_shared_prompt), so the
    key is the prompt length first, then the longest response: prompt * 2**20 + response."""
    def key(e):
        prompt, response = len(e["prompt"]), max(len(v) for k, v in e.items() if k != "prompt" and isinstance(v, list))
        return prompt * 2**20 + response if share_prompt else prompt + response
    return torch.tensor([key(e) for e in examples])
