"""The inference job: one video and its annotated frame(s) in, a label series (and optional PNGs/overlay) out.

Frames stream from the reader through the propagator into the writers one at a time; outputs are staged and moved
into place only when everything succeeded, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scripts.annotations import read_annotations
from scripts.flags import as_bool, as_list
from scripts.outputs import LabelSeriesWriter, prepare_output_dir, staged_output, write_png_labels
from scripts.overlay import write_overlay
from scripts.readers import NIFTI_SUFFIXES, VIDEO_SUFFIXES, open_video


def video_name(path: str | Path) -> str:
    """File or folder name without its (double) suffix: clip.nii.gz → clip."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + VIDEO_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class Prediction:
    """Propagate `mask` (annotated at `mask_frame`) through `video` and write the results into `output_dir`."""

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
    ) -> None:
        self.video = video
        self.masks = as_list(mask)
        self.frames = [int(f) for f in as_list(mask_frame)] or None
        self.propagator = propagator
        self.output_dir = output_dir
        self.save_png = as_bool(save_png)
        self.save_overlay = as_bool(save_overlay)
        self.overlay_format = overlay_format
        self.overwrite = as_bool(overwrite)

    def run(self) -> Path:
        """Run the job; returns the label series' path."""
        prepare_output_dir(self.output_dir, self.overwrite)  # refuse before any work is done
        source = open_video(self.video)
        annotations = read_annotations(self.masks, self.frames, source.info)
        name = video_name(self.video)
        with staged_output(self.output_dir, self.overwrite) as staging:
            with LabelSeriesWriter(staging / f"{name}_seg.nii.gz", source.info) as series:
                if self.save_png:
                    (staging / name).mkdir()
                for t, labels in self.propagator.propagate(source, annotations):
                    series.write(t, labels)
                    if self.save_png:
                        write_png_labels(staging / name, t, labels)
                if self.save_overlay:  # from the writer's on-disk buffer: frames in order, never all in RAM
                    write_overlay(staging / f"{name}_overlay.{self.overlay_format}", source, series.labels)
        result = Path(self.output_dir) / f"{name}_seg.nii.gz"
        print(f"wrote {result}: {len(source)} frames propagated from annotated frame(s) {sorted(annotations)}")
        return result
