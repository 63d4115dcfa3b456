"""The DAVIS layout (``<root>/JPEGImages/<seq>/NNNNN.jpg``, ``<root>/Annotations/<seq>/NNNNN.png``): the one scanner of
dataset roots, and the one frame order, for training, evaluation, batch inference, int8 calibration, the static-image
stage and packing.

Frames and sequences are in natural order (`readers.natural_key`: ``2.jpg`` before ``10.jpg``), the order a frame
folder is read in by `readers.open_video`, so a sequence's frames are the same frames in the same order whether
training, evaluation or inference reads them. The dataset name is the root's folder name, so sequences are keyed
``"<dataset>/<sequence>"`` in a split file (``configs/splits.json``); sequences it does not list count as ``train``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from scripts.errors import InputError
from scripts.readers import FRAME_SUFFIXES, natural_key

DEFAULT_SPLIT_FILE = Path(__file__).resolve().parents[1] / "configs" / "splits.json"
SPLITS = ("train", "val")


@dataclass
class Sequence:
    """One annotated video: frame paths in temporal order and the label map path of each frame."""

    dataset: str
    name: str
    frames: list[Path]
    masks: list[Path]

    @property
    def key(self) -> str:
        """The sequence's key in the split file."""
        return f"{self.dataset}/{self.name}"


def load_split(path: str | Path) -> dict[str, str]:
    """Read a split file mapping ``"<dataset>/<sequence>"`` to ``train`` or ``val``."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read split file ({e})") from e
    if not isinstance(split, dict):
        raise InputError(f"{path}: split file must be a JSON object mapping '<dataset>/<sequence>' to train|val")
    bad = {k: v for k, v in split.items() if "/" not in k or v not in SPLITS}
    if bad:
        raise InputError(f"{path}: entries must map '<dataset>/<sequence>' to one of {SPLITS}, got {bad}")
    return split


def sequence_folders(images: Path) -> list[Path]:
    """The sequence folders of a root's ``JPEGImages/``, in natural order."""
    return sorted((p for p in images.iterdir() if p.is_dir()), key=natural_key)


def frame_files(folder: Path) -> list[Path]:
    """A sequence's frame images, in natural order (the order `readers.open_video` reads the folder in)."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=natural_key)


def annotation_files(folder: Path) -> list[Path]:
    """A sequence's PNG label maps under ``Annotations/<seq>/``, in natural order (none when the folder is absent)."""
    return sorted(folder.glob("*.png"), key=natural_key)


def check_layout(root: str | Path) -> None:
    """Refuse a root without ``JPEGImages/`` and ``Annotations/`` (one line naming the missing folder)."""
    for folder in (Path(root) / "JPEGImages", Path(root) / "Annotations"):
        if not folder.is_dir():
            raise InputError(f"{folder}: missing; a data root needs JPEGImages/ and Annotations/ (DAVIS layout)")


def check_roots(roots: str | Path | Iterable[str | Path]) -> None:
    """`check_layout` on every root of a ``--dataset_dir`` value, so a job refuses a wrong root before it writes
    anything (training would otherwise generate its synthetic echo set first)."""
    if isinstance(roots, (str, Path)):
        roots = [roots]
    for root in (r.strip() for root in roots for r in str(root).split(",") if r.strip()):
        check_layout(root)


def scan_root(root: Path) -> list[Sequence]:
    """List the sequences of one DAVIS root, checking that every frame has its label map."""
    check_layout(root)
    images, annotations = root / "JPEGImages", root / "Annotations"
    sequences = []
    for seq_dir in sequence_folders(images):
        frames = frame_files(seq_dir)
        if not frames:
            raise InputError(f"{seq_dir}: sequence has no frames ({'/'.join(FRAME_SUFFIXES)})")
        masks = [annotations / seq_dir.name / f"{f.stem}.png" for f in frames]
        for frame, mask in zip(frames, masks):
            if not mask.is_file():
                raise InputError(f"{mask}: label map missing for frame {frame}")
        sequences.append(Sequence(root.name, seq_dir.name, frames, masks))
    if not sequences:
        raise InputError(f"{images}: no sequence folders")
    return sequences


def list_sequences(
    roots: str | Path | Iterable[str | Path], split: str | None = None, split_file: str | Path | None = None
) -> list[Sequence]:
    """List the sequences under one or more DAVIS roots, optionally only those of one split.

    ``roots`` may hold comma-separated strings (handy in configs). With ``split`` set, ``split_file`` defaults to the
    bundle's ``configs/splits.json``; sequences it does not list count as ``train``.
    """
    if isinstance(roots, (str, Path)):
        roots = [roots]
    roots = [r.strip() for root in roots for r in str(root).split(",") if r.strip()]
    sequences = [s for root in roots for s in scan_root(Path(root))]
    if split is None:
        return sequences
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    assignment = load_split(split_file or DEFAULT_SPLIT_FILE)
    return [s for s in sequences if assignment.get(s.key, "train") == split]
