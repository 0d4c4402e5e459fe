"""
--lora_r (engineering/adapters.py) against independent computation: a plain model (no peft) whose adapted weights
are computed densely here, in float64 (W = W0 + s*B*A for the policy, W0 + the lerp of those deltas for the
reference), is the ground truth for every forward of the adapted model. Two architectures built from configs in
code: the tiny GPT-NeoX of --model tiny, and a Llama-style model with grouped-query attention (k_proj, v_proj:
64 -> 32) and a tied head. The `slow` tests run the scripts: resume, 1 vs 2 processes, the saved folders, an SFT
LoRA as --model, evaluate.py, the one-line refusals.

    python -m pytest tests/test_adapters.py -m "not slow"      the update, the forwards, checkpoints in-process
"""
import contextlib
import copy
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import evaluate as ev
import sft
import tr_dpo
import tr_kto
from common import collate_pairs, sequence_logps, tokenize_rows
from conftest import ENV, FAST, ROOT, checkpoint, metrics, naive_logp, torchrun
from engineering import adapters
from engineering.adapters import POLICY, REFERENCE, add_lora, make_reference, update_reference
from engineering.cli import InputError
from engineering.data import load_preferences
from engineering.models import byte_tokenizer, load_model
from engineering.speed import collate_shared_prompt, shared_prompt_logps

pytest.importorskip("peft")
R = 8  # lora_alpha defaults to 2R: the policy's scaling s is 2
slow = pytest.mark.slow


def neox():
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25,
                                            tie_word_embeddings=False))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                        tie_word_embeddings=True))


