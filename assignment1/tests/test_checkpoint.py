"""Checkpoints: round trip, atomic writes, clear errors for corrupted or mismatched files."""

import io
import os

import pytest
import torch
from cs336_basics.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from cs336_basics.model import TransformerLM
from cs336_basics.optimizer import AdamW

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _model_and_opt(seed=0, d_model=16):
    torch.manual_seed(seed)
    m = TransformerLM(30, 8, d_model, 1, 2, 32)
    opt = AdamW(m.parameters(), lr=1e-2)
    m(torch.randint(0, 30, (2, 8))).sum().backward()
    opt.step()
    return m, opt


@pytest.mark.parametrize("to_file_object", [False, True])
def test_roundtrip(tmp_path, to_file_object):
    m, opt = _model_and_opt(0)
    target = io.BytesIO() if to_file_object else tmp_path / "ck.pt"
    save_checkpoint(m, opt, 17, target, config={"a": 1})
    if to_file_object:
        target.seek(0)
    m2, opt2 = _model_and_opt(1)
    assert load_checkpoint(target, m2, opt2) == 17
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert str(opt.state_dict()) == str(opt2.state_dict())
    if not to_file_object:
        assert read_checkpoint(target)["config"] == {"a": 1}
        assert [f for f in os.listdir(tmp_path)] == ["ck.pt"]  # no temp files left behind


def test_compiled_or_wrapped_model_saves_plain_keys(tmp_path):
    m, opt = _model_and_opt()
    wrapper = torch.nn.Module()
    wrapper.module = m  # DDP-style wrapper
    save_checkpoint(wrapper, opt, 1, tmp_path / "ck.pt")
    assert set(read_checkpoint(tmp_path / "ck.pt")["model"]) == set(m.state_dict())


def test_corrupted_checkpoint_is_a_clear_error_and_target_untouched(tmp_path):
    m, opt = _model_and_opt()
    p = tmp_path / "ck.pt"
    save_checkpoint(m, opt, 3, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # truncated, as after a crash without atomic writes
    m2, opt2 = _model_and_opt(1)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(p, m2, opt2)
    assert all(torch.equal(before[k], v) for k, v in m2.state_dict().items())
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt", m2, opt2)
    (tmp_path / "junk.pt").write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "junk.pt", m2, opt2)


def test_mismatched_checkpoint_names_the_difference(tmp_path):
    m, opt = _model_and_opt(d_model=16)
    save_checkpoint(m, opt, 3, tmp_path / "ck.pt")
    other, other_opt = _model_and_opt(d_model=32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"(?s)does not match the model.*token_embeddings.weight: checkpoint \(30, 16\)"):
        load_checkpoint(tmp_path / "ck.pt", other, other_opt)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
