"""Checkpoints: atomic saves, the reference formats, precise mismatch errors, and safe (weights-only) loads."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import riftlab.checkpoint as ckpt
from riftlab.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, read_checkpoint, save_checkpoint
from riftlab.models import build_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than two and immune to contention on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name: str = "resnet18", seed: int = 0, width: int = 4, num_classes: int = 10) -> nn.Module:
    """A small model with random BatchNorm statistics (so they matter for the logits), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes, 3, 32, width=width)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(seed + 7)
    return model.eval()


X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def _folder(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ------------------------------------------------------------------------------------ saving


def test_save_checkpoint_roundtrip_and_no_temporary_files(tmp_path):
    model = _model()
    target = tmp_path / "sub" / "dir" / "at.pt"
    meta = {"model": "resnet18", "width": 4, "epoch": 3, "mean": [0.5, 0.5, 0.5]}
    out = save_checkpoint(target, {"model_state": model.state_dict(), "meta": meta})
    assert out == target and isinstance(out, Path)
    assert _folder(target.parent) == ["at.pt"]  # parents created, no *.tmp left behind
    obj = read_checkpoint(target)
    assert obj["meta"] == meta
    assert set(obj["model_state"]) == set(model.state_dict())
    assert all(torch.equal(obj["model_state"][k], v) for k, v in model.state_dict().items())


def test_save_checkpoint_overwrites_by_rename_not_in_place(tmp_path):
    """A second save replaces the directory entry (temp file + rename); a hard link to the old file
    still sees the old, complete checkpoint -- an in-place rewrite would have changed it."""
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"model_state": _model(seed=0).state_dict(), "meta": {"epoch": 1}})
    old_bytes = target.read_bytes()
    os.link(target, tmp_path / "old.pt")
    save_checkpoint(target, {"model_state": _model(seed=1).state_dict(), "meta": {"epoch": 2}})
    assert read_checkpoint(target)["meta"] == {"epoch": 2}
    assert (tmp_path / "old.pt").read_bytes() == old_bytes
    assert _folder(tmp_path) == ["last.pt", "old.pt"]


def _failing_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")
    raise RuntimeError("disk full")


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "best.pt"
    model = _model(seed=0)
    save_checkpoint(target, {"model_state": model.state_dict(), "meta": {"epoch": 1}})
    before = target.read_bytes()

    monkeypatch.setattr(ckpt.torch, "save", _failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(target, {"model_state": _model(seed=1).state_dict(), "meta": {"epoch": 2}})
    monkeypatch.undo()

    assert target.read_bytes() == before
    assert _folder(tmp_path) == ["best.pt"]
    fresh = _model(seed=5)
    assert load_checkpoint(fresh, target) == {"epoch": 1}
    assert torch.equal(_logits(fresh), _logits(model))


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.torch, "save", _failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "at.pt", {"model_state": {}})
    assert _folder(tmp_path) == []


def test_interrupted_save_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupted(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "at.pt", {"model_state": {}})
    assert _folder(tmp_path) == []


def test_saved_checkpoint_has_the_usual_file_mode(tmp_path):
    old_umask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "at.pt", {"model_state": _model().state_dict()})
        torch.save({"x": torch.zeros(1)}, tmp_path / "plain.pt")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "plain.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "at.pt").stat().st_mode) == 0o644


# ------------------------------------------------------------------------- reference formats


def _wrap(state: dict, fmt: str):
    if fmt == "bare":
        return state
    if fmt == "net":  # RiFT / kuangliu style, with extra non-tensor entries
        return {"net": state, "acc": 51.3, "epoch": 109}
    if fmt == "state_dict":
        return {"state_dict": state, "epoch": 10, "optimizer": {"param_groups": [{"lr": 0.1}]}}
    if fmt == "model":
        return {"model": state}
    raise AssertionError(fmt)


@pytest.mark.parametrize("prefixed", [False, True], ids=["plain", "module."])
@pytest.mark.parametrize("fmt", ["bare", "net", "state_dict", "model"])
def test_load_reference_formats(tmp_path, fmt, prefixed):
    source = _model(seed=0)
    state = nn.DataParallel(source).state_dict() if prefixed else source.state_dict()
    assert all(k.startswith("module.") for k in state) == prefixed
    path = tmp_path / "ref.pt"
    torch.save(_wrap(state, fmt), path)

    target = _model(seed=1)
    assert not torch.equal(_logits(target), _logits(source))
    meta = load_checkpoint(target, path)
    assert meta == {}
    assert torch.equal(_logits(target), _logits(source))
    for k, v in source.state_dict().items():  # BN running stats and counters included
        assert torch.equal(target.state_dict()[k], v), k


