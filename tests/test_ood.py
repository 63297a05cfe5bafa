"""Corrupted test sets (CIFAR-C .npy files, Tiny-ImageNet-C JPEG trees), ood_accuracy and `riftlab evaluate --ood`."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from PIL import Image

from riftlab.checkpoint import read_checkpoint, save_checkpoint
from riftlab.cli import main
from riftlab.evaluation.corruptions import CORRUPTIONS, REFERENCE_CORRUPTIONS
from riftlab.data import CIFAR_MEAN, CIFAR_STD, DatasetNotFoundError, ImageSet, make_synthetic
from riftlab.models import build_model

from conftest import KillAfter
from riftlab.evaluation.ood import check_corrupted_dir, load_cifar_c, load_corrupted, load_tinyimagenet_c, ood_accuracy, read_wnids

N = 4  # images per severity in the fixtures


def _c_images(n: int = N, size: int = 32) -> np.ndarray:
    """(5n, H, W, 3) uint8: image k of severity s is filled with 40 * s + k, channel c plus c."""
    out = np.empty((5 * n, size, size, 3), dtype=np.uint8)
    for s in range(5):
        for k in range(n):
            out[s * n + k] = (40 * (s + 1) + k + np.arange(3)).astype(np.uint8)
    return out


def write_cifar_c(root, corruptions=("gaussian_noise", "fog"), n: int = N):
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True)
    for name in corruptions:
        np.save(folder / f"{name}.npy", _c_images(n))
    np.save(folder / "labels.npy", (np.arange(5 * n) % 10).astype(np.int64))  # labels differ per severity: shows the block read
    return folder


WNIDS_FILE_ORDER = ["n03", "n01", "n02"]  # wnids.txt is not sorted


def write_tiny_c(root, corruptions=("fog",), severities=(1, 2)):
    folder = root / "Tiny-ImageNet-C"
    for name in corruptions:
        for s in severities:
            for c, wnid in enumerate(sorted(WNIDS_FILE_ORDER)):
                (folder / name / str(s) / wnid).mkdir(parents=True)
                for k in range(2):
                    value = 30 * s + 60 * c + 10 * k
                    mode = "L" if k == 1 else "RGB"  # Tiny-ImageNet has a few grey JPEGs
                    Image.new(mode, (64, 64), value if mode == "L" else (value, value, value)).save(
                        folder / name / str(s) / wnid / f"{wnid}_{k}.JPEG", quality=95)
    (root / "wnids.txt").write_text("\n".join(WNIDS_FILE_ORDER) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------
# Loaders


def test_cifar_c_loader_reads_the_severity_block(tmp_path):
    write_cifar_c(tmp_path)
    for severity in (1, 3, 5):
        data = load_cifar_c(tmp_path, "fog", severity, dataset="cifar10", image_shape=(3, 32, 32))  # parent folder is fine
        assert data.images.shape == (N, 3, 32, 32) and data.images.dtype == torch.uint8
        expected = 40 * severity + torch.arange(N)[:, None] + torch.arange(3)[None, :]
        assert torch.equal(data.images[:, :, 5, 7].long(), expected)  # NHWC -> NCHW, the right block
        assert data.labels.tolist() == [((severity - 1) * N + k) % 10 for k in range(N)]
    # labels.npy with one label per test image (not repeated per severity) also works
    np.save(tmp_path / "CIFAR-10-C" / "labels.npy", np.array([3, 1, 4, 1]))
    assert load_cifar_c(tmp_path / "CIFAR-10-C", "fog", 2).labels.tolist() == [3, 1, 4, 1]


def test_cifar_c_errors_are_clear(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"CIFAR-10-C file fog.npy not found .*zenodo.org/records/2535967"):
        load_cifar_c(tmp_path, "fog", 1, dataset="cifar10")
    with pytest.raises(DatasetNotFoundError, match="zenodo.org/records/3555552"):
        load_cifar_c(tmp_path, "fog", 1, dataset="cifar100")
    folder = write_cifar_c(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="snow.npy not found"):
        load_cifar_c(folder, "snow", 1)
    with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
        load_cifar_c(folder, "fog", 6)
    with pytest.raises(ValueError, match="the model expects 28x28x1"):
        load_cifar_c(folder, "fog", 1, image_shape=(1, 28, 28))
    np.save(folder / "fog.npy", _c_images()[:-1])
    with pytest.raises(ValueError, match="holds 19 images.*multiple of 5.*truncated"):
        load_cifar_c(folder, "fog", 1)
    np.save(folder / "fog.npy", _c_images().astype(np.float32))
    with pytest.raises(ValueError, match=r"float32 \(20, 32, 32, 3\); a -C file must be uint8"):
        load_cifar_c(folder, "fog", 1)
    np.save(folder / "fog.npy", _c_images()[..., 0])
    with pytest.raises(ValueError, match="must be uint8 \\(5n, H, W, C\\)"):
        load_cifar_c(folder, "fog", 1)
    np.save(folder / "labels.npy", np.arange(7))
    with pytest.raises(ValueError, match="expected integer labels of length 20"):
        load_cifar_c(folder, "gaussian_noise", 1)
    raw = (folder / "gaussian_noise.npy").read_bytes()
    (folder / "gaussian_noise.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="may be truncated"):
        load_cifar_c(folder, "gaussian_noise", 1)


def test_tiny_imagenet_c_loader_and_class_order(tmp_path):
    write_tiny_c(tmp_path)
    data = load_tinyimagenet_c(tmp_path, "fog", 2)  # default: sorted class folders (ImageFolder order)
    assert data.images.shape == (6, 3, 64, 64) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    centre = data.images[:, :, 32, 32].float()
    expected = torch.tensor([60 + 60 * c + 10 * k for c in range(3) for k in range(2)]).float()
    assert (centre - expected[:, None]).abs().max() <= 3  # JPEG round trip; grey files became RGB
    # a wnids.txt (unsorted as published) gives the same, sorted numbering as riftlab's Tiny-ImageNet loader
    from_file = load_tinyimagenet_c(tmp_path / "Tiny-ImageNet-C", "fog", 2, wnids=tmp_path / "wnids.txt")
    assert from_file.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert read_wnids(tmp_path) == sorted(WNIDS_FILE_ORDER)
    # an explicit list is taken as given: class i is wnids[i]
    assert load_tinyimagenet_c(tmp_path, "fog", 2, wnids=WNIDS_FILE_ORDER).labels.tolist() == [1, 1, 2, 2, 0, 0]
    assert torch.equal(load_corrupted(tmp_path, "fog", 1, dataset="tinyimagenet").labels, torch.tensor([0, 0, 1, 1, 2, 2]))


def test_tiny_imagenet_c_errors_are_clear(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"Tiny-ImageNet-C folder .*fog/1 not found.*zenodo.org/records/2536630"):
        load_tinyimagenet_c(tmp_path, "fog", 1)
    write_tiny_c(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="fog/3 not found"):
        load_tinyimagenet_c(tmp_path, "fog", 3)
    with pytest.raises(ValueError, match="class folder\\(s\\) n03 are not in the class list"):
        load_tinyimagenet_c(tmp_path, "fog", 1, wnids=["n01", "n02"])
    with pytest.raises(FileNotFoundError, match="no wnids.txt"):
        read_wnids(tmp_path / "nowhere")


def test_missing_files_are_listed_before_any_evaluation(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist.*2535967"):
        check_corrupted_dir(tmp_path / "none", CORRUPTIONS, (1,), "cifar10")
    write_cifar_c(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"is missing 16 of the files or folders this evaluation needs: shot_noise.npy, .* and 10 more.*extra corruptions gaussian_blur, saturate, spatter, speckle_noise"):
        check_corrupted_dir(tmp_path, REFERENCE_CORRUPTIONS, (1,), "cifar10")
    check_corrupted_dir(tmp_path, ["fog", "gaussian_noise"], (1, 5), "cifar10")  # complete: no error
    write_tiny_c(tmp_path / "t")
    with pytest.raises(DatasetNotFoundError, match=r"missing 3 of the files or folders this evaluation needs: fog/3/, fog/4/, fog/5/"):
        check_corrupted_dir(tmp_path / "t", ["fog"], (1, 2, 3, 4, 5), "tinyimagenet")
    with pytest.raises(ValueError, match="no published corrupted test set for 'fashion-mnist'"):
        check_corrupted_dir(tmp_path, ["fog"], (1,), "fashion-mnist")


# ----------------------------------------------------------------------------------------------
# ood_accuracy


class ConstantModel(nn.Module):
    """Ignores its input: always the same logits."""

    def __init__(self, favourite: int, classes: int = 10):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(classes))
        with torch.no_grad():
            self.logits[favourite] = 1.0

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_a_model_that_ignores_its_input_scores_the_same_everywhere(tmp_path):
    clean, _ = make_synthetic("synthetic-cifar10", 40, 1, seed=2)
    model = ConstantModel(favourite=3)
    expected = 100.0 * float((clean.labels == 3).float().mean())
    assert 0 < expected < 100
    result = ood_accuracy(model, clean, "reference", (1, 5), batch_size=16)
    assert result.protocol == "reference-18" and result.severities == (1, 5) and result.source == "on-the-fly" and result.n == 40
    assert list(result.table.columns) == ["corruption", "severity", "accuracy"] and len(result.table) == 36
    assert list(result.per_corruption.index) == list(REFERENCE_CORRUPTIONS) and list(result.per_severity.index) == [1, 5]
    assert np.allclose(result.table["accuracy"], expected) and result.mean == pytest.approx(expected)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["protocol"] == "reference-18" and summary["mean"] == pytest.approx(expected) and summary["severities"] == [1, 5]
    # On a published -C folder: the labels of each severity block decide the accuracy.
    write_cifar_c(tmp_path)
    from_files = ood_accuracy(ConstantModel(favourite=1), c_dir=tmp_path, corruptions=["fog", "gaussian_noise"], dataset="cifar10")
    assert from_files.protocol == "custom" and from_files.source == str(tmp_path)
    by_severity = from_files.per_severity  # labels of severity s are (s-1)*4 .. (s-1)*4+3, mod 10
    assert by_severity.tolist() == [25.0, 0.0, 25.0, 0.0, 0.0]


def _template_images(n: int, templates: torch.Tensor, gen: torch.Generator) -> ImageSet:
    """Class k = template k (a fine +-1 pattern) at a low random contrast, plus pixel noise:
    learnable by a linear model, yet fragile to blur, noise and contrast loss."""
    labels = torch.randint(0, len(templates), (n,), generator=gen)
    contrast = 0.01 + 0.02 * torch.rand(n, 1, 1, 1, generator=gen)
    x = 0.5 + contrast * templates[labels] + 0.1 * torch.randn(n, *templates.shape[1:], generator=gen)
    return ImageSet(x.clamp(0, 1).mul(255).round().to(torch.uint8), labels)


def test_a_trained_model_degrades_with_severity():
    gen = torch.Generator().manual_seed(0)
    templates = nn.functional.interpolate(torch.randn(5, 3, 16, 16, generator=gen).sign(), size=32, mode="nearest")
    train, test = _template_images(1000, templates, gen), _template_images(300, templates, gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(train.float()), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        clean_acc = 100.0 * float((model(test.float()).argmax(1) == test.labels).float().mean())
    result = ood_accuracy(model, test, "standard", (1, 3, 5), batch_size=100)
    per_severity = result.per_severity
    assert clean_acc > 80  # it learnt the task (chance is 20%)
    assert clean_acc > per_severity[1] > per_severity[3] > per_severity[5]
    assert result.mean < clean_acc


def test_the_sweep_resumes_from_partial_progress():
    clean, _ = make_synthetic("synthetic-cifar10", 24, 1, seed=3)
    model = ConstantModel(favourite=clean.labels[0].item())
    whole = ood_accuracy(model, clean, ["fog", "snow"], "1,2")
    killed = KillAfter(1)  # after the first (corruption, severity) pair
    with pytest.raises(KeyboardInterrupt):
        ood_accuracy(model, clean, ["fog", "snow"], "1,2", state=killed)
    assert list(killed.load()["accuracy"]) == ["fog/1"]
    pd.testing.assert_frame_equal(ood_accuracy(model, clean, ["fog", "snow"], "1,2", state=killed).table, whole.table)


def test_cli_ood_resumed_with_another_model_is_refused(cli_setup, tmp_path, capsys):
    """The stage's fingerprint holds the model's own digest: another model's results are never reused (it once silently was)."""
    root, checkpoint, _ = cli_setup
    out = tmp_path / "out"
    args = ["--ood", "--corruptions", "fog", "--severities", "1"]
    assert main(_evaluate_args(root, checkpoint, out, *args)) == 0
    first = json.loads((out / "evaluate-tiny-test.json").read_text())
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    state = read_checkpoint(checkpoint)
    changed = {k: (v * 1.5 if v.is_floating_point() else v) for k, v in state["model_state"].items()}
    other = save_checkpoint(other_dir / "tiny.pt", {"model_state": changed, "meta": state["meta"]})  # same name, other weights
    capsys.readouterr()
    assert main(_evaluate_args(root, other, out, *args, "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot reuse stage evaluate/tiny-test" in err and "model:" in err and "--overwrite" in err
    assert json.loads((out / "evaluate-tiny-test.json").read_text()) == first  # nothing was mixed in or lost
    assert main(_evaluate_args(root, checkpoint, out, *args)) == 0  # the same model again: reused as it is
    assert "done earlier, reusing it" in capsys.readouterr().out


def test_ood_accuracy_checks_its_arguments(tmp_path):
    clean = ImageSet(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    model = ConstantModel(0)
    with pytest.raises(ValueError, match="exactly one source"):
        ood_accuracy(model)
    with pytest.raises(ValueError, match="exactly one source"):
        ood_accuracy(model, clean, c_dir=tmp_path)
    for bad in ("0,1", "1,1", "a", (), (2.5,)):
        with pytest.raises(ValueError, match="severities must be"):
            ood_accuracy(model, clean, severities=bad)
    with pytest.raises(ValueError, match="unknown corruption"):
        ood_accuracy(model, clean, corruptions="fgo")
    with pytest.raises(DatasetNotFoundError, match="2535967"):
        ood_accuracy(model, c_dir=tmp_path / "missing", dataset="cifar10")


# ----------------------------------------------------------------------------------------------
# The command line


def _write_fake_cifar10(root, test_images: np.ndarray, test_labels: np.ndarray) -> None:
    """cifar-10-batches-py with 5 x 1001 blank training images (the loader holds out 5000 for validation)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for b in range(1, 6):
        with open(base / f"data_batch_{b}", "wb") as fh:
            pickle.dump({"data": np.zeros((1001, 3072), np.uint8), "labels": [0] * 1001}, fh)
    rows = test_images.transpose(0, 3, 1, 2).reshape(len(test_images), 3072)
    with open(base / "test_batch", "wb") as fh:
        pickle.dump({"data": rows, "labels": [int(v) for v in test_labels]}, fh)


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A tiny CIFAR-10 (40 test images), a tiny resnet18 checkpoint, and a CIFAR-10-C whose
    gaussian_noise.npy holds the clean test images unchanged at every severity."""
    root = tmp_path_factory.mktemp("ood-cli")
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 32, 4, CIFAR_MEAN, CIFAR_STD)
    test = (make_synthetic("synthetic-cifar10", 40, 1, seed=4)[0].images.permute(0, 2, 3, 1).numpy()).copy()
    x = torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(10):  # a few steps towards random labels, so that predictions depend on the image
        loss = nn.functional.cross_entropy(model(x), torch.arange(40) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    assert len(set(predicted.tolist())) > 1  # an input-dependent model, so the subset and alignment matter
    labels = np.where(np.arange(40) % 2 == 0, predicted, (predicted + 1) % 10)  # right on even images only
    _write_fake_cifar10(root / "data", test, labels)
    c_dir = root / "CIFAR-10-C"
    c_dir.mkdir()
    np.save(c_dir / "gaussian_noise.npy", np.concatenate([test] * 5))
    np.save(c_dir / "labels.npy", np.concatenate([labels] * 5))
    checkpoint = save_checkpoint(root / "tiny.pt", {"model_state": model.state_dict(), "meta": {"dataset": "cifar10", **model.riftlab_config}})
    return root, checkpoint, c_dir


def _evaluate_args(root, checkpoint, out, *extra):
    return ["evaluate", "--checkpoint", str(checkpoint), "--data-root", str(root / "data"), "--out", str(out), "--device", "cpu",
            "--no-progress", "--steps", "1", "--restarts", "1", "--batch-size", "16", *extra]


def test_cli_evaluate_ood_on_the_fly(cli_setup):
    root, checkpoint, _ = cli_setup
    out = root / "fly"
    assert main(_evaluate_args(root, checkpoint, out, "--ood", "--corruptions", "reference", "--severities", "1,5")) == 0
    table = pd.read_csv(out / "ood-tiny-test.csv")
    assert list(table.columns) == ["corruption", "severity", "accuracy"] and len(table) == 36
    assert set(table["corruption"]) == set(REFERENCE_CORRUPTIONS) and set(table["severity"]) == {1, 5}
    result = json.loads((out / "evaluate-tiny-test.json").read_text())
    assert result["ood"]["protocol"] == "reference-18" and result["ood"]["severities"] == [1, 5] and result["ood"]["n"] == 40
    assert result["ood_acc"] == pytest.approx(table["accuracy"].mean())
    assert not (out / "progress" / "ood").exists() or not any((out / "progress" / "ood").iterdir())  # finished: progress cleared


def test_cli_evaluate_ood_dir_matches_the_clean_test_subset(cli_setup):
    """An uncorrupted '-C' copy of the test set must score exactly the clean accuracy on the same subset."""
    root, checkpoint, c_dir = cli_setup
    out = root / "published"
    assert main(_evaluate_args(root, checkpoint, out, "--ood-dir", str(c_dir), "--corruptions", "gaussian_noise",
                               "--test-subset", "24")) == 0
    result = json.loads((out / "evaluate-tiny-test.json").read_text())
    assert result["n"] == 24 and result["ood"]["n"] == 24 and result["ood"]["source"] == str(c_dir)
    assert result["ood"]["per_severity"] == {str(s): pytest.approx(result["clean_acc"]) for s in range(1, 6)}
    assert 0 < result["clean_acc"] < 100


def test_cli_ood_errors_exit_2_before_evaluating(cli_setup, capsys):
    root, checkpoint, c_dir = cli_setup
    cases = [
        (["--ood-dir", str(c_dir)], "is missing 14 of the files or folders"),  # the standard 15, only gaussian_noise present
        (["--ood-dir", str(root / "nowhere")], "zenodo.org/records/2535967"),
        (["--ood-dir", str(c_dir), "--split", "val", "--corruptions", "gaussian_noise"], "use --split test"),
        (["--ood", "--severities", "0,6"], "severities must be distinct integers from 1 to 5"),
        (["--ood", "--corruptions", "fgo"], "unknown corruption(s) 'fgo'"),
        (["--ood-dir", str(c_dir), "--dataset", "synthetic-cifar10"], "no published corrupted test set for 'synthetic-cifar10'"),
    ]
    for extra, message in cases:
        out = root / "errors"
        assert main(_evaluate_args(root, checkpoint, out, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert not (out / "evaluate-tiny-test.json").exists()  # nothing evaluated


# ----------------------------------------------------------------------------------------------
# Verified downloads of the published -C sets (served from local files in the published layout)


def _tar(folder, archive):
    import tarfile

    with tarfile.open(archive, "w") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


def _serve_c(monkeypatch, dataset, archive, md5):
    import dataclasses

    import riftlab.evaluation.ood as ood

    info = dataclasses.replace(ood.CORRUPTED_SETS[dataset], url=archive.parent.as_uri(), archive=archive.name, md5=md5)
    monkeypatch.setattr(type(info), "download", property(lambda self: f"{self.url}/{self.archive}"))
    monkeypatch.setitem(ood.CORRUPTED_SETS, dataset, info)
    return info


def test_cifar_c_download_is_verified_extracted_and_loads(tmp_path, monkeypatch):
    from riftlab.data import md5sum
    from riftlab.evaluation.ood import download_corrupted

    (tmp_path / "served").mkdir()
    archive = _tar(write_cifar_c(tmp_path / "src"), tmp_path / "served" / "CIFAR-10-C.tar")
    _serve_c(monkeypatch, "cifar10", archive, md5sum(archive))
    dest = download_corrupted("cifar10", tmp_path / "dest")
    data = load_cifar_c(dest, "fog", 3)
    np.testing.assert_array_equal(data.labels.numpy(), np.arange(2 * N, 3 * N) % 10)
    assert not list(dest.rglob("*.part"))
    # a corrupted archive is refused, removed and nothing is extracted
    _serve_c(monkeypatch, "cifar10", archive, "0" * 32)
    with pytest.raises(IOError, match="checksum mismatch"):
        download_corrupted("cifar10", tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []


def test_tiny_imagenet_c_checksum_comes_from_the_zenodo_record(tmp_path, monkeypatch):
    from riftlab.data import md5sum
    from riftlab.evaluation.ood import download_corrupted

    (tmp_path / "served").mkdir()
    archive = _tar(write_tiny_c(tmp_path / "src"), tmp_path / "served" / "Tiny-ImageNet-C.tar")
    info = _serve_c(monkeypatch, "tinyimagenet", archive, None)
    record = tmp_path / "record.json"
    monkeypatch.setattr(type(info), "record_api", property(lambda self: record.as_uri()))
    record.write_text(json.dumps({"files": [{"key": "other.tar", "checksum": "md5:" + "1" * 32},
                                            {"key": archive.name, "checksum": "md5:" + md5sum(archive)}]}))
    dest = download_corrupted("tinyimagenet", tmp_path / "dest")
    assert load_tinyimagenet_c(dest, "fog", 2).labels.tolist() == [0, 0, 1, 1, 2, 2]
    record.write_text(json.dumps({"files": [{"key": archive.name, "checksum": "md5:" + "2" * 32}]}))
    with pytest.raises(IOError, match="checksum mismatch"):
        download_corrupted("tinyimagenet", tmp_path / "bad")
    record.write_text(json.dumps({"files": []}))
    with pytest.raises(IOError, match="lists no md5"):
        download_corrupted("tinyimagenet", tmp_path / "bad2")
