"""
The toy task: digit-string puzzles ("sort 3142", "reverse 3142") with an exact gold score, in Anthropic-HH format.

It lets every script run offline in seconds and lets toy_experiment.py judge policies exactly, without an LLM judge.
A reader needs it only to see what `--dataset toy` trains on or how the gold judge of evaluate.py scores; the
methods themselves never look at it. common.load_preferences and sft.load_sft draw their toy rows from here.
"""
import random

TOY_OPS = ("reverse", "sort")


def toy_answer(op, digits):
    return digits[::-1] if op == "reverse" else "".join(sorted(digits))


def toy_problem(rng):
    op, n = rng.choice(TOY_OPS), rng.randint(3, 6)
    digits = "".join(rng.choice("0123456789") for _ in range(n))
    return f"\n\nHuman: {op} {digits}\n\nAssistant:", " " + toy_answer(op, digits)


def toy_corrupt(answer, rng):
    """A plausible wrong answer: one digit changed, two neighbours swapped, or one digit dropped."""
    s = answer.strip()
    while True:
        kind, i = rng.randrange(3), rng.randrange(len(s))
        if kind == 0:
            w = s[:i] + rng.choice("0123456789") + s[i + 1:]
        elif kind == 1 and i + 1 < len(s):
            w = s[:i] + s[i + 1] + s[i] + s[i + 2:]
        else:
            w = s[:i] + s[i + 1:]
        if w != s:
            return " " + w


def toy_parse(prompt):
    """(op, digits) of a toy prompt."""
    op, digits = prompt.rsplit("Human: ", 1)[1].split("\n\n")[0].split()
    return op, digits


def toy_expected(prompt):
    """The right answer (without its leading space) to a toy prompt."""
    return toy_answer(*toy_parse(prompt))


def toy_other_op(prompt):
    """The other operation's answer (with its leading space) on the prompt's digits: a well-formed, systematic
    mistake (sort for reverse and reverse for sort). It is right too when the digits are non-increasing."""
    op, digits = toy_parse(prompt)
    return " " + toy_answer(TOY_OPS[1 - TOY_OPS.index(op)], digits)


def toy_malformed(prompt, response):
    """True when a response is not a digit string of the answer's length (gold score 0 for its form, unlike a
    well-formed answer with every digit wrong)."""
    got = response.strip()
    return len(got) != len(toy_expected(prompt)) or not got.isdigit()


def toy_gold_score(prompt, response):
    """Exact score of a toy response in [0, 1]: the fraction of digit positions right when the response is a
    digit string of the right length, 0 for any other (malformed) response. 1.0 only for the exact answer."""
    if toy_malformed(prompt, response):
        return 0.0
    want = toy_expected(prompt)
    return sum(a == b for a, b in zip(response.strip(), want)) / len(want)


def toy_preferences(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = toy_problem(rng)
        rows.append({"prompt": prompt, "chosen": answer, "rejected": toy_corrupt(answer, rng)})
    return rows


def toy_sft_rows(n, seed, error_rate=0.3):
    """SFT demonstrations {"prompt", "completion"} for the toy task, imperfect on purpose: a fraction error_rate
    of the completions are toy_corrupt() answers, so the SFT model is often wrong when sampled and preference
    optimisation has room to improve. Drawn from a stream separate from toy_preferences(n, seed)."""
    rng = random.Random(f"toy-sft-{seed}")
    rows = []
    for _ in range(n):
        prompt, answer = toy_problem(rng)
        rows.append({"prompt": prompt, "completion": toy_corrupt(answer, rng) if rng.random() < error_rate else answer})
    return rows