BUILD = {"neox": neox, "llama": llama}
X = torch.randint(0, 258, (3, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, x=X):
    return model(input_ids=x).logits


@torch.no_grad()
def ref_logits(ref, x=X):
    with ref.active():
        return ref.lm(input_ids=x).logits


@torch.no_grad()
def move_policy(model, seed):
    """What training does to the policy adapter, with deltas as large as the base weights (std 0.02): A and B
    random, B nonzero."""
    g = torch.Generator().manual_seed(seed)
    for m in adapters.lora_layers(model).values():
        for w in (m.lora_A[POLICY].weight, m.lora_B[POLICY].weight):
            w.copy_(0.1 * torch.randn(w.shape, generator=g))


def policy_deltas(model):
    """s*B*A per adapted layer, float64."""
    return {n: m.scaling[POLICY] * m.lora_B[POLICY].weight.double() @ m.lora_A[POLICY].weight.double()
            for n, m in adapters.lora_layers(model).items()}


@torch.no_grad()
def plain(base, deltas):
    """The base without peft, each adapted layer's weight replaced by W0 + delta (computed in float64)."""
    m = copy.deepcopy(base)
    for n, d in deltas.items():
        w = m.get_submodule(n).weight
        w.copy_((w.double() + d).float())
    return m


def max_diff(a, b):
    return (a - b).abs().max().item()

# -----------------------------------------------------------------------------
# the update


@pytest.mark.parametrize("arch, R, targets", [("neox", R, "all-linear"), ("llama", R, "all-linear"),
                                              ("llama", 24, "all-linear"), ("neox", R, "all-linear+head")])
def test_reference_forward_is_the_exact_lerp_over_soft_and_hard_updates(arch, R, targets):
    """R 24 > 32/2: k_proj and v_proj (full rank 32) pass it at the first soft update after a copy, where the
    reference's scaling is still the policy's. all-linear+head: the LM head (258 x 64) is adapted too."""
    base = BUILD[arch]()
    model = add_lora(copy.deepcopy(base), R, targets=targets)
    ref = make_reference(model)
    full_rank = {n: min(base.get_submodule(n).weight.shape) for n in ref.layers}  # 64, or 32 for k_proj/v_proj
    d_ref = {n: torch.zeros(base.get_submodule(n).weight.shape, dtype=torch.float64) for n in ref.layers}
    assert max_diff(ref_logits(ref), logits(base)) < 1e-6  # step 0, fresh adapter (B = 0): the base itself

    # two soft updates, a hard one, then nine soft ones: every layer goes past its full rank (rank 8 -> 80 > 64)
    soft_since_hard = 0
    for t, alpha in enumerate([0.6, 0.3, 1.0] + [0.5] * 9):
        move_policy(model, seed=t)
        d_pol = policy_deltas(model)
        assert max_diff(logits(model), logits(plain(base, d_pol))) < 1e-5  # the policy: base + its adapter
        update_reference(ref, model, alpha)
        d_ref = {n: alpha * d_pol[n] + (1 - alpha) * d_ref[n] for n in d_ref}  # the lerp, densely
        expected = logits(plain(base, d_ref))
        assert max_diff(ref_logits(ref), expected) < 1e-5, (t, alpha)
        soft_since_hard = 0 if alpha == 1.0 else soft_since_hard + 1
        assert ref.ranks() == {n: min(R * (soft_since_hard + 1), full_rank[n]) for n in ref.layers}
        assert all(m.scaling[REFERENCE] == m.lora_alpha[REFERENCE] / m.r[REFERENCE] for m in ref.layers.values())
        if alpha == 1.0:  # a hard update copies the adapter: the reference's forward is the policy's, bit for bit
            assert torch.equal(ref_logits(ref), logits(model))
        else:  # the check above can fail: the reference is far from the policy it moved towards
            assert max_diff(expected, logits(model)) > 1e-2
    # every layer is now kept at its full rank m, m*(out + in) numbers: twice a square layer
    assert ref.numel() == sum(full_rank[n] * sum(base.get_submodule(n).weight.shape) for n in ref.layers)


def test_common_update_reference_dispatches_to_the_exact_update():
    """The scripts' one call, common.update_reference(ref, policy, alpha), on a LoRA reference: the same exact lerp,
    and common.make_reference returns an adapter reference on the policy's own model, not a copy of the model."""
    import common
    base = neox()
    model = add_lora(copy.deepcopy(base), R)
    policy = common.SequenceLogps(model)
    ref = common.make_reference(policy)
    assert isinstance(ref, adapters.AdapterReference) and ref.lm is model and ref.logps is policy.logps
    move_policy(model, seed=0)
    common.update_reference(ref, policy, 0.6)
    assert max_diff(ref_logits(ref), logits(plain(base, {n: 0.6 * d for n, d in policy_deltas(model).items()}))) < 1e-5


def test_mixing_the_factors_separately_is_not_the_update():
    """(a*B + (1-a)*B_r)(a*A + (1-a)*A_r) - (a*B*A + (1-a)*B_r*A_r) = -a(1-a)(B - B_r)(A - A_r): the cross terms
    (expand the product: a^2 - a = -a(1-a), (1-a)^2 - (1-a) = -a(1-a)). Zero only when one factor pair is equal."""
    base, a = neox(), 0.6
    model = add_lora(copy.deepcopy(base), R)
    ref = make_reference(model)
    move_policy(model, seed=0)
    update_reference(ref, model, 1.0)  # the reference adapter: B_r, A_r (scaling s, as the policy's)
    factors_r = {n: (m.lora_B[REFERENCE].weight.double(), m.lora_A[REFERENCE].weight.double())
                 for n, m in ref.layers.items()}
    move_policy(model, seed=1)
    s, exact, mixed = 2.0, {}, {}
    for n, m in ref.layers.items():
        (B_r, A_r), B, A = factors_r[n], m.lora_B[POLICY].weight.double(), m.lora_A[POLICY].weight.double()
        exact[n] = s * (a * B @ A + (1 - a) * B_r @ A_r)
        mixed[n] = s * (a * B + (1 - a) * B_r) @ (a * A + (1 - a) * A_r)
        assert torch.allclose(mixed[n] - exact[n], -a * (1 - a) * s * (B - B_r) @ (A - A_r), atol=1e-12)
        assert (mixed[n] - exact[n]).norm() > 0.3 * exact[n].norm()  # not a rounding difference
    update_reference(ref, model, a)
    assert max_diff(ref_logits(ref), logits(plain(base, exact))) < 1e-5
    assert max_diff(ref_logits(ref), logits(plain(base, mixed))) > 1e-2  # what factor mixing would train against


def batch_of_pairs(step, n=4):
    """n random (prompt, chosen, rejected) token pairs for step `step`, collated as the scripts collate them."""
    g = torch.Generator().manual_seed(step)
    ids = lambda lo, hi: torch.randint(0, 256, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    return [{"prompt": ids(3, 7), "chosen": ids(2, 6), "rejected": ids(2, 6)} for _ in range(n)]


def naive_pair_logps(model, examples):
    """Summed response log-probs of every chosen, then every rejected, from one unpadded float64 forward each."""
    return torch.tensor([naive_logp(model, e["prompt"], e[k]) for k in ("chosen", "rejected") for e in examples],
                        dtype=torch.float64)


@pytest.mark.parametrize("arch", BUILD)
def test_sequence_logps_and_share_prompt_run_policy_and_reference(arch):
    """common.sequence_logps (the backbone model.base_model, then the head at response positions) and
    --share_prompt's shared_prompt_logps (each prompt once, its KV cache reused) on the adapted model, inside
    ref.active() for the reference, equal a full-vocabulary float64 log-softmax of the plain models."""
    base = BUILD[arch]()
    model = add_lora(copy.deepcopy(base), R)
    ref = make_reference(model)
    move_policy(model, seed=0)
    d_ref = {n: 0.6 * d for n, d in policy_deltas(model).items()}  # the fresh reference (delta 0) moved towards it
    update_reference(ref, model, 0.6)
    move_policy(model, seed=1)
    examples = batch_of_pairs(0)
    got = {}
    with torch.no_grad():
        for name, scope in (("policy", contextlib.nullcontext), ("reference", ref.active)):
            with scope():
                got[name] = (sequence_logps(model, **collate_pairs(examples, 257))[0],
                             shared_prompt_logps(model, **collate_shared_prompt(examples, 257))[0])
    for name, deltas in (("policy", policy_deltas(model)), ("reference", d_ref)):
        with torch.no_grad():
            naive = naive_pair_logps(plain(base, deltas), examples)
        for lp in got[name]:
            assert torch.allclose(lp.double(), naive, atol=1e-4), name
    assert max_diff(got["policy"][0], got["reference"][0]) > 1e-2

# -----------------------------------------------------------------------------
# training: the reference forward between the policy's forward and backward changes nothing; resume is bit-exact


def dpo_step(model, ref, opt, step, beta=0.5):
    """One optimizer step of DPO against the reference, as tr_dpo.py's step runs it."""
    batch = collate_pairs(batch_of_pairs(step), 257)
    logps, _ = sequence_logps(model, **batch)
    with torch.inference_mode(), ref.active():
        ref_logps, _ = sequence_logps(model, **batch)
    h = (logps - ref_logps.clone()).view(2, -1)
    (-F.logsigmoid(beta * (h[0] - h[1]))).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_reference_forward_leaves_the_policy_gradient_unchanged(checkpointing):
    """The policy's gradient with the reference's forward run between its forward and backward (as every script's
    step does) equals the gradient without it, bit for bit; with gradient checkpointing too, whose backward
    recomputes the policy's forward after active() has switched back."""
    base = neox()
    model = add_lora(copy.deepcopy(base), R)
    ref = make_reference(model)
    move_policy(model, seed=0)
    update_reference(ref, model, 0.5)
    move_policy(model, seed=1)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})  # as models.load_model enables it
    batch = collate_pairs(batch_of_pairs(0), 257)
    grads = []
    for with_ref in (False, True):
        logps, _ = sequence_logps(model, **batch)
        if with_ref:
            with torch.inference_mode(), ref.active():
                sequence_logps(model, **batch)
        logps.sum().backward()
        grads.append([p.grad.clone() for p in trainable(model)])
        model.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert model.training and all(p.requires_grad == (f".{POLICY}." in n) for n, p in model.named_parameters())


