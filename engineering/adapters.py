r"""
LoRA adapters for the trust-region methods (--lora_r R): the policy is a frozen base plus a trainable adapter, the
reference is the SAME frozen base plus a reference adapter. No second copy of the base exists.

An adapted linear layer computes  y = W0 x + s * B A x  (B: out x R, A: R x in, s = lora_alpha / R, peft's LoRA).
With the base W0 shared and frozen, theta = W0 + Delta, so the trust-region update of arXiv 2404.09656

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref
is, for every adapted layer, exactly
    Delta_ref <- alpha * s*B*A + (1 - alpha) * Delta_ref            (alpha = 1: the hard update, a copy)

It is NOT the update of the factors: (alpha*B + (1-alpha)*B_ref)(alpha*A + (1-alpha)*A_ref) differs from
alpha*B*A + (1-alpha)*B_ref*A_ref by -alpha*(1-alpha)*(B - B_ref)(A - A_ref), the cross terms (tests/test_adapters.py
measures it). The reference keeps Delta_ref exact by concatenating factors, folding every scale into B:

    A_ref <- [A ; A_ref]                B_ref <- [alpha*s*B , (1-alpha)*s_ref*B_ref]         s_ref <- 1

so its rank grows by R per soft update: R*(k+1) after k soft updates since the start or the last hard update (which
resets it to R). Once that would pass m = min(out, in), the layer's full rank, Delta_ref is kept as the m-rank
factorisation D = D @ I (out >= in) or I @ D (out < in), still exact, still a peft LoRA adapter, and its size stops
growing: a layer's reference adapter never holds more than m*(out + in) numbers, twice the layer for a square one.
With --tau 512 over one epoch of Anthropic-HH at batch 64 (about 2.5k steps) that is 4 soft updates: rank 5R.

Both adapters live in peft's LoRA layers ("default" is the policy, "reference" the reference); the model the scripts
train is the ordinary Hugging Face model with those layers inside, so model.base_model is its backbone and
common.sequence_logps runs unchanged. The reference (AdapterReference, a common.SequenceLogps) runs the same module
inside `with ref.active():`, which switches every LoRA layer to the reference adapter and the model to eval mode,
and back: the policy's graph, its DDP hooks and its requires_grad flags are never touched.

Without peft installed, --lora_r ends in one line: pip install peft. FSDP is refused (--fsdp with --lora_r).
docs/lora.md has the commands, the measured cost and the memory table. A reader learning the methods can skip this
file; the update above is all it does.
"""
import dataclasses
import os
import re
import warnings
from collections import Counter
from contextlib import contextmanager

import torch

from common import SequenceLogps, sequence_logps
from engineering import jsonio
from engineering.cli import InputError, first_line, need

POLICY, REFERENCE = "default", "reference"  # peft's adapter names; a saved policy adapter loads as "default"


def require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise InputError("--lora_r needs the peft package: pip install peft (tested with 0.21)") from None


def check_args(r, alpha, targets, base_dtype, save_merged, fsdp, ref_dtype, autocast_bf16):
    """The LoRA flags together, before anything is loaded (launch calls this after cli.check_args; each flag's
    range is its argparse type); each message says what to do."""
    need(r or (alpha is None and targets == "all-linear" and base_dtype == "float32" and not save_merged),
         "--lora_alpha, --lora_targets, --base_dtype and --save_merged need --lora_r R (0 trains all weights)")
    if r:
        require_peft()
        need(not fsdp, "--fsdp with --lora_r is not supported: LoRA keeps the frozen base on every GPU; drop "
                       "--fsdp (torchrun alone runs DDP)")
        need(ref_dtype == "float32", "--ref_dtype: with --lora_r the reference is an adapter and stays float32; "
                                     "--base_dtype bfloat16 stores the shared base in bf16")
        need(base_dtype == "float32" or autocast_bf16, "--base_dtype bfloat16 needs bf16 autocast: --dtype bfloat16")


