"""The mixed-precision study: the accumulation numbers of the course, and the dtypes autocast
gives each part of the toy model and of the LM (parameters and gradients fp32, matmuls low)."""

import json

import pytest
import torch
from cs336_systems import mixed_precision as MP


def test_accumulation_experiment_matches_the_course():
    rows = {(r["accumulator"], r["addend"]): r["sum"] for r in MP.accumulation_experiment()}
    assert rows[("float32", "float32")] == pytest.approx(10.0001335, abs=1e-6)
    assert (
        rows[("float16", "float16")] == 9.953125
    )  # fp16 spacing near 10 is 2^-7: additions round away
    assert rows[("float32", "float16")] == pytest.approx(
        10.0021362, abs=1e-6
    )  # fp16(0.01) = 0.010002136
    assert rows[("bfloat16", "bfloat16")] < 5  # bf16: stalls once 0.01 is under half its spacing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_toy_model_dtypes_under_autocast(dtype):
    result = MP.toy_model_dtypes(dtype, torch.device("cpu"))
    low = str(dtype).removeprefix("torch.")
    by_name = {m["module"]: m for m in result["modules"]}
    assert by_name["fc1"]["params"] == "float32" and by_name["fc1"]["input"] == "float32"
    assert (
        by_name["fc1"]["output"] == low and by_name["fc2"]["output"] == low
    )  # matmuls in the low dtype
    assert result["loss"] == "float32" and result["grads"] == ["float32"]
    assert {"op": "mm", "dtype": low, "count": 2} in result["ops"]


def test_lm_dtypes_and_cli(tmp_path, capsys):
    result = MP.lm_dtypes(torch.bfloat16, torch.device("cpu"))
    by_name = {m["module"]: m for m in result["modules"]}
    assert (
        by_name["lm_head"]["output"] == "bfloat16"
        and by_name["layers.0.ln1"]["params"] == "float32"
    )
    assert result["loss"] == "float32" and result["grads"] == ["float32"]
    out_json = tmp_path / "mp.json"
    assert MP.cli_main(["--device", "cpu", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| float16 | float16 | 9.953125 |" in out and "### ToyModel" in out
    assert json.loads(out_json.read_text())["dtype"] == "bf16"