def test_reference_forward_runs_in_eval_mode():
    """A base with dropout, trained in train mode: the reference's forward is the plain lerp model's in eval mode
    (a separate frozen reference is kept in eval mode), and the policy's module is back in train mode after it."""
    config = neox().config
    config.hidden_dropout = config.attention_dropout = 0.5
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(config)
    model = add_lora(copy.deepcopy(base), R).train()
    ref = make_reference(model)
    move_policy(model, seed=0)
    d_ref = {n: 0.6 * d for n, d in policy_deltas(model).items()}
    update_reference(ref, model, 0.6)
    assert max_diff(ref_logits(ref), logits(plain(base, d_ref).eval())) < 1e-5 and model.training
    assert max_diff(logits(model), logits(model)) > 1e-2  # dropout is on in the policy's forward


def test_resume_is_bit_exact():
    """6 DPO steps with a soft update every 2, against 3 steps, a checkpoint (policy adapter and AdamW state as
    checkpoint.py gathers them, without the frozen parameters; the reference adapter's state_dict), a fresh model
    and 3 more steps: the same adapters, bit for bit."""
    base, o = neox(), StateDictOptions(full_state_dict=True, ignore_frozen_params=True)

    def start(seed):
        model = add_lora(copy.deepcopy(base), R)
        move_policy(model, seed)  # a fresh run's adapter init differs from the checkpoint's
        return model, make_reference(model), torch.optim.AdamW(trainable(model), lr=1e-2)

    def run(model, ref, opt, steps):
        for step in steps:
            dpo_step(model, ref, opt, step)
            if (step + 1) % 2 == 0:
                update_reference(ref, model, 0.6)

    model, ref, opt = start(0)
    run(model, ref, opt, range(6))
    m2, r2, o2 = start(0)
    run(m2, r2, o2, range(3))
    ckpt = {"policy": get_model_state_dict(m2, options=o), "optimizer": get_optimizer_state_dict(m2, o2, options=o),
            "reference": r2.state_dict()}
    assert all(".lora_" in k and f".{POLICY}." in k for k in ckpt["policy"])  # the adapter only, not the base
    m3, r3, o3 = start(1)
    set_model_state_dict(m3, ckpt["policy"], options=o)
    set_optimizer_state_dict(m3, o3, ckpt["optimizer"], options=o)
    r3.load_state_dict(ckpt["reference"])
    run(m3, r3, o3, range(3, 6))
    assert r3.ranks() == ref.ranks() == {n: 4 * R for n in ref.layers}  # a copy, then 3 soft updates
    for (n, a), b in zip(model.state_dict().items(), m3.state_dict().values()):  # base, both adapters
        assert torch.equal(a, b), n
    assert max_diff(ref_logits(ref), logits(model)) > 1e-3  # the reference did not simply follow the policy

    # the base is rebuilt from --model at resume, not saved: another base is refused in one line
    torch.manual_seed(5)
    wrong = add_lora(GPTNeoXForCausalLM(base.config), R)
    with pytest.raises(InputError, match="base model's weights differ"):
        make_reference(wrong).load_state_dict(ckpt["reference"])

