"""Unseen-object clips: synthetic-motion clips made from the held-out stills of image/mask folders, written in the
DAVIS layout, so that ``evaluate.json`` scores a model on objects and scenes no training stage has seen.

Why: the val split holds other sequences of the training datasets, so it cannot show how a model does on a new
hospital's polyps. Kvasir-SEG is such a hospital; the static stage trains on its stills except one in five
(``static_clips.held_out``), and those become these clips. Each clip is one still moved by the static stage's own
transforms (``pretrain_static.json``: crop, per-frame affine and elastic deformation, photometric changes, and
copy-paste objects from other held-out stills that travel, leave the crop and come back), so the motion is
synthetic: the clips measure following an unseen object through large jumps, not real video. Clip ``i`` depends
only on ``--seed`` and ``i``, so the same command writes the same clips on every machine.

    python -m scripts.tools.heldout_clips ../shared/data/kvasir_seg heldout/kvasir_seg --clips 60 --frames 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser
from PIL import Image

from scripts.errors import InputError
from scripts.flags import as_bool
from scripts.staging import staged_output
from scripts.static_clips import HELD_OUT_EVERY, StaticClipDataset, list_static_images

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def heldout_dataset(
    image_dirs: str, clips: int, frames: int, size: int, max_objects: int, seed: int
) -> StaticClipDataset:
    """The clips as a `StaticClipDataset` over the held-out stills, with the transforms `pretrain_static.json`
    declares (read from the config, so the two stages cannot drift apart) at crop size ``size``."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "pretrain_static.json")])
    parser["crop_size"] = size
    return StaticClipDataset(
        list_static_images(image_dirs, part="heldout"),
        parser.get_parsed_content("train#clip_transforms"),
        parser.get_parsed_content("train#frame_transforms"),
        num_frames=frames,
        crop_size=size,
        max_objects=max_objects,
        samples_per_epoch=clips,
        paste_prob=parser["paste_prob"],
        load_size=max(size, parser["static_load_size"]),
        seed=seed,
    )


def write_heldout_clips(
    image_dirs: str,
    target: str | Path,
    clips: int = 60,
    frames: int = 20,
    size: int = 320,
    max_objects: int = 2,
    seed: int = 0,
    overwrite: bool = False,
) -> int:
    """Write ``clips`` clips of ``frames`` frames (``size``² JPEG frames, uint8 PNG label maps, every frame
    annotated) and a ``meta.json`` under ``target``; nothing is written unless all of it is, and earlier clips there
    are replaced only with ``overwrite``. Returns the frame count."""
    dataset = heldout_dataset(image_dirs, clips, frames, size, max_objects, seed)
    meta = {
        "dataset": "heldout_clips",
        "modality": "synthetic motion over held-out still images",
        "synthetic": True,
        "classes": {"0": "background", **{str(k): f"object {k}" for k in range(1, max_objects + 1)}},
        "source": f"scripts.tools.heldout_clips over {image_dirs}: one still in {HELD_OUT_EVERY} (held out of "
        "training)",
        "settings": {"clips": clips, "frames": frames, "size": size, "max_objects": max_objects, "seed": seed},
    }
    with staged_output(target, ("JPEGImages", "Annotations", "meta.json"), overwrite) as staging:
        for i in range(clips):
            item = dataset[i]
            name = f"clip{i:03d}"
            for kind in ("JPEGImages", "Annotations"):
                (staging / kind / name).mkdir(parents=True)
            images = (item["image"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # T×H×W×3
            labels = item["label"][:, 0].numpy().astype(np.uint8)  # objects 1..K, already remapped
            for t in range(frames):
                Image.fromarray(images[t]).save(staging / "JPEGImages" / name / f"{t:05d}.jpg", quality=95)
                Image.fromarray(labels[t]).save(staging / "Annotations" / name / f"{t:05d}.png")
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    return clips * frames


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image_dirs", help="image/mask folders (images/<id>.jpg, masks/<id>.png), comma-separated")
    parser.add_argument(
        "target", type=Path, help="output root (absent, or without JPEGImages/, Annotations/, meta.json)"
    )
    parser.add_argument("--clips", type=int, default=60)
    parser.add_argument("--frames", type=int, default=20, help="frames per clip (>= 2)")
    parser.add_argument("--size", type=int, default=320, help="frame side in pixels (>= 32)")
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(  # `--overwrite` or `--overwrite true`, as the bundle's jobs and their error messages spell it
        "--overwrite", type=as_bool, nargs="?", const=True, default=False, help="replace clips written there before"
    )
    args = parser.parse_args(argv)
    if args.clips < 1 or args.frames < 2 or args.size < 32 or not 1 <= args.max_objects <= 255:
        parser.error("--clips must be >= 1, --frames >= 2, --size >= 32 and --max-objects in 1..255")
    try:
        count = write_heldout_clips(
            args.image_dirs,
            args.target,
            args.clips,
            args.frames,
            args.size,
            args.max_objects,
            args.seed,
            args.overwrite,
        )
    except InputError as e:
        raise SystemExit(f"error: {e}") from e
    print(f"{args.target}: {args.clips} clips, {count} frames")


if __name__ == "__main__":
    main()