@contextmanager
def quiet_peft():
    """peft 0.21 asks transformers 5 a deprecated question when it wraps a model; the warning is not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        yield


def adapter_base(path, seen=()):
    """base_model_name_or_path of a peft adapter folder (it holds adapter_config.json), else None. A config that does
    not parse or names no base, and a base that leads back to the adapter (itself, or adapters naming each other),
    are one line."""
    cfg = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        base = jsonio.read(cfg)
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg}: {first_line(e)}; save the adapter again (save_pretrained)") from None
    base = base.get("base_model_name_or_path") if isinstance(base, dict) else None
    need(isinstance(base, str) and base, f"{cfg} names no base model (base_model_name_or_path); set it to the model "
                                         f"the adapter was trained on")
    seen = (*seen, os.path.realpath(path))
    need(os.path.realpath(base) not in seen, f"{cfg}: its base model {base} leads back to the adapter itself; set "
                                             f"base_model_name_or_path to the model it was trained on")
    adapter_base(base, seen)  # a base that is an adapter too: its own base checked the same way
    return base

# -----------------------------------------------------------------------------
# the policy: frozen base + trainable adapter; the reference adapter beside it


def add_lora(model, r, alpha=None, targets="all-linear", adapter=None, base_dtype=None, base_name=None):
    """Freeze `model` (a Hugging Face causal LM) and inject, in place, the trainable policy adapter and beside it the
    reference adapter (make_reference makes it a copy of the policy's); returns the same model object.

    A fresh adapter: rank r, lora_alpha `alpha` (None: 2r), on `targets`: "all-linear" (peft: every nn.Linear and
    Conv1D of the model except its output head, whatever the architecture calls them), "all-linear+head" (the head
    too: a random-init model such as the demo's barely learns with its random head frozen, docs/lora.md) or
    module-name suffixes ("q_proj,v_proj"). peft's init: A random, B = 0, so the policy starts as the base.
    adapter: a trained peft LoRA folder (an SFT LoRA) whose base `model` is. It is continued, not stacked: its factors
    become the policy adapter's start (its own rank, alpha and targets; r must equal its rank), so the saved policy
    adapter applies to the original base, and the reference starts as base + that adapter, never the bare base.
    base_dtype (e.g. torch.bfloat16, with bf16 autocast): the frozen base is stored in it; adapters stay float32.
    base_name: what the saved adapters name as their base (base_model_name_or_path): a hub id or an absolute folder
    (for an SFT adapter, its own base); None for a model built in code, whose base save_final writes to base/.
    """
    require_peft()
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers.pytorch_utils import Conv1D
    if base_dtype is not None:
        model.to(base_dtype)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    modules = ("all-linear" if targets == "all-linear" else list(linear) if targets == "all-linear+head"
               else [t.strip() for t in targets.split(",")])
    if adapter is None:
        check_targets(linear, modules, r, model.get_output_embeddings(), targets)
    with quiet_peft():
        if adapter is None:
            try:
                pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=modules))
            except ValueError as e:  # peft: no module matched the targets
                raise InputError(f"--lora_targets {targets}: {first_line(e)}") from None
        else:
            pm = load_adapter(lambda: PeftModel.from_pretrained(model, adapter, is_trainable=True), adapter)
            cfg = pm.peft_config[POLICY]
            need(cfg.peft_type == "LORA", f"--model {adapter}: a {cfg.peft_type.value} adapter; --lora_r continues "
                                          "LoRA adapters only")
            need(r == cfg.r and alpha in (None, cfg.lora_alpha) and targets == "all-linear",
                 f"--model {adapter} is a LoRA adapter of rank {cfg.r}: continue it with --lora_r {cfg.r} (its own "
                 f"alpha and target modules), or train all weights of base + adapter merged with --lora_r 0")
    # the update below knows plain LoRA on linear layers: no DoRA, no trained biases or whole modules
    extra = [n for n, p in model.named_parameters()
             if p.requires_grad and f".lora_A.{POLICY}." not in n and f".lora_B.{POLICY}." not in n]
    layers = lora_layers(model).values()
    need(not extra and layers and all(POLICY in m.lora_A and not m.lora_variant for m in layers),
         "--lora_r: only plain LoRA on linear layers is supported (no DoRA, bias, modules_to_save or embedding "
         f"targets){f'; trainable besides A and B: {extra[0]}' if extra else ''}")
    pm.peft_config[POLICY].base_model_name_or_path = base_name
    # the reference adapter: frozen and inactive; make_reference makes it a copy of the policy's
    pm.add_adapter(REFERENCE, dataclasses.replace(pm.peft_config[POLICY], inference_mode=True))
    model.lora_reference = lambda policy: make_reference(model, policy.logps)  # what common.make_reference calls
    return model  # pm is dropped: model.peft_config and the LoRA layers inside carry everything


def check_targets(linear, modules, r, head, targets):
    """Every name of --lora_targets matches a linear layer (a misspelt one would be ignored: the run trains fewer
    layers than asked), and --lora_r is at most the width min(in, out) of every layer it adapts (beyond it the
    factors add parameters, not rank; a typo like 100000 would allocate hundreds of GB)."""
    if modules == "all-linear":
        chosen = [n for n, m in linear.items() if m is not head]
    else:
        unknown = [t for t in modules if not any(n == t or n.endswith("." + t) for n in linear)]
        need(not unknown, f"--lora_targets {targets}: {', '.join(unknown)} names no linear layer of the model; its "
                          f"linear layers are named {', '.join(sorted({n.rsplit('.', 1)[-1] for n in linear}))}")
        chosen = [n for n in linear if any(n == t or n.endswith("." + t) for t in modules)]
    width, name = min((min(linear[n].weight.shape), n) for n in chosen)
    need(r <= width, f"--lora_r {r} is beyond the width of {name} (min(in, out) = {width}); use --lora_r <= {width}")


def load_adapter(load, path):
    """load() of a peft adapter folder; a folder without its weights or with broken ones is one line."""
    try:
        return load()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - no adapter_model.safetensors, a truncated one, shapes of another base
        raise InputError(f"--model {path}: cannot load the adapter ({type(e).__name__}: {first_line(e)})") from None


def merge_adapter(model, path):
    """`model` + the peft LoRA adapter folder `path`, merged into plain weights: --model an adapter folder without
    --lora_r (full fine-tuning of base + SFT adapter), and evaluate.py's --models/--reference out/run/policy."""
    require_peft()
    from peft import PeftModel
    with quiet_peft():
        model = load_adapter(lambda: PeftModel.from_pretrained(model, path), path).merge_and_unload()
    return model.requires_grad_(True)  # peft froze the base for the adapter; a plain model trains all its weights


def has_adapters(model):
    """True for a model that add_lora adapted."""
    return REFERENCE in getattr(model, "peft_config", {})


def signature(model):
    """What a checkpoint must match to be resumed: the policy adapter's rank, alpha and target modules (None for full
    fine-tuning)."""
    if not has_adapters(model):
        return None
    cfg = model.peft_config[POLICY]
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}


def lora_layers(model):
    """{module name: peft LoRA layer}, in model order."""
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}

