"""The propagation core: a per-video state that segments one frame per `step`, and a two-way `propagate` over it.

`PropagationState` holds one video's memory bank and write schedule (as Cutie's `InferenceCore`); callers run the
loop. `PropagationInferer.propagate` is that loop for a whole video, forward from the first annotated frame and then
backward, fetching frames one at a time so a streaming video is never held whole; it serves inference, evaluation
(`ModelPropagator`) and training-time validation (`__call__`, MONAI's `Inferer` interface). The memory bank is made by
the `memory` factory the config declares, so the eviction rule is the bank's business, not the loop's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from tqdm import tqdm

from scripts.memory import MemoryBank
from scripts.network import TCMN

logger = logging.getLogger(__name__)
KEY_STRIDE = 16


def short_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) scaled so the short side equals ``size``, aspect ratio kept (training, validation and inference)."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def available_memory(device: torch.device) -> int:
    """Bytes the propagation may still use: free CUDA memory, or the host's MemAvailable (Linux; else free pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def unwrap(network: torch.nn.Module) -> TCMN:
    """The TCMN inside DistributedDataParallel or a training wrapper."""
    while not isinstance(network, TCMN) and hasattr(network, "module"):
        network = network.module
    return network


class PropagationState:
    """One video's propagation: the network, its memory bank (`bank`) and the memory write schedule.

    Annotated frames are `pin`ned first (never evicted; corrections later in the video then guide earlier frames
    too). `step` gives one frame's probabilities (K+1)×H×W, channel k for object k; frames are 1×3×H×W in [0, 1] and
    label maps H×W with objects numbered 1..`num_objects`. Every `mem_every`-th segmented frame since the last memory
    frame is written to working memory. `size` (short side, optional) resizes frames for the network and the
    probabilities back. Each call runs under inference mode (and CUDA autocast with `amp`), entered and left inside
    the call, so the caller's own code between steps keeps autograd.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        bank: MemoryBank,
        num_objects: int,
        mem_every: int = 5,
        size: int | None = None,
        device: str | torch.device = "cpu",
        amp: bool = False,
    ) -> None:
        if mem_every < 1:
            raise ValueError(f"mem_every must be >= 1, got {mem_every}")
        self.net = unwrap(network)
        self.bank = bank
        self.num_objects = num_objects
        self.mem_every = mem_every
        self.size = size
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.since_write = 0

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        amp = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            yield

    def _prepare(self, frame: torch.Tensor) -> torch.Tensor:
        """1×3×H×W in [0, 1] → on device, resized to `size` on the short side, channels_last."""
        frame = frame.to(self.device, non_blocking=True)
        if self.size is not None:
            frame = F.interpolate(
                frame, size=short_side_shape(*frame.shape[-2:], self.size), mode="bilinear", antialias=True
            )
        return frame.contiguous(memory_format=torch.channels_last)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """Label map H×W (0..K) → probabilities (K+1)×H×W."""
        return F.one_hot(labels.long().to(self.device), self.num_objects + 1).permute(2, 0, 1).float()

    def pin(self, frame: torch.Tensor, labels: torch.Tensor) -> None:
        """Write an annotated frame into the pinned memory."""
        with self._context():
            frame = self._prepare(frame)
            masks = F.interpolate(self.one_hot(labels)[None, 1:], size=frame.shape[-2:], mode="bilinear")
            key, f16, _, _ = self.net.encode_key(frame)
            self.bank.write(key, self.net.encode_value(frame, f16, masks), pinned=True)

    def new_pass(self) -> None:
        """Start a propagation pass (another direction): working memory cleared, write schedule restarted."""
        self.bank.clear_working()
        self.since_write = 0

    def step(self, frame: torch.Tensor | None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities (K+1)×H×W of the next frame of the pass.

        Without `labels` the frame is segmented from memory. With `labels` (an annotated frame, pinned beforehand)
        they are the result and `frame` is not needed; the frame counts as a memory frame for the write schedule.
        """
        if labels is not None:
            self.since_write = 0
            return self.one_hot(labels)
        with self._context():
            prepared = self._prepare(frame)
            key, f16, f8, f4 = self.net.encode_key(prepared)
            logits = self.net.decode(self.bank.read(key), f16, f8, f4, tuple(prepared.shape[-2:]))
            prob = torch.softmax(logits.float(), dim=1)
            self.since_write += 1
            if self.since_write >= self.mem_every:
                self.bank.write(key, self.net.encode_value(prepared, f16, prob[:, 1:]))
                self.since_write = 0
            if prob.shape[-2:] != frame.shape[-2:]:
                prob = F.interpolate(prob, size=frame.shape[-2:], mode="bilinear")
            return prob[0]


