"""Batch inference: many videos through one loaded model, resumable, failure-isolated and sharded over ranks.

Each video is one single-video job (`scripts.predict.Prediction`) writing into ``output_dir/<name>/``, so a batch
writes per video exactly what `run inference` writes. What is done is read from disk: a video whose outputs are all
in place is skipped (outputs appear only when their job's staging moves them there, so a file that exists is whole),
and a killed batch rerun with the same command continues where it stopped. A video that cannot be read or
propagated is recorded with its error and the batch goes on; rank 0 writes ``batch_report.json`` and the job exits
non-zero if any video failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from monai.data import load_decathlon_datalist

from scripts.davis import annotation_files, frame_files, sequence_folders
from scripts.distributed import gather, job_lock, rank_and_size, share
from scripts.errors import InputError
from scripts.flags import as_bool, as_list
from scripts.predict import Prediction, video_name
from scripts.readers import NiftiSeries
from scripts.staging import output_lock, remove_stale_staging, staged_output

REPORT = "batch_report.json"
DATALIST_KEY = "testing"


@dataclass(frozen=True)
class Video:
    """One entry of the list: the video, its annotation(s) and the annotated frame of each."""

    name: str
    video: str
    mask: tuple[str, ...]
    mask_frame: tuple[int, ...] | None


def read_datalist(path: str | Path) -> list[Video]:
    """The videos of a MONAI datalist JSON (``{"testing": [{"image", "label", "mask_frame"?, "name"?}]}``, relative
    paths against the file's folder, as MONAI resolves them) or of a DAVIS-layout folder (``JPEGImages/<seq>/``, the
    first PNG of ``Annotations/<seq>/`` as the annotation of the frame of the same name)."""
    path = Path(str(path))
    if not path.exists():
        raise InputError(f"{path}: no such datalist file or DAVIS folder")
    videos = _davis_videos(path) if path.is_dir() else _datalist_videos(path)
    if not videos:
        raise InputError(f"{path}: lists no video")
    names = [v.name for v in videos]
    for name in names:
        if name in (".", "..", REPORT) or Path(name).name != name:
            raise InputError(f'{path}: {name!r} cannot name a video\'s output folder; give the entry another "name"')
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(
            f"{path}: several videos are named {', '.join(repeated)} and would write into the same output folder; "
            'give the entries distinct "name"s'
        )
    return videos


def _datalist_videos(path: Path) -> list[Video]:
    try:
        entries = load_decathlon_datalist(path, is_segmentation=True, data_list_key=DATALIST_KEY)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not a JSON datalist ({exc})") from exc
    except (ValueError, TypeError, AttributeError, OSError) as exc:
        raise InputError(f'{path}: not a MONAI datalist with a "{DATALIST_KEY}" list ({exc})') from exc
    videos = []
    for i, entry in enumerate(entries):
        where = f'{path}: "{DATALIST_KEY}" entry {i}'
        if not isinstance(entry, Mapping) or not entry.get("image"):
            raise InputError(f'{where} has no "image" (the video)')
        if not entry.get("label"):
            raise InputError(f'{where} ({entry["image"]}) has no "label" (the annotation to propagate)')
        frames = as_list(entry.get("mask_frame"))
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 0 for f in frames):
            raise InputError(f'{where}: "mask_frame" {entry.get("mask_frame")!r} is not a frame index (or a list)')
        name = str(entry.get("name") or video_name(entry["image"]))
        masks = tuple(str(m) for m in as_list(entry["label"]))
        videos.append(Video(name, str(entry["image"]), masks, tuple(frames) or None))
    return videos


def _davis_videos(root: Path) -> list[Video]:
    images, annotations = root / "JPEGImages", root / "Annotations"
    if not images.is_dir() or not annotations.is_dir():
        raise InputError(f"{root}: a folder given as --datalist must hold DAVIS-layout JPEGImages/ and Annotations/")
    videos = []
    for folder in sequence_folders(images):
        frames = frame_files(folder)
        masks = annotation_files(annotations / folder.name)
        if not masks:
            raise InputError(f"{annotations / folder.name}: no annotation (PNG label map) for {folder}")
        stems = [f.stem for f in frames]
        if masks[0].stem not in stems:
            raise InputError(f"{masks[0]}: annotates no frame of {folder} (no frame named {masks[0].stem})")
        videos.append(Video(folder.name, str(folder), (str(masks[0]),), (stems.index(masks[0].stem),)))
    return videos


class BatchPrediction:
    """Run `Prediction` for every video of `datalist` this rank owns, with one `propagator` (one loaded model).

    ``overwrite`` redoes videos whose outputs exist (replacing exactly those); otherwise complete videos are skipped
    and a video holding only some of its outputs (an earlier run with other options) is redone. Every other argument
    is `Prediction`'s, applied to each video. Rank 0 holds the output folder's lock for the whole batch, so a second
    job on the same folder is refused at once; each video's job clears the staging a killed run left there.
    """

    def __init__(
        self,
        datalist: str,
        output_dir: str,
        propagator,
        save_png: bool | str = False,
        save_overlay: bool | str = False,
        overlay_format: str = "mp4",
        save_dicom_seg: bool | str | None = None,
        labels: str | Mapping | None = None,
        overwrite: bool | str = False,
    ) -> None:
        """The list is read and checked here, before the model runs: a bad list fails the job, a bad video only
        its own entry."""
        if not str(output_dir or "").strip():
            raise InputError("--output_dir: give the folder to write the results into")
        self.output_dir = Path(str(output_dir)).absolute()
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise InputError(f"{self.output_dir}: output path exists and is not a directory")
        self.datalist = Path(str(datalist))
        self.videos = read_datalist(self.datalist)
        self.propagator = propagator
        try:
            self.overwrite = as_bool(overwrite)
        except ValueError as exc:
            raise InputError(f"--overwrite: {exc}") from exc
        self.options = dict(
            save_png=save_png,
            save_overlay=save_overlay,
            overlay_format=overlay_format,
            save_dicom_seg=save_dicom_seg,
            labels=labels,
        )
        self.report: dict | None = None

    def run(self) -> dict:
        """Propagate this rank's videos, gather every rank's records and write the report (rank 0); returns it."""
        with job_lock(self.output_dir):
            return self._run()

    def _run(self) -> dict:
        rank, world_size = rank_and_size()
        mine = share(self.videos, rank, world_size)
        start = time.perf_counter()
        records = []
        for i, video in enumerate(mine, 1):
            record = self._one(video)
            records.append(record)
            where = f"rank {rank}: " if world_size > 1 else ""
            detail = {
                "done": f"{record.get('frames')} frames in {record.get('seconds', 0):.1f} s",
                "skipped": "outputs already complete",
                "failed": "the error is above and in the report",
            }[record["status"]]
            print(f"{where}[{i}/{len(mine)}] {video.name}: {record['status']}, {detail}", flush=True)
        parts = gather({"rank": rank, "records": records, "seconds": time.perf_counter() - start})
        self.report = self._report(parts)
        if rank == 0:
            with staged_output(self.output_dir, [REPORT], overwrite=True) as staging:
                (staging / REPORT).write_text(json.dumps(self.report, indent=2) + "\n")
            counts = ", ".join(f"{self.report[k]} {k}" for k in ("done", "skipped", "failed"))
            print(
                f"wrote {self.output_dir}/<name>/ for {len(self.videos)} videos ({counts}; "
                f"{self.report['frames_per_second']:.2f} frames/s) and {self.output_dir / REPORT}"
            )
        return self.report

    def finish(self) -> None:
        """End the job non-zero when any video failed (called after the process group is closed). Only rank 0 exits
        non-zero, with the line naming the failed videos: torchrun then reports the job failed."""
        if self.report is None or not self.report["failed"]:
            return
        if os.environ.get("RANK", "0") != "0":  # rank 0 ends the job: torchrun would stop it if another rank failed
            return
        names = ", ".join(f["name"] for f in self.report["failures"])
        raise SystemExit(
            f"error: {self.report['failed']} of {self.report['videos']} videos failed ({names}); "
            f"{self.output_dir / REPORT} holds each error"
        )

    def _one(self, video: Video) -> dict:
        """One video: skipped, done or failed, never raising for the video's own problems."""
        out = self.output_dir / video.name
        record: dict = {"name": video.name, "video": video.video}
        try:
            prediction = Prediction(
                video.video,
                list(video.mask),
                self.propagator,
                str(out),
                mask_frame=list(video.mask_frame) if video.mask_frame else None,
                overwrite=self.overwrite,
                **self.options,
            )
            names = prediction.output_names()
            if out.is_dir():  # a video skipped below still gets a killed run's staging cleared
                with output_lock(out):
                    remove_stale_staging(out)
            present = [n for n in names if os.path.lexists(out / n)]
            if len(present) == len(names) and not self.overwrite:
                return {**record, "status": "skipped", "outputs": names}
            prediction.overwrite = bool(present) or self.overwrite  # only the video's own output names
            start = time.perf_counter()
            series = prediction.run()
            seconds = time.perf_counter() - start
            frames = NiftiSeries(series).num_frames
        except Exception as exc:  # a bad video is recorded and the batch goes on
            error = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            print(f"error: {video.name}: {error}", file=sys.stderr, flush=True)
            return {**record, "status": "failed", "error": error}
        return {**record, "status": "done", "outputs": names, "frames": frames, "seconds": round(seconds, 3)}

    def _report(self, parts: list[dict]) -> dict:
        """The merged summary: counts, throughput over the slowest rank's time, and each video's record in list
        order."""
        by_name = {r["name"]: r for part in parts for r in part["records"]}
        results = [by_name[v.name] for v in self.videos if v.name in by_name]
        count = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed")}
        frames = sum(r.get("frames", 0) for r in results)
        seconds = max(part["seconds"] for part in parts)
        ranks = []
        for part in parts:
            records = part["records"]
            done = [r for r in records if r["status"] == "done"]
            ranks.append(
                {
                    "rank": part["rank"],
                    "videos": len(records),
                    "done": len(done),
                    "frames": sum(r["frames"] for r in done),
                    "seconds": round(part["seconds"], 3),
                }
            )
        return {
            "datalist": str(self.datalist.absolute()),
            "output_dir": str(self.output_dir),
            "world_size": len(parts),
            "videos": len(results),
            **count,
            "frames": frames,
            "seconds": round(seconds, 3),
            "frames_per_second": round(frames / seconds, 3) if seconds > 0 else 0.0,
            "videos_per_hour": round(3600 * count["done"] / seconds, 1) if seconds > 0 else 0.0,
            "failures": [
                {"name": r["name"], "video": r["video"], "error": r["error"]} for r in results if "error" in r
            ],
            "ranks": ranks,
            "results": results,
        }
