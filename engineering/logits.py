"""
Which computation gives a model's log-probs: decided once per model, when models.load_model loads it.

common.sequence_logps runs the model's body and then its LM head only where a response token is predicted:
    logits = model.get_output_embeddings()(model.base_model(x).last_hidden_state[positions])
That is the model's own computation only when its forward does nothing between the body and the logits it returns.
Some do: Granite divides the logits by logits_scaling, Cohere multiplies them by logit_scale, Gemma-2 soft-caps them
(30 * tanh(logits / 30)), MiniCPM3 scales the hidden states before the head, BERT-like decoders transform them.
choose_logps_path() stores the decision on the model as `model.logps_path`:
    "head"          the fast path above; chosen only where the probe below shows it is the model's own computation
    "forward_keep"  model(x, logits_to_keep=<(N, T) bool mask of the positions>).logits: the model's own forward, its
                    head and whatever follows it run at those positions only (transformers 5 takes such a mask in
                    nearly every model; checked on the probe, since older versions and remote code may not)
    "forward"       model(x).logits at every position, then those positions: exact, but the full (N, T, V) logits
                    cost memory
A model nobody checked (no attribute: one a test or a user built by hand) gets "forward": exact first, fast where
proven. The attribute travels with the model: make_reference's deepcopy, DDP and FSDP2 (they wrap the scripts' networks,
common.SequenceLogps, whose forward hands the Hugging Face model itself to sequence_logps).

The probe trusts no list of model families, so that a family added to transformers next month gets exact numbers
too. It runs the model's own forward on 2 x 6 random tokens with a hook on the LM head that keeps the head's real
output and hands the rest of the forward large random logits instead: if the forward returns that very tensor with
the values it was given, nothing happens after the head, whatever the size of real logits (a soft-cap that is
nearly the identity on small logits is still seen). Then the fast path's logits must equal the head's real output
at the same positions: the head reads the body's output as it is, and the body called alone behaves as inside the
model. Config attributes of known post-processing are a second line of defence. Cost: 5 forwards of at most 12
tokens, once, on the CPU where load_model builds the model.

A reader learning the methods can skip this file; read it when a model's line says it got its own forward, or to
see why a model was refused.
"""
import torch
import torch.nn.functional as F

from common import keep_mask
from engineering.cli import InputError, first_line

# config attributes by which known families change the logits after the body, or the hidden states before the head
# (Gemma-2/3, RecurrentGemma, xLSTM, Granite, Cohere, Falcon-H1, Inkling), with the values that change nothing
KNOWN_POSTPROCESSING = {"final_logit_softcapping": (None,), "logits_soft_cap": (None,),
                        "output_logit_soft_cap": (None,), "logits_scaling": (None, 1), "logit_scale": (None, 1),
                        "lm_head_multiplier": (None, 1), "logits_mup_width_multiplier": (None, 1)}


# -----------------------------------------------------------------------------
# the probe


def _probe(model):
    """2 x 6 random token ids (the second row right-padded by 2), its mask, the flat positions whose next token is a
    real token, and the generator (private: the global RNG, which drives dropout and data order, is left alone)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.get_input_embeddings().num_embeddings, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    positions = F.pad(mask[:, 1:] == 1, (0, 1)).flatten().nonzero().squeeze(1)
    device = next(model.parameters()).device
    return ids.to(device), mask.to(device), positions.to(device), g


def _close(a, b):
    """Equal up to the float rounding of two ways to compute the same thing in a's dtype (1e-4 in float32)."""
    tol = max(1e-4, 8 * torch.finfo(a.dtype).eps)
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)


def head_path_problem(model, ids, mask, positions, g):
    """None when body -> LM head at `positions` is exactly model(...)'s own computation on the probe; otherwise what
    differs, in words."""
    head = model.get_output_embeddings()
    if head is None:
        return "it has no get_output_embeddings()"
    calls = []

    def swap(module, inputs, output):  # keep the head's real output; the forward goes on with large random logits
        fake = (torch.randn(output.shape, generator=g) * 1000).to(output.device, output.dtype)
        calls.append((output, fake, fake.clone()))
        return fake
    handle = head.register_forward_hook(swap)
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    if len(calls) != 1:
        return f"its forward runs get_output_embeddings() {len(calls)} times"
    real, fake, fake_before = calls[0]
    if logits is not fake or not torch.equal(fake, fake_before):  # a new tensor, or the same one changed in place
        return "its forward changes the logits after the LM head"
    out = model.base_model(input_ids=ids, attention_mask=mask)
    if getattr(out, "last_hidden_state", None) is None:
        return "model.base_model returns no last_hidden_state"
    fast = head(out.last_hidden_state.flatten(0, 1).index_select(0, positions))
    if real.shape[:2] != ids.shape or not _close(fast, real.flatten(0, 1)[positions]):
        return "its LM head does not read model.base_model's last_hidden_state as it is"
    return None


def takes_keep_mask(model, ids, mask, positions, logits):
    """True when model(..., logits_to_keep=<(N, T) bool mask>) returns its plain forward's `logits` at exactly the
    masked positions (older transformers and remote code may take no mask, or read it as something else)."""
    try:
        got = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep_mask(positions, ids.shape)).logits
    except Exception:  # noqa: BLE001  (a TypeError, an IndexError...: any failure means no)
        return False
    return _close(got, logits.flatten(0, 1)[positions])


@torch.no_grad()
def choose_logps_path(model):
    """Decide how `model`'s log-probs are computed (module docstring), store it as model.logps_path and return the
    one line that says so. InputError when no path here can be exact: model(...).logits is not one row per input
    token (a prompt-tuned model), or padding changes the logits of the real tokens before it (CPM-Ant)."""
    was_training, name = model.training, type(model).__name__
    model.eval()  # no dropout in the probe
    try:
        ids, mask, positions, g = _probe(model)
        logits = model(input_ids=ids, attention_mask=mask).logits
        if logits.shape[:2] != ids.shape:
            raise InputError(f"{name} returns logits of shape {tuple(logits.shape)} for input of shape "
                             f"{tuple(ids.shape)}: not one row per token, so no log-probs here would be exact")
        alone = model(input_ids=ids[1:, :4]).logits[0]  # row 1 without its 2 padding tokens
        if not _close(logits[1, :4], alone):
            raise InputError(f"{name} gives a right-padded sequence other logits than the same tokens alone (padding "
                             "changes the logits of real tokens), so no batched log-probs here would be exact")
        try:
            problem = head_path_problem(model, ids, mask, positions, g)
        except Exception as e:  # noqa: BLE001  (a body that needs inputs the probe does not give, say)
            problem = f"the fast path fails on it ({type(e).__name__}: {first_line(e)})"
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        known = [f"{k}={getattr(config, k)}" for k, neutral in KNOWN_POSTPROCESSING.items()
                 if getattr(config, k, None) not in neutral]
        if problem is None and known:
            problem = f"its config sets {', '.join(known)}, which the probe did not see change anything"
        elif known:
            problem += f" ({', '.join(known)})"
        if problem is None:
            model.logps_path = "head"
        else:
            model.logps_path = "forward_keep" if takes_keep_mask(model, ids, mask, positions, logits) else "forward"
    finally:
        model.train(was_training)
    if model.logps_path == "head":
        return f"log-probs: LM head at response positions only (checked against {name}'s own forward)"
    if model.logps_path == "forward_keep":
        return f"log-probs: {name}'s own forward, logits at response positions only, because {problem}"
    return (f"log-probs: {name}'s own forward with logits at every position (it takes no boolean logits_to_keep), "
            f"because {problem}: exact, but more memory")