class PropagationInferer(Inferer):
    """Propagate annotated frames' labels forward to the end and backward to frame 0, with bounded memory.

    Every non-zero label is an object; objects are segmented together with soft aggregation. `memory` is a factory
    (the config declares it with `"_mode_": "callable"`) of one empty `MemoryBank` per video, the `bank` of its
    `PropagationState`; see `PropagationState` for `mem_every`, `size` and `amp`. `adapt` (optional,
    `adapt.TestTimeAdaptation`) is called at the start of each video with the network, the annotated frames and their
    labels, and gives the network to propagate that video with.
    """

    def __init__(
        self,
        memory: Callable[[], MemoryBank] = MemoryBank,
        mem_every: int = 5,
        size: int | None = None,
        device: str | torch.device = "cpu",
        amp: bool = True,
        progress: bool = False,
        adapt: (
            Callable[[torch.nn.Module, Mapping[int, torch.Tensor], Mapping[int, torch.Tensor]], torch.nn.Module] | None
        ) = None,
    ) -> None:
        super().__init__()
        if mem_every < 1:
            raise ValueError(f"mem_every must be >= 1, got {mem_every}")
        self.memory = memory
        self.mem_every = mem_every
        self.size = size
        self.device = torch.device(device)
        self.amp = amp
        self.progress = progress
        self.adapt = adapt

    def start(self, network: torch.nn.Module, num_objects: int, size: int | None = None) -> PropagationState:
        """A fresh propagation state, with an empty memory bank, for one video (`size` overrides the inferer's)."""
        size = self.size if size is None else size
        return PropagationState(network, self.memory(), num_objects, self.mem_every, size, self.device, self.amp)

    def read_bytes(self, height: int, width: int, pinned: int, size: int | None = None) -> int:
        """Peak bytes of one memory read for H×W frames run at short side `size` (None: native) with `pinned`
        annotated frames and a full working memory: every memory position meets every query position."""
        h, w = short_side_shape(height, width, size) if size else (height, width)
        return self.probe_bank.read_bytes(math.ceil(h / KEY_STRIDE) * math.ceil(w / KEY_STRIDE), pinned)

    def capacity(self) -> int:
        """The working-memory frames a bank of `memory` holds, as the bank reports it."""
        return self.probe_bank.capacity

    @functools.cached_property
    def probe_bank(self) -> MemoryBank:
        """An empty bank of `memory`, asked for its capacity and read cost (an empty bank holds no tensors)."""
        return self.memory()

    def fitted_size(self, height: int, width: int, pinned: int, budget: int) -> int | None:
        """The short side to run H×W frames at so that one memory read fits in `budget` bytes: the inferer's own
        `size` (None: native) when it fits, else the largest multiple of 16 that does (the read grows with the fourth
        power of the side, so very large frames exhaust memory long before the network does)."""
        if self.read_bytes(height, width, pinned, self.size) <= budget:
            return self.size
        side = (min(height, width) if self.size is None else self.size) // KEY_STRIDE * KEY_STRIDE
        while side > KEY_STRIDE and self.read_bytes(height, width, pinned, side) > budget:
            side -= KEY_STRIDE
        return max(side, KEY_STRIDE)

    def propagate(
        self,
        network: torch.nn.Module,
        get_frame: Callable[[int], torch.Tensor],
        num_frames: int,
        annotations: Mapping[int, torch.Tensor],
        size: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (t, probabilities (K+1)×H×W) for every frame once: forward from the first annotated frame, then back.

        get_frame(t) gives 1×3×H×W in [0, 1]; annotations map frame index → H×W label tensor with objects already
        numbered 1..K (K = the largest label over all annotations). `size` overrides the inferer's for this video.
        """
        order = sorted(annotations)
        for t in order:
            if not 0 <= t < num_frames:
                raise IndexError(f"annotated frame {t} is outside the video's {num_frames} frames")
        pinned = {t: get_frame(t) for t in order}
        if self.adapt is not None:
            network = self.adapt(network, pinned, annotations)
        state = self.start(network, int(max(int(a.max()) for a in annotations.values())), size)
        for t in order:
            state.pin(pinned[t], annotations[t])
        with tqdm(total=num_frames, disable=not self.progress, desc="propagating", unit="frame") as bar:
            for frames in (range(order[0], num_frames), range(order[0] - 1, -1, -1)):
                state.new_pass()
                for t in frames:
                    bar.update(1)
                    labels = annotations.get(t)
                    yield t, state.step(None if labels is not None else get_frame(t), labels)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        """inputs B×4×T×H×W (RGB in [0, 1] and frame 0's label map) → probabilities B×(L+1)×T×H×W, L the max label.

        Used by validation on short in-memory clips; channel c holds label c, so argmax gives label values.
        """
        outputs = []
        for clip in inputs:
            labels = clip[3, 0].round().long()
            out = torch.zeros(int(labels.max()) + 1, *clip.shape[1:], device=inputs.device)
            for t, prob in self.propagate(network, lambda i: clip[None, :3, i], clip.shape[1], {0: labels}):
                out[:, t] = prob.to(out.device)
            outputs.append(out)
        return torch.stack(outputs)


class ModelPropagator:
    """The model bound to an inferer, with the propagator interface shared with the baselines: a `VideoSource` and
    label maps with any label values in, (t, H×W uint8 label map with the annotation's values) out."""

    def __init__(self, network: torch.nn.Module, inferer: PropagationInferer) -> None:
        self.network = network.to(inferer.device, memory_format=torch.channels_last).eval()
        self.inferer = inferer

    def propagate(self, source, annotations: Mapping[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
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

        size = self.fit(source, len(dense))
        for t, prob in self.inferer.propagate(self.network, get_frame, len(source), dense, size):
            # max(0).indices, not argmax(0): the same first-maximum labels, and on CPU (torch 2.13) many times faster
            yield t, to_values[prob.max(0).indices.cpu().numpy()]

    def fit(self, source, pinned: int) -> int | None:
        """The network size for this video: the inferer's, unless one memory read would need more than half of the
        memory available; then the largest that fits, said in one warning line (labels stay at the frame size)."""
        inferer = self.inferer
        info = getattr(source, "info", None)  # a VideoSource; any other frame sequence is sized by its first frame
        height, width = (info.height, info.width) if info is not None else np.shape(source[0])[:2]
        budget = available_memory(inferer.device) // 2
        size = inferer.fitted_size(height, width, pinned, budget)
        if size != inferer.size:
            need = inferer.read_bytes(height, width, pinned, inferer.size)
            logger.warning(
                f"{info.path if info is not None else 'video'}: {width}×{height} frames need about "
                f"{need / 2**30:.1f} GiB for one memory read at "
                f"{'full size' if inferer.size is None else f'--size {inferer.size}'}, more than half of the "
                f"{2 * budget / 2**30:.1f} GiB available; running the network at --size {size} (short side), labels "
                "are still written at the frame size"
            )
        return size
