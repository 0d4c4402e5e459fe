"""Past one process (docs/scaling.md): the sharded build keeps one full copy of the weights on the host, and more
than one node: two torchrun launchers on 127.0.0.1 with --nnodes 2 and a c10d rendezvous (the multi-node command,
one process per "node"), sharing one output folder as nodes share a file system."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from common import Dist, SequenceLogps, make_reference
from conftest import ENV, FAST, ROOT, torchrun, weights
from engineering.models import load_model
from engineering.parallel import wrap_models
from test_faults import free_port


def test_the_reference_never_copies_rank_0s_full_weights(tmp_path):
    """A one-process Gloo group, --fsdp's build: make_reference's deepcopy of the meta policy shares rank 0's full
    copy instead of copying it (a second full copy on the host, for the whole run), and wrap_models drops it for
    both once the shards are filled."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        policy = SequenceLogps(load_model("tiny", fsdp=True)[0])
        ref = make_reference(policy)
        weights = policy.lm.full_weights.weights
        assert weights is not None and ref.lm.full_weights.weights is weights
        wrap_models(policy, ref, Dist(0, 0, 1, torch.device("cpu")), fsdp=True)
        assert policy.lm.full_weights.weights is None and ref.lm.full_weights.weights is None
    finally:
        dist.destroy_process_group()

# two micro-batches of 2 per rank under two processes, a reference update every 2 steps
FLAGS = FAST + ["--micro_batch_size", "2", "--tau", "2", "--alpha", "0.5", "--fsdp"]


def two_nodes(*flags, timeout=300):
    """tr_dpo.py under two launchers (nodes 0 and 1, one process each) meeting at a c10d rendezvous on a free
    port; both must exit 0. A launcher still running at the timeout, or left waiting by its partner's failure, is
    stopped as a scheduler stops one: SIGTERM, on which torchrun stops its workers, then SIGKILL."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                               "--rdzv_id", "two-nodes", "--local_addr", "127.0.0.1",
                               os.path.join(ROOT, "tr_dpo.py"), *flags], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errs)


@pytest.mark.slow
def test_two_nodes_save_and_resume_on_one_node(tmp_path):
    straight, nodes = str(tmp_path / "straight"), str(tmp_path / "nodes")
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "4", "--output_dir", straight)
    # two nodes to step 2 with a checkpoint, then the same world size (2) on one node to step 4
    two_nodes(*FLAGS, "--max_steps", "2", "--save_every", "2", "--output_dir", nodes)
    with open(os.path.join(nodes, "checkpoint", "run.json")) as f:
        assert json.load(f)["world_size"] == 2  # the launchers met: one run of two ranks, not two runs of one
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "4", "--resume", "--output_dir", nodes)
    for name in ("policy", "reference"):
        a, b = weights(straight, name), weights(nodes, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
