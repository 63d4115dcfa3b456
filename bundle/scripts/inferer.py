"""The propagation inferer: annotated frames in, one label map per frame out, with bounded memory.

One core loop (`PropagationInferer.steps`) serves inference, evaluation and training-time validation: frames are
fetched one at a time through a callable, so a streaming `VideoSource` is never held in memory whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from tqdm import tqdm

from scripts.data import short_side_shape
from scripts.memory import MemoryBank
from scripts.network import TCMN

# Trained affinities produce denormal floats that are very slow on x86 CPUs; flushing them costs no accuracy here.
torch.set_flush_denormal(True)


def _unwrap(network: torch.nn.Module) -> TCMN:
    """The TCMN inside DistributedDataParallel or a training wrapper."""
    while not isinstance(network, TCMN) and hasattr(network, "module"):
        network = network.module
    return network


class PropagationInferer(Inferer):
    """Propagate annotated frames' labels forward to the end and backward to frame 0.

    Every non-zero label is an object; objects are segmented together with soft aggregation. Annotated frames are
    pinned in memory and their labels win on that frame; a new memory frame is written every `mem_every` frames
    and at most `mem_size` are kept (oldest evicted), so memory stays flat whatever the video length.
    `size` (short side in pixels, optional) resizes frames for the network and resizes logits back.
    """

    def __init__(
        self,
        mem_every: int = 5,
        mem_size: int = 8,
        top_k: int | None = 30,
        size: int | None = None,
        device: str | torch.device = "cpu",
        amp: bool = True,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if mem_every < 1:
            raise ValueError(f"mem_every must be >= 1, got {mem_every}")
        self.mem_every = mem_every
        self.mem_size = mem_size
        self.top_k = top_k
        self.size = size
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.progress = progress

    def _prepare(self, frame: torch.Tensor) -> torch.Tensor:
        """1×3×H×W in [0, 1] → on device, resized to `size` on the short side, channels_last."""
        frame = frame.to(self.device, non_blocking=True)
        if self.size is not None:
            shape = short_side_shape(*frame.shape[-2:], self.size)
            frame = F.interpolate(frame, size=shape, mode="bilinear", antialias=True)
        return frame.contiguous(memory_format=torch.channels_last)

    def steps(
        self,
        network: torch.nn.Module,
        get_frame: Callable[[int], torch.Tensor],
        num_frames: int,
        annotations: Mapping[int, torch.Tensor],
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (t, probabilities (K+1)×H×W) for every frame once: forward from the first annotated frame, then back.

        get_frame(t) gives 1×3×H×W in [0, 1]; annotations map frame index → H×W one-hot-able label tensor with
        objects already numbered 1..K (K = the largest label over all annotations).

        Inference mode and autocast are entered around each step only: a `with` block spanning the yields would leave
        them switched on in the caller's code between frames, and for good if the caller stops iterating early.
        """
        inner = self._steps(network, get_frame, num_frames, annotations)
        try:
            while True:
                amp = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
                with torch.inference_mode(), amp:
                    try:
                        item = next(inner)
                    except StopIteration:
                        return
                yield item
        finally:
            inner.close()

    def _steps(
        self,
        network: torch.nn.Module,
        get_frame: Callable[[int], torch.Tensor],
        num_frames: int,
        annotations: Mapping[int, torch.Tensor],
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The propagation loop of `steps`, run by it under inference mode (and autocast) one step at a time."""
        net = _unwrap(network)
        num_objects = int(max(int(a.max()) for a in annotations.values()))
        memory = MemoryBank(self.mem_size, self.top_k)
        order = sorted(annotations)
        for t in order:
            if not 0 <= t < num_frames:
                raise IndexError(f"annotated frame {t} is outside the video's {num_frames} frames")
        one_hot = {}
        for t in order:
            frame = self._prepare(get_frame(t))
            onehot = F.one_hot(annotations[t].long().to(self.device), num_objects + 1).permute(2, 0, 1).float()
            one_hot[t] = onehot
            small = F.interpolate(onehot[None, 1:], size=frame.shape[-2:], mode="bilinear")
            key, f16, _, _ = net.encode_key(frame)
            memory.write(key, net.encode_value(frame, f16, small), pinned=True)
        passes = [range(order[0], num_frames), range(order[0] - 1, -1, -1)]
        bar = tqdm(total=num_frames, disable=not self.progress, desc="propagating", unit="frame")
        try:
            for frames in passes:
                memory.working.clear()
                since_write = 0
                for t in frames:
                    bar.update(1)
                    if t in one_hot:
                        since_write = 0
                        yield t, one_hot[t]
                        continue
                    raw = get_frame(t)
                    frame = self._prepare(raw)
                    key, f16, f8, f4 = net.encode_key(frame)
                    logits = net.decode(memory.read(key), f16, f8, f4, tuple(frame.shape[-2:]))
                    prob = torch.softmax(logits.float(), dim=1)
                    since_write += 1
                    if since_write >= self.mem_every:
                        memory.write(key, net.encode_value(frame, f16, prob[:, 1:]))
                        since_write = 0
                    if prob.shape[-2:] != raw.shape[-2:]:
                        prob = F.interpolate(prob, size=raw.shape[-2:], mode="bilinear")
                    yield t, prob[0]
        finally:
            bar.close()

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        """inputs B×4×T×H×W (RGB in [0, 1] and frame 0's label map) → probabilities B×(L+1)×T×H×W, L the max label.

        Used by validation on short in-memory clips; channel c holds label c, so argmax gives label values.
        """
        outputs = []
        for clip in inputs:
            labels = clip[3, 0].round().long()
            num_labels = int(labels.max())
            out = torch.zeros(num_labels + 1, *clip.shape[1:], device=inputs.device)
            for t, prob in self.steps(network, lambda i: clip[None, :3, i], clip.shape[1], {0: labels}):
                out[:, t] = prob.to(out.device)
            outputs.append(out)
        return torch.stack(outputs)

    def propagate(
        self, network: torch.nn.Module, source, annotations: Mapping[int, np.ndarray]
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Stream (t, label map H×W uint8 with the annotation's label values) over a `VideoSource`."""
        values = np.unique(np.concatenate([np.unique(a) for a in annotations.values()]))
        values = values[values > 0]
        lut = np.zeros(256, dtype=np.int64)
        lut[values] = np.arange(1, len(values) + 1)
        to_values = np.concatenate([[0], values]).astype(np.uint8)
        dense = {t: torch.from_numpy(lut[a]) for t, a in annotations.items()}

        def get_frame(t: int) -> torch.Tensor:
            # readers may hand out read-only arrays (PIL, caches); torch warns on those, so copy only then
            frame = np.require(source[t], np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])
            return torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255

        for t, prob in self.steps(network, get_frame, len(source), dense):
            yield t, to_values[prob.argmax(0).cpu().numpy()]


class ModelPropagator:
    """The model bound to an inferer, with the propagator interface shared with the baselines."""

    def __init__(self, network: torch.nn.Module, inferer: PropagationInferer) -> None:
        self.network = network.to(inferer.device, memory_format=torch.channels_last).eval()
        self.inferer = inferer

    def propagate(self, source, annotations: Mapping[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        return self.inferer.propagate(self.network, source, annotations)