# -----------------------------------------------------------------------------
# outputs a user loads


@pytest.mark.parametrize("arch", BUILD)
def test_saved_adapters_load_with_peft_and_from_pretrained(arch, tmp_path):
    """After a hard and 4 soft updates (llama: q_proj at rank 40, k_proj/v_proj at their full rank 32, so the
    reference's config needs rank_pattern): policy/ and reference/ load as peft adapters on base/ (written for a
    model built in code) and give the forwards of the run; policy_merged/ is base + policy adapter."""
    from peft import PeftModel
    base = BUILD[arch]()
    model = add_lora(copy.deepcopy(base), R)
    ref = make_reference(model)
    for t, alpha in enumerate([1.0, 0.6, 0.6, 0.6, 0.6]):
        move_policy(model, seed=t)
        update_reference(ref, model, alpha)
    move_policy(model, seed=9)
    written = adapters.save_final(str(tmp_path), model, ref, byte_tokenizer(), merged=True)
    assert written == ["base/", "policy/", "reference/", "policy_merged/"]
    assert adapters.adapter_base(str(tmp_path / "policy")) == str(tmp_path / "base")

    loaded_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")  # transformers reads the base's name
    loaded_ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "reference")
    assert torch.equal(logits(loaded_policy), logits(model))
    assert torch.equal(logits(loaded_ref), ref_logits(ref))
    assert max_diff(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "policy_merged")), logits(model)) < 1e-5
    merged_ref = load_model(str(tmp_path / "reference"))[0]  # what evaluate.py loads for --reference
    assert max_diff(logits(merged_ref), ref_logits(ref)) < 1e-5
    assert all(p.requires_grad for p in merged_ref.parameters())  # --lora_r 0 trains base + adapter, merged
    if arch == "llama":
        assert set(ref.ranks().values()) == {32, 40} and loaded_ref.peft_config["default"].rank_pattern


