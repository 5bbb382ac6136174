"""Mixed precision, as code: the course's accumulation experiment and the dtypes under autocast.

1. :func:`accumulation_experiment`: add 0.01 a thousand times with the accumulator and the
   addend in different dtypes. fp16 has 10 mantissa bits, so once the sum is near 10 its spacing
   (2^-7 ≈ 0.0078) is close to the addend and every addition rounds: the fp16 sum ends near 9.95.
   Keeping the accumulator in fp32 fixes it, even when the addends are fp16 (then only the
   representation error of 0.01 in fp16 remains: 10.002).
2. :func:`autocast_dtypes`: which dtype each part of a model runs in under ``torch.autocast``,
   read by forward hooks (parameters, inputs and outputs of every module), plus the loss and the
   gradients, and a per-op summary from a dispatch mode (matmuls in the low dtype, reductions
   such as the norms' mean of squares and the loss in fp32). Run on the course's ``ToyModel``
   and on the ``cs336_basics`` LM.

    cs336-systems mixed-precision                    # CUDA fp16 if there is a GPU, else CPU bf16
    cs336-systems mixed-precision --device cpu --dtype bf16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cs336_systems.benchmark import markdown_table

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "-"


# ----------------------------------------------------------------------------- accumulation


def accumulate(
    acc_dtype: torch.dtype, addend_dtype: torch.dtype, n: int = 1000, value: float = 0.01
) -> float:
    """``s = 0`` in ``acc_dtype``; ``n`` times ``s += value`` made in ``addend_dtype`` (cast up to the
    accumulator's dtype first, as in the course's fourth variant)."""
    s = torch.tensor(0.0, dtype=acc_dtype)
    x = torch.tensor(value, dtype=addend_dtype)
    for _ in range(n):
        s += x.to(acc_dtype)
    return float(s)


def accumulation_experiment(n: int = 1000, value: float = 0.01) -> list[dict[str, Any]]:
    """The course's four variants (+ the bf16 pair): accumulator dtype, addend dtype, the sum."""
    pairs = [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ]
    exact = n * value
    return [
        {
            "accumulator": _name(acc),
            "addend": _name(add),
            "sum": (s := accumulate(acc, add, n, value)),
            "abs_error": abs(s - exact),
        }
        for acc, add in pairs
    ]


# ----------------------------------------------------------------------------- autocast dtypes


class ToyModel(nn.Module):
    """The course's toy model for the autocast question."""

    def __init__(self, in_features: int = 20, out_features: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 10, bias=False)
        self.ln = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, out_features, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ln(self.relu(self.fc1(x))))


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        return next((t for t in map(_first_tensor, obj) if t is not None), None)
    return None


class _OpDtypes(TorchDispatchMode):
    """Counts (aten op, output dtype) pairs of non-view ops; runs below autocast, so it sees the
    casts autocast inserted (``_to_copy``) and the dtype each op then computes in."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensor = _first_tensor(out)
        if (
            not func.is_view and tensor is not None and tensor.is_floating_point()
        ):  # views compute nothing
            self.counts[(func.overloadpacket.__name__, _name(tensor.dtype))] += 1
        return out


def autocast_dtypes(
    model: nn.Module,
    inputs: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    max_depth: int = 3,
) -> dict[str, Any]:
    """Forward + backward under ``torch.autocast(dtype)``; returns the dtype of every part.

    ``modules``: per module (up to ``max_depth`` dots), its parameters', input's and output's
    dtype; ``loss``: the loss dtype; ``grads``: the set of parameter-gradient dtypes; ``ops``:
    (aten op, output dtype, count) seen during the forward.
    """
    modules: list[dict[str, str]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, out: Any) -> None:
            params = {_name(p.dtype) for p in module.parameters(recurse=False)}
            modules.append(
                {
                    "module": name or "(model)",
                    "type": type(module).__name__,
                    "params": ",".join(sorted(params)) or "-",
                    "input": _name(getattr(_first_tensor(args), "dtype", None)),
                    "output": _name(getattr(_first_tensor(out), "dtype", None)),
                }
            )

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if n.count(".") < max_depth
    ]
    ops = _OpDtypes()
    try:
        with torch.autocast(inputs.device.type, dtype=dtype):
            with ops:
                out = model(inputs)
            loss = loss_fn(out)
    finally:
        for h in handles:
            h.remove()
    loss.backward()
    grads = sorted({_name(p.grad.dtype) for p in model.parameters() if p.grad is not None})
    op_rows = [{"op": op, "dtype": dt, "count": c} for (op, dt), c in sorted(ops.counts.items())]
    return {"modules": modules, "loss": _name(loss.dtype), "grads": grads, "ops": op_rows}


def toy_model_dtypes(dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = ToyModel().to(device)
    x = torch.randn(8, 20, device=device)
    target = torch.randint(0, 5, (8,), device=device)
    return autocast_dtypes(
        model, x, lambda logits: nn.functional.cross_entropy(logits, target), dtype
    )


def lm_dtypes(dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The ``cs336_basics`` LM at the benchmark's "tiny" size, one block, its own cross-entropy."""
    from cs336_basics.model import TransformerLM
    from cs336_basics.nn_utils import cross_entropy

    torch.manual_seed(0)
    model = TransformerLM(1000, 16, 64, 1, 4, 128, device=device)
    ids = torch.randint(0, 1000, (2, 16), device=device)
    return autocast_dtypes(model, ids, lambda logits: cross_entropy(logits, ids), dtype)


def report(result: dict[str, Any], title: str) -> str:
    mods = markdown_table(
        ["module", "type", "params", "input", "output"],
        [[m["module"], m["type"], m["params"], m["input"], m["output"]] for m in result["modules"]],
    )
    ops = markdown_table(
        ["aten op", "output dtype", "calls"],
        [[o["op"], o["dtype"], str(o["count"])] for o in result["ops"]],
    )
    return (
        f"### {title}\n\nModules (forward hooks; outputs in call order):\n\n{mods}\n\n"
        f"loss: {result['loss']}; parameter gradients: {', '.join(result['grads'])}\n\n"
        f"Ops in the forward (dispatch mode):\n\n{ops}\n"
    )


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cs336-systems mixed-precision", description=__doc__.split("\n\n")[0]
    )
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on CUDA, bf16 on CPU"
    )
    p.add_argument("--json", type=Path, default=None, help="also write every table as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not cuda:
        print("error: CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "bf16")
    dtype = DTYPES[dtype_name]

    acc = accumulation_experiment()
    print("## Accumulating 0.01 a thousand times (exact: 10)\n")
    print(
        markdown_table(
            ["accumulator", "addend", "sum", "|error|"],
            [
                [r["accumulator"], r["addend"], f"{r['sum']:.6f}", f"{r['abs_error']:.2e}"]
                for r in acc
            ],
        )
    )
    results = {"toy": toy_model_dtypes(dtype, device), "lm": lm_dtypes(dtype, device)}
    print(f"\n## dtypes under torch.autocast({device.type}, {dtype_name}); parameters are fp32\n")
    print(report(results["toy"], "ToyModel (the course's)"))
    print(report(results["lm"], "cs336_basics TransformerLM (1 block, d_model 64)"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"device": str(device), "dtype": dtype_name, "accumulation": acc, **results},
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
