"""Ctrl-C and SIGTERM: the first one is a flag the training loop reads between steps, the second one
acts as it always did; the CLI run ends with an evaluation, a checkpoint and status 128 + signal, and
its log reaches a pipe line by line."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from cs336_basics.checkpoint import read_checkpoint
from cs336_basics.stop_signals import StopSignals


def test_first_signal_is_a_flag_the_second_acts_as_before(capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGINT)  # handled here, at the next bytecode: no KeyboardInterrupt
        assert stop.received is signal.SIGINT
        assert "SIGINT received" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):  # the handler before (pytest's / Python's) is back
            os.kill(os.getpid(), signal.SIGINT)
            signal.getsignal(signal.SIGINT)  # (a bytecode for the handler to run at)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_and_leaving_the_context_restore_the_handlers(capsys):
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(announce=False) as stop:
        assert signal.getsignal(signal.SIGTERM) != before
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received is signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == before  # a second SIGTERM would now end the process
    assert capsys.readouterr().err == ""  # announce=False: the other ranks of a run stay quiet
    with StopSignals():
        pass
    assert signal.getsignal(signal.SIGTERM) == before


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def worker():
        with StopSignals() as stop:
            seen["handler"] = signal.getsignal(signal.SIGINT)
            seen["received"] = stop.received

    before = signal.getsignal(signal.SIGINT)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"handler": before, "received": None}


def _tokens(path: Path, n: int, seed: int) -> str:
    np.random.default_rng(seed).integers(0, 512, n).astype(np.uint16).tofile(path)
    Path(str(path) + ".json").write_text(json.dumps({"dtype": "uint16", "num_tokens": n}))
    return str(path)


def test_cli_run_sent_sigterm_checkpoints_and_exits_143(tmp_path):
    # the real program, as a scheduler would stop it: SIGTERM once it is logging steps
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cs336_basics.train", "--preset", "tiny", "--device", "cpu",
           "--train-data", _tokens(tmp_path / "tr.bin", 5000, 0), "--val-data", _tokens(tmp_path / "va.bin", 800, 1),
           "--max-steps", "1000000", "--eval-interval", "1000000", "--checkpoint-interval", "0",
           "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # line by line through the pipe: stdout is line-buffered
            lines.append(line)
            if line.startswith("step") and "| loss " in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest + err
    assert "SIGTERM received" in err
    finished = json.loads(rest.split("finished: ")[-1])
    assert finished["stopped"] == "interrupted" and finished["signal"] == "SIGTERM"
    step = finished["step"]
    assert 0 < step < 1_000_000
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == step
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step and rows[-1]["val_loss"] > 0


@pytest.mark.parametrize("call", ["", "from cs336_basics.cli import line_buffered_stdout; line_buffered_stdout(); "])
def test_cli_stdout_is_line_buffered_into_a_pipe(call):
    # a long run's log piped into `tee` or a job's log file arrives line by line, not in 8 KB blocks
    code = call + "import sys; print(sys.stdout.line_buffering)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("True" if call else "False")  # (without the call: Python's block buffering)
