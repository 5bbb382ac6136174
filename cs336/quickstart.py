"""`cs336 quickstart`: the whole stack in one command, on an embedded synthetic corpus.

    uv run cs336 quickstart                        # CPU, a few minutes, runs/quickstart/
    uv run cs336 quickstart --scale 0.3            # smaller (what CI runs)
    uv run cs336 quickstart --device cuda --scale 8 --out runs/qs-gpu

Stages, each calling the packages' own library functions (no private training loops):

1. corpus     ``cs336.synthetic.write_corpus``: seeded stories + arithmetic word problems
2. tokenizer  ``cs336_basics.bpe.train_bpe`` -> ``cs336_basics.tokenizer.Tokenizer.save``
3. tokenize   ``cs336_basics.tokenize_corpus.tokenize_file`` -> flat uint16 token arrays
4. pretrain   ``cs336_basics.train.train(TrainConfig)``: a small TransformerLM
5. sample     ``cs336_basics.generate.generate``: stories and a word problem from the LM
6. sft        ``cs336_alignment.sft``: the LM learns the R1-Zero answer format on the problems
7. grpo       ``cs336_alignment.grpo.train_grpo``: reward = ``grading.r1_zero_reward_fn``
8. evaluate   ``rollout.RolloutEngine`` + ``r1_zero_reward_fn`` on held-out problems, for the
              pretrained, SFT and GRPO models (temperature 1, the course's setting, and greedy)

The run folder gets ``report.md`` (results, curves, samples and the exact command that reruns
each stage on its own), ``curves.png``, ``samples.md``, ``results.json``, one log per stage under
``logs/`` and every stage's outputs (tokenizer, token arrays, checkpoints).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# OpenMP threads that spin while waiting slow CPU training ~10x when the cores are shared with
# other processes (measured on a 2-core machine); passive waiting costs nothing when they are not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The r1_zero *answer* format, with a one-line prompt: the course's r1_zero preamble is ~250 tokens
# for a 1K-token vocabulary trained on stories, 5x the problem itself, which a CPU run cannot afford.
PROMPT_TEMPLATE = "User: {question}\nAssistant: <think>"
SPECIAL_TOKENS = ["<|endoftext|>"]


@dataclass(frozen=True)
class Plan:
    """Every size of the run, derived from ``--scale`` (1.0 = the default CPU run)."""

    scale: float = 1.0
    device: str = "cpu"
    seed: int = 0
    vocab_size: int = 1024
    context_length: int = 128
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 384
    pretrain_steps: int = 400
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    sft_steps: int = 150
    sft_batch: int = 16
    sft_lr: float = 1e-3
    grpo_steps: int = 20
    grpo_questions: int = 16  # per GRPO step; x group_size responses
    grpo_group: int = 8
    grpo_lr: float = 3e-4
    grpo_epochs: int = 2  # optimizer passes over each rollout batch (GRPO-Clip keeps the 2nd pass near the 1st's policy)
    eval_problems: int = 500
    eval_samples: int = 4  # T=1 completions per held-out problem (accuracy is their mean; greedy takes one)
    max_new_tokens: int = 48

    @classmethod
    def for_scale(cls, scale: float, device: str = "cpu", seed: int = 0) -> Plan:
        if scale <= 0:
            raise ValueError(f"--scale must be > 0, got {scale}")
        grow = max(1.0, scale) ** 0.5  # model width grows with sqrt(scale) above 1
        d_model = round(128 * grow / 64) * 64 if scale > 1 else 128
        steps = lambda n, lo: max(lo, round(n * scale))
        plan = cls(
            scale=scale, device=device, seed=seed,
            vocab_size=1024 if scale <= 2 else 4096,
            d_model=d_model, num_heads=max(4, d_model // 32), d_ff=int(d_model * 8 / 3 / 32 + 0.5) * 32,
            num_layers=4 if scale <= 2 else 6,
            pretrain_steps=steps(400, 60),
            sft_steps=steps(150, 60), grpo_steps=int(20 * grow),
            eval_problems=500,
        )
        if scale < 1:
            # The small path (CI runs 0.3): the same model, pretrained on 300 half-size batches (0.6 M tokens
            # instead of 1.6 M), then the default 150 SFT steps, i.e. repeated passes over the smaller problem
            # set. That lands where the default run lands: the SFT model writes the right equation but at T=1
            # often a wrong number after <answer> (held-out accuracy ~0.3 at T=1, ~0.8 greedy), which GRPO's
            # reward sharpens. Steps scaled down instead (120 pretraining, 75 SFT) left the arithmetic
            # unlearned (T=1 accuracy ~0.04): GRPO then had almost no reward signal and gained nothing.
            # One optimizer pass per rollout batch: 2.3x cheaper GRPO steps (no second pass, no old-policy
            # forward), which bought more held-out accuracy per second than 2 passes x fewer steps.
            # 30 GRPO steps, not 20: from one SFT model, held-out T=1 accuracy 0.377 -> 0.423 after 20 steps,
            # 0.501 and 0.509 after 30 (two GRPO seeds), for ~18 s more on 2 cores. CI asserts the gain, and
            # it should stand well clear of the run-to-run spread (docs/benchmarks.md, quickstart).
            plan = dataclasses.replace(plan, pretrain_steps=300, pretrain_batch=16, sft_steps=150, grpo_epochs=1,
                                       grpo_steps=30)
        return plan


# ----------------------------------------------------------------------------- console plumbing
def _banner(i: int, n: int, title: str) -> None:
    print(f"\n[{i}/{n}] {title}", flush=True)


@contextlib.contextmanager
def _stage_log(path: Path):
    """Send a stage's own stdout lines to ``logs/<stage>.log``; progress bars (stderr) stay on screen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f, contextlib.redirect_stdout(f):
        yield