def test_load_riftlab_format_returns_meta(tmp_path):
    source = _model(seed=0)
    meta = {"riftlab": "0.1", "model": "resnet18", "width": 4, "stage": "rift", "alpha": 0.6}
    path = save_checkpoint(tmp_path / "rift.pt", {"model_state": source.state_dict(), "meta": meta})
    target = _model(seed=1)
    assert load_checkpoint(target, path) == meta
    assert torch.equal(_logits(target), _logits(source))


def test_load_riftlab_format_from_data_parallel(tmp_path):
    source = _model(seed=0)
    path = save_checkpoint(tmp_path / "at.pt", {"model_state": nn.DataParallel(source).state_dict(), "meta": {"a": 1}})
    target = _model(seed=1)
    assert load_checkpoint(target, path) == {"a": 1}
    assert torch.equal(_logits(target), _logits(source))


@pytest.mark.parametrize("prefixed", [False, True], ids=["plain", "module."])
def test_load_wrn_checkpoint_with_reference_sub_block1(tmp_path, prefixed):
    source = _model("wrn34_10", seed=0, width=1)
    state = dict(source.state_dict())
    # the reference WideResNet also has an unused sub_block1 (same shapes as block1)
    state.update({"sub_block1." + k[len("block1."):]: torch.randn_like(v.float()).to(v.dtype)
                  for k, v in source.state_dict().items() if k.startswith("block1.")})
    assert sum(k.startswith("sub_block1.") for k in state) > 0
    if prefixed:
        state = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "trades.pt"
    torch.save(state, path)

    target = _model("wrn34_10", seed=1, width=1)
    assert not torch.equal(_logits(target), _logits(source))
    assert load_checkpoint(target, path) == {}
    assert torch.equal(_logits(target), _logits(source))
    assert not any(k.startswith("sub_block1") for k in target.state_dict())


def test_load_moves_tensors_to_map_location(tmp_path):
    source = _model(seed=0)
    path = tmp_path / "ref.pt"
    torch.save({"net": source.state_dict()}, path)
    obj = read_checkpoint(path, map_location="meta")
    assert all(v.device.type == "meta" for v in obj["net"].values())


# -------------------------------------------------------------------------------- mismatches