# -----------------------------------------------------------------------------
# the reference: the shared base with the reference adapter active


class AdapterReference(SequenceLogps):
    """pi_ref for a LoRA policy: its forward is logps(model, **batch) inside active(), `model` being the policy's own
    module, shared (self.lm; never move it or switch its mode through the reference). Holds no weights of its own:
    its state is the "reference" adapter's factors in the model's LoRA layers, per layer A (r x in), B (out x r),
    scaling and lora_alpha; state_dict() and load_state_dict() are that state."""

    def __init__(self, model, logps=sequence_logps):
        super().__init__(model, logps, self.active)
        self.layers = lora_layers(model)
        self.base_sums = base_fingerprint(model)  # checked on resume: the base is rebuilt from --model, not saved

    @contextmanager
    def active(self):
        """Forward passes inside this block are the reference's: every LoRA layer uses the reference adapter and
        the model is in eval mode (no dropout, as a separate frozen reference would be). Restored on exit, before
        the policy's backward (gradient checkpointing recomputes the policy's forward there)."""
        was_training, previous = self.lm.training, [m.active_adapters for m in self.layers.values()]
        for m in self.layers.values():
            m._active_adapter = [REFERENCE]  # peft's set_adapter would also flip requires_grad
        self.lm.eval()
        try:
            yield
        finally:
            for m, p in zip(self.layers.values(), previous):
                m._active_adapter = p
            self.lm.train(was_training)

    def update_towards(self, policy, alpha):
        """What common.update_reference calls for this reference and the policy (a SequenceLogps): update_reference
        below."""
        update_reference(self, policy.lm, alpha)

    def ranks(self):
        return {n: m.lora_A[REFERENCE].weight.shape[0] for n, m in self.layers.items()}

    def numel(self):
        """Numbers the reference holds: sum over layers of rank * (out + in)."""
        return sum(m.lora_A[REFERENCE].weight.numel() + m.lora_B[REFERENCE].weight.numel()
                   for m in self.layers.values())

    def state_dict(self):
        """Everything resume needs, on the CPU: per layer its factors, scaling and alpha (the rank is A's shape)."""
        layer = lambda m: {"A": m.lora_A[REFERENCE].weight.cpu().clone(),  # noqa: E731
                           "B": m.lora_B[REFERENCE].weight.cpu().clone(),
                           "scaling": m.scaling[REFERENCE], "alpha": m.lora_alpha[REFERENCE]}
        return {"layers": {n: layer(m) for n, m in self.layers.items()}, "base_sums": self.base_sums.cpu()}

    def load_state_dict(self, state):
        need(torch.allclose(state["base_sums"], self.base_sums.cpu(), rtol=1e-5, atol=1e-6),
             "--resume: the base model's weights differ from the checkpoint's (--model changed?); resume with the "
             "run's own --model")
        for n, m in self.layers.items():
            s = state["layers"][n]
            set_factors(m, s["A"], s["B"], s["scaling"], s["alpha"])