@contextlib.contextmanager
def _progress_from_jsonl(path: Path, total: int, desc: str, step_of=lambda r: r.get("step")):
    """A tqdm bar that follows a training log (JSONL, one record per step) written by another loop."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    stop = threading.Event()

    def follow():
        while not stop.wait(0.5):
            _update(bar, path, step_of)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    try:
        yield bar
    finally:
        stop.set()
        t.join()
        _update(bar, path, step_of)
        bar.close()


def _update(bar, path: Path, step_of) -> None:
    if not path.exists():
        return
    last, post = None, {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        s = step_of(r)
        if s is not None:
            last = s if last is None else max(last, s)
            post = {k: f"{v:.3g}" for k, v in r.items() if k in ("loss", "val_loss", "reward", "accuracy")
                    and isinstance(v, (int, float))} or post
    if last is not None and last > bar.n:
        bar.update(min(last, bar.total) - bar.n)
        if post:
            bar.set_postfix(post, refresh=False)


def _cmd(*parts: Any) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def _flags(cfg: Any, base: Any, style: str) -> list[str]:
    """CLI flags for the fields of dataclass ``cfg`` that differ from ``base`` (or, when ``base`` is
    None, from the field defaults); ``style`` is ``-`` (``--max-steps``) or ``_`` (``--max_steps``)."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        default = getattr(base, f.name, object()) if base is not None else f.default
        if default == v:
            continue
        name = "--" + (f.name.replace("_", "-") if style == "-" else f.name)
        if isinstance(v, bool):
            out.append(name if v else "--no-" + name[2:])
        elif isinstance(v, (tuple, list)):
            out += [name, *map(str, v)]
        elif v is not None:
            out += [name, str(v)]
    return out


# ----------------------------------------------------------------------------- stages
def stage_corpus(plan: Plan, out: Path) -> dict:
    from cs336.synthetic import write_corpus

    info = write_corpus(out / "data", scale=plan.scale, seed=plan.seed)
    print(f"  {info['corpus_bytes'] / 1e6:.1f} MB of synthetic text: {info['num_stories']:,} stories, "
          f"{info['num_pretrain_problems']:,} worked problems; {info['num_sft_problems']:,} SFT/RL problems, "
          f"{info['num_test_problems']:,} held out", flush=True)
    return info


def stage_tokenizer(plan: Plan, corpus: Path, tok_dir: Path) -> Any:
    from cs336_basics.bpe import train_bpe
    from cs336_basics.tokenizer import Tokenizer

    vocab, merges = train_bpe(corpus, plan.vocab_size, SPECIAL_TOKENS, progress=True)
    tok = Tokenizer(vocab, merges, SPECIAL_TOKENS)
    tok.save(tok_dir)
    note = " (the templated corpus runs out of pairs before the requested size)" if len(vocab) < plan.vocab_size else ""
    print(f"  vocab {len(vocab):,} ({len(merges):,} merges){note} -> {tok_dir}", flush=True)
    return tok


