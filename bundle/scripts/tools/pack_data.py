"""Shrink data roots: short side down to ``--short-side``, frames re-encoded as JPEG.

Two layouts: DAVIS roots (``JPEGImages/<seq>/``, ``Annotations/<seq>/``) and image/mask folders (``images/<id>.jpg``,
``masks/<id>.png``, e.g. Kvasir-SEG for the static-image stage); the packed copy keeps the layout.

Why: a copy of the training data has to travel to a lent GPU machine inside a 64 MiB working tree, and smaller
frames also decode faster in the clip loader. Training crops are drawn relative to the short side
(``data.RandResizedCropd``), so the crops a packed root gives cover the same fraction of the scene as the original's.
Label maps are resized with nearest neighbour and kept as PNG. Frames already at or under the size are only
re-encoded. An existing output root must not hold ``JPEGImages/``, ``Annotations/`` or ``meta.json`` yet (nothing
is overwritten).

    python -m scripts.tools.pack_data ../shared/data/vocalfolds packed/vocalfolds --short-side 320 --quality 85
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from scripts.davis import list_sequences
from scripts.errors import InputError
from scripts.inferer import short_side_shape
from scripts.staging import staged_output
from scripts.static_clips import list_static_images


def _shrink(frame: Path, mask: Path, short_side: int) -> tuple[Image.Image, Image.Image]:
    """The frame (RGB, bilinear) and its label map (nearest neighbour) with the short side at most ``short_side``."""
    with Image.open(frame) as im:
        image = im.convert("RGB")
    with Image.open(mask) as im:
        label = im.copy()
    if min(image.size) > short_side:
        h, w = short_side_shape(image.height, image.width, short_side)
        image = image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
        label = label.resize((w, h), Image.Resampling.NEAREST)
    return image, label


def pack_images(source: Path, target: Path, short_side: int, quality: int) -> int:
    """Pack an image/mask folder (``images/``, ``masks/``) as ``pack`` packs a DAVIS root; returns the image count."""
    stills = list_static_images(str(source), part="all")
    with staged_output(target, ("images", "masks")) as staging:
        for kind in ("images", "masks"):
            (staging / kind).mkdir()
        for still in stills:
            image, label = _shrink(still.image, still.mask, short_side)
            image.save(staging / "images" / f"{still.image.stem}.jpg", quality=quality)
            label.save(staging / "masks" / f"{still.mask.stem}.png", optimize=True)
    return len(stills)


def pack(source: Path, target: Path, short_side: int, quality: int) -> int:
    """Write the packed copy of ``source`` to ``target``; returns the number of frames."""
    if (source / "images").is_dir() and (source / "masks").is_dir():
        return pack_images(source, target, short_side, quality)
    count, meta = 0, (source / "meta.json").is_file()
    with staged_output(target, ("JPEGImages", "Annotations") + (("meta.json",) if meta else ())) as staging:
        for seq in list_sequences(source):
            for kind in ("JPEGImages", "Annotations"):
                (staging / kind / seq.name).mkdir(parents=True)
            for frame, mask in zip(seq.frames, seq.masks):
                image, label = _shrink(frame, mask, short_side)
                image.save(staging / "JPEGImages" / seq.name / f"{frame.stem}.jpg", quality=quality)
                label.save(staging / "Annotations" / seq.name / f"{mask.stem}.png", optimize=True)
                count += 1
        if meta:
            shutil.copy2(source / "meta.json", staging / "meta.json")
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="DAVIS root (JPEGImages/, Annotations/) or image/mask folder")
    parser.add_argument(
        "target", type=Path, help="output root (absent, or without JPEGImages/, Annotations/, meta.json)"
    )
    parser.add_argument("--short-side", type=int, default=320)
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality, 1-95")
    args = parser.parse_args(argv)
    if args.short_side < 16 or not 1 <= args.quality <= 95:
        parser.error("--short-side must be >= 16 and --quality in 1..95")
    try:
        count = pack(args.source, args.target, args.short_side, args.quality)
    except InputError as e:
        raise SystemExit(f"error: {e}") from e
    print(f"{args.target}: {count} frames")


if __name__ == "__main__":
    main()
