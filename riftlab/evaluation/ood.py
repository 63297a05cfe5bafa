"""Out-of-distribution (common-corruption) accuracy, and loaders for the published -C sets.

Two sources of corrupted images:

* **on the fly**: :func:`riftlab.corruptions.corrupt` applied to a clean split (any dataset, any
  size; riftlab's own severity tables, see :mod:`riftlab.corruptions`);
* **published**: CIFAR-10-C / CIFAR-100-C (``<corruption>.npy``, 5 severities x 10000 test
  images, and ``labels.npy``) and Tiny-ImageNet-C (``<corruption>/<severity>/<wnid>/*.JPEG``),
  read by :func:`load_cifar_c` and :func:`load_tinyimagenet_c` into :class:`~riftlab.data.ImageSet` s.

:func:`ood_accuracy` evaluates a model on every (corruption, severity) pair and reports the mean
under a named protocol: ``standard-15`` (the benchmark's 15 corruptions) or ``reference-18`` (the
RiFT reference code's list: glass blur left out; speckle noise, Gaussian blur, spatter and
saturate added). The reference code averages all 5 severities on CIFAR-C and severity 1 only on
Tiny-ImageNet-C; ``severities`` reproduces either convention.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .._progress import bar
from ..resume import StepState, ensure_state
from ..attacks import eval_mode
from .corruptions import SEVERITIES, corrupt, resolve_corruptions
from ..data import DatasetNotFoundError, ImageSet, default_root, extract_archive, fetch_verified

__all__ = [
    "CorruptedSetInfo",
    "CORRUPTED_SETS",
    "OODResult",
    "corrupted_set_info",
    "download_corrupted",
    "load_cifar_c",
    "load_tinyimagenet_c",
    "load_corrupted",
    "read_wnids",
    "check_corrupted_dir",
    "parse_severities",
    "ood_accuracy",
]


@dataclass(frozen=True)
class CorruptedSetInfo:
    """A published corrupted test set: its folder name, file layout and where to get it."""

    name: str
    dataset: str
    layout: str  # "npy": <corruption>.npy + labels.npy; "jpeg": <corruption>/<severity>/<wnid>/*.JPEG
    url: str
    image_size: int
    archive: str = ""
    md5: str | None = None  # None: read the checksum Zenodo publishes in the record's metadata

    @property
    def download(self) -> str:
        return f"{self.url}/files/{self.archive}?download=1"

    @property
    def record_api(self) -> str:
        return self.url.replace("/records/", "/api/records/")


CORRUPTED_SETS: dict[str, CorruptedSetInfo] = {
    "cifar10": CorruptedSetInfo("CIFAR-10-C", "cifar10", "npy", "https://zenodo.org/records/2535967", 32,
                                "CIFAR-10-C.tar", "56bf5dcef84df0e2308c6dcbcbbd8499"),
    "cifar100": CorruptedSetInfo("CIFAR-100-C", "cifar100", "npy", "https://zenodo.org/records/3555552", 32,
                                 "CIFAR-100-C.tar", "11f0ed0f1191edbf9fa23466ae6021d3"),
    "tinyimagenet": CorruptedSetInfo("Tiny-ImageNet-C", "tinyimagenet", "jpeg", "https://zenodo.org/records/2536630", 64,
                                     "Tiny-ImageNet-C.tar"),
}

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def corrupted_set_info(dataset: str) -> CorruptedSetInfo:
    """The published -C set of ``dataset`` (cifar10, cifar100 or tinyimagenet)."""
    if dataset not in CORRUPTED_SETS:
        raise ValueError(f"no published corrupted test set for {dataset!r} (there are: {', '.join(CORRUPTED_SETS)}); "
                         "evaluate on corruptions made on the fly instead (riftlab evaluate --ood without --ood-dir)")
    return CORRUPTED_SETS[dataset]


def download_corrupted(dataset: str, root: str | os.PathLike | None = None) -> Path:
    """Download and extract the published -C set of ``dataset`` into ``root``; returns ``root``.

    The archive's md5 is checked before extraction against the checksum Zenodo publishes for it
    (written here for CIFAR-10-C and CIFAR-100-C, read from the record's metadata otherwise). A
    mismatching or partial archive is deleted and reported; a verified archive is not fetched again.
    """
    info = corrupted_set_info(dataset)
    folder = Path(root).expanduser() if root is not None else default_root() / f"{dataset}-c"
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / info.archive
    fetch_verified(info.download, archive, info.md5 or _published_md5(info))
    extract_archive(archive, folder)
    return folder


def _published_md5(info: CorruptedSetInfo) -> str:
    import json
    from urllib.request import urlopen

    with urlopen(info.record_api, timeout=60) as response:
        record = json.load(response)
    for entry in record.get("files", []):
        if entry.get("key") == info.archive and str(entry.get("checksum", "")).startswith("md5:"):
            return entry["checksum"][4:]
    raise IOError(f"{info.record_api} lists no md5 checksum for {info.archive}; download it by hand from {info.url} "
                  "and check it there")


def _where_to_get(info: CorruptedSetInfo | None) -> str:
    if info is None:
        return ("Get CIFAR-10-C from https://zenodo.org/records/2535967, CIFAR-100-C from https://zenodo.org/records/3555552 "
                "or Tiny-ImageNet-C from https://zenodo.org/records/2536630 and extract the archive there.")
    return f"Get {info.name} from {info.url} and extract it there (or pass the folder that holds it)."


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")


def _descend(root: Path, info: CorruptedSetInfo | None, marker: str) -> Path:
    """``root`` itself, or its ``CIFAR-10-C``-style subfolder when the archive was extracted into it."""
    if (root / marker).exists():
        return root
    candidates = [info.name] if info is not None else [i.name for i in CORRUPTED_SETS.values()]
    for name in candidates:
        if (root / name / marker).exists():
            return root / name
    return root


def load_cifar_c(root: str | os.PathLike, corruption: str, severity: int, dataset: str | None = None,
                 image_shape: tuple[int, int, int] | None = None) -> ImageSet:
    """One severity of one corruption of CIFAR-10-C / CIFAR-100-C as an :class:`ImageSet`.

    Args:
        root: the folder with ``<corruption>.npy`` and ``labels.npy`` (or its parent, holding
            ``CIFAR-10-C/`` or ``CIFAR-100-C/``).
        corruption: file stem, e.g. ``"gaussian_noise"``.
        severity: 1..5; the .npy holds the 5 severities one after the other (rows
            (severity - 1) * n to severity * n - 1, n = 10000 in the published files).
        dataset: ``"cifar10"`` or ``"cifar100"``, only to say where to get missing files.
        image_shape: expected (C, H, W) of the images, checked when given.

    Returns:
        uint8 images (n, C, H, W) and int64 labels (n,).
    """
    _check_severity(severity)
    info = CORRUPTED_SETS.get(dataset) if dataset else None
    folder = _descend(Path(root).expanduser(), info, "labels.npy")
    images_path, labels_path = folder / f"{corruption}.npy", folder / "labels.npy"
    for path in (images_path, labels_path):
        if not path.is_file():
            what = f"{info.name} " if info else "CIFAR-C "
            raise DatasetNotFoundError(f"{what}file {path.name} not found in {folder}: expected <corruption>.npy files "
                                       f"(5 severities x n images, uint8 (5n, H, W, C)) and labels.npy. {_where_to_get(info)}")
    images = _load_npy(images_path)
    labels = _load_npy(labels_path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{images_path} holds {images.dtype} {images.shape}; a -C file must be uint8 (5n, H, W, C) with C = 1 or 3")
    if len(images) == 0 or len(images) % 5:
        raise ValueError(f"{images_path} holds {len(images)} images; a -C file holds 5 severities of n images each "
                         "(50000 = 5 x 10000 for CIFAR-C), so its length must be a positive multiple of 5. Is it truncated?")
    n = len(images) // 5
    if image_shape is not None and tuple(image_shape) != (images.shape[3], images.shape[1], images.shape[2]):
        raise ValueError(f"{images_path} holds {images.shape[1]}x{images.shape[2]}x{images.shape[3]} images, "
                         f"but the model expects {image_shape[1]}x{image_shape[2]}x{image_shape[0]} (another dataset?)")
    if labels.ndim != 1 or len(labels) not in (n, 5 * n) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_path} holds {labels.dtype} {labels.shape}; expected integer labels of length {5 * n} "
                         f"(one per image of {images_path.name}) or {n} (one per test image)")
    block = slice((severity - 1) * n, severity * n)
    chosen = labels[block] if len(labels) == 5 * n else labels
    pixels = np.array(images[block].transpose(0, 3, 1, 2), order="C")  # copies out of the memory map
    return ImageSet(torch.from_numpy(pixels), torch.from_numpy(np.array(chosen, dtype=np.int64)))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {path} as a .npy array ({err}); the file may be truncated: download it again") from None


def read_wnids(path: str | os.PathLike) -> list[str]:
    """Class ids of Tiny-ImageNet, sorted: class index i is the i-th (riftlab's loader and ImageFolder agree).

    ``path`` is ``wnids.txt`` itself or a folder holding it (directly or in ``tiny-imagenet-200/``).
    """
    p = Path(path).expanduser()
    for candidate in (p, p / "wnids.txt", p / "tiny-imagenet-200" / "wnids.txt"):
        if candidate.is_file():
            return sorted(w for w in candidate.read_text().split() if w)
    raise FileNotFoundError(f"no wnids.txt at {p} (looked for {p}, {p / 'wnids.txt'} and {p / 'tiny-imagenet-200' / 'wnids.txt'})")


def load_tinyimagenet_c(root: str | os.PathLike, corruption: str, severity: int,
                        wnids: Sequence[str] | str | os.PathLike | None = None) -> ImageSet:
    """One severity of one corruption of Tiny-ImageNet-C as an :class:`ImageSet` (64x64 RGB).

    Args:
        root: the folder with ``<corruption>/<severity>/<wnid>/*.JPEG`` (or its parent, holding
            ``Tiny-ImageNet-C/``).
        wnids: the class list, i.e. class index i is ``wnids[i]``: a list of wnids, or the path
            of a ``wnids.txt`` (read sorted, as riftlab's Tiny-ImageNet loader numbers classes).
            None: the sorted class folders found here; pass the training set's ``wnids.txt`` when
            a severity folder may lack some classes.

    Files are read in sorted order within each class; grey JPEGs are converted to RGB.
    """
    _check_severity(severity)
    info = CORRUPTED_SETS["tinyimagenet"]
    folder = _descend(Path(root).expanduser(), info, corruption)
    where = folder / corruption / str(severity)
    if not where.is_dir():
        raise DatasetNotFoundError(f"Tiny-ImageNet-C folder {where} not found: expected <corruption>/<severity 1-5>/<wnid>/*.JPEG "
                                   f"under {folder}. {_where_to_get(info)} Not every published -C set includes the 4 extra "
                                   "corruptions of the reference-18 list; use the standard-15 list if they are missing.")
    classes = sorted(d.name for d in where.iterdir() if d.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{where} has no class folders (<wnid>/*.JPEG); the extraction may be incomplete. {_where_to_get(info)}")
    if wnids is None:
        order = classes
    elif isinstance(wnids, (str, os.PathLike)):
        order = read_wnids(wnids)
    else:
        order = list(wnids)
    index = {w: i for i, w in enumerate(order)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ValueError(f"{where}: class folder(s) {', '.join(unknown[:3])} are not in the class list of {len(order)} wnids "
                         "(is the wnids list for another dataset?)")
    from PIL import Image

    paths, labels = [], []
    for wnid in classes:
        files = sorted(f for f in (where / wnid).iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        paths += files
        labels += [index[wnid]] * len(files)
    if not paths:
        raise DatasetNotFoundError(f"no images under {where}/<wnid>/; the extraction may be incomplete. {_where_to_get(info)}")
    pixels = np.empty((len(paths), 3, info.image_size, info.image_size), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (info.image_size, info.image_size):
                im = im.resize((info.image_size, info.image_size))
            pixels[i] = np.asarray(im).transpose(2, 0, 1)
    return ImageSet(torch.from_numpy(pixels), torch.tensor(labels, dtype=torch.int64))


def load_corrupted(root: str | os.PathLike, corruption: str, severity: int, dataset: str | None = None,
                   layout: str = "auto", wnids: Sequence[str] | str | os.PathLike | None = None,
                   image_shape: tuple[int, int, int] | None = None) -> ImageSet:
    """One (corruption, severity) of a published -C set, whichever its layout.

    ``layout`` is ``"npy"`` (CIFAR-C), ``"jpeg"`` (Tiny-ImageNet-C) or ``"auto"``: the dataset's
    layout when ``dataset`` is given, else npy if the folder holds ``labels.npy``, else jpeg.
    """
    if layout == "auto":
        if dataset is not None:
            layout = corrupted_set_info(dataset).layout
        else:
            root_path = Path(root).expanduser()
            layout = "npy" if (_descend(root_path, None, "labels.npy") / "labels.npy").is_file() else "jpeg"
            if layout == "jpeg" and not root_path.is_dir():
                raise DatasetNotFoundError(f"corrupted test set folder {root_path} does not exist. {_where_to_get(None)}")
    if layout == "npy":
        return load_cifar_c(root, corruption, severity, dataset=dataset, image_shape=image_shape)
    if layout == "jpeg":
        data = load_tinyimagenet_c(root, corruption, severity, wnids=wnids)
        if image_shape is not None and tuple(data.images.shape[1:]) != tuple(image_shape):
            raise ValueError(f"{root}: images are {tuple(data.images.shape[1:])} (C, H, W) but the model expects {tuple(image_shape)}")
        return data
    raise ValueError(f"layout must be 'npy', 'jpeg' or 'auto', got {layout!r}")


def check_corrupted_dir(root: str | os.PathLike, corruptions: Sequence[str], severities: Sequence[int], dataset: str | None = None,
                        layout: str = "auto") -> None:
    """Fail fast, before any evaluation, if a -C folder lacks files for some (corruption, severity);
    the error lists every missing one and says where to get the set."""
    info = corrupted_set_info(dataset) if dataset is not None else None
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetNotFoundError(f"corrupted test set folder {root_path} does not exist. {_where_to_get(info)}")
    if layout == "auto":
        layout = info.layout if info else ("npy" if (_descend(root_path, None, "labels.npy") / "labels.npy").is_file() else "jpeg")
    if layout == "npy":
        folder = _descend(root_path, info, "labels.npy")
        missing = [f"{name}.npy" for name in ("labels", *corruptions) if not (folder / f"{name}.npy").is_file()]
    else:
        folder = _descend(root_path, info, corruptions[0])
        missing = [f"{c}/{s}/" for c in corruptions for s in severities if not (folder / c / str(s)).is_dir()]
    if missing:
        extra = sorted({m.split("/")[0].removesuffix(".npy") for m in missing} & {"speckle_noise", "gaussian_blur", "spatter", "saturate"})
        hint = (f" The extra corruptions {', '.join(extra)} are not part of every published -C set; the standard-15 list avoids them."
                if extra else "")
        listed = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise DatasetNotFoundError(f"{folder} is missing {len(missing)} of the files or folders this evaluation needs: {listed}. {_where_to_get(info)}{hint}")


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class OODResult:
    """Accuracy (percent) on each (corruption, severity), and how it was measured.

    ``table`` has columns corruption, severity, accuracy (one row per pair, in protocol order);
    ``protocol`` is ``standard-15``, ``reference-18`` or ``custom``; ``source`` is
    ``"on-the-fly"`` or the -C folder.
    """

    table: pd.DataFrame
    protocol: str
    severities: tuple[int, ...]
    source: str
    n: int

    @property
    def mean(self) -> float:
        """Mean accuracy over all (corruption, severity) pairs, each weighted equally."""
        return float(self.table["accuracy"].mean())

    @property
    def per_corruption(self) -> pd.Series:
        """Mean accuracy of each corruption over the severities, in protocol order."""
        order = list(dict.fromkeys(self.table["corruption"]))
        return self.table.groupby("corruption", sort=False)["accuracy"].mean().reindex(order)

    @property
    def per_severity(self) -> pd.Series:
        """Mean accuracy at each severity over the corruptions."""
        return self.table.groupby("severity")["accuracy"].mean()

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: protocol, severities, source, mean and the per-corruption /
        per-severity means."""
        return {
            "protocol": self.protocol,
            "severities": list(self.severities),
            "source": self.source,
            "n": self.n,
            "mean": self.mean,
            "per_severity": {int(k): float(v) for k, v in self.per_severity.items()},
            "per_corruption": {str(k): float(v) for k, v in self.per_corruption.items()},
        }


def parse_severities(severities: Sequence[int] | str) -> tuple[int, ...]:
    """Severities as a tuple of distinct integers in 1..5, from a sequence or a string like ``"1,2,3"``."""
    if isinstance(severities, str):
        try:
            severities = [int(s) for s in severities.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"severities must be comma-separated integers from 1 to 5, e.g. 1,2,3; got {severities!r}") from None
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in severities):
        raise ValueError(f"severities must be distinct integers from 1 to 5, got {list(severities)}")
    values = tuple(int(s) for s in severities)
    if not values or any(not 1 <= s <= 5 for s in values) or len(set(values)) != len(values):
        raise ValueError(f"severities must be distinct integers from 1 to 5, got {list(severities)}")
    return values


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def _correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             corruption: str | None, severity: int, seed: int) -> torch.Tensor:
    """Count of correct predictions (a device tensor: no host sync) over uint8 ``images`` on the model's device."""
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].float().div_(255)
        if corruption is not None:
            # Seeded per batch position, so every (corruption, severity) sees the same random draws.
            x = corrupt(x, corruption, severity, seed=seed * 1_000_003 + start)
        correct += (model(x).argmax(1) == labels[start:start + batch_size]).sum()
    return correct


def ood_accuracy(
    model: nn.Module,
    data: ImageSet | None = None,
    corruptions: str | Sequence[str] = "standard",
    severities: Sequence[int] | str = SEVERITIES,
    *,
    c_dir: str | os.PathLike | None = None,
    dataset: str | None = None,
    wnids: Sequence[str] | str | os.PathLike | None = None,
    image_shape: tuple[int, int, int] | None = None,
    max_examples: int | None = None,
    subset_seed: int = 0,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    state: StepState | None = None,
) -> OODResult:
    """Accuracy of ``model`` under each common corruption at each severity.

    Give either ``data`` (a clean split, corrupted on the fly with
    :func:`riftlab.corruptions.corrupt`) or ``c_dir`` (a published -C folder; ``dataset`` names
    it for the layout and error messages, ``wnids`` sets the Tiny-ImageNet-C class order, see
    :func:`load_tinyimagenet_c`; ``image_shape`` (C, H, W), when given, is checked against its images).

    Args:
        model: takes float images in [0, 1] (N, C, H, W); evaluated in eval mode on its own device.
        corruptions: ``"standard"`` (the 15), ``"reference"`` (the reference code's 18), ``"all"``
            or a list of names (see :func:`riftlab.corruptions.resolve_corruptions`).
        severities: which of 1..5 to evaluate, e.g. ``(1,)`` for the reference code's
            Tiny-ImageNet-C convention; a comma-separated string is accepted.
        max_examples: evaluate a random subset of this many images (``ImageSet.subset`` with
            ``subset_seed``; the same images at every pair, since -C files keep the test order).
        batch_size: images per forward pass.
        seed: seed of the on-the-fly corruptions (batch b of every pair uses the same draws).
            The corrupted images depend on the seed, the batch size and the device.
        progress: show a progress bar over the pairs.
        state: receives the finished pairs after each one (:mod:`riftlab.resume`); a call whose
            state holds progress continues from it.

    Returns:
        An :class:`OODResult`: ``table`` (corruption, severity, accuracy in percent), ``mean``,
        ``per_corruption``, ``per_severity``, ``protocol`` and ``summary()``.
    """
    if (data is None) == (c_dir is None):
        raise ValueError("give exactly one source of images: data (a clean split, corrupted on the fly) or c_dir (a published -C folder)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    protocol, names = resolve_corruptions(corruptions)
    levels = parse_severities(severities)
    if c_dir is not None:
        check_corrupted_dir(c_dir, names, levels, dataset)
    device = _model_device(model)
    source = "on-the-fly" if c_dir is None else str(c_dir)
    clean = data.subset(max_examples, seed=subset_seed) if data is not None else None
    if clean is not None and len(clean) == 0:
        raise ValueError("the clean split is empty; nothing to corrupt")
    keeper = ensure_state(state)
    saved = keeper.load() or {}
    done: dict[str, float] = dict(saved.get("accuracy", {}))
    n = int(saved.get("n", len(clean) if clean is not None else 0))
    if clean is not None:
        images, labels = clean.images.to(device), clean.labels.to(device)
    pairs = [(c, s) for c in names for s in levels]
    with eval_mode(model), bar(len(pairs), "corruptions", progress, unit="pair", initial=len(done)) as live:
        for corruption, severity in pairs:
            key = f"{corruption}/{severity}"
            if key in done:
                continue
            if clean is None:
                cset = load_corrupted(c_dir, corruption, severity, dataset=dataset, wnids=wnids, image_shape=image_shape).subset(max_examples, seed=subset_seed)
                images, labels = cset.images.to(device), cset.labels.to(device)
                correct = _correct(model, images, labels, batch_size, None, severity, seed)
            else:
                correct = _correct(model, images, labels, batch_size, corruption, severity, seed)
            n = len(labels)
            done[key] = 100.0 * float(correct) / n
            keeper.save({"accuracy": done, "n": n})
            live.update(1, lambda: {"last": key, "acc": done[key]})
    table = pd.DataFrame([{"corruption": c, "severity": s, "accuracy": done[f"{c}/{s}"]} for c, s in pairs])
    return OODResult(table, protocol, levels, source, n)
