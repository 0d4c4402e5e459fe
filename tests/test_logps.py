"""Every log-prob path equals the naive computation, log_softmax(model(prompt + response).logits) on each sequence
alone and unpadded, in float64 (conftest.naive_logp), on tiny models of 18 architectures built in code (19 configs:
Gemma-3 with and without its optional soft-cap). Their LM heads are scaled to logits of standard deviation ~10 (up
to ~40): a soft-cap of 30 or a logit scale of 1/8 then changes the summed log-probs by hundreds of nats (at the
models' initial logits of O(1), a soft-cap of 30 changes them by 5e-6 and no test could see it).
test_fast_path_is_wrong_where_postprocessed shows that the fast path (the LM head at response positions only)
fails these comparisons on exactly the post-processed architectures.
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_logps.py
"""
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers as tf

import evaluate
import sft
import tr_dpo
from common import Dist, SequenceLogps, collate_pairs, make_reference, sequence_logps, tokenize_rows
from conftest import FAST, checkpoint, metrics, naive_logp, torchrun
from engineering.cli import InputError
from engineering.data import load_preferences, load_sft
from engineering.logits import _probe, choose_logps_path
from engineering.models import byte_tokenizer
from engineering.parallel import wrap_models
from engineering.speed import check_share_prompt, collate_shared_prompt, shared_prompt_layout, shared_prompt_logps

slow = pytest.mark.slow

# -----------------------------------------------------------------------------
# tiny models of many architectures, built from configs in code

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = {  # name: (config class, causal-LM class, changes to SMALL; None removes a key)
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=8)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=None)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(head_dim=8)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(head_dim=8, sliding_window=512)),  # soft-cap None
    "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM, {}),
    "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM, dict(sliding_window=None)),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(num_key_value_heads=None)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                                     hidden_size=None, intermediate_size=None, num_hidden_layers=None,
                                                     num_attention_heads=None, num_key_value_heads=None,
                                                     max_position_embeddings=None)),
    "falcon": (tf.FalconConfig, tf.FalconForCausalLM, dict(num_key_value_heads=None, intermediate_size=None)),
    # their forward changes the logits after the LM head, or the hidden states before it
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(logits_scaling=8.0)),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=0.0625)),  # its config's default
    "cohere2": (tf.Cohere2Config, tf.Cohere2ForCausalLM, dict(logit_scale=0.25, sliding_window=512)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(head_dim=8, final_logit_softcapping=30.0,
                                                           sliding_window=512)),
    "gemma3_softcap": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(head_dim=8, final_logit_softcapping=30.0,
                                                                     sliding_window=512)),
    "minicpm3": (tf.MiniCPM3Config, tf.MiniCPM3ForCausalLM, dict(num_key_value_heads=4, qk_nope_head_dim=8,
                                                               qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=16,
                                                               kv_lora_rank=16, dim_model_base=8, scale_depth=1.4,
                                                               scale_emb=12.0)),  # hidden / (32 / 8) before the head
}
POSTPROCESSED = ["granite", "cohere", "cohere2", "gemma2", "gemma3_softcap", "minicpm3"]


def build(name, seed=0, logit_std=10.0, **changes):
    """ARCHS[name] with seeded random weights, in eval mode, its LM head scaled so that the logits of the body's
    output have standard deviation about `logit_std` (tied input embeddings scale with it; None: as initialised)."""
    config_cls, model_cls, extra = ARCHS[name]
    config = config_cls(**{k: v for k, v in {**SMALL, **extra, **changes}.items() if v is not None})
    config._attn_implementation = "eager"  # the same attention code on every machine
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    ids = torch.randint(config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(2 if logit_std else 0):  # with tied embeddings the first rescaling also moves the hidden states
        with torch.no_grad():
            std = model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state).std().item()
            model.get_output_embeddings().weight.mul_(logit_std / std)
    return model

# -----------------------------------------------------------------------------
# the examples, the naive numbers, and every path