def test_sft_adapter_as_the_start(tmp_path):
    """--model an SFT LoRA folder: the policy continues that adapter, and the reference at step 0 is base + the SFT
    adapter (as peft itself loads it), not the bare base; the saved policy adapter names the original base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    base = neox()
    base.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")  # a usable folder has its tokenizer (models.from_pretrained)
    sft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=16, target_modules=[
        "query_key_value", "dense_h_to_4h"]))
    move_policy(sft_model.base_model.model, seed=3)  # a trained SFT adapter: B nonzero
    sft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    sft_model.save_pretrained(tmp_path / "sft")
    expected = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "sft"))

    model, _ = load_model(str(tmp_path / "sft"), lora_r=R)  # as the scripts load --model with --lora_r
    ref = make_reference(model)
    assert torch.equal(ref_logits(ref), expected) and torch.equal(logits(model), expected)
    assert max_diff(ref_logits(ref), logits(base)) > 1e-2  # the bare base would be the wrong reference
    assert len(ref.layers) == 4 and len(trainable(model)) == 8  # its own targets: 2 kinds x 2 layers, A and B

    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    dpo_step(model, ref, opt, 0)
    update_reference(ref, model, 0.6)
    written = adapters.save_final(str(tmp_path / "run"), model, ref, byte_tokenizer())
    assert written == ["policy/", "reference/"] and not (tmp_path / "run" / "base").exists()
    assert adapters.adapter_base(str(tmp_path / "run" / "policy")) == str(tmp_path / "base")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")), logits(model))
    assert adapters.save_final(str(tmp_path / "sft_run"), model, None, byte_tokenizer()) == ["policy/"]  # sft.py

    with pytest.raises(InputError, match="continue it with --lora_r 8"):
        load_model(str(tmp_path / "sft"), lora_r=16)
    merged = load_model(str(tmp_path / "sft"))[0]  # --lora_r 0: full fine-tuning of base + SFT adapter, merged
    assert max_diff(logits(merged), expected) < 1e-5 and all(p.requires_grad for p in merged.parameters())

# -----------------------------------------------------------------------------
# targets, dtypes, flags


@pytest.mark.parametrize("arch", BUILD)
def test_all_linear_adapts_every_block_linear_but_not_the_head(arch):
    base = BUILD[arch]()
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    head = {n for n, m in base.named_modules() if m is base.get_output_embeddings()}
    model = add_lora(copy.deepcopy(base), R)
    assert set(adapters.lora_layers(model)) == linear - head and len(linear - head) == 2 * (4 if arch == "neox" else 7)
    model = add_lora(copy.deepcopy(base), R, targets="all-linear+head")
    assert set(adapters.lora_layers(model)) == linear and len(head) == 1
    model = add_lora(copy.deepcopy(base), R, targets="dense_h_to_4h,query_key_value" if arch == "neox" else "q_proj")
    assert len(adapters.lora_layers(model)) == (4 if arch == "neox" else 2)


def test_bf16_base_keeps_float32_adapters():
    model = add_lora(neox(), R, base_dtype=torch.bfloat16)
    ref = make_reference(model)
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" in n} == {torch.float32}
    move_policy(model, seed=0)
    update_reference(ref, model, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ref_logits(ref), logits(model))


def test_flags_are_one_line_errors():
    ok = dict(r=8, alpha=None, targets="all-linear", base_dtype="float32", save_merged=False, fsdp=False,
              ref_dtype="float32", autocast_bf16=False)
    adapters.check_args(**ok)
    for bad, match in ((dict(fsdp=True), "--fsdp with --lora_r"), (dict(ref_dtype="bfloat16"), "--ref_dtype"),
                       (dict(base_dtype="bfloat16"), "needs bf16 autocast"),
                       (dict(r=0, save_merged=True), "need --lora_r"), (dict(r=0, alpha=16), "need --lora_r")):
        with pytest.raises(InputError, match=match):
            adapters.check_args(**{**ok, **bad})
    with pytest.raises(InputError, match="--lora_targets nope"):
        add_lora(neox(), R, targets="nope")


@pytest.mark.parametrize("script", [tr_dpo, tr_kto, sft], ids=lambda m: m.__name__)
def test_fsdp_is_refused_in_one_line(tmp_path, script, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        script.main(["--lora_r", "8", "--fsdp", "--output_dir", str(out)])
    assert (e.value.code, capsys.readouterr().err) == (2, "error: --fsdp with --lora_r is not supported: LoRA keeps "
                                                          "the frozen base on every GPU; drop --fsdp (torchrun alone runs DDP)\n")
    assert not out.exists()

# -----------------------------------------------------------------------------
# through the scripts


@slow
def test_without_peft_one_line_and_exit_code_2(tmp_path):
    out = tmp_path / "out"
    code = f"import sys; sys.modules['peft'] = None; import tr_dpo; tr_dpo.main(['--lora_r', '8', '--output_dir', {str(out)!r}])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert (r.returncode, r.stderr) == (2, "error: --lora_r needs the peft package: pip install peft (tested with 0.21)\n")
    assert not out.exists()


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """tr_dpo.py on the toy task, 3 steps, a soft update after each, an evaluation after each: full fine-tuning and
    --lora_r 8 --save_merged, from the same flags. Their stdout (the summary) is kept."""
    runs = {}
    for name, extra in (("full", []), ("lora", ["--lora_r", "8", "--save_merged"])):
        out, stdout = str(tmp_path_factory.mktemp(name)), io.StringIO()
        with contextlib.redirect_stdout(stdout):
            tr_dpo.main(FAST + ["--max_steps", "3", "--tau", "1", "--eval_every", "1", "--output_dir", out] + extra)
        runs[name] = (out, stdout.getvalue())
    return runs


@slow
def test_metrics_and_summary_as_for_full_fine_tuning(demo_runs):
    (full, full_stdout), (lora, lora_stdout) = demo_runs["full"], demo_runs["lora"]
    assert [sorted(r) for r in metrics(full)] == [sorted(r) for r in metrics(lora)]  # every record, the same keys
    assert [r["ref_updates"] for r in metrics(lora, "loss")] == [1, 2, 3]
    summary = lambda text, out: [line.replace(out, "OUT") for line in text.splitlines()]  # noqa: E731
    f, lo = summary(full_stdout, full), summary(lora_stdout, lora)
    assert [line.split(":")[0] for line in f[:-1]] == [line.split(":")[0] for line in lo[:-1]]  # the same lines
    assert f[-1] == "wrote OUT/policy/, OUT/reference/, OUT/metrics.jsonl, OUT/curves.png"
    assert lo[-1] == ("wrote OUT/base/, OUT/policy/, OUT/reference/, OUT/policy_merged/, OUT/metrics.jsonl, "
                      "OUT/curves.png")


@slow
def test_saved_adapters_give_the_runs_last_evaluation(demo_runs):
    """The last evaluation (after the third soft update) from the saved folders, loaded as a user loads them and
    computed here: DPO's rewards beta * (log pi - log pi_ref) on the 16 eval pairs, policy/ and reference/ applied
    to base/ by peft; --save_merged's policy_merged/ gives the policy's log-probs."""
    from peft import PeftModel
    out = demo_runs["lora"][0]
    last = metrics(out, "eval_loss")[-1]
    tok = byte_tokenizer()
    batch = collate_pairs(tokenize_rows(tok, load_preferences("toy", 16)[1], ("chosen", "rejected"), 128, 64),
                          tok.pad_token_id)
    base = lambda: AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"))  # noqa: E731
    with torch.no_grad():
        # get_base_model(): the Hugging Face model with the adapter inside (PeftModel.base_model is peft's wrapper)
        pol = sequence_logps(PeftModel.from_pretrained(base(), os.path.join(out, "policy")).get_base_model(), **batch)[0]
        ref = sequence_logps(PeftModel.from_pretrained(base(), os.path.join(out, "reference")).get_base_model(),
                             **batch)[0]
        merged = sequence_logps(AutoModelForCausalLM.from_pretrained(os.path.join(out, "policy_merged")), **batch)[0]
    r_c, r_r = (0.05 * (pol - ref)).chunk(2)
    assert last["eval_reward_margin"] == pytest.approx((r_c - r_r).mean().item(), abs=1e-6)
    assert last["eval_loss"] == pytest.approx(-F.logsigmoid(r_c - r_r).mean().item(), abs=1e-6)
    assert max_diff(pol, ref) > 1e-3 and max_diff(merged, pol) < 1e-4
    ranks = {k: v.shape[0] for k, v in load_file(os.path.join(out, "reference", "adapter_model.safetensors")).items()
             if "lora_A" in k}
    assert set(ranks.values()) == {4 * R}  # a copy at step 0, then 3 soft updates; no layer at its full rank 64


@slow
def test_evaluate_takes_adapter_folders(demo_runs, tmp_path):
    """evaluate.py --models out/policy --reference out/reference: base + adapter, merged as load_model merges it;
    the same generations and KL as from the plain weights of policy_merged/."""
    out = demo_runs["lora"][0]
    flags = ["--n_prompts", "4", "--judge", "gold", "--reference", os.path.join(out, "reference")]
    res = {name: ev.main(["--models", os.path.join(out, name), "--labels", "policy", "--output_dir",
                          str(tmp_path / name)] + flags) for name in ("policy", "policy_merged")}
    gens = {name: [r["response"] for r in ev.read_jsonl(str(tmp_path / name / "generations" / "policy.jsonl"))]
            for name in res}
    assert gens["policy"] == gens["policy_merged"] and len(gens["policy"]) == 4
    kl = {name: res[name]["models"][0]["kl"]["mean"] for name in res}
    assert kl["policy"] == pytest.approx(kl["policy_merged"], abs=1e-4) and kl["policy"] != 0


@slow
@pytest.mark.parametrize("script", [tr_dpo, sft], ids=lambda m: m.__name__)
def test_script_resume_is_bit_exact_with_both_adapters(tmp_path, script):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # reference updates after steps 2 (before the checkpoint) and 4; SFT has none
    flags = FAST + ["--lora_r", "8"] + (["--tau", "2"] if script is tr_dpo else [])
    script.main(flags + ["--max_steps", "5", "--output_dir", a])
    script.main(flags + ["--max_steps", "3", "--save_every", "3", "--output_dir", b])
    assert set(checkpoint(b)["policy"]) == {k for k in checkpoint(b)["policy"] if ".lora_" in k}  # no frozen base
    script.main(flags + ["--max_steps", "5", "--resume", "--output_dir", b])
    folders = ["policy", "reference"] if script is tr_dpo else ["policy"]
    for name in folders:
        wa, wb = (load_file(os.path.join(o, name, "adapter_model.safetensors")) for o in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert metrics(a, "loss") and [m["loss"] for m in metrics(a, "loss")] == [m["loss"] for m in metrics(b, "loss")]
    assert metrics(a, "eval_loss")[-1] == metrics(b, "eval_loss")[-1]


@slow
def test_resume_refuses_another_lora_setting(tmp_path, capsys):
    out = str(tmp_path)
    tr_dpo.main(FAST + ["--max_steps", "1", "--save_every", "1", "--lora_r", "8", "--output_dir", out])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tr_dpo.main(FAST + ["--max_steps", "2", "--resume", "--lora_r", "4", "--output_dir", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"error: --resume: {out}/checkpoint was written with --lora_r 8, not 4; pass "
                                         f"--lora_r 8 to continue that run, or start a new one (--overwrite, or "
                                         f"another --output_dir)\n")  # run.json, before any model is built


@slow
def test_two_processes_end_with_the_same_adapters(tmp_path):
    """DDP (torchrun, 2 CPU processes, Gloo) vs one process: the same adapters up to the rounding of a gradient
    summed in another order; the reference forward runs outside DDP, through the same module."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = FAST + ["--max_steps", "4", "--micro_batch_size", "2", "--tau", "2", "--alpha", "0.5", "--lora_r", "8"]
    tr_dpo.main(flags + ["--output_dir", one])
    torchrun("tr_dpo.py", *flags, "--output_dir", two)
    for name in ("policy", "reference"):
        w1, w2 = (load_file(os.path.join(o, name, "adapter_model.safetensors")) for o in (one, two))
        assert w1.keys() == w2.keys()
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5), (name, k)
    moved = [w for k, w in load_file(os.path.join(one, "policy", "adapter_model.safetensors")).items() if "lora_B" in k]
    assert min(w.abs().max().item() for w in moved) > 3e-4  # B starts at 0; Adam moved it ~(1+2+3+4)/11 x lr
    assert [m["loss"] for m in metrics(one, "loss")] == pytest.approx([m["loss"] for m in metrics(two, "loss")], abs=1e-5)


