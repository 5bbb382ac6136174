"""DDP variants vs single-process training on the concatenated batch (gloo, 2 CPU processes).

One forked 2-process job runs every variant and bucket size on models with frozen, tied and
unused parameters; after every step each rank's parameters must equal those of a single-process
model trained on the global batch. A second job covers parameters used by only one rank, and a
third checks that a crashed rank or a hung collective fails fast with a clear error.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cs336_systems import adapters, ddp
from cs336_systems.dist_utils import run_distributed
from torch import nn

VOCAB, DIM, BATCH, STEPS = 13, 8, 8, 4


class ToyLM(nn.Module):
    """Embedding tied to the output head, a frozen layer, a never-used layer, a layer used on odd
    steps only and (optionally) one used only when the local batch's first token is even."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.norm = nn.LayerNorm(2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)
        self.frozen = nn.Linear(DIM, DIM)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(DIM, DIM)
        self.odd_steps = nn.Linear(DIM, DIM)
        self.data_dependent = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x, step: int = 0, data_dependent: bool = False):
        h = self.fc2(self.norm(F.gelu(self.fc1(self.emb(x)))))
        h = self.frozen(h)
        if step % 2:
            h = h + self.odd_steps(h)
        if data_dependent and int(x[0, 0]) % 2 == 0:
            h = h + self.data_dependent(h)
        return self.head(h)


def _batches(steps: int, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, 6), generator=g) for _ in range(steps)]


def _loss(model, x, step, data_dependent):
    logits = model(x[:, :-1], step, data_dependent)
    return F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))


def _make_optimizer(params):
    # AdamW with weight decay: a zero gradient where single-process has None would show up.
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _compare_variants(rank: int, world_size: int, variants: list, data_dependent: bool, accum_modes=((1, False),)) -> dict:
    """For each (name, ctor) and (micro-batches, use no_sync): train the wrapped model and a
    single-process reference in lockstep; return the largest parameter difference after any step."""
    out = {}
    for accum, use_no_sync in accum_modes:
        for name, value in _compare(rank, world_size, variants, data_dependent, accum, use_no_sync).items():
            out[f"accum={accum},no_sync={use_no_sync}/{name}" if accum > 1 else name] = value
    return out


def _compare(rank, world_size, variants, data_dependent, accum, use_no_sync) -> dict:
    torch.manual_seed(0)
    out = {}
    b = BATCH // world_size
    batches = _batches(STEPS)
    if data_dependent:  # rank 0's first token even (uses the layer), rank 1's odd (does not)
        for x in batches:
            x[0, 0], x[b, 0] = 2, 3
    for name, ctor in variants:
        torch.manual_seed(0)
        reference = ToyLM()
        torch.manual_seed(100 + rank)  # different init per rank: the wrapper must broadcast rank 0's
        model = ToyLM()
        if rank == 0:
            model.load_state_dict(reference.state_dict())
        wrapped = ctor(model)
        opt, ref_opt = _make_optimizer(wrapped.parameters()), _make_optimizer(reference.parameters())
        worst = 0.0
        for step, x in enumerate(batches):
            if hasattr(wrapped, "on_train_batch_start"):
                wrapped.on_train_batch_start()
            opt.zero_grad(set_to_none=True)
            local = x[rank * b : (rank + 1) * b]
            for mb, rows in enumerate(local.chunk(accum)):
                last = mb == accum - 1
                with wrapped.no_sync() if use_no_sync and not last else contextlib.nullcontext():
                    (_loss(wrapped, rows, step, data_dependent) / accum).backward()
            wrapped.finish_gradient_synchronization()
            opt.step()
            ref_opt.zero_grad(set_to_none=True)
            if data_dependent:  # the global loss is the mean of the per-rank losses
                sum(_loss(reference, x[r * b : (r + 1) * b], step, True) for r in range(world_size)).div(world_size).backward()
            else:
                _loss(reference, x, step, False).backward()
            ref_opt.step()
            for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
                worst = max(worst, (p.detach() - q.detach()).abs().max().item())
        out[name] = worst
        # Replicas must agree exactly with each other.
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        out[name + "/replicas_equal"] = all(torch.equal(gathered[0], g) for g in gathered)
    return out


VARIANTS = [
    ("naive", ddp.DDPNaive),
    ("flat", ddp.DDPFlat),
    ("individual", ddp.DDPIndividualParameters),
    ("bucketed-None", lambda m: ddp.DDPBucketed(m, bucket_size_mb=None)),
    ("bucketed-0.0002", lambda m: ddp.DDPBucketed(m, bucket_size_mb=0.0002)),  # ~1 parameter per bucket
    ("bucketed-0.001", lambda m: ddp.DDPBucketed(m, bucket_size_mb=0.001)),
    ("bucketed-1", lambda m: ddp.DDPBucketed(m, bucket_size_mb=1)),
    ("adapter-get_ddp", adapters.get_ddp),
    ("adapter-individual", adapters.get_ddp_individual_parameters),
]


def test_ddp_variants_match_single_process():
    results = run_distributed(_compare_variants, 2, VARIANTS, False, ((1, False), (2, False), (2, True)))
    for rank_result in results:
        for name, value in rank_result.items():
            if name.endswith("replicas_equal"):
                assert value, name
            else:
                assert value < 1e-5, f"{name}: max |param - reference| = {value}"


def test_ddp_parameter_used_by_one_rank_only():
    # The local batches are arranged so that only rank 0 uses `data_dependent`; naive, flat and
    # bucketed DDP average its gradient with rank 1's zeros (the bucket order keeps ranks in step).
    variants = [v for v in VARIANTS if "individual" not in v[0]]
    results = run_distributed(_compare_variants, 2, variants, True)
    for rank_result in results:
        for name, value in rank_result.items():
            if name.endswith("replicas_equal"):
                assert value, name
            else:
                assert value < 1e-5, f"{name}: max |param - reference| = {value}"


def test_bucket_layout():
    def check(rank, world_size):
        torch.manual_seed(0)
        model = ToyLM()
        wrapped = ddp.DDPBucketed(model, bucket_size_mb=0.0002)
        trainable = [p for p in model.parameters() if p.requires_grad]
        in_buckets = [p for b in wrapped.buckets for p in b.params]
        assert in_buckets == list(reversed(trainable))  # reverse order, frozen excluded, tied once
        for b in wrapped.buckets:  # each bucket within the size, unless it is a single large param
            assert len(b.params) == 1 or sum(p.numel() * 4 for p in b.params) <= 0.0002 * 2**20
        return len(wrapped.buckets), len(ddp.DDPBucketed(ToyLM(), bucket_size_mb=None).buckets)

    n_small, n_one = run_distributed(check, 2)[0]
    assert n_small > 3 and n_one == 1


def _crash(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.all_reduce(torch.ones(3))


def _hang(rank, world_size):
    if rank == 0:
        dist.all_reduce(torch.ones(3))  # rank 1 never joins
    else:
        time.sleep(30)


def test_crashed_rank_and_hung_collective_fail_fast():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom on rank 1|rank 0 failed"):
        run_distributed(_crash, 2, timeout_s=30, collective_timeout_s=5)
    assert time.monotonic() - t0 < 20
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0 failed[\s\S]*(imed out|imeout)"):
        run_distributed(_hang, 2, timeout_s=30, collective_timeout_s=3)
    assert time.monotonic() - t0 < 20
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 2s; ranks"):
        run_distributed(_hang, 2, timeout_s=2, collective_timeout_s=60)
    assert time.monotonic() - t0 < 10