g = torch.Generator().manual_seed(1)
rand_ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731  (0-2 are pad, BOS, EOS)
# prompts of 3, 9 and 5 tokens, responses of 1 to 8: both layouts (plain and shared prompt) pad
EXAMPLES = [{"prompt": rand_ids(p), "chosen": rand_ids(c), "rejected": rand_ids(r)} for p, c, r in
            [(3, 6, 1), (9, 2, 5), (5, 4, 8)]]
PAIRS = [(e["prompt"], e[k]) for k in ("chosen", "rejected") for e in EXAMPLES]  # the rows of collate_pairs
TOL = 1e-4


def naive_all(model):
    with torch.no_grad():
        return torch.tensor([naive_logp(model, p, r) for p, r in PAIRS], dtype=torch.float64)


def every_path(model):
    """{path: (2B,) log-probs}: training's plain layout, --share_prompt's layout, evaluate.py's KL (batches of 2)."""
    with torch.no_grad():
        return {"plain": sequence_logps(model, **collate_pairs(EXAMPLES, 0))[0],
                "shared": shared_prompt_logps(model, **collate_shared_prompt(EXAMPLES, 0))[0],
                "eval": torch.tensor(evaluate.response_logps(model, 0, *zip(*PAIRS), batch_size=2))}


def worst(got, want):
    return (got.double() - want).abs().max().item()


@functools.lru_cache(maxsize=None)
def checked(name):
    """(model, the line choose_logps_path returned, naive log-probs), for the tests that leave the model as it is."""
    model = build(name)
    line = choose_logps_path(model)
    return model, line, naive_all(model)


@pytest.mark.parametrize("name", ARCHS)
def test_decision(name):
    model, line, _ = checked(name)
    assert model.logps_path == ("forward_keep" if name in POSTPROCESSED else "head"), line
    assert line.startswith("log-probs: ") and "\n" not in line


@pytest.mark.parametrize("name", ARCHS)
def test_every_path_equals_naive(name):
    model, _, want = checked(name)
    for path, got in every_path(model).items():
        assert worst(got, want) <= TOL, (name, path)


@pytest.mark.parametrize("name", POSTPROCESSED)
def test_fast_path_is_wrong_where_postprocessed(name):
    """The same comparison with the fast path forced on every architecture: off by more than 10 nats on
    every post-processed architecture (hundreds at these logits). So the test above can fail."""
    model, _, want = checked(name)
    try:
        model.logps_path = "head"
        for path, got in every_path(model).items():
            assert worst(got, want) > 10, (name, path)
    finally:
        model.logps_path = "forward_keep"


@pytest.mark.parametrize("name", ["llama", "gpt2", "granite", "gemma2", "minicpm3"])
@pytest.mark.parametrize("path", ["forward", "forward_keep"])
def test_own_forward_paths_equal_naive(name, path):
    """Both own-forward paths are exact on any model, also where the probe chooses the fast path ("forward" is what a
    model gets that takes no boolean logits_to_keep: older transformers, remote code)."""
    model = build(name)
    model.logps_path = path
    want = naive_all(model)
    for p, got in every_path(model).items():
        assert worst(got, want) <= TOL, (name, path, p)


def test_an_unchecked_model_gets_its_own_forward():
    model = build("granite")  # built by hand, not by load_model: no decision
    assert not hasattr(model, "logps_path")
    want = naive_all(model)
    for p, got in every_path(model).items():
        assert worst(got, want) <= TOL, p


@pytest.mark.parametrize("layout", ["plain", "shared"])
def test_gradients_equal_naive(layout):
    """Gemma-2's own forward with logits_to_keep (its soft-cap included) gives the naive gradients too."""
    model = build("gemma2")
    choose_logps_path(model)
    weights = torch.linspace(1, 2, len(PAIRS))  # distinct weights: a row mix-up would show

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    def naive(prompt, response):  # conftest.naive_logp, differentiable
        logp = F.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0].double(), -1)
        return sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response))
    want = grads(sum(w * naive(p, r) for w, (p, r) in zip(weights, PAIRS)))
    fn, collate = (sequence_logps, collate_pairs) if layout == "plain" else (shared_prompt_logps, collate_shared_prompt)
    got = grads((fn(model, **collate(EXAMPLES, 0))[0] * weights).sum())
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k].float(), rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_shared_prompt_exact_under_a_sliding_window(name):
    """A window of 4 tokens, shorter than the sequences (up to 17), changes the log-probs; the shared-prompt cache
    still gives the naive ones."""
    model = build(name, sliding_window=4)
    choose_logps_path(model)
    want = naive_all(model)
    assert worst(want, naive_all(build(name))) > 1  # the window is felt
    for p, got in every_path(model).items():
        assert worst(got, want) <= TOL, p


