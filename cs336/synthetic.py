"""The embedded corpus: seeded, synthetic simple stories and arithmetic word problems.

Everything here is *synthetic*: generated from small hand-written templates by a seeded
``random.Random``, so the same ``(seed, scale)`` always gives byte-identical files and no
download is ever needed. It exists so that ``cs336 quickstart`` can run the whole stack
(tokenizer -> pretraining -> SFT -> GRPO) on a laptop CPU in minutes; it is not a benchmark.

Two kinds of text:
- **Stories**: TinyStories-like paragraphs (a child, a place, an object, a small event and a
  happy ending), for pretraining and for sampling text.
- **Arithmetic word problems** with a worked one-line solution, e.g.
  ``Mia has 3 apples. She finds 4 more apples. How many apples does Mia have now?`` ->
  ``Mia starts with 3 apples and finds 4 more, so 3 + 4 = 7.`` with answer ``7``.
  In the pretraining corpus they appear as plain text (``Question: ... Solution: ...``);
  for SFT they render into the r1_zero format (``<reasoning> </think> <answer>7</answer>``,
  the prompt itself ending in ``<think>``), so the reasoning is the worked solution.

Held-out evaluation problems are *distinct question strings* from every training problem
(checked here, not assumed).

Usage::

    from cs336.synthetic import write_corpus
    info = write_corpus("data/synthetic", scale=1.0, seed=0)   # corpus.txt, sft/train/test jsonl
"""

from __future__ import annotations

import json
import operator
import random
from dataclasses import asdict, dataclass
from pathlib import Path

EOT = "<|endoftext|>"

# ---------------------------------------------------------------- vocabulary of the templates
NAMES = [
    ("Mia", "she", "her"), ("Tom", "he", "his"), ("Lily", "she", "her"), ("Ben", "he", "his"),
    ("Sara", "she", "her"), ("Max", "he", "his"), ("Anna", "she", "her"), ("Sam", "he", "his"),
    ("Zoe", "she", "her"), ("Leo", "he", "his"), ("Emma", "she", "her"), ("Jack", "he", "his"),
    ("Nina", "she", "her"), ("Finn", "he", "his"), ("Ruby", "she", "her"), ("Owen", "he", "his"),
]
ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "duck", "fox", "bear", "puppy", "kitten"]
PLACES = ["park", "garden", "forest", "beach", "farm", "school", "lake", "hill", "town", "yard"]
TOYS = ["ball", "kite", "boat", "doll", "drum", "car", "block", "book", "hat", "balloon"]
COLORS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft", "happy", "little"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud", "curious", "surprised"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "quiet", "bright"]
ITEMS = ["apples", "cookies", "stickers", "marbles", "shells", "flowers", "pencils", "stones",
         "cards", "candies", "eggs", "coins", "leaves", "berries", "buttons", "crayons"]

STORY_OPENINGS = [
    "Once upon a time, there was a {color} {animal} named {name2}.",
    "One {weather} day, {name} went to the {place}.",
    "{name} had a {color} {toy}. {Pron} loved it very much.",
    "There was a little {animal} who lived near the {place}.",
]
STORY_MIDDLES = [
    "{Pron} saw a {color} {toy} under a tree. {Pron} wanted to play with it.",
    "{name} met a {animal} named {name2}. They played together all day.",
    "Then the {toy} fell into the water. {name} felt {feeling}.",
    "{name} and {poss} friend {name2} ran to the {place} to look for a {toy}.",
    "The {animal} was {feeling} because it could not find its {toy}.",
    "{Pron} asked {poss} mom, \"Can I go to the {place}?\" Mom said, \"Yes, but be careful.\"",
    "It started to rain, so {name} and the {animal} hid under a big tree.",
]
STORY_ENDINGS = [
    "In the end, they found the {toy} and everyone was {feeling}.",
    "{name} learned that sharing makes friends happy.",
    "They went home and had a warm dinner. It was a good day.",
    "From that day on, {name} and the {animal} were best friends.",
    "{name} smiled and said, \"Thank you!\" Then {pron} went to sleep.",
]

