"""Draw label maps on frames in the DAVIS palette and write them as MP4/AVI or GIF videos.

The palette is the one colour code of the project: overlays use it, and colour masks are read through it
(``scripts.annotations``). MP4/AVI are lossy: a clip written by ``write_video`` reads back within
``VIDEO_ROUND_TRIP_MAE`` (mean absolute error in grey levels) on smooth content.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from monai.utils import optional_import
from PIL import GifImagePlugin, Image

from scripts.readers import VIDEO_SUFFIXES, VideoSource, path_suffix

# PyAV (video) is a dependency, but imported lazily (as in scripts.readers): training never writes a video, so a GPU
# host without its wheel still runs it; writing an MP4/AVI there fails with MONAI's OptionalImportError naming it.
av, _ = optional_import("av")

VIDEO_ROUND_TRIP_MAE = 6.0


def _davis_palette() -> np.ndarray:
    """The PASCAL VOC / DAVIS colour of each label (bit-interleaved), so overlays match the usual tools."""
    palette = np.zeros((256, 3), np.uint8)
    for label in range(256):
        value = label
        for bit in range(8):
            for channel in range(3):
                palette[label, channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
    return palette


PALETTE = _davis_palette()


def overlay(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Frame with each object tinted in its palette colour and its contour drawn opaque."""
    colours = PALETTE[labels]
    inside = labels > 0
    out = frame.copy()
    out[inside] = (frame[inside] * (1 - alpha) + colours[inside] * alpha).astype(np.uint8)
    edge = np.zeros_like(inside)
    dx, dy = labels[:, 1:] != labels[:, :-1], labels[1:] != labels[:-1]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:] |= dy
    edge[:-1] |= dy
    edge &= inside
    out[edge] = colours[edge]
    return out


def _encoder(suffix: str) -> str:
    if suffix == ".mp4":
        try:
            return av.Codec("libx264", "w").name
        except av.codec.codec.UnknownCodecError:
            pass
    return "mpeg4"


def write_video(
    path: str | Path, frames: Iterable[np.ndarray], fps: float, keyframe_interval: int | None = None
) -> Path:
    """Stream ``H×W×3`` uint8 frames into an MP4 (H.264, else MPEG-4) or AVI (MPEG-4) file, yuv420p.

    Odd sizes are padded by one row/column (yuv420p needs even ones). MP4 puts its index first (faststart). A
    keyframe every ``keyframe_interval`` frames (default: every second) keeps seeking cheap.
    """
    path = Path(path)
    suffix = path_suffix(path)
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: video output must be one of {VIDEO_SUFFIXES}")
    options = {"movflags": "faststart"} if suffix == ".mp4" else {}
    with av.open(str(path), "w", options=options) as container:
        stream = None
        for frame in frames:
            if stream is None:
                height, width = frame.shape[0] + frame.shape[0] % 2, frame.shape[1] + frame.shape[1] % 2
                stream = container.add_stream(_encoder(suffix), rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.codec_context.gop_size = keyframe_interval or max(1, round(fps))
                if stream.codec_context.name == "libx264":
                    stream.options = {"crf": "17"}
                else:
                    stream.bit_rate = int(width * height * fps)
            pad = ((0, height - frame.shape[0]), (0, width - frame.shape[1]), (0, 0))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.pad(frame, pad, mode="edge"), format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frame to write")
        for packet in stream.encode():
            container.mux(packet)
    return path


def _write_gif(path: Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Stream frames into a looping GIF with one palette (from the first frame), one frame at a time: Pillow's
    ``save_all`` would keep every frame in memory."""
    duration = max(20, round(1000 / fps))
    with open(path, "wb") as fp:
        palette = None
        for frame in frames:
            image = Image.fromarray(frame)
            if palette is None:
                palette = image.quantize(256, dither=Image.Dither.NONE)
                for chunk in GifImagePlugin.getheader(palette, info={"loop": 0})[0]:
                    fp.write(chunk)
            indexed = image.quantize(palette=palette, dither=Image.Dither.NONE)
            for chunk in GifImagePlugin.getdata(indexed, duration=duration, disposal=1):
                fp.write(chunk)
        if palette is None:
            raise ValueError(f"{path}: no frame to write")
        fp.write(b";")
    return path


def write_overlay(
    path: str | Path,
    source: VideoSource,
    labels: Callable[[int], np.ndarray] | Sequence[np.ndarray],
    fps: float | None = None,
) -> Path:
    """Write the video with its label maps overlaid, frame by frame, as MP4 or GIF (by suffix).

    ``labels`` is ``t -> H×W`` label map or anything indexable by frame; ``fps`` defaults to the source's (or 10).
    """
    path = Path(path)
    label_of = labels if callable(labels) else labels.__getitem__
    frames = (overlay(frame, np.asarray(label_of(t), np.uint8)) for t, frame in enumerate(source))
    fps = fps or source.info.fps or 10.0
    if path_suffix(path) == ".gif":
        return _write_gif(path, frames, fps)
    if path_suffix(path) == ".mp4":
        return write_video(path, frames, fps)
    raise ValueError(f"{path}: overlay output must be .mp4 or .gif")
