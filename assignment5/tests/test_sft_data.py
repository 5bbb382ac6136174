"""SFT data: prompt/response tokenization on the real GPT-2 tokenizer (built offline), packing, batching."""

from __future__ import annotations

import json

import pytest
import torch
from cs336_alignment import sft_data
from cs336_alignment.adapters import (
    get_packed_sft_dataset,
    run_iterate_batches,
    run_tokenize_prompt_and_output,
)


@pytest.fixture(scope="module")
def gpt2_tokenizer(shared_data):
    from transformers import GPT2TokenizerFast

    # from_pretrained on the folder of vocab.json + merges.txt works offline in transformers 4 and 5
    tok = GPT2TokenizerFast.from_pretrained(str(shared_data / "tokenizers" / "gpt2"))
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    return tok


def test_tokenize_prompt_and_output_gpt2(gpt2_tokenizer):
    prompts = ["Hello, world!", "This is a somewhat longer prompt,", "A"]
    outputs = [" Hello, model.", " and this is its answer 42.", " b"]
    got = run_tokenize_prompt_and_output(prompts, outputs, gpt2_tokenizer)

    seqs = [gpt2_tokenizer.encode(p) + gpt2_tokenizer.encode(o) for p, o in zip(prompts, outputs)]
    n_prompt = [len(gpt2_tokenizer.encode(p)) for p in prompts]
    width = max(map(len, seqs))
    pad = gpt2_tokenizer.eos_token_id  # GPT-2 has no pad token
    for b, seq in enumerate(seqs):
        full = seq + [pad] * (width - len(seq))
        assert got["input_ids"][b].tolist() == full[:-1]
        assert got["labels"][b].tolist() == full[1:]
        mask = [n_prompt[b] <= t + 1 < len(seq) for t in range(width - 1)]  # labels index t is token t+1
        assert got["response_mask"][b].tolist() == mask
    for key in ("input_ids", "labels", "response_mask"):
        assert got[key].shape == (3, width - 1)
    # the masked labels decode back to the outputs
    for b in range(3):
        assert gpt2_tokenizer.decode(got["labels"][b][got["response_mask"][b]]) == outputs[b]


def test_r1_zero_trace_from_gsm8k_answer():
    reasoning, answer = sft_data.gsm8k_trace("Natalia sold 48/2 = <<48/2=24>>24 clips.\nSo 1,072 total.\n#### 1,072")
    assert reasoning == "Natalia sold 48/2 = 24 clips.\nSo 1,072 total."
    assert answer == "1072"
    response = sft_data.r1_zero_response(reasoning, answer)
    assert response.endswith("</think> <answer>1072</answer>")


def test_packed_dataset_and_batches(gpt2_tokenizer, shared_data, tmp_path):
    path = shared_data / "sft" / "sft_sample.jsonl"
    seq = 64
    ds = get_packed_sft_dataset(gpt2_tokenizer, str(path), seq, shuffle=False)

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    stream = []
    for r in rows:
        stream += gpt2_tokenizer.encode(sft_data.instruction_prompt(r["prompt"]) + r["response"]) + [gpt2_tokenizer.eos_token_id]
    assert len(ds) == (len(stream) - 1) // seq
    for i in (0, 1, len(ds) - 1):
        assert ds[i]["input_ids"].tolist() == stream[i * seq : (i + 1) * seq]
        assert ds[i]["labels"].tolist() == stream[i * seq + 1 : (i + 1) * seq + 1]
    assert "### Instruction:" in gpt2_tokenizer.decode(ds[0]["input_ids"])

    shuffled = get_packed_sft_dataset(gpt2_tokenizer, str(path), seq, shuffle=True)
    assert len(shuffled) == len(ds) and sorted(shuffled.tokens.tolist()) == sorted(ds.tokens.tolist())

    batches = list(run_iterate_batches(ds, batch_size=4, shuffle=True))
    assert len(batches) == -(-len(ds) // 4)
    assert batches[0]["input_ids"].shape == (4, seq)
    seen = torch.cat([b["input_ids"] for b in batches])
    assert sorted(map(tuple, seen.tolist())) == sorted(tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds)))


def test_sft_examples_from_jsonl(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "Q: 1+1?", "response": " 2", "answer": "2"}) + "\n")
    assert sft_data.sft_examples(str(p)) == [{"prompt": "Q: 1+1?", "response": " 2", "answer": "2"}]
    p.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:1"):
        sft_data.sft_examples(str(p))
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="pairs.jsonl:1"):
        sft_data.read_jsonl(p)


def test_qa_examples_math_train_skips_the_two_unanswerable_rows():
    from cs336_alignment.sft_data import qa_examples

    rows = qa_examples("math", "train")
    assert len(rows) == 7500 - 2  # number_theory lines 662 and 664 have an empty \boxed{}
    assert all(r["question"] and r["answer"] for r in rows)