def base_fingerprint(model):
    """One float32 sum per frozen parameter: a resumed run must rebuild the base it was trained on (another seed or
    checkpoint changes these sums by far more than the 1e-5 that load_state_dict allows for a device's rounding).
    Not float64: torch.sum(dtype=float64) first copies the whole tensor (300 MB for Pythia-160m's embedding)."""
    return torch.stack([p.detach().sum(dtype=torch.float32) for n, p in model.named_parameters()
                        if not p.requires_grad and ".lora_" not in n])


def set_factors(layer, A, B, scaling, alpha):
    """The reference adapter of one LoRA layer becomes B @ A * scaling; its rank is A.shape[0] (it may change)."""
    w = layer.lora_A[REFERENCE].weight
    for lin, t in ((layer.lora_A[REFERENCE], A), (layer.lora_B[REFERENCE], B)):
        lin.weight = torch.nn.Parameter(t.to(w.device, w.dtype), requires_grad=False)
        lin.out_features, lin.in_features = t.shape
    layer.r[REFERENCE], layer.scaling[REFERENCE], layer.lora_alpha[REFERENCE] = A.shape[0], scaling, alpha


def make_reference(model, logps=sequence_logps):
    """The reference at step 0: its adapter an exact copy of the policy's (the bare base for a fresh adapter, since
    B = 0; base + the SFT adapter when continuing one); its forward is logps(model, **batch) with that adapter."""
    ref = AdapterReference(model, logps)
    update_reference(ref, model, 1.0)
    return ref


@torch.no_grad()
def update_reference(ref, policy, alpha):
    """Trust-region update, exact, in place: Delta_ref <- alpha * s*B*A + (1 - alpha) * Delta_ref per adapted layer.

    alpha = 1 copies the policy adapter (its rank, scaling and alpha: the reference's forward is then the policy's
    bit for bit). A soft update concatenates the factors, scales folded into B (rank + R), or, past the layer's full
    rank m = min(out, in), keeps D = alpha*s*B*A + (1-alpha)*Delta_ref as D @ I or I @ D (rank m). No
    communication: under DDP every rank holds the same adapters and updates its own copy.
    """
    assert policy is ref.lm, "the reference adapter lives in the policy's own model"
    for m in ref.layers.values():
        A, B, s = m.lora_A[POLICY].weight, m.lora_B[POLICY].weight, m.scaling[POLICY]
        if alpha == 1.0:
            set_factors(m, A.clone(), B.clone(), s, m.lora_alpha[POLICY])
            continue
        A_r, B_r, s_r = m.lora_A[REFERENCE].weight, m.lora_B[REFERENCE].weight, m.scaling[REFERENCE]
        out, inp, rank = B.shape[0], A.shape[1], A.shape[0] + A_r.shape[0]
        if rank <= min(out, inp):
            A_new, B_new = torch.cat([A, A_r]), torch.cat([alpha * s * B, (1 - alpha) * s_r * B_r], dim=1)
        else:  # full rank: the dense delta, as a rank-m factorisation with an identity factor
            D = (alpha * s) * B @ A + ((1 - alpha) * s_r) * B_r @ A_r
            eye = torch.eye(min(out, inp), device=D.device, dtype=D.dtype)
            A_new, B_new = (eye, D) if out >= inp else (D, eye)
        set_factors(m, A_new, B_new, 1.0, A_new.shape[0])  # lora_alpha = rank: peft's scaling alpha/r is 1