def test_share_prompt_checked_once_and_refused_where_the_cache_cannot_be_shared():
    """RWKV's state and Mamba's cache are no per-layer KV cache: with --share_prompt RWKV's log-probs would be off
    (its state reads the prompts' left padding) and Mamba's forward fails. The scripts' shared_prompt_layout(model)
    refuses both in one line, and passes the others."""
    for name in ("llama", "gemma2", "granite"):
        assert shared_prompt_layout(checked(name)[0]) == (collate_shared_prompt, shared_prompt_logps)
    rwkv = tf.RwkvForCausalLM(tf.RwkvConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                            attention_hidden_size=32, intermediate_size=64, context_length=128))
    mamba = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4))
    for model, why in ((rwkv, "its log-probs differ from the plain forward's by up to"), (mamba, "it fails")):
        choose_logps_path(model)
        with pytest.raises(InputError, match=f"^--share_prompt cannot reuse {type(model).__name__}'s cache exactly: "
                                             f"{why}.*; run without --share_prompt$"):
            shared_prompt_layout(model)
    check_share_prompt(checked("gpt2")[0])

# -----------------------------------------------------------------------------
# the probe: it sees what a hand-kept list would miss, and refuses what no path here computes


class CappedLlama(tf.LlamaForCausalLM):
    """A family "added next month": it clamps its logits to [-200, 200] in place. With logits of O(10) nothing is
    clamped, so comparing the fast path's values with the forward's on real logits could not see it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits.clamp_(-200, 200)
        return out


def test_probe_sees_postprocessing_that_real_logits_do_not_show():
    model = build("llama")
    capped = CappedLlama(model.config).eval()
    capped.load_state_dict(model.state_dict())
    ids, mask, _, _ = _probe(model)
    with torch.no_grad():
        assert torch.equal(capped(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)  # identical on real inputs
    line = choose_logps_path(capped)
    assert capped.logps_path == "forward_keep" and line == (
        "log-probs: CappedLlama's own forward, logits at response positions only, because its forward changes the "
        "logits after the LM head")


def test_known_config_attribute_is_a_second_line_of_defence():
    model = build("llama", final_logit_softcapping=30.0)  # Llama's forward ignores it: the probe sees nothing
    line = choose_logps_path(model)
    assert model.logps_path == "forward_keep" and "config sets final_logit_softcapping=30.0" in line


class NoKeepMaskLlama(tf.LlamaForCausalLM):
    """Takes no boolean logits_to_keep (as transformers before the mask form, or remote code)."""

    def forward(self, *args, cache=None, logits_to_keep=0, **kwargs):
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            raise TypeError("logits_to_keep must be an int or a 1-D tensor of indices")
        out = super().forward(*args, cache=cache, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 0.5  # and it changes the logits after the head
        return out


def test_own_forward_with_every_logit_where_no_mask_is_taken():
    model = NoKeepMaskLlama(build("llama").config).eval()
    model.load_state_dict(build("llama").state_dict())
    line = choose_logps_path(model)
    assert model.logps_path == "forward" and "it takes no boolean logits_to_keep" in line
    want = naive_all(model)
    for p, got in every_path(model).items():
        assert worst(got, want) <= TOL, p


class ShiftedLlama(tf.LlamaForCausalLM):
    """Returns one row of logits fewer than tokens (a prompt-tuned model returns more)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits[:, 1:]
        return out


