"""Training augmentation for how a video was stored: lossy codecs, JPEG series and monochrome exports.

Clinics export AVI (MPEG-4 part 2), low-bitrate MP4 (H.264), JPEG series and greyscale endoscopy or ultrasound. The
frames of such files decode close to the originals on average, but with block and ringing artefacts a network trained
on clean JPEG frames has never seen, so it loses the object on them. These transforms store a whole training clip the
way a clinic would and decode it back, so the artefacts (including those that a codec's predicted frames carry from one
frame to the next) are in training. MONAI has no codec or greyscale transform; the codecs are the real ones (PyAV's
FFmpeg encoders, Pillow's JPEG), not imitations.

Both transforms take the clip as ``image``: T×3×H×W or stacked 3T×H×W (``data.clip_transforms``), values in [0, 1],
and return it in the same shape. Labels are untouched.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Mapping, Sequence

import av
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor
from PIL import Image

__all__ = ["RandCompressiond", "RandGrayscaled"]

# ITU-R BT.601 luma, the weights video codecs and Pillow's "L" mode use
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _frames(image: torch.Tensor) -> torch.Tensor:
    """T×3×H×W view of a clip given as T×3×H×W or 3T×H×W."""
    return image.reshape(-1, 3, *image.shape[-2:])


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """T×3×H×W float in [0, 1] → T×H×W×3 uint8."""
    return frames.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()


def _from_uint8(array: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """T×H×W×3 uint8 → T×3×H×W float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(array))).permute(0, 3, 1, 2).float().div_(255)


def jpeg_round_trip(frames: np.ndarray, quality: int) -> np.ndarray:
    """Each H×W×3 uint8 frame saved as a JPEG of ``quality`` and decoded back (a JPEG series export)."""
    out = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        with Image.open(buffer) as im:
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def video_round_trip(frames: np.ndarray, codec: str, bit_rate: int, fps: int = 25) -> np.ndarray:
    """The frames (T×H×W×3 uint8, H and W even) encoded as one video with ``codec`` at ``bit_rate`` bits/s and decoded
    back: ``mpeg4`` in AVI (MPEG-4 part 2, what OpenCV and many capture cards write), ``libx264`` in MP4."""
    container_format = "avi" if codec == "mpeg4" else "mp4"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = int(bit_rate)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    buffer.seek(0)
    with av.open(buffer, "r") as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if len(decoded) != len(frames):
        raise RuntimeError(f"{codec} round trip gave {len(decoded)} frames for {len(frames)}")
    return np.stack(decoded)


class RandCompressiond(RandomizableTransform, MapTransform):
    """Store the clip lossily and decode it back, with probability ``prob``: one of ``codecs`` drawn per clip —
    ``jpeg`` (quality drawn from ``jpeg_quality``), ``mpeg4`` (AVI) or ``libx264`` (MP4) at a bit rate drawn
    log-uniformly from ``bit_rate`` (bits per second at 25 frames/s, for the clip's own frame size).

    Odd frame sizes are padded by one edge pixel for the video codecs (4:2:0 chroma needs even sizes) and cropped
    back.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        codecs: Sequence[str] = ("jpeg", "mpeg4", "libx264"),
        jpeg_quality: tuple[int, int] = (30, 90),
        bit_rate: tuple[float, float] = (100e3, 800e3),
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        unknown = [c for c in codecs if c != "jpeg" and c not in av.codecs_available]
        if not codecs or unknown:
            raise ValueError(f"codecs must be 'jpeg' or PyAV encoders available here, got {list(codecs)}")
        self.codecs, self.jpeg_quality, self.bit_rate = list(codecs), jpeg_quality, bit_rate
        self.codec, self.quality, self.rate = self.codecs[0], jpeg_quality[0], bit_rate[0]

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self.codec = self.codecs[self.R.randint(len(self.codecs))]
        self.quality = int(self.R.randint(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
        self.rate = float(np.exp(self.R.uniform(np.log(self.bit_rate[0]), np.log(self.bit_rate[1]))))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=False).float()
            frames = _to_uint8(_frames(image))
            if self.codec == "jpeg":
                stored = jpeg_round_trip(frames, self.quality)
            else:
                h, w = frames.shape[1:3]
                padded = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                stored = video_round_trip(padded, self.codec, int(self.rate))[:, :h, :w]
            d[key] = _from_uint8(stored).reshape(image.shape)
        return d


class RandGrayscaled(RandomizableTransform, MapTransform):
    """Replace every frame of the clip by its luma in all three channels, with probability ``prob`` (monochrome
    endoscopy and ultrasound reach the network as grey RGB)."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=False).float()
            frames = _frames(image)
            grey = torch.einsum("c,tchw->thw", _LUMA, frames)[:, None].expand_as(frames)
            d[key] = grey.reshape(image.shape).contiguous()
        return d