# -----------------------------------------------------------------------------
# outputs: peft adapter folders (PeftModel.from_pretrained, or from_pretrained of the folder, load them)


def save_adapter(model, name, path, config):
    """One adapter of `model` as a peft folder: adapter_config.json + adapter_model.safetensors, keyed as
    PeftModel.save_pretrained keys them (base_model.model.<module>.lora_A.weight)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    weights = get_peft_model_state_dict(model, adapter_name=name)
    save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()},
              os.path.join(path, "adapter_model.safetensors"))
    config.save_pretrained(path)


def reference_config(ref, base):
    """The reference adapter's LoraConfig as it is now: the policy's after a hard update (same ranks and scalings);
    after a soft update scaling 1 (lora_alpha = r) per layer, ranks in rank_pattern where they differ."""
    policy_cfg = ref.lm.peft_config[POLICY]
    ranks = ref.ranks()
    if all(m.scaling[REFERENCE] == m.scaling[POLICY] and ranks[n] == m.r[POLICY] for n, m in ref.layers.items()):
        return dataclasses.replace(policy_cfg, base_model_name_or_path=base, inference_mode=True)
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}  # full module names, matched literally
    return dataclasses.replace(policy_cfg, base_model_name_or_path=base, inference_mode=True, r=r, lora_alpha=r,
                               use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))


def base_state_dict(model, merge=False):
    """The model's weights under its own parameter names, without LoRA; merge: W0 + s*B*A of the policy adapter
    (peft's get_delta_weight, which knows Conv1D's transposed layout)."""
    sd = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    if merge:
        for n, m in lora_layers(model).items():
            w = m.get_base_layer().weight
            sd[f"{n}.weight"] = (w.float() + m.get_delta_weight(POLICY).float()).to(w.dtype)
    return sd


def save_final(output_dir, model, ref, tokenizer, merged=False):
    """policy/ and reference/ as peft adapter folders (+ tokenizer); policy_merged/ (base + policy adapter, plain
    weights) when `merged`. ref=None (SFT): policy/ alone. The adapters name add_lora's base_name as their base; a
    model built in code ('tiny', the Pythia shapes, smollm2's GGUF) has none: the frozen base is then written to
    base/ and named by its absolute path, so that from_pretrained of an adapter folder loads base + adapter
    exactly. Rank 0 only. Returns the folders written, as the summary names them."""
    base, written = model.peft_config[POLICY].base_model_name_or_path, []
    if base is None:
        base = os.path.abspath(os.path.join(output_dir, "base"))
        model.save_pretrained(base, state_dict=base_state_dict(model))
        tokenizer.save_pretrained(base)
        written.append("base/")
    saves = [("policy", POLICY, dataclasses.replace(model.peft_config[POLICY], base_model_name_or_path=base,
                                                    inference_mode=True))]
    if ref is not None:
        saves.append(("reference", REFERENCE, reference_config(ref, base)))
    for folder, adapter, cfg in saves:
        save_adapter(model, adapter, os.path.join(output_dir, folder), cfg)
        tokenizer.save_pretrained(os.path.join(output_dir, folder))
        written.append(folder + "/")
    if merged:
        path = os.path.join(output_dir, "policy_merged")
        model.save_pretrained(path, state_dict=base_state_dict(model, merge=True))
        tokenizer.save_pretrained(path)
        written.append("policy_merged/")
    return written