def _save_state(tmp_path: Path, state: dict, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save({"net": state}, path)
    return path


def _assert_untouched(model: nn.Module, before: dict) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed load"


def test_other_width_names_first_mismatching_tensor_and_both_shapes(tmp_path):
    path = _save_state(tmp_path, _model(width=8).state_dict())
    model = _model(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path)
    msg = str(info.value)
    assert "'conv1.weight'" in msg
    assert "(8, 3, 3, 3)" in msg and "(4, 3, 3, 3)" in msg
    assert msg.index("(8, 3, 3, 3)") < msg.index("(4, 3, 3, 3)")  # checkpoint shape first, then the model's
    assert str(path) in msg
    _assert_untouched(model, before)


def test_other_class_count_names_the_classifier(tmp_path):
    path = _save_state(tmp_path, _model(num_classes=100).state_dict())
    model = _model(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path)
    msg = str(info.value)
    assert "'linear.weight'" in msg and "(100, 32)" in msg and "(10, 32)" in msg
    _assert_untouched(model, before)


def test_missing_tensor_is_named(tmp_path):
    state = dict(_model().state_dict())
    del state["layer3.1.bn2.running_var"]
    path = _save_state(tmp_path, state)
    model = _model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'layer3\.1\.bn2\.running_var'.*missing"):
        load_checkpoint(model, path)
    _assert_untouched(model, before)


def test_extra_tensor_is_named(tmp_path):
    state = dict(_model().state_dict())
    state["layer5.0.conv1.weight"] = torch.zeros(3, 3)
    path = _save_state(tmp_path, state)
    model = _model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'layer5\.0\.conv1\.weight'"):
        load_checkpoint(model, path)
    _assert_untouched(model, before)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    path = _save_state(tmp_path, _model("preact_resnet18").state_dict())
    with pytest.raises(CheckpointError, match="missing"):  # resnet18 needs bn1.*, preact has none
        load_checkpoint(_model("resnet18"), path)


def test_sub_block1_is_only_dropped_for_the_wrn_prefix(tmp_path):
    """Only `sub_block1.*` is tolerated as extra; a similar name is still an extra tensor."""
    state = dict(_model().state_dict())
    state["sub_block2.layer.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="sub_block2"):
        load_checkpoint(_model(seed=1), _save_state(tmp_path, state))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(_model(), tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        read_checkpoint(tmp_path)  # a directory is not a checkpoint file, and the error says so


GARBAGE = {
    "empty": b"",
    "zip-header": b"PK\x03\x04" + bytes(range(256)),
    "truncated-pickle": b"\x80\x02}q\x00(X\x01\x00\x00\x00a",
    "text": b"not a checkpoint\n",
}
# Non-checkpoint bytes on which torch's weights-only unpickler fails with exceptions other than
# UnpicklingError (KeyError, IndexError, UnicodeDecodeError): they must still be CheckpointErrors.


GARBAGE_ESCAPING = [
    pytest.param(b"hello world", id="hello-world"),
    pytest.param(b"\x86\x13garbage", id="tuple2-on-empty-stack"),
    pytest.param(b"\x80\x02\x86.", id="pickle-header-then-tuple2-on-empty-stack"),
    pytest.param(b"X\x02\x00\x00\x00\xff\xfe.", id="bad-utf8"),
]


@pytest.mark.parametrize("data", [pytest.param(v, id=k) for k, v in GARBAGE.items()] + GARBAGE_ESCAPING)
def test_garbage_file_is_a_checkpoint_error(tmp_path, data):
    path = tmp_path / "garbage.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(_model(), path)


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"model_state": _model().state_dict()})
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    for fraction in (0.1, 0.5, 0.99):  # torch's own errors differ with the cut (OSError EINVAL at 10%): the message does not
        bad.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(CheckpointError, match="truncated or damaged"):
            load_checkpoint(_model(), bad)


def test_garbage_file_is_not_called_unsafe(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"not a checkpoint\n")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert "refusing" not in str(info.value)


# --------------------------------------------------------------------------------------- safety


def _write_marker(path):
    Path(path).write_text("pwned")
    return {"weight": None}


class _ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _FunctionPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (str(self.marker),)


@pytest.mark.parametrize("payload", [_ShellPayload, _FunctionPayload], ids=["os.system", "python-function"])
@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-a-state-dict"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, payload, nested):
    marker = tmp_path / "marker"
    evil = payload(marker)
    obj = {"net": {**_model().state_dict(), "evil": evil}} if nested else evil
    path = tmp_path / "evil.pt"
    torch.save(obj, path)

    for load in (lambda: read_checkpoint(path), lambda: load_checkpoint(_model(), path)):
        with pytest.raises(CheckpointError) as info:
            load()
        assert "refusing" in str(info.value)
        assert not marker.exists()

    # control: the payload is live -- an unsafe load does run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_whole_pickled_model_is_refused(tmp_path):
    """torch.save(model) pickles classes; the weights-only loader refuses it with advice to re-save."""
    path = tmp_path / "whole.pt"
    torch.save(_model(), path)
    with pytest.raises(CheckpointError, match=r"refusing.*state_dict"):
        load_checkpoint(_model(), path)


# ----------------------------------------------------------------------------- extract_state_dict


@pytest.mark.parametrize("obj", [
    {}, {"epoch": 3, "acc": 51.2}, {"net": {"epoch": 3}}, {"model": {}}, [torch.zeros(1)], torch.zeros(3),
    {"a": torch.zeros(1), "b": 3}, None, "resnet18",
], ids=["empty", "scalars", "net-without-tensors", "empty-model", "list", "tensor", "mixed", "none", "string"])
def test_extract_state_dict_without_tensors_raises(obj):
    with pytest.raises(CheckpointError, match="no state dict"):
        extract_state_dict(obj)


def test_extract_state_dict_formats_and_prefix():
    state = {"conv1.weight": torch.ones(2), "module_x.bias": torch.zeros(1)}
    prefixed = {"module." + k: v for k, v in state.items()}
    for obj in (state, prefixed, {"net": prefixed}, {"state_dict": state}, {"model": prefixed},
                {"model_state": state, "meta": {"model": "resnet18"}}):
        out = extract_state_dict(obj)
        assert list(out) == ["conv1.weight", "module_x.bias"]
        assert out["conv1.weight"] is state["conv1.weight"]