@slow
def test_sft_lora_as_model_starts_the_reference_at_base_plus_adapter(tmp_path, capsys):
    """sft.py --lora_r 8, then tr_dpo.py --model <its policy/> --lora_r 8: the initial reference's eval log-probs
    (kept in the checkpoint) are those of base + SFT adapter, computed here unpadded in float64 from the folders by
    peft, not the bare base's."""
    from peft import PeftModel
    sft_out, dpo = str(tmp_path / "sft"), str(tmp_path / "dpo")
    sft.main(FAST + ["--max_steps", "3", "--lr", "1e-2", "--lora_r", "8", "--output_dir", sft_out])
    policy = os.path.join(sft_out, "policy")
    tr_dpo.main(FAST + ["--max_steps", "1", "--save_every", "1", "--model", policy, "--lora_r", "8",
                        "--output_dir", dpo])
    init = checkpoint(dpo)["extra"]["init_ref_logps"]  # (2, 16): chosen, rejected of every eval pair
    tok = byte_tokenizer()
    evals = tokenize_rows(tok, load_preferences("toy", 16)[1], ("chosen", "rejected"), 128, 64)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(sft_out, "base"))
    with torch.no_grad():
        bare = naive_pair_logps(base, evals)
        expected = naive_pair_logps(PeftModel.from_pretrained(base, policy), evals)
    assert torch.allclose(init.flatten().double(), expected, atol=1e-4)
    assert max_diff(bare, expected) > 1e-2  # the bare base would be another reference
    assert json.load(open(os.path.join(dpo, "policy", "adapter_config.json")))["base_model_name_or_path"] == \
        os.path.join(sft_out, "base")
    assert not os.path.exists(os.path.join(dpo, "base"))  # the SFT run's base/ is named, not copied
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tr_dpo.main(FAST + ["--model", policy, "--lora_r", "16", "--output_dir", str(tmp_path / "bad")])
    assert e.value.code == 2 and "is a LoRA adapter of rank 8: continue it with --lora_r 8" in capsys.readouterr().err
