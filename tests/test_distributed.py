"""Several processes under torchrun (gloo on the CPU, 2 ranks) give the results of one process.

Each command runs once alone and once under ``torchrun --nproc_per_node 2`` on the same data:
fine-tuning (frozen BatchNorm: the same update, summed in another order) and MRC (modules
handed out across ranks) agree to float precision, clean accuracy exactly, and adversarial
training and PGD robust accuracy (other random starts, per-rank BatchNorm batches) within noise.
"""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from riftlab import Batches
from riftlab.checkpoint import read_checkpoint

from conftest import make_model

TINY = ["--profile", "demo", "--width", "4", "--train-subset", "512", "--val-subset", "128", "--test-subset", "256",
        "--batch-size", "64", "--device", "cpu", "--no-progress"]


def test_sharded_batches_split_every_batch_without_loss_or_overlap(tiny_splits):
    whole = Batches(tiny_splits.val, 64, shuffle=True, augment=True, seed=3)
    parts = [whole.sharded(r, 3) for r in range(3)]
    for p in [whole, *parts]:
        p.set_epoch(2)
    batches = list(whole)
    per_rank = [list(p) for p in parts]
    assert all(len(b) == len(batches) for b in per_rank)  # 250 = 3 x 64 + 58: no batch smaller than 3
    for i, (x, y) in enumerate(batches):
        xs = torch.cat([per_rank[r][i][0] for r in range(3)])
        ys = torch.cat([per_rank[r][i][1] for r in range(3)])
        assert torch.equal(xs, x) and torch.equal(ys, y)  # same images, same augmentation, same order
    with pytest.raises(ValueError, match="rank must be in"):
        whole.sharded(3, 3)


def _run(args, nproc, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "riftlab", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "riftlab", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Adversarial training: the same schedule, data and batches; BatchNorm batch statistics per half-batch.
    train = ["train-at", *TINY, "--epochs", "3", "--attack-steps", "2"]
    out_one = _run([*train, "--out", str(one)], 1, tmp_path)
    out_two = _run([*train, "--out", str(two)], 2, tmp_path)
    assert out_two.count("wrote") == out_one.count("wrote") == 1  # rank 0 alone speaks
    h1, h2 = pd.read_csv(one / "at_history.csv"), pd.read_csv(two / "at_history.csv")
    assert len(h1) == len(h2) == 3
    # Per-rank BatchNorm statistics make the runs drift apart slowly (a width-4 net at lr 0.1 is
    # chaotic): the first epoch agrees closely, later ones within a quarter of a nat, and both learn.
    assert abs(h1["train_loss"].iloc[0] - h2["train_loss"].iloc[0]) < 0.05
    assert (h1["train_loss"] - h2["train_loss"]).abs().max() < 0.25
    assert (h1["val_clean_acc"] - h2["val_clean_acc"]).abs().max() <= 10
    for h in (h1, h2):
        assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert not list(two.rglob("*.tmp"))

    at = str(one / "at.pt")  # from here on both runs start from the same AT model (in run directories of their own)
    one, two = tmp_path / "one-steps", tmp_path / "two-steps"
    mrc = ["mrc", *TINY, "--checkpoint", at, "--examples", "128", "--passes", "2"]
    _run([*mrc, "--out", str(one)], 1, tmp_path)
    _run([*mrc, "--out", str(two)], 2, tmp_path)
    m1, m2 = pd.read_csv(one / "mrc.csv"), pd.read_csv(two / "mrc.csv")
    assert list(m1["module"]) == list(m2["module"])
    assert torch.allclose(torch.tensor(m1["mrc"].values), torch.tensor(m2["mrc"].values), rtol=1e-4, atol=1e-6)

    ft = ["finetune", *TINY, "--checkpoint", at, "--module", str(m1["module"].iloc[0]), "--epochs", "2", "--lr", "0.01"]
    _run([*ft, "--out", str(one)], 1, tmp_path)
    _run([*ft, "--out", str(two)], 2, tmp_path)
    s1, s2 = read_checkpoint(one / "ft.pt")["model_state"], read_checkpoint(two / "ft.pt")["model_state"]
    changed = [k for k in s1 if not torch.equal(s1[k], read_checkpoint(one / "at.pt")["model_state"][k])]
    assert changed == [f"{m1['module'].iloc[0]}.weight"]
    for k in s1:
        assert torch.allclose(s1[k].float(), s2[k].float(), rtol=1e-4, atol=1e-5), k

    ev = ["evaluate", *TINY, "--checkpoint", at, "--restarts", "1"]
    _run([*ev, "--out", str(one)], 1, tmp_path)
    _run([*ev, "--out", str(two)], 2, tmp_path)
    e1 = json.loads((one / "evaluate-at-test.json").read_text())
    e2 = json.loads((two / "evaluate-at-test.json").read_text())
    assert e1["n"] == e2["n"] == 256
    assert e1["clean_acc"] == e2["clean_acc"]
    assert abs(e1["robust_acc"] - e2["robust_acc"]) <= 3.0


def test_sync_batchnorm_round_trip_keeps_every_tensor_and_output(tiny_splits):
    """Under torchrun on CUDA, training runs with SyncBatchNorm (the whole batch's statistics); afterwards the
    model is turned back into plain BatchNorm2d with the same tensors, so checkpoints and evaluation are unchanged."""
    from riftlab.distributed import done_training

    model = make_model(tiny_splits, width=4).eval()
    x = tiny_splits.val.float()[:16]
    before_state, before_out = {k: v.clone() for k, v in model.state_dict().items()}, model(x)
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == 20
    done_training(model)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before_state) and all(torch.equal(after[k], before_state[k]) for k in after)
    assert torch.equal(model(x), before_out)


def test_unequal_slices_weight_each_ranks_loss_by_its_share(tiny_splits):
    """A batch of 10 over 3 ranks is split 4 / 3 / 3: each rank's mean loss weighted by its share, then averaged over the
    ranks as DDP averages gradients, is the whole batch's mean (the one-process update)."""
    full = Batches(tiny_splits.train.subset(10), 10)
    losses = torch.rand(10, generator=torch.Generator().manual_seed(0))
    (x_all, _), = list(full)
    averaged = 0.0
    for rank in range(3):
        view = full.sharded(rank, 3)
        (x, _), = list(view)
        mine = torch.arange(10).tensor_split(3)[rank]
        assert torch.equal(x, x_all[mine])
        averaged += view.shard_weight * float(losses[mine].mean()) / 3
    assert averaged == pytest.approx(float(losses.mean()), rel=1e-6)
    assert full.shard_weight is None  # the whole batch needs no weight
