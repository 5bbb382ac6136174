"""`cs336 download`: offline errors are clear and leave nothing behind; MATH conversion; never the network."""

from __future__ import annotations

import io
import json
import tarfile
import urllib.error
from typing import ClassVar

import pytest

from cs336 import download


def test_unreachable_url_gives_clear_error_and_no_partial_file(tmp_path):
    dest = tmp_path / "x" / "file.txt"
    # Port 9 (discard) on localhost: refused at once, no network involved.
    with pytest.raises(download.DownloadError, match=r"could not reach 127\.0\.0\.1.*offline"):
        download.fetch("http://127.0.0.1:9/file.txt", dest, progress=False)
    assert not dest.exists() and not dest.with_name("file.txt.part").exists()


def test_cli_offline_every_item_fails_cleanly(tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download, "_urlopen", offline)
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)  # force the urllib path
    rc = download.cli_main(["all", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    for name in download.ITEMS:
        assert f"error [{name}]: could not reach" in err
    assert "name resolution" in err and "HTTPS_PROXY" in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_http_error_names_the_status(tmp_path, monkeypatch):
    def forbidden(req, timeout):
        raise urllib.error.HTTPError(req.full_url, 403, "Forbidden", {}, None)

    monkeypatch.setattr(download, "_urlopen", forbidden)
    with pytest.raises(download.DownloadError, match="HTTP 403.*HF_TOKEN"):
        download.fetch(download.hf_url("org/gated", "a.txt"), tmp_path / "a.txt", progress=False)


def test_fetch_streams_gunzips_and_skips_existing(tmp_path, monkeypatch):
    import gzip

    payload = b"hello world\n" * 1000

    class Resp(io.BytesIO):
        headers: ClassVar[dict[str, str]] = {"Content-Length": "0"}

    calls = []

    def fake(req, timeout):
        calls.append(req.full_url)
        return Resp(gzip.compress(payload))

    monkeypatch.setattr(download, "_urlopen", fake)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    dest = tmp_path / "owt.txt"
    download.fetch(download.hf_url("stanford-cs336/owt-sample", "owt_valid.txt.gz"), dest, gunzip=True, progress=False)
    assert dest.read_bytes() == payload
    assert calls == ["https://mirror.example/datasets/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz"]
    download.fetch("https://unused", dest, progress=False)  # exists -> skipped, no request
    assert len(calls) == 1


def test_unknown_item_and_list(capsys):
    assert download.cli_main(["nope"]) == 2
    assert "unknown item" in capsys.readouterr().err
    assert download.cli_main(["--list"]) == 0
    assert "qwen2.5-math-1.5b" in capsys.readouterr().out


def test_convert_math_tar(tmp_path):
    tar_path = tmp_path / "MATH.tar"
    with tarfile.open(tar_path, "w") as tar:
        for split, subject, i in [("train", "algebra", 1), ("train", "algebra", 2), ("test", "geometry", 7)]:
            row = {"problem": f"p{i}", "level": "Level 1", "type": subject, "solution": f"\\boxed{{{i}}}"}
            data = json.dumps(row).encode()
            info = tarfile.TarInfo(f"MATH/{split}/{subject}/{i}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counts = download.convert_math_tar(tar_path, tmp_path / "math")
    assert counts == {"train": 2, "test": 1}
    rows = [json.loads(x) for x in (tmp_path / "math" / "hendrycks_math_algebra_train.json").read_text().splitlines()]
    assert [r["problem"] for r in rows] == ["p1", "p2"] and rows[0]["solution"] == "\\boxed{1}"
