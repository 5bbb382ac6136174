"""ZeRO-1 (`ShardedOptimizer`) vs unsharded AdamW (gloo, 2 CPU processes, one forked job)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from cs336_systems import ddp
from cs336_systems.dist_utils import run_distributed
from cs336_systems.sharded_optimizer import ShardedOptimizer
from torch import nn


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 48), nn.LayerNorm(48), nn.Linear(48, 5))


def _job(rank: int, world_size: int) -> dict:
    out = {}
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 10, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(5)]

    # 1. Same data on every rank (no DDP): every step equals torch's AdamW; add_param_group works.
    torch.manual_seed(0)
    model, reference = _model(), _model()
    reference.load_state_dict(model.state_dict())
    head, body = list(model[4].parameters()), [p for m in list(model)[:4] for p in m.parameters()]
    opt = ShardedOptimizer(body, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    opt.add_param_group({"params": head, "lr": 3e-3})
    ref_body = [p for m in list(reference)[:4] for p in m.parameters()]
    ref_opt = torch.optim.AdamW([{"params": ref_body}, {"params": list(reference[4].parameters()), "lr": 3e-3}], lr=1e-2, weight_decay=0.1)
    worst = 0.0
    for step, (x, y) in enumerate(data):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            if step == 3:  # a learning-rate schedule writes into param_groups
                o.param_groups[0]["lr"] = 5e-3
            o.step()
        worst = max(worst, max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())))
    out["same_data_max_diff"] = worst

    # Each rank holds AdamW state (exp_avg, exp_avg_sq) only for the parameters it owns.
    owned = [p for grp in opt.param_groups for p in grp["params"] if opt.owner[id(p)] == rank]
    out["state_numel"] = opt.local_state_numel()
    out["owned_numel"] = sum(p.numel() for p in owned)
    out["total_numel"] = sum(p.numel() for p in model.parameters())
    out["state_keys_owned"] = all(id(p) in {id(q) for q in owned} for p in opt.local_optimizer.state)

    # The consolidated state loads into an unsharded AdamW and continues identically.
    opt.consolidate_state_dict()
    state = opt.state_dict()
    fresh = torch.optim.AdamW([{"params": ref_body}, {"params": list(reference[4].parameters()), "lr": 3e-3}], lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(state)
    out["consolidated_matches"] = all(
        torch.equal(fresh.state[p]["exp_avg"], ref_opt.state[p]["exp_avg"]) and torch.allclose(fresh.state[p]["exp_avg_sq"], ref_opt.state[p]["exp_avg_sq"])
        for p in ref_opt.state
    )

    # ... and a fresh ShardedOptimizer resumes from it: one more step equals the reference's.
    resumed = ShardedOptimizer(body, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    resumed.add_param_group({"params": head, "lr": 3e-3})
    resumed.load_state_dict(state)
    x, y = data[0]
    for m, o in ((model, resumed), (reference, ref_opt)):
        o.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        o.step()
    out["resumed_max_diff"] = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
    out["resumed_state_numel"] = resumed.local_state_numel()

    # 2. DDP + ZeRO-1 on per-rank halves vs single-process AdamW on the full batch.
    torch.manual_seed(1)
    model, reference = _model(), _model()
    reference.load_state_dict(model.state_dict())
    wrapped = ddp.DDPBucketed(model, bucket_size_mb=0.001)
    opt = ShardedOptimizer(wrapped.parameters(), torch.optim.AdamW, lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    b = 8 // world_size
    worst = 0.0
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x[rank * b : (rank + 1) * b]), y[rank * b : (rank + 1) * b]).backward()
        wrapped.finish_gradient_synchronization()
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
        worst = max(worst, max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())))
    out["ddp_zero1_max_diff"] = worst
    return out


def test_zero1_matches_adamw_and_shards_state():
    results = run_distributed(_job, 2)
    total = results[0]["total_numel"]
    assert sum(r["owned_numel"] for r in results) == total  # every parameter owned exactly once
    for r in results:
        assert r["same_data_max_diff"] < 1e-6, r
        assert r["ddp_zero1_max_diff"] < 1e-5, r
        assert r["state_numel"] == 2 * r["owned_numel"], r  # exp_avg + exp_avg_sq of owned params only
        assert r["owned_numel"] < 0.75 * total, r  # greedy balancing: no rank owns (nearly) all
        assert r["state_keys_owned"] and r["consolidated_matches"], r
        assert r["resumed_max_diff"] < 1e-6 and r["resumed_state_numel"] == r["state_numel"], r
