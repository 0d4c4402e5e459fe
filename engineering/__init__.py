"""
Engineering a reader learning the methods can skip: each module opens with a paragraph saying when it is needed.

    run.py         what a script's main() and loop call around the step: launch() and Run (the output folder,
                   metrics.jsonl, checkpoints and --resume, the gradient clip, preemption, the final save)
    cli.py         the command line: the shared flags and their checks, one-line errors (exit code 2)
    data.py        loading and validating rows: hub sets, local files and folders, the toy task
    chat.py        chat-format rows, split into prompt and responses and rendered with the chat template
    hub.py         a hub model or dataset that cannot be fetched: one line within seconds
    models.py      the built-in models, SmolLM2 from its GGUF file, hub models; --dtype autocast
    logits.py      which computation gives a model's exact log-probs: checked once at load, stated in one line
    toy.py         the toy task (digit puzzles) and its exact gold score
    parallel.py    DDP and FSDP2 around the policy; log-probs of a data set across ranks
    speed.py       --share_prompt (each prompt once, its KV cache reused) and --group_by_length's sort keys
    logger.py      metrics.jsonl, the progress bar, the summary at the end of a run; --report_to wandb/tensorboard
    checkpoint.py  checkpoints, the final save, preemption, non-finite steps, a lost rank
    adapters.py    --lora_r: a frozen base, the policy and reference as LoRA adapters; the exact TR update
    curves.py      a PNG of a run's metrics.jsonl
    api_judge.py   evaluate.py --judge api: an OpenAI-compatible judge through the openai package, the key kept safe
    jsonio.py      the one JSON reader: deep nesting, huge numbers, lone surrogates refused in one line
"""