# Problem templates: (question, reasoning); {a} {b} {c} numbers, {r} the result of the first step.
ADD_TEMPLATES = [
    ("{name} has {a} {item}. {Pron} finds {b} more {item}. How many {item} does {name} have now?",
     "{name} starts with {a} {item} and finds {b} more, so {a} + {b} = {ans}."),
    ("There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box?",
     "The box has {a} {item} and {b} more go in, so {a} + {b} = {ans}."),
    ("{name} picked {a} {item} in the morning and {b} {item} in the afternoon. How many {item} did {pron} pick?",
     "{name} picked {a} and then {b}, so {a} + {b} = {ans}."),
    ("{name} has {a} {item} and {name2} has {b} {item}. How many {item} do they have together?",
     "Together they have {a} + {b} = {ans} {item}."),
]
SUB_TEMPLATES = [
    ("{name} has {a} {item}. {Pron} gives {b} to {name2}. How many {item} does {name} have left?",
     "{name} starts with {a} {item} and gives away {b}, so {a} - {b} = {ans}."),
    ("There are {a} {item} on the table. {name} takes {b} of them. How many {item} are left on the table?",
     "{a} {item} minus the {b} taken is {a} - {b} = {ans}."),
    ("{name} had {a} {item} but lost {b}. How many {item} does {pron} have now?",
     "{name} had {a} and lost {b}, so {a} - {b} = {ans}."),
]
TWO_STEP_TEMPLATES = [
    ("{name} has {a} {item}. {Pron} finds {b} more and then gives {c} to {name2}. How many {item} does {name} have now?",
     "First {a} + {b} = {r}. Then {r} - {c} = {ans}."),
    ("A bag has {a} {item}. {name} adds {b} {item} and takes out {c}. How many {item} are in the bag?",
     "First {a} + {b} = {r}. Then {r} - {c} = {ans}."),
]

R1_ZERO_RESPONSE = "{reasoning} </think> <answer>{answer}</answer>"


@dataclass(frozen=True)
class Problem:
    """One arithmetic word problem. ``answer`` is a string, as graders compare strings."""

    question: str
    reasoning: str  # the worked solution, one or two equations
    answer: str
    kind: str  # "add" | "sub" | "two_step"

    def r1_zero_response(self) -> str:
        """The response half of the r1_zero format (the prompt already ends with ``<think>``)."""
        return R1_ZERO_RESPONSE.format(reasoning=self.reasoning, answer=self.answer)

    def pretraining_text(self) -> str:
        return f"Question: {self.question}\nSolution: {self.reasoning} The answer is {self.answer}."


def _fill(template: str, **kw) -> str:
    return template.format(**kw)


def make_story(rng: random.Random) -> str:
    """One short story: an opening, two or three middle sentences, an ending."""
    (name, pron, poss), (name2, _, _) = rng.sample(NAMES, 2)
    kw = dict(name=name, name2=name2, pron=pron, Pron=pron.capitalize(), poss=poss,
              animal=rng.choice(ANIMALS), place=rng.choice(PLACES), toy=rng.choice(TOYS),
              color=rng.choice(COLORS), feeling=rng.choice(FEELINGS), weather=rng.choice(WEATHER))
    parts = [rng.choice(STORY_OPENINGS)]
    parts += rng.sample(STORY_MIDDLES, rng.randint(2, 3))
    parts.append(rng.choice(STORY_ENDINGS))
    return " ".join(_fill(p, **kw) for p in parts)


def make_problem(rng: random.Random, max_operand: int = 9, kinds: tuple[str, ...] = ("add", "sub")) -> Problem:
    """One word problem with operands in ``0..max_operand`` (results never negative)."""
    kind = rng.choice(kinds)
    (name, pron, _), (name2, _, _) = rng.sample(NAMES, 2)
    kw = dict(name=name, name2=name2, pron=pron, Pron=pron.capitalize(), item=rng.choice(ITEMS))
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if kind == "add":
        q, r = rng.choice(ADD_TEMPLATES)
        ans = a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q, r = rng.choice(SUB_TEMPLATES)
        ans = a - b
    elif kind == "two_step":
        q, r = rng.choice(TWO_STEP_TEMPLATES)
        kw["r"] = a + b
        kw["c"] = rng.randint(1, a + b)
        ans = a + b - kw["c"]
    else:
        raise ValueError(f"unknown problem kind {kind!r}; expected add, sub or two_step")
    kw.update(a=a, b=b, ans=ans)
    return Problem(question=_fill(q, **kw), reasoning=_fill(r, **kw), answer=str(ans), kind=kind)


def check_equations(reasoning: str) -> bool:
    """Independently recompute every ``x op y = z`` in a worked solution (used by tests and
    by ``write_corpus`` as a guard)."""
    import re

    ops = {"+": operator.add, "-": operator.sub}
    eqs = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", reasoning)
    return bool(eqs) and all(ops[o](int(x), int(y)) == int(z) for x, o, y, z in eqs)