def test_refuses_what_no_path_can_compute():
    # CPM-Ant: its padding changes the logits of the real tokens before it (by 29 nats in the prototype's survey)
    cpmant = tf.CpmAntForCausalLM(tf.CpmAntConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, dim_head=8,
                                                  dim_ff=64, num_hidden_layers=2)).eval()
    with pytest.raises(InputError, match="^CpmAntForCausalLM gives a right-padded sequence other logits than the "
                                         "same tokens alone"):
        choose_logps_path(cpmant)
    with pytest.raises(InputError, match=r"^ShiftedLlama returns logits of shape \(2, 5, 128\) for input of shape "
                                         r"\(2, 6\): not one row per token"):
        choose_logps_path(ShiftedLlama(build("llama").config).eval())


def test_probe_leaves_mode_and_rng_as_they_were():
    model = build("gpt2").train()  # GPT-2 has dropout: the probe runs in eval mode, then restores train mode
    state = torch.get_rng_state()
    choose_logps_path(model)
    assert model.training and model.logps_path == "head"
    assert torch.equal(torch.get_rng_state(), state)

# -----------------------------------------------------------------------------
# the decision travels: make_reference's deepcopy, FSDP2's fully_shard, LoRA layers


@pytest.mark.parametrize("layout", ["plain", "shared"])
def test_fsdp_and_reference_keep_the_decision(tmp_path, layout):
    """A one-process Gloo group: policy and deepcopy reference sharded as the scripts shard them (wrap_models, with
    micro-batches of 2 pairs and 1 pair); both give Gemma-2's naive log-probs, through its own forward."""
    model = build("gemma2")
    choose_logps_path(model)
    want = naive_all(model)
    collate, logps = (collate_pairs, sequence_logps) if layout == "plain" else (collate_shared_prompt,
                                                                                shared_prompt_logps)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        policy = SequenceLogps(model, logps)
        ref = make_reference(policy)
        assert wrap_models(policy, ref, Dist(0, 0, 1, torch.device("cpu")), fsdp=True) is policy  # sharded in place
        assert ref.lm.logps_path == model.logps_path == "forward_keep"
        for micro in (EXAMPLES[:2], EXAMPLES[2:]):
            rows = [i for i, (p, _) in enumerate(PAIRS) if any(p is e["prompt"] for e in micro)]
            got, _ = policy(**collate(micro, 0))
            got.sum().backward()
            assert worst(got.detach(), want[rows]) <= TOL
            with torch.no_grad():
                assert worst(ref(**collate(micro, 0))[0], want[rows]) <= TOL
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name, path", [("llama", "head"), ("granite", "forward_keep")])
def test_lora_layers(name, path):
    """LoRA layers injected in place into the Hugging Face model (as peft's get_peft_model does, and --lora_r keeps
    the model so): the fast path runs them inside model.base_model, the own forward too. B is random
    (init_lora_weights=False), so skipping the adapters would change the numbers."""
    peft = pytest.importorskip("peft")
    model = build(name)
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    choose_logps_path(model)
    assert model.logps_path == path
    want = naive_all(model)
    assert worst(want, naive_all(build(name))) > 1  # the adapters are felt
    for p, got in every_path(model).items():
        assert worst(got, want) <= TOL, p

# -----------------------------------------------------------------------------
# whole runs on a saved soft-capped model: a local folder (save_pretrained, the tokenizer beside it)