def stage_tokenize(tok_dir: Path, texts: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    from cs336_basics.tokenize_corpus import tokenize_file

    paths = {}
    for name, src in texts.items():
        dst = out_dir / f"{name}.bin"
        meta = tokenize_file(tok_dir, src, dst)
        print(f"  {name}: {meta.get('num_tokens', 0):,} tokens -> {dst}", flush=True)
        paths[name] = dst
    return paths


def pretrain_config(plan: Plan, tokens: dict[str, Path], tok_dir: Path, out_dir: Path, vocab_size: int):
    from cs336_basics.config import PRESETS

    return PRESETS["tiny"].replace(
        train_data=str(tokens["train"]), val_data=str(tokens["valid"]), tokenizer_dir=str(tok_dir),
        vocab_size=vocab_size, context_length=plan.context_length, d_model=plan.d_model,
        num_layers=plan.num_layers, num_heads=plan.num_heads, d_ff=plan.d_ff,
        batch_size=plan.pretrain_batch, max_steps=plan.pretrain_steps, lr=plan.pretrain_lr,
        min_lr=plan.pretrain_lr / 10, warmup_steps=max(10, plan.pretrain_steps // 20),
        eval_interval=max(25, plan.pretrain_steps // 8), eval_batches=8, log_interval=5, checkpoint_interval=0,
        out_dir=str(out_dir), overwrite=True, device=plan.device, seed=plan.seed,
        attn_backend="sdpa", dtype="bf16" if plan.device.startswith("cuda") else "fp32",
    )


def stage_pretrain(cfg, logs: Path) -> dict:
    from cs336_basics.train import train

    with _progress_from_jsonl(Path(cfg.out_dir) / "metrics.jsonl", cfg.max_steps, "pretrain"), \
            _stage_log(logs / "pretrain.log"):
        result = train(cfg)
    print(f"  train loss {result.get('train_loss', float('nan')):.3f}, val loss {result.get('val_loss') or float('nan'):.3f} "
          f"after {result.get('step')} steps ({result.get('tokens', 0):,} tokens, {result.get('wall_s', 0):.0f}s)", flush=True)
    return result


def stage_sample(ckpt: Path, tok_dir: Path, device: str, seed: int) -> list[dict]:
    import torch
    from cs336_basics.generate import generate, load_model_from_checkpoint
    from cs336_basics.tokenizer import Tokenizer
    from tqdm.auto import tqdm

    tok = Tokenizer.from_dir(tok_dir)
    model = load_model_from_checkpoint(ckpt, device)
    eos = tok.token_id(SPECIAL_TOKENS[0])
    prompts = ["Once upon a time,", "One sunny day, Lily went to the",
               "Question: Tom has 4 apples. He finds 3 more apples. How many apples does Tom have now?\nSolution:"]
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for p in tqdm(prompts, desc="sample", file=sys.stderr):
        ids = generate(model, tok.encode(p), max_new_tokens=80, temperature=0.8, top_p=0.95, eos_id=eos, generator=g)
        text = tok.decode([i for i in ids if i != eos])
        out.append({"prompt": p, "completion": text})
    for s in out:  # after the bar, so the lines are not overwritten by it
        print(f"  {s['prompt']!r} -> {s['completion'].strip()[:160]!r}", flush=True)
    return out


def sft_examples(rows: list[dict]) -> list[dict]:
    return [{"prompt": PROMPT_TEMPLATE.format(question=r["question"]), "response": r["response"],
             "answer": r["answer"]} for r in rows]


def qa_examples(rows: list[dict]) -> list[dict]:
    """Question/answer rows for GRPO and evaluation. The question is already wrapped in the prompt
    template, so the training programs use it with ``--prompt question_only`` (``{question}``),
    in this process and from their command lines alike."""
    return [{"question": PROMPT_TEMPLATE.format(question=r["question"]), "answer": r["answer"]} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def stage_evaluate(policy_spec: Path, tok_dir: Path, rows: list[dict], device: str, seed: int,
                   max_new_tokens: int, samples_path: Path, samples_per_problem: int = 1) -> dict:
    """Reward, accuracy and format rate on ``rows``: at T=1 over ``samples_per_problem`` completions
    of each problem (one call, so each gets its own noise), and greedy (one)."""
    from cs336_alignment.grading import r1_zero_reward_fn
    from cs336_alignment.models import load_policy
    from cs336_alignment.rollout import SamplingParams, make_engine
    from cs336_alignment.train_utils import evaluate_rewards

    policy = load_policy(policy_spec, device=device, tokenizer=tok_dir)
    engine = make_engine(policy, "builtin", max_batch_size=512)
    ex = qa_examples(rows)
    prompts, answers = [e["question"] for e in ex], [e["answer"] for e in ex]
    res = {}
    for name, temp, k in (("sampled", 1.0, samples_per_problem), ("greedy", 0.0, 1)):
        params = SamplingParams(temperature=temp, max_new_tokens=max_new_tokens, stop=("</answer>",), seed=seed)
        path = samples_path.with_name(f"{samples_path.stem}_{name}.jsonl")
        res[name] = evaluate_rewards(engine, prompts * k, answers * k, params, r1_zero_reward_fn, path)
    return res


def stage_sft(plan: Plan, pre_ckpt: Path, tok_dir: Path, sft_file: Path, val_file: Path, out_dir: Path,
              logs: Path, commands: dict[str, str]) -> Path:
    """SFT of the pretrained LM on r1_zero-format worked solutions; returns the policy directory."""
    from cs336_alignment.sft import SFTConfig, train_sft
    from cs336_alignment.train_utils import latest_checkpoint

    # SFT sees sft_steps x sft_batch examples: a subset of a larger set, or several passes over a smaller one.
    want, have = plan.sft_steps * plan.sft_batch, len(sft_file.read_text(encoding="utf-8").splitlines())
    epochs = max(1, round(want / have))
    cfg = _config(
        SFTConfig, model=str(pre_ckpt), tokenizer=str(tok_dir), out_dir=str(out_dir), train_data=str(sft_file),
        num_examples=want if want < have else 0, epochs=epochs, batch_size=plan.sft_batch,
        gradient_accumulation_steps=1, learning_rate=plan.sft_lr, max_seq_len=plan.context_length,
        eval_data="none", seed=plan.seed, device=plan.device,
        precision="fp32" if plan.device == "cpu" else "bf16-mixed")
    total = epochs * max(1, min(want, have) // plan.sft_batch)  # as train_sft counts them
    with _progress_from_jsonl(out_dir / "log.jsonl", total, "sft",
                              step_of=lambda r: r["step"] if r.get("kind") == "train" else None), \
            _stage_log(logs / "sft.log"):
        final = train_sft(cfg)
    print(f"  final loss {final.get('loss', float('nan')):.3f} per response token", flush=True)
    commands["sft"] = _cmd("uv", "run", "cs336-alignment", "sft", *_flags(cfg, None, "_"))
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        raise RuntimeError(f"SFT wrote no checkpoint under {out_dir}")
    return ckpt / "policy"


def stage_grpo(plan: Plan, sft_policy_dir: Path, tok_dir: Path, train_file: Path, val_file: Path, out_dir: Path,
               logs: Path, commands: dict[str, str]) -> Path:
    """GRPO from the SFT policy; returns the final policy directory (loadable by ``load_policy``)."""
    from cs336_alignment.grpo import GRPOConfig, train_grpo
    from cs336_alignment.train_utils import latest_checkpoint

    rollout = plan.grpo_questions * plan.grpo_group
    cfg = _config(
        GRPOConfig, model=str(sft_policy_dir), tokenizer=str(tok_dir), out_dir=str(out_dir),
        train_data=str(train_file), eval_data=str(val_file), prompt="question_only",
        n_grpo_steps=plan.grpo_steps, learning_rate=plan.grpo_lr, rollout_batch_size=rollout,
        group_size=plan.grpo_group, sampling_max_tokens=plan.max_new_tokens, eval_max_tokens=plan.max_new_tokens,
        train_batch_size=rollout, gradient_accumulation_steps=max(1, rollout // 64),
        loss_type="grpo_clip", epochs_per_rollout_batch=plan.grpo_epochs, eval_every=max(1, plan.grpo_steps // 4), eval_examples=100,
        seed=plan.seed, device=plan.device, precision="fp32" if plan.device == "cpu" else "bf16-mixed",
        rollout_max_batch_size=512)
    from cs336_alignment.sft_data import qa_examples as read_qa

    with _progress_from_jsonl(out_dir / "log.jsonl", cfg.n_grpo_steps, "grpo",
                              step_of=lambda r: r["step"] if r.get("kind") == "train" else None), \
            _stage_log(logs / "grpo.log"):
        final = train_grpo(cfg, train_examples=read_qa(str(train_file)), eval_examples=read_qa(str(val_file)))
    print(f"  last rollout reward {final.get('reward', float('nan')):.3f}; validation accuracy "
          f"{final.get('eval_accuracy', float('nan')):.3f}", flush=True)
    commands["grpo"] = _cmd("uv", "run", "cs336-alignment", "grpo", *_flags(cfg, None, "_"))
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        raise RuntimeError(f"GRPO wrote no checkpoint under {out_dir}")
    return ckpt / "policy"


# ----------------------------------------------------------------------------- plots and report
def _records(path: Path, kind: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [r for r in rows if kind is None or r.get("kind") == kind]


def plot_curves(pretrain_metrics: Path, sft_log: Path, grpo_log: Path, results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    pre = _records(pretrain_metrics)
    tr = [(r["step"], r["loss"]) for r in pre if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in pre if "val_loss" in r]
    if tr:
        axes[0].plot(*zip(*tr), label="train", lw=1)
    if va:
        axes[0].plot(*zip(*va), "o-", label="validation")
    axes[0].set(title="pretraining", xlabel="step", ylabel="cross-entropy (nats/token)")
    axes[0].legend()
    sft = [(r["step"], r["loss"]) for r in _records(sft_log, "train") if "loss" in r]
    if sft:
        axes[1].plot(*zip(*sft), lw=1)
    axes[1].set(title="SFT (r1_zero format)", xlabel="step", ylabel="response NLL")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    paths.append(out / "loss_curves.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    g = [(r["step"], r.get("reward")) for r in _records(grpo_log, "train") if r.get("reward") is not None]
    e = [(r["step"], r.get("accuracy")) for r in _records(grpo_log, "eval") if r.get("accuracy") is not None]
    if g:
        ax.plot(*zip(*g), label="rollout reward (train questions)", lw=1)
    if e:
        ax.plot(*zip(*e), "o-", label="accuracy (held-out, T=1)")
    for name, style in (("sft", ":"), ("grpo", "--")):
        acc = results.get("evaluation", {}).get(name, {}).get("sampled", {}).get("accuracy")
        if acc is not None:
            ax.axhline(acc, ls=style, c="gray", lw=1, label=f"final eval {name.upper()}: {acc:.2f}")
    ax.set(title="GRPO", xlabel="GRPO step", ylabel="reward / accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=110)
    plt.close(fig)
    paths.append(out / "reward_curve.png")
    return paths


def write_report(out: Path, plan: Plan, results: dict, commands: dict[str, str], samples: list[dict],
                 eval_examples: dict[str, list[dict]]) -> Path:
    ev = results["evaluation"]
    lines = [
        "# cs336 quickstart report", "",
        f"Synthetic corpus (seed {plan.seed}, scale {plan.scale}), device `{plan.device}`, "
        f"total wall time {results['wall_s']:.0f} s. Everything below was produced by "
        "`" + " ".join(["uv run cs336 quickstart", *results["argv"]]) + "`.", "",
        "## Held-out evaluation", "",
        (f"{ev['n']} held-out word problems (question strings never seen in pretraining, SFT or GRPO), "
         "prompt `User: <question>\\nAssistant: <think>`, graded by `cs336_alignment.grading.r1_zero_reward_fn` "
         "(answer reward = correct answer inside `</think> <answer>…</answer>`). "
         f"At T=1 each problem is sampled {plan.eval_samples} times and the accuracy is the mean."), "",
        "| model | accuracy (T=1) | format rate (T=1) | accuracy (greedy) | format rate (greedy) |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("pretrained", "pretrained LM (before SFT)"), ("sft", "after SFT"), ("grpo", "after SFT + GRPO")):
        r = ev.get(name)
        if r:
            lines.append(f"| {label} | {r['sampled']['accuracy']:.3f} | {r['sampled']['format_rate']:.3f} | "
                         f"{r['greedy']['accuracy']:.3f} | {r['greedy']['format_rate']:.3f} |")
    d = results["grpo_minus_sft_accuracy"]
    verdict = "GRPO beats SFT" if d > 0 else "GRPO did NOT beat SFT"
    lines += ["", f"**GRPO vs SFT (T=1): {d:+.3f} accuracy** ({verdict}).", "",
              "## Stages", "", "| stage | wall time (s) | result |", "|---|---|---|"]
    for name, st in results["stages"].items():
        lines.append(f"| {name} | {st['wall_s']:.1f} | {st.get('summary', '')} |")
    lines += ["", "## Curves", "", "![loss curves](loss_curves.png)", "", "![reward curve](reward_curve.png)", "",
              "## Samples", "", "Pretrained LM (temperature 0.8, top-p 0.95):", ""]
    for s in samples:
        lines += [f"- **{s['prompt']!s}** {s['completion'].strip()}"]
    for name in ("sft", "grpo"):
        lines += ["", f"{name.upper()} model on held-out problems (temperature 1):", ""]
        for e in eval_examples.get(name, [])[:4]:
            ok = "correct" if e.get("answer_reward") else "wrong"
            question = e["prompt"].splitlines()[0].removeprefix("User: ")
            lines += [f"- {question}  \n  → `{e['response'].strip()}` (truth {e['answer']}, {ok})"]
    lines += ["", "## Rerun each stage on its own", "",
              "Each stage's full log is in `logs/`. The same stages as separate commands (from the repository root):",
              "", "```bash"]
    for name, c in commands.items():
        lines += [f"# {name}", c]
    lines += ["```", "", "## At full scale", "", "```bash",
              "uv run cs336 quickstart --device cuda --scale 8 --out runs/quickstart-gpu   # same pipeline, bigger",
              "uv run cs336 download tinystories gsm8k math qwen2.5-math-1.5b                 # real data (README)",
              "```", "",
              ("Then the README's sections: TinyStories, OpenWebText leaderboard, FlashAttention, multi-GPU with "
               "torchrun, GRPO with Qwen2.5-Math-1.5B."), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the pipeline
def _config(cls: type, **kw: Any) -> Any:
    """Build a frozen config from the fields ``cls`` actually has (names checked, not guessed)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}; update cs336/quickstart.py")
    return cls(**kw)


def run(plan: Plan, out: Path, argv: list[str] | None = None) -> dict:
    """Run every stage into ``out``; returns the results (also ``out/results.json``).

    On CPU the run is reproducible bit for bit on one machine: PyTorch's deterministic algorithms are on
    while it runs. Without them two runs of the same command differed (pretrained weights by up to
    9e-5), GRPO's sampled rollouts then diverged, and the held-out accuracy after GRPO moved by ±0.04.
    They cost nothing measurable here (60 pretraining steps: 14.0 s with, 14.7 s without)."""
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(plan.device == "cpu" or previous)
    try:
        return _run_stages(plan, out, argv)
    finally:
        torch.use_deterministic_algorithms(previous)


def _run_stages(plan: Plan, out: Path, argv: list[str] | None) -> dict:
    import torch

    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "tokenizer", "tokens", "pretrain", "sft", "grpo", "eval", "logs"):  # a previous run's
        shutil.rmtree(out / sub, ignore_errors=True)  # checkpoints must never be mistaken for this run's
    logs = out / "logs"
    torch.manual_seed(plan.seed)
    stages: dict[str, dict] = {}
    commands: dict[str, str] = {}
    n = 8

    def timed(name: str, i: int, title: str):
        _banner(i, n, title)
        stages[name] = {"t0": time.perf_counter()}
        return stages[name]

    def done(name: str, summary: str) -> None:
        st = stages[name]
        st["wall_s"] = time.perf_counter() - st.pop("t0")
        st["summary"] = summary
        print(f"  done in {st['wall_s']:.1f}s", flush=True)

    # 1. corpus
    timed("corpus", 1, "Synthetic corpus: stories + arithmetic word problems (cs336.synthetic)")
    info = stage_corpus(plan, out)
    done("corpus", f"{info['corpus_bytes'] / 1e6:.1f} MB, {info['num_stories']} stories, "
                   f"{info['num_pretrain_problems']} problems")
    commands["corpus"] = _cmd("uv", "run", "python", "-c",
                              f"from cs336.synthetic import write_corpus; write_corpus({str(out / 'data')!r}, "
                              f"scale={plan.scale}, seed={plan.seed})")
    corpus, corpus_valid = Path(info["corpus"]), Path(info["corpus_valid"])

    # 2. tokenizer
    tok_dir = out / "tokenizer"
    timed("tokenizer", 2, f"Byte-level BPE, vocab {plan.vocab_size} (cs336_basics.bpe)")
    vocab_size = stage_tokenizer(plan, corpus, tok_dir).vocab_size
    done("tokenizer", f"vocab {vocab_size}")
    commands["tokenizer"] = _cmd("uv", "run", "cs336-basics", "train-tokenizer", "--input", corpus,
                                 "--vocab-size", plan.vocab_size, "--special-token", SPECIAL_TOKENS[0], "--out", tok_dir)

    # 3. tokenize
    timed("tokenize", 3, "Tokenize the corpus (cs336_basics.tokenize_corpus)")
    tokens = stage_tokenize(tok_dir, {"train": corpus, "valid": corpus_valid}, out / "tokens")
    n_tok = json.loads(Path(str(tokens["train"]) + ".json").read_text()).get("num_tokens", 0) \
        if Path(str(tokens["train"]) + ".json").exists() else 0
    done("tokenize", f"{n_tok:,} training tokens")
    commands["tokenize"] = "\n".join(_cmd("uv", "run", "cs336-basics", "tokenize", "--tokenizer", tok_dir,
                                          "--input", src, "--out", tokens[k])
                                     for k, src in (("train", corpus), ("valid", corpus_valid)))

    # 4. pretrain
    from cs336_basics.config import PRESETS

    cfg = pretrain_config(plan, tokens, tok_dir, out / "pretrain", vocab_size)
    n_params = vocab_size * plan.d_model * 2 + plan.num_layers * (4 * plan.d_model ** 2 + 3 * plan.d_model * plan.d_ff)
    timed("pretrain", 4, f"Pretrain a TransformerLM, ~{n_params / 1e6:.1f}M params, {cfg.max_steps} steps of "
                         f"{cfg.batch_size}x{cfg.context_length} tokens (cs336_basics.train)")
    pre = stage_pretrain(cfg, logs)
    pre_ckpt = Path(cfg.out_dir) / "checkpoint.pt"
    done("pretrain", f"val loss {pre.get('val_loss') or float('nan'):.3f} after {pre.get('step')} steps")
    commands["pretrain"] = _cmd("uv", "run", "cs336-basics", "train", "--preset", "tiny",
                                *_flags(cfg, PRESETS["tiny"], "-"))

    # 5. sample
    timed("sample", 5, "Sample text from the pretrained LM (cs336_basics.generate)")
    samples = stage_sample(pre_ckpt, tok_dir, plan.device, plan.seed)
    done("sample", f"{len(samples)} samples")
    commands["sample"] = _cmd("uv", "run", "cs336-basics", "generate", "--checkpoint", pre_ckpt, "--tokenizer-dir", tok_dir,
                              "--prompt", "Once upon a time,", "--max-new-tokens", 80, "--temperature", 0.8)
    (out / "samples.md").write_text("# Samples from the pretrained LM\n\n" + "\n\n".join(
        f"**{s['prompt']}**{s['completion']}" for s in samples) + "\n", encoding="utf-8")

    # 6. SFT (and 7. GRPO) read JSONL files that their CLIs read too: prompt already formatted.
    from cs336.synthetic import load_problems

    train_rows, test_rows = load_problems(info["sft_train"]), load_problems(info["test"])
    test_rows = test_rows[: plan.eval_problems]
    sft_file = write_jsonl(out / "data" / "sft.jsonl", sft_examples(train_rows))
    rl_file = write_jsonl(out / "data" / "rl_train.jsonl", qa_examples(train_rows))
    val_file = write_jsonl(out / "data" / "rl_val.jsonl", qa_examples(test_rows[:100]))
    sft_out, grpo_out = out / "sft", out / "grpo"
    timed("sft", 6, f"SFT into the r1_zero answer format: {plan.sft_steps} steps of {plan.sft_batch} worked "
                    "problems (cs336_alignment.sft)")
    sft_policy_dir = stage_sft(plan, pre_ckpt, tok_dir, sft_file, val_file, sft_out, logs, commands)
    done("sft", f"{plan.sft_steps} steps")
    timed("grpo", 7, f"GRPO: {plan.grpo_steps} steps x {plan.grpo_questions} questions x {plan.grpo_group} "
                     "samples, reward r1_zero_reward_fn (cs336_alignment.grpo)")
    grpo_policy_dir = stage_grpo(plan, sft_policy_dir, tok_dir, rl_file, val_file, grpo_out, logs, commands)
    done("grpo", f"{plan.grpo_steps} steps")

    # 8. evaluate
    timed("evaluate", 8, f"Evaluate on {len(test_rows)} held-out problems: pretrained, SFT, GRPO "
                         "(rollout engine + r1_zero_reward_fn)")
    ev: dict[str, Any] = {"n": len(test_rows)}
    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)
    for name, spec in (("pretrained", pre_ckpt), ("sft", sft_policy_dir), ("grpo", grpo_policy_dir)):
        ev[name] = stage_evaluate(spec, tok_dir, test_rows, plan.device, plan.seed, plan.max_new_tokens,
                                  eval_dir / f"{name}.jsonl", plan.eval_samples)
        s, g = ev[name]["sampled"], ev[name]["greedy"]
        print(f"  {name:<10} accuracy {s['accuracy']:.3f} (T=1)  {g['accuracy']:.3f} (greedy) | "
              f"format {s['format_rate']:.3f} (T=1)", flush=True)
    delta = ev["grpo"]["sampled"]["accuracy"] - ev["sft"]["sampled"]["accuracy"]
    done("evaluate", f"SFT {ev['sft']['sampled']['accuracy']:.3f} -> GRPO {ev['grpo']['sampled']['accuracy']:.3f} (T=1)")
    commands["evaluate"] = _cmd(
        "uv", "run", "python", "-c",
        "from pathlib import Path; from cs336.quickstart import stage_evaluate; from cs336.synthetic import load_problems; "
        f"print(stage_evaluate(Path({str(grpo_policy_dir)!r}), Path({str(tok_dir)!r}), "
        f"load_problems({info['test']!r})[:{plan.eval_problems}], {plan.device!r}, {plan.seed}, {plan.max_new_tokens}, "
        f"Path({str(eval_dir / 'rerun.jsonl')!r}), {plan.eval_samples}))")

    results = {"plan": dataclasses.asdict(plan), "argv": list(argv or []), "stages": stages, "pretrain": pre,
               "evaluation": ev, "grpo_minus_sft_accuracy": delta, "wall_s": time.perf_counter() - t_all}
    plot_curves(Path(cfg.out_dir) / "metrics.jsonl", sft_out / "log.jsonl", grpo_out / "log.jsonl", results, out)
    examples = {name: [json.loads(x) for x in (eval_dir / f"{name}_sampled.jsonl").read_text().splitlines()[:4]]
                for name in ("sft", "grpo")}
    report = write_report(out, plan, results, commands, samples, examples)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nGRPO vs SFT on held-out problems (T=1): {ev['sft']['sampled']['accuracy']:.3f} -> "
          f"{ev['grpo']['sampled']['accuracy']:.3f} ({delta:+.3f})")
    print(f"total {results['wall_s']:.0f}s; report: {report}")
    return results


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cs336 quickstart", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--scale", type=float, default=1.0, help="corpus size and training steps (1 = the CPU default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA GPU is visible; use --device cpu", file=sys.stderr)
            return 2
    plan = Plan.for_scale(args.scale, args.device, args.seed)
    print(f"cs336 quickstart -> {args.out}  (scale {plan.scale}, device {plan.device}, seed {plan.seed})")
    res = run(plan, args.out, argv if argv is not None else sys.argv[2:])
    return 0 if math.isfinite(res["grpo_minus_sft_accuracy"]) else 1
