"""Helpers shared by the test files. Tests never download: the Hugging Face libraries are forced offline here,
before any test imports them.

Two tiers (the `slow` marker is registered in pytest.ini):
    python -m pytest -m "not slow"    the hand-computed tests: losses, the update, masking, truncation, the HH
                                      boundary, KTO's z0, data loading; under a minute on 2 CPU cores
    python -m pytest                  everything, including `slow`: tests that start a process or a whole run
"""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: the scripts
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# a short run of any training script on the toy task: 8 examples per step, 2 micro-batches, metrics every step
FAST = ["--batch_size", "8", "--micro_batch_size", "4", "--eval_size", "16", "--log_every", "1", "--eval_every", "0"]
# one thread per child process: two of them share the 2 CPU cores of CI
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# what loading a built-in model prints (engineering/logits.py: the fast log-prob path is exact for GPT-NeoX)
LOGPS_LINE = "log-probs: LM head at response positions only (checked against GPTNeoXForCausalLM's own forward)"


def metrics(out, key=None):
    """The records of out/metrics.jsonl, only those holding `key` when given."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if key is None or key in r]


def weights(out, name="policy"):
    """A saved folder's weights (policy/ or reference/), loaded the way a user loads them (from_pretrained), so
    that they carry the model's own parameter names, as checkpoints and in-memory models do."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.join(out, name)).state_dict()


def checkpoint(out, name="checkpoint"):
    """out/checkpoint as one dict: trainer.pt's entries (step, extra, scheduler, ...) and the DCP shards' full
    tensors ("policy", "reference", "optimizer"), read the way a user inspects a checkpoint offline: DCP's own
    converter to one torch.save file, loaded weights_only."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = os.path.join(out, name)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "shards.pt"))
        shards = torch.load(os.path.join(tmp, "shards.pt"), weights_only=True)
    return {**torch.load(os.path.join(path, "trainer.pt"), weights_only=True), **shards}


def torchrun(script, *flags, nproc=2, timeout=300):
    """`torchrun --standalone --nproc_per_node=nproc script flags` on CPU (Gloo), one thread per process."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        os.path.join(ROOT, script), *flags], env=ENV, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def naive_logp(model, prompt_ids, response_ids):
    """log pi(response | prompt) from one unpadded forward pass and a full-vocabulary log-softmax, in float64."""
    ids = torch.tensor([prompt_ids + response_ids])
    logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(prompt_ids) - 1 + t, tok].item() for t, tok in enumerate(response_ids))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """The built-in tiny model and its tokenizer saved as a folder, for tests that damage or edit a copy of it."""
    from engineering.models import load_model  # after the offline settings above
    path = tmp_path_factory.mktemp("model") / "tiny"
    model, tok = load_model("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