def gemma2_folder(path):
    """Gemma-2 with final_logit_softcapping 30, the byte tokenizer's vocabulary, its head scaled to logits of std
    ~10 (the fast path is off by hundreds of nats on it); saved with its tokenizer as a user's folder would be."""
    tok = byte_tokenizer()
    model = build("gemma2", vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def naive_pairs(model_dir, examples):
    """Naive log-probs of each example's chosen and rejected under the folder's weights: (2, len(examples))."""
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return torch.tensor([[naive_logp(model, e["prompt"], e[k]) for e in examples] for k in ("chosen", "rejected")])


def eval_pairs(tok_dir):
    """The 16 eval pairs of the toy task, as the runs below tokenise them (default lengths 128 / 64)."""
    tok = tf.AutoTokenizer.from_pretrained(tok_dir)
    return tokenize_rows(tok, load_preferences("toy", 16)[1], ("chosen", "rejected"), 128, 64)


@slow
def test_tr_dpo_on_a_saved_softcapped_model(tmp_path, capsys):
    """tr_dpo.py on the folder, 2 steps of 2 micro-batches: the line says it got its own forward; the step-0
    log-probs of the initial reference (kept in the checkpoint) and the last evaluation's log-probs equal the naive
    ones under the folder's weights and under the saved policy/."""
    folder, out = gemma2_folder(tmp_path / "gemma2"), str(tmp_path / "out")
    tr_dpo.main(["--model", folder, *FAST, "--max_steps", "2", "--save_every", "2", "--lr", "1e-3",
                 "--output_dir", out])
    assert capsys.readouterr().out.splitlines()[0] == (
        "log-probs: Gemma2ForCausalLM's own forward, logits at response positions only, because its forward changes "
        "the logits after the LM head (final_logit_softcapping=30.0)")
    examples = eval_pairs(folder)
    torch.testing.assert_close(checkpoint(out)["extra"]["init_ref_logps"], naive_pairs(folder, examples).float(),
                               rtol=0, atol=TOL)
    policy = naive_pairs(os.path.join(out, "policy"), examples)
    assert (policy - naive_pairs(folder, examples)).abs().max() > 1e-3  # the policy moved
    last = metrics(out, "eval_logps_chosen")[-1]
    assert last["eval_logps_chosen"] == pytest.approx(policy[0].mean().item(), abs=TOL)
    assert last["eval_logps_rejected"] == pytest.approx(policy[1].mean().item(), abs=TOL)


@slow
def test_sft_on_a_saved_softcapped_model(tmp_path):
    folder, out = gemma2_folder(tmp_path / "gemma2"), str(tmp_path / "out")
    sft.main(["--model", folder, *FAST, "--max_steps", "2", "--lr", "1e-3", "--output_dir", out])
    tok = tf.AutoTokenizer.from_pretrained(folder)
    examples = tokenize_rows(tok, load_sft("toy", 16)[1], ("completion",), 128, 64)
    model = tf.AutoModelForCausalLM.from_pretrained(os.path.join(out, "policy"))
    with torch.no_grad():
        want = [naive_logp(model, e["prompt"], e["completion"]) for e in examples]
    last = metrics(out, "eval_loss")[-1]
    assert last["eval_logps"] == pytest.approx(sum(want) / len(want), abs=TOL)
    assert last["eval_loss"] == pytest.approx(-sum(want) / sum(len(e["completion"]) for e in examples), abs=TOL)


@slow
def test_two_processes_share_prompt_on_a_saved_softcapped_model(tmp_path):
    """TR-IPO under DDP (2 processes), --share_prompt, micro-batches: its last evaluation's summed log-probs equal
    the naive ones under the saved policy/; rank 0 alone states the decision."""
    folder, out = gemma2_folder(tmp_path / "gemma2"), str(tmp_path / "out")
    r = torchrun("tr_ipo.py", "--model", folder, *FAST, "--micro_batch_size", "2", "--max_steps", "2",
                 "--share_prompt", "--logps", "sum", "--lr", "1e-3", "--output_dir", out)
    assert [line for line in r.stdout.splitlines() if line.startswith("log-probs: ")] == [
        "log-probs: Gemma2ForCausalLM's own forward, logits at response positions only, because its forward changes "
        "the logits after the LM head (final_logit_softcapping=30.0)"]
    policy = naive_pairs(os.path.join(out, "policy"), eval_pairs(folder))
    last = metrics(out, "eval_logps_chosen")[-1]
    assert last["eval_logps_chosen"] == pytest.approx(policy[0].mean().item(), abs=TOL)
    assert last["eval_logps_rejected"] == pytest.approx(policy[1].mean().item(), abs=TOL)