@dataclass(frozen=True)
class CorpusSpec:
    """Sizes at ``scale=1`` (about 4.5 MB of text). Sizes scale linearly with ``scale``, except that
    the held-out set keeps at least 500 problems (a smaller one makes the evaluation too noisy)."""

    num_stories: int = 4000
    num_pretrain_problems: int = 20000
    num_sft_problems: int = 4000
    num_test_problems: int = 500
    max_operand: int = 9
    kinds: tuple[str, ...] = ("add", "sub")

    def scaled(self, scale: float) -> CorpusSpec:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        s = lambda n, lo: max(lo, round(n * scale))
        return CorpusSpec(s(self.num_stories, 20), s(self.num_pretrain_problems, 40),
                          s(self.num_sft_problems, 40), max(min(500, self.num_test_problems), s(self.num_test_problems, 20)),
                          self.max_operand, self.kinds)


def generate(spec: CorpusSpec = CorpusSpec(), seed: int = 0) -> dict:
    """Generate everything in memory: ``{"stories", "pretrain_problems", "sft_problems",
    "test_problems"}``. Test problems are distinct question strings from all training ones."""
    rng = random.Random(seed)
    stories = [make_story(rng) for _ in range(spec.num_stories)]
    # Draw the held-out set first so that training problems can avoid its questions.
    test: dict[str, Problem] = {}
    tries = 0
    while len(test) < spec.num_test_problems:
        p = make_problem(rng, spec.max_operand, spec.kinds)
        test.setdefault(p.question, p)
        tries += 1
        if tries > 100 * spec.num_test_problems:
            raise RuntimeError("template space too small for the requested number of test problems")

    def train_problems(n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            p = make_problem(rng, spec.max_operand, spec.kinds)
            if p.question not in test:
                out.append(p)
        return out

    return {"stories": stories, "pretrain_problems": train_problems(spec.num_pretrain_problems),
            "sft_problems": train_problems(spec.num_sft_problems), "test_problems": list(test.values())}


def write_corpus(out_dir: str | Path, scale: float = 1.0, seed: int = 0,
                 spec: CorpusSpec = CorpusSpec()) -> dict:
    """Write the embedded corpus to ``out_dir`` and return a summary with the paths.

    Files: ``corpus.txt`` / ``corpus_valid.txt`` (stories and plain-text problems, shuffled,
    joined by ``<|endoftext|>``; 98 % / 2 % of the documents), ``sft_train.jsonl`` / ``test.jsonl`` (``question``, ``answer``,
    ``reasoning``, ``response`` = r1_zero response, ``kind``), ``README.md`` (what it is).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec.scaled(scale)
    data = generate(spec, seed)
    rng = random.Random(seed + 1)
    docs = data["stories"] + [p.pretraining_text() for p in data["pretrain_problems"]]
    rng.shuffle(docs)
    n_valid = max(10, len(docs) // 50)  # 2 % of the documents for validation loss
    corpus, valid = out / "corpus.txt", out / "corpus_valid.txt"
    corpus.write_text(EOT.join(docs[n_valid:]) + EOT, encoding="utf-8")
    valid.write_text(EOT.join(docs[:n_valid]) + EOT, encoding="utf-8")
    for split, problems in (("sft_train", data["sft_problems"]), ("test", data["test_problems"])):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for p in problems:
                assert check_equations(p.reasoning), p
                f.write(json.dumps({**asdict(p), "response": p.r1_zero_response()}) + "\n")
    (out / "README.md").write_text(
        f"# Synthetic corpus (seed {seed}, scale {scale})\n\nGenerated by `cs336.synthetic` from "
        "templates: simple stories and arithmetic word problems with worked solutions. Not real "
        "data; deterministic for a given seed and scale.\n", encoding="utf-8")
    return {"dir": str(out), "corpus": str(corpus), "corpus_valid": str(valid), "sft_train": str(out / "sft_train.jsonl"),
            "test": str(out / "test.jsonl"), "corpus_bytes": corpus.stat().st_size,
            "num_stories": len(data["stories"]), "num_pretrain_problems": len(data["pretrain_problems"]),
            "num_sft_problems": len(data["sft_problems"]), "num_test_problems": len(data["test_problems"]),
            "seed": seed, "scale": scale}


def load_problems(path: str | Path) -> list[dict]:
    """Read a ``*.jsonl`` written by :func:`write_corpus`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
