"""The evaluation batch sized from free GPU memory (riftlab.evaluation.robust.eval_batch_size_for, the
``auto_eval_batch_size`` setting): the sizing arithmetic, what the CPU gets, and what a run records. The measurement
on a GPU is tested in ``test_cuda.py``."""

import json

import pytest

from riftlab import RiftConfig, build_model
from riftlab.cli import build_parser, config_from_args
from riftlab.engine.pipeline import RiftRun, resolve_eval_batch_size
from riftlab.evaluation.robust import batch_size_for_memory, eval_batch_size_for

MIB, GIB = 2**20, 2**30


def test_the_largest_power_of_two_that_fits_the_fraction():
    # 2.4 MiB an image (ResNet-18 at 32x32 in bf16: 1.2 GiB at batch 512 on an H200), 10 GiB free, half of it usable:
    # 5 GiB / 2.4 MiB = 2133 images, so 2048
    assert batch_size_for_memory(10 * GIB, 2.4 * MIB) == 2048
    assert batch_size_for_memory(10 * GIB, 2.4 * MIB, fraction=1.0) == 4096  # 4266 fit: the cap
    assert batch_size_for_memory(10 * GIB, 2.4 * MIB, fraction=0.25) == 1024  # 1066 fit
    # the fixed part comes off first: 5 GiB - 0.5 GiB leaves 1920 images, so 1024
    assert batch_size_for_memory(10 * GIB, 2.4 * MIB, fixed_bytes=0.5 * GIB) == 1024
    # exactly fitting is fitting: 2048 images of 1 MiB in half of 4 GiB
    assert batch_size_for_memory(4 * GIB, 1 * MIB) == 2048
    assert batch_size_for_memory(4 * GIB + 1, 1 * MIB) == 2048 and batch_size_for_memory(4 * GIB - 2, 1 * MIB) == 1024


def test_the_cap_and_the_floor():
    assert batch_size_for_memory(140 * GIB, 2.4 * MIB) == 4096  # an H200: 29866 would fit
    assert batch_size_for_memory(140 * GIB, 2.4 * MIB, cap=8192) == 8192
    assert batch_size_for_memory(100 * MIB, 2.4 * MIB) == 64  # 20 fit: never below the floor (evaluate halves on OOM)
    assert batch_size_for_memory(0, 2.4 * MIB) == 64
    assert batch_size_for_memory(0, 2.4 * MIB, floor=16) == 16
    assert batch_size_for_memory(10 * GIB, 1 * GIB, fixed_bytes=20 * GIB) == 64  # the fixed part alone overflows


@pytest.mark.parametrize("kwargs, message", [
    (dict(bytes_per_image=0), "bytes_per_image"), (dict(free_bytes=-1), "free_bytes"), (dict(fraction=0), "fraction"),
    (dict(fraction=1.5), "fraction"), (dict(cap=1000), "powers of two"), (dict(floor=128, cap=64), "powers of two"),
])
def test_bad_sizing_input_is_refused_on_one_line(kwargs, message):
    args = {"free_bytes": GIB, "bytes_per_image": MIB, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        batch_size_for_memory(**args)
    assert "\n" not in str(info.value)


def test_off_cuda_the_configured_size_stays():
    model = build_model("resnet18", 10, 3, 32, 4)
    assert eval_batch_size_for(model, (3, 32, 32), "cpu") == 512
    assert eval_batch_size_for(model, (3, 32, 32), "cpu", default=96, free_bytes=100 * GIB) == 96
    cfg = RiftConfig(dataset="synthetic-cifar10", device="cpu", eval_batch_size=96, auto_eval_batch_size=True).resolved()
    assert resolve_eval_batch_size(cfg).eval_batch_size == 96


def test_the_command_line_sets_both_evaluation_options():
    tiny = ["--dataset", "synthetic-cifar10", "--width", "4", "--device", "cpu", "--eval-batch-size", "96"]
    cfg = config_from_args(build_parser().parse_args(["rift", *tiny, "--auto-eval-batch-size", "--fold-bn"]))
    assert cfg.auto_eval_batch_size and cfg.fold_bn and cfg.eval_batch_size == 96
    plain = config_from_args(build_parser().parse_args(["rift", *tiny]))
    assert not plain.auto_eval_batch_size and not plain.fold_bn  # both off by default: the reference path


def test_a_run_records_the_resolved_size_and_the_fold_in_its_config_and_fingerprints(tmp_path):
    """A tiny run on the CPU with auto_eval_batch_size and fold_bn: results.json's config names the size used (the
    configured one, on the CPU) and both settings; the evaluating stages' fingerprints hold the size and the fold."""
    cfg = RiftConfig(dataset="synthetic-cifar10", width=4, device="cpu", synthetic_sizes=(600, 200), val_size=100, train_subset=64,
                     val_subset=64, test_subset=64, batch_size=32, eval_batch_size=48, auto_eval_batch_size=True, fold_bn=True,
                     at_epochs=1, at_attack_steps=1, mrc_examples=32, mrc_passes=1, ft_epochs=1, alphas=(0.0, 1.0), eval_steps=1,
                     eval_restarts=1, progress=False)
    run = RiftRun(cfg, tmp_path, log=lambda *_: None)
    assert run.cfg.eval_batch_size == 48
    run.run("test")
    recorded = json.loads((tmp_path / "results.json").read_text())["config"]
    assert recorded["eval_batch_size"] == 48 and recorded["auto_eval_batch_size"] is True and recorded["fold_bn"] is True
    stages = json.loads((tmp_path / "riftlab.lock").read_text())["stages"]
    for name in ("interpolate", "test"):
        assert stages[name]["params"]["eval_batch_size"] == 48 and stages[name]["params"]["fold_bn"] is True
    assert "fold_bn" not in stages["at"]["params"]  # training does not fold: its fingerprint is the one it always had
