"""The inference job: one video and its annotated frame(s) in, a label series (and optional PNGs/overlay) out.

Every argument is checked when the job is built, and the output folder and its free space before propagation
starts, so a bad flag never costs a propagation. Frames stream from the reader through the propagator into the
writers one at a time; the outputs are staged and moved into place only when everything succeeded, so a failed run
leaves nothing half-written, and only the job's own output names are ever replaced. The DICOM SEG is the one output
placed on its own, after the others: what it needs is checked before propagation, and should writing it still fail
(a full disk, a file-size limit), the label series, PNGs and overlay are kept and the one `error:` line names the SEG.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.annotations import check_annotation_format, read_annotations
from scripts.dicom_seg import (
    SEG_SUFFIX,
    build_dicom_seg,
    check_source,
    is_dicom,
    parse_labels,
    save_dicom_seg,
    trial_segmentation,
)
from scripts.errors import InputError
from scripts.flags import as_bool, as_list
from scripts.outputs import LabelSeriesWriter, write_png_labels
from scripts.overlay import write_overlay
from scripts.readers import VideoInfo, open_video, video_stem
from scripts.staging import OVERWRITE_HINT, prepare_output_dir, staged_output

OVERLAY_FORMATS = ("mp4", "gif")
_BLOCK = 4096  # a small file still takes a filesystem block


def video_name(path: str | Path) -> str:
    """File or folder name without its (double) suffix: clip.nii.gz → clip."""
    return video_stem(Path(path).name)


def label_frame_bytes(annotations: Mapping[int, np.ndarray]) -> int:
    """What one frame of labels is expected to take compressed: twice the largest annotation's zlib (level 1) size,
    as propagated labels have rougher edges than a drawn annotation (the model card has the measured ratio)."""
    return 2 * max(len(zlib.compress(np.ascontiguousarray(a, np.uint8).tobytes(), 1)) for a in annotations.values())


def estimate_output_bytes(
    info: VideoInfo,
    save_png: bool,
    overlay_format: str | None,
    frame_bytes: int,
    seg_segments: int = 0,
) -> int:
    """The disk space a run is expected to need at its peak, so that a disk the results will not fit on is refused
    before propagation; an estimate, not a bound (a write that fails anyway ends in one line, nothing left).

    At the peak the staging folder holds the compressed label buffer and the NIfTI (``frame_bytes`` a frame each,
    from `label_frame_bytes`), the PNGs (as much, at least a filesystem block each) and the overlay (a quarter of a
    byte per pixel and frame for MP4, a byte for GIF); a DICOM SEG
    (``seg_segments`` segments) holds one bit per pixel, frame and segment.
    """
    frame, frames = info.height * info.width, info.num_frames
    need = 2 * frames * frame_bytes + 2 * _BLOCK
    if save_png:
        need += frames * max(frame_bytes, _BLOCK) + _BLOCK
    if overlay_format == "mp4":
        need += frames * frame // 4 + _BLOCK
    elif overlay_format == "gif":
        need += frames * frame + _BLOCK
    if seg_segments:
        need += frames * frame * seg_segments // 8 + _BLOCK
    return need


def _flag(name: str, value: object) -> bool:
    try:
        return as_bool(value)
    except ValueError as exc:
        raise InputError(f"--{name}: {exc}") from exc


class Prediction:
    """Propagate `mask` (annotated at `mask_frame`) through `video` and write the results into `output_dir`.

    The job writes exactly ``<name>_seg.nii.gz``, with ``save_png`` the folder ``<name>/`` and with ``save_overlay``
    ``<name>_overlay.<overlay_format>`` (``<name>`` is the video's name), and with ``save_dicom_seg`` (by default on
    for a DICOM input) the DICOM SEG ``<name>_seg.dcm`` (`scripts.dicom_seg`, segments named by ``labels``). Other
    files in ``output_dir`` are never touched; existing outputs of those names are refused unless ``overwrite``.
    """

    def __init__(
        self,
        video: str,
        mask: str | Sequence[str],
        propagator,
        output_dir: str,
        mask_frame: int | str | Sequence[int] | None = None,
        save_png: bool | str = False,
        save_overlay: bool | str = False,
        overlay_format: str = "mp4",
        overwrite: bool | str = False,
        save_dicom_seg: bool | str | None = None,
        labels: str | Mapping[int, str] | None = None,
        overwrite_hint: str = OVERWRITE_HINT,
    ) -> None:
        """Every argument is checked here, so a bad one is refused before any video is opened. ``overwrite_hint``
        is how the refusal of existing results tells the user to ask for overwriting (the app: a box to tick)."""
        if not str(video or "").strip():
            raise InputError("--video: give the video to segment")
        if not str(output_dir or "").strip():
            raise InputError("--output_dir: give the folder to write the results into")
        if not callable(getattr(propagator, "propagate", None)):
            raise TypeError(f"propagator {propagator!r} has no propagate(source, annotations) method")
        self.video, self.output_dir, self.propagator = Path(str(video)), Path(str(output_dir)), propagator
        self.masks = [Path(str(m)) for m in as_list(mask)]
        if not self.masks:
            raise InputError("--mask: give at least one annotation (a PNG or NIfTI label map)")
        self.frames = self._frame_indices(mask_frame)
        self.save_png = _flag("save_png", save_png)
        self.save_overlay = _flag("save_overlay", save_overlay)
        self.overwrite = _flag("overwrite", overwrite)
        self.overwrite_hint = overwrite_hint
        self.overlay_format = str(overlay_format).strip().lower().lstrip(".")
        if self.overlay_format not in OVERLAY_FORMATS:
            raise InputError(
                f"--overlay_format: {overlay_format!r} is not supported; use {' or '.join(OVERLAY_FORMATS)}"
            )
        self.name = video_name(self.video)
        self.label_names = parse_labels(labels)
        self.dicom_default = save_dicom_seg is None  # a SEG by default (not asked for) that cannot be made is a note
        self.dicom_source = self._dicom_seg_source(save_dicom_seg)
        self.save_dicom_seg = self.dicom_source is not None
        self._check_inputs()

    def _frame_indices(self, mask_frame: int | str | Sequence[int] | None) -> list[int] | None:
        values = as_list(mask_frame)
        if not values:
            return None
        try:
            frames = [int(str(f)) for f in values]
        except ValueError as exc:
            raise InputError(f"--mask_frame: {mask_frame!r} is not a frame index (or comma-separated indices)") from exc
        if any(f < 0 for f in frames):
            raise InputError(f"--mask_frame: {mask_frame!r}: frame indices count from 0")
        if len(frames) != len(self.masks):
            raise InputError(
                f"{self.masks[0]}: {len(self.masks)} annotation files but {len(frames)} annotated frame indices"
            )
        return frames

    def _dicom_seg_source(self, save_dicom_seg: bool | str | None) -> list | None:
        """The DICOM headers the SEG will reference when one is written: when asked, or by default (None) for a
        DICOM input a SEG can reference; a default-on SEG that cannot be written is only noted, not an error."""
        if not self.video.exists():
            return None  # _check_inputs names the missing video
        if save_dicom_seg is None:
            if not is_dicom(self.video):
                return None
            try:
                return check_source(self.video)
            except InputError as exc:
                print(f"note: no DICOM SEG written: {exc}")
                return None
        if not _flag("save_dicom_seg", save_dicom_seg):
            return None
        if not is_dicom(self.video):
            raise InputError(f"--save_dicom_seg: {self.video} is not DICOM; a DICOM SEG references a DICOM source")
        return check_source(self.video)

    def _check_inputs(self) -> None:
        """The inputs exist, and no output would replace one of them (refused even with ``overwrite``)."""
        if not self.video.exists():
            raise InputError(f"{self.video}: no such file or directory")
        for mask in self.masks:
            if not mask.is_file():
                raise InputError(f"{mask}: no such annotation file")
            check_annotation_format(mask)
        inputs = [p.resolve() for p in (self.video, *self.masks)]
        for name in self.output_names():
            target = (self.output_dir / name).resolve()
            for path in inputs:
                if path == target or target in path.parents:
                    raise InputError(
                        f"{self.output_dir / name}: would replace the input {path}; choose another --output_dir"
                    )

    def output_names(self) -> list[str]:
        """The names this run writes into the output folder."""
        names = [f"{self.name}_seg.nii.gz"]
        if self.save_dicom_seg:
            names.append(self.name + SEG_SUFFIX)
        if self.save_png:
            names.append(self.name)
        if self.save_overlay:
            names.append(f"{self.name}_overlay.{self.overlay_format}")
        return names

    def _check_dicom_seg(self, annotations: Mapping[int, object]) -> None:
        """Before propagation: a trial SEG from the source headers with the annotations' label values, so a SEG that
        cannot be written is refused now (asked for) or dropped with a note (by default), not found at the end."""
        if not self.save_dicom_seg:
            return
        values = {int(v) for a in annotations.values() for v in np.unique(a)}
        try:
            trial_segmentation(self.dicom_source, values, self.label_names)
        except InputError as exc:
            if not self.dicom_default:
                raise
            print(f"note: no DICOM SEG written: {exc}")
            self.save_dicom_seg, self.dicom_source = False, None

    def run(self) -> Path:
        """Run the job; returns the label series' path."""
        prepare_output_dir(self.output_dir, self.output_names(), self.overwrite, self.overwrite_hint)  # before any work
        source = open_video(self.video)
        annotations = read_annotations(self.masks, self.frames, source.info)
        self._check_dicom_seg(annotations)
        names = [n for n in self.output_names() if not n.endswith(SEG_SUFFIX)]  # the SEG is placed on its own
        out = self.output_dir.absolute()
        info, seg, seg_error = source.info, None, None
        frame_bytes = label_frame_bytes(annotations)
        segments = len({int(v) for a in annotations.values() for v in np.unique(a)} - {0}) if self.save_dicom_seg else 0
        overlay = self.overlay_format if self.save_overlay else None
        need = estimate_output_bytes(info, self.save_png, overlay, frame_bytes, segments)
        detail = f"{info.num_frames} frames of {info.height}×{info.width} labels at about {frame_bytes} bytes a frame"
        with staged_output(out, names, self.overwrite, need_bytes=need, need_detail=detail) as staging:
            with LabelSeriesWriter(staging / names[0], info) as series:
                if self.save_png:
                    (staging / self.name).mkdir()
                for t, labels in self.propagator.propagate(source, annotations):
                    series.write(t, labels)
                    if self.save_png:
                        write_png_labels(staging / self.name, t, labels)
                if self.save_overlay:  # from the writer's on-disk buffer: frames in order, never all in RAM
                    write_overlay(staging / names[-1], source, series.labels)
                if self.save_dicom_seg:  # built now, while the labels are at hand; written once the others are placed
                    try:
                        seg = build_dicom_seg(self.dicom_source, series.labels, self.label_names)
                    except InputError as exc:  # what the trial did not foresee costs the SEG only
                        seg_error = exc
        written = [str(out / n) + ("/ (PNG label maps)" if n == self.name else "") for n in names]
        if self.save_dicom_seg:
            seg_name = self.name + SEG_SUFFIX
            try:
                if seg_error is not None:
                    raise seg_error
                with staged_output(out, [seg_name], self.overwrite) as staging:
                    save_dicom_seg(seg, staging / seg_name)
            except InputError as exc:
                cause = str(exc).removeprefix(f"{out / seg_name}: ")
                earlier = "; the earlier SEG is still there" if os.path.lexists(out / seg_name) else ""
                raise InputError(
                    f"{out / seg_name}: the DICOM SEG was not written ({cause}){earlier}; the other outputs were "
                    f"written: {', '.join(written)}"
                ) from exc
            written.insert(1, str(out / seg_name))
        print(
            f"wrote {', '.join(written)}: {len(source)} frames propagated from annotated frame(s) {sorted(annotations)}"
        )
        return out / names[0]
