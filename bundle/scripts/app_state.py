"""The browser app's state, without any web code: open videos, their annotations and results, one propagation queue.

Kept apart from the routes (``scripts.app``) so the rules (what a propagation recomputes, what an export writes,
which paths may be read) are plain Python, tested without a server. Propagation and export go through the very
objects the ``inference`` job uses: the config's ``ModelPropagator`` and ``predict.Prediction`` (with the app's
finished results standing in for the network), so the app writes exactly what the command line writes.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import tempfile
import threading
import traceback
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.annotations import annotation_kind, check_annotation_format, read_annotations, read_label_map
from scripts.errors import InputError
from scripts.outputs import allocated_memmap
from scripts.predict import Prediction
from scripts.readers import VIDEO_FORMATS, VideoInfo, VideoSource, open_video, path_suffix

FRAME_CACHE_BYTES = 64 * 2**20  # encoded JPEGs kept for scrubbing back and forth


class AccessError(InputError):
    """A path outside ``--data_dir`` (or no ``--data_dir`` at all): never read."""


class Busy(InputError):
    """The request needs results that a propagation has not (yet) produced for the current annotations."""


def inside(root: Path | None, relative: str) -> Path:
    """``relative`` resolved inside ``root``; absolute paths, ``..`` and links leading out are refused, unread."""
    if root is None:
        raise AccessError(f"{relative}: the app was started without --data_dir, so no folder can be browsed")
    if not relative or relative in (".", "/"):
        return root
    if Path(relative).is_absolute() or relative.startswith(("/", "\\")):
        raise AccessError(f"{relative}: absolute paths are refused; give a path relative to --data_dir")
    if "\x00" in relative:
        raise AccessError(f"{relative!r}: a path with a NUL byte is refused")
    if ".." in Path(relative).parts:
        raise AccessError(f"{relative}: '..' is refused; give a path inside --data_dir")
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise AccessError(f"{relative}: leads outside --data_dir (a link); refused")
    return path


def safe_name(name: str) -> str:
    """An uploaded file's own name, without any folder part the browser sent."""
    name = Path(str(name).replace("\\", "/")).name
    if name in ("", ".", "..") or name.startswith("."):
        raise InputError(f"{name!r}: not a usable file name for an upload")
    return name


def encode_jpeg(frame: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@dataclass
class VideoSession:
    """One opened video: its reader (for the page's frame requests), annotations as PNG files (the CLI's --mask
    files), and results in a ``T×H×W`` memmap on disk, so a long video's labels never sit in RAM."""

    id: str
    path: Path
    name: str
    workdir: Path
    source: VideoSource
    lock: threading.Lock = field(default_factory=threading.Lock)
    frame_cache: OrderedDict = field(default_factory=OrderedDict)
    cache_bytes: int = 0
    revision: int = 0
    results_for: str | None = None  # digest of the annotations the results were propagated from

    def __post_init__(self) -> None:
        (self.workdir / "masks").mkdir(parents=True, exist_ok=True)
        info = self.info
        self.results = allocated_memmap(self.workdir / "results.labels", (info.num_frames, info.height, info.width))
        self.computed = np.zeros(info.num_frames, bool)

    @property
    def info(self) -> VideoInfo:
        return self.source.info

    def describe(self) -> dict:
        info = self.info
        return {
            "id": self.id,
            "name": self.name,
            "kind": info.kind,
            "num_frames": info.num_frames,
            "height": info.height,
            "width": info.width,
            "fps": info.fps or 10.0,
            "annotated": self.annotated_frames(),
            "computed": int(self.computed.sum()),
            "up_to_date": self.up_to_date(),
            "revision": self.revision,
        }

    def frame_jpeg(self, t: int) -> bytes:
        """Frame ``t`` as JPEG: decoded on request (never the whole video), recent ones cached."""
        self._check_frame(t)
        with self.lock:
            if t in self.frame_cache:
                self.frame_cache.move_to_end(t)
                return self.frame_cache[t]
            data = encode_jpeg(self.source[t])
            self.frame_cache[t] = data
            self.cache_bytes += len(data)
            while self.cache_bytes > FRAME_CACHE_BYTES and len(self.frame_cache) > 1:
                self.cache_bytes -= len(self.frame_cache.popitem(last=False)[1])
            return data

    def _check_frame(self, t: int) -> None:
        if not 0 <= t < self.info.num_frames:
            raise InputError(f"{self.name}: frame {t} is outside 0..{self.info.num_frames - 1}")

    def mask_path(self, t: int) -> Path:
        return self.workdir / "masks" / f"{t:05d}.png"

    def annotated_frames(self) -> list[int]:
        return sorted(int(p.stem) for p in (self.workdir / "masks").glob("*.png"))

    def annotation_files(self) -> tuple[list[Path], list[int]]:
        frames = self.annotated_frames()
        return [self.mask_path(t) for t in frames], frames

    def digest(self) -> str:
        """What the results depend on: every annotated frame and its label map."""
        digest = hashlib.sha256()
        for t in self.annotated_frames():
            digest.update(f"{t}:".encode() + self.mask_path(t).read_bytes())
        return digest.hexdigest()

    def up_to_date(self) -> bool:
        return bool(self.annotated_frames()) and self.results_for == self.digest() and bool(self.computed.all())

    def labels(self, t: int) -> tuple[str, np.ndarray | None]:
        """What the page draws on frame ``t``: its annotation, else its propagated result, else nothing."""
        self._check_frame(t)
        if self.mask_path(t).exists():
            return "annotation", read_label_map(self.mask_path(t))
        if self.computed[t]:
            return "result", np.asarray(self.results[t])
        return "none", None

    def set_annotation(self, t: int, labels: np.ndarray) -> None:
        """Pin frame ``t`` to ``labels`` (all zero: unpin it), checked exactly as the CLI checks a --mask file."""
        self._check_frame(t)
        if labels.shape != (self.info.height, self.info.width):
            raise InputError(
                f"annotation of frame {t}: {'×'.join(map(str, labels.shape))} (H×W) but the frames of {self.name} "
                f"are {self.info.height}×{self.info.width}"
            )
        if not labels.any():
            self.mask_path(t).unlink(missing_ok=True)
        else:
            staged = self.workdir / f".mask-{t:05d}.png"
            Image.fromarray(np.asarray(labels, np.uint8)).save(staged, format="PNG")
            read_annotations([staged], [t], self.info)  # the CLI's checks, on the file the CLI would be given
            staged.replace(self.mask_path(t))
        self.revision += 1

    def load_mask_file(self, path: Path, t: int) -> list[int]:
        """Annotations from a PNG or NIfTI label map (a NIfTI series may annotate several frames), as --mask."""
        check_annotation_format(path, shown=path.name)
        found = read_annotations([path], [t], self.info)
        for frame, labels in found.items():
            self.set_annotation(frame, labels)
        return sorted(found)

    def close(self) -> None:
        self.source.close()


class CachedPropagator:
    """The app's finished results behind the propagator interface, so `predict.Prediction` writes them exactly as
    the ``inference`` job writes a fresh propagation (names, geometry, PNGs, overlay, overwrite rules)."""

    def __init__(self, session: VideoSession) -> None:
        self.session = session

    def propagate(self, source: VideoSource, annotations: Mapping[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        if sorted(annotations) != self.session.annotated_frames() or not self.session.up_to_date():
            raise Busy(f"{self.session.name}: the annotations changed; propagate again before exporting")
        for t in range(len(source)):
            yield t, np.asarray(self.session.results[t])


@dataclass
class Job:
    """One propagation request; the page polls it for its queue position and progress."""

    id: str
    session: VideoSession
    state: str = "queued"  # queued|running|done|failed|cancelled
    done: int = 0
    total: int = 0
    recomputed: int = 0
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


class JobQueue:
    """Propagations run one at a time, first come first served, on one worker thread: one model serves every
    video, and two runs at once would only share the same cores. A failed job is reported, never fatal."""

    def __init__(self, propagator) -> None:
        self.propagator = propagator
        self.jobs: dict[str, Job] = {}
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.condition = threading.Condition()
        self.ids = itertools.count(1)
        self.stopped = False
        self.worker = threading.Thread(target=self._work, name="tcmn-app-propagation", daemon=True)
        self.worker.start()

    def submit(self, session: VideoSession) -> Job:
        """Queue a propagation of ``session``; a request for a video already waiting joins that job."""
        if not session.annotated_frames():
            raise InputError(f"{session.name}: annotate at least one frame (or load a mask) before propagating")
        with self.condition:
            for job in self.waiting:
                if job.session is session:
                    return job
            job = Job(str(next(self.ids)), session, total=session.info.num_frames)
            self.jobs[job.id] = job
            self.waiting.append(job)
            self.condition.notify()
            return job

    def status(self, job: Job) -> dict:
        with self.condition:
            position = next((i + 1 for i, j in enumerate(self.waiting) if j is job), 0)
        return {
            "id": job.id,
            "video": job.session.id,
            "state": job.state,
            "position": position,
            "done": job.done,
            "total": job.total,
            "recomputed": job.recomputed,
            "error": job.error,
        }

    def cancel(self, job: Job) -> None:
        with self.condition:
            if job in self.waiting:
                self.waiting.remove(job)
                job.state = "cancelled"
        job.cancel.set()

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            for job in self.waiting:
                job.state = "cancelled"
            self.waiting.clear()
            if self.running is not None:
                self.running.cancel.set()
            self.condition.notify_all()
        self.worker.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.stopped:
                    self.condition.wait()
                if self.stopped:
                    return
                job = self.running = self.waiting.popleft()
                job.state = "running"
            try:
                self._run(job)
                job.state = "cancelled" if job.cancel.is_set() else "done"
            except Exception as exc:  # reported in the page; the server stays up
                job.state, job.error = "failed", (
                    str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
                )
                if not isinstance(exc, InputError):
                    traceback.print_exc()
            finally:
                with self.condition:
                    self.running = None

    def _run(self, job: Job) -> None:
        """Propagate from the current annotations, as ``Prediction.run`` does, into the session's results.

        All annotated frames are pinned in memory before either pass, so any change of an annotation changes the
        memory every other frame is read from: every frame that is not itself annotated can change and is
        recomputed; annotated frames are never recomputed (they are their annotation), and when the annotations are
        the ones the results came from, nothing is.
        """
        session = job.session
        digest = session.digest()
        if session.results_for == digest and session.computed.all():
            job.done = job.total
            return
        paths, frames = session.annotation_files()
        with open_video(session.path) as source:  # the job's own reader: the page keeps scrubbing on the other
            annotations = read_annotations(paths, frames, source.info)
            session.results_for = None
            session.computed[:] = False
            for t, labels in annotations.items():
                session.results[t] = labels
                session.computed[t] = True
            for t, labels in self.propagator.propagate(source, annotations):
                if job.cancel.is_set():
                    return
                if t not in annotations:
                    session.results[t] = labels
                    session.computed[t] = True
                    job.recomputed += 1
                job.done += 1
                session.revision += 1
        session.results.flush()
        session.results_for = digest


class AppState:
    """Everything the server holds: the open videos, the propagation queue and the app's own scratch folder."""

    def __init__(
        self,
        propagator,
        data_dir: str | Path | None = None,
        output_dir: str | Path = "out",
        max_upload_bytes: int = 2 * 2**30,
        sample: str | Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve() if data_dir not in (None, "") else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise InputError(f"{data_dir}: --data_dir is not a folder")
        self.output_dir = Path(output_dir)
        self.max_upload_bytes = int(max_upload_bytes)
        self.sample = Path(sample) if sample else None
        self.workdir = Path(tempfile.mkdtemp(prefix="tcmn-app-"))
        self.sessions: dict[str, VideoSession] = {}
        self.ids = itertools.count(1)
        self.queue = JobQueue(propagator)
        self.lock = threading.Lock()

    def browse(self, relative: str) -> dict:
        """The folders and openable videos in a folder of ``--data_dir`` (frame and DICOM folders open as videos)."""
        folder = inside(self.data_dir, relative)
        if not folder.is_dir():
            raise InputError(f"{relative}: not a folder inside --data_dir")
        entries = []
        for path in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
            if path.name.startswith("."):
                continue
            rel = (folder.relative_to(self.data_dir) / path.name).as_posix()
            if path.is_dir():
                entries.append({"name": path.name, "path": rel, "kind": "folder"})
            elif path_suffix(path) in VIDEO_FORMATS:
                entries.append({"name": path.name, "path": rel, "kind": "video"})
            elif annotation_kind(path) is not None:
                entries.append({"name": path.name, "path": rel, "kind": "mask"})
        here = folder.relative_to(self.data_dir).as_posix()
        return {"path": "" if here == "." else here, "entries": entries}

    def open(self, path: Path, name: str | None = None) -> VideoSession:
        """Open a video exactly as the CLI's --video does; any refusal is the CLI's message."""
        source = open_video(path)
        with self.lock:
            session_id = str(next(self.ids))
        session = VideoSession(session_id, path, name or path.name, self.workdir / f"video-{session_id}", source)
        self.sessions[session_id] = session
        return session

    def open_data(self, relative: str) -> VideoSession:
        return self.open(inside(self.data_dir, relative))

    def open_sample(self) -> VideoSession:
        if self.sample is None or not self.sample.exists():
            raise InputError("the embedded sample is not available in this installation")
        return self.open(self.sample)

    def upload_folder(self) -> Path:
        """A fresh folder of the app's own for one upload."""
        return Path(tempfile.mkdtemp(prefix="upload-", dir=self.workdir))

    def session(self, session_id: str) -> VideoSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise LookupError(f"no open video {session_id}") from None

    def close_session(self, session: VideoSession) -> None:
        """Forget a video the page left: its jobs are cancelled, its reader closed, its scratch files removed."""
        for job in list(self.queue.jobs.values()):
            if job.session is session:
                self.queue.cancel(job)
        self.sessions.pop(session.id, None)
        session.close()
        shutil.rmtree(session.workdir, ignore_errors=True)

    def export(
        self,
        session: VideoSession,
        output_dir: Path,
        save_png: bool,
        save_overlay: bool,
        overlay_format: str,
        overwrite: bool,
    ) -> list[Path]:
        """Write the results with the ``inference`` job itself; returns the paths written."""
        if not session.up_to_date():
            raise Busy(f"{session.name}: propagate the current annotations before exporting")
        paths, frames = session.annotation_files()
        prediction = Prediction(
            video=str(session.path),
            mask=[str(p) for p in paths],
            mask_frame=frames,
            propagator=CachedPropagator(session),
            output_dir=str(output_dir),
            save_png=save_png,
            save_overlay=save_overlay,
            overlay_format=overlay_format,
            overwrite=overwrite,
            overwrite_hint='tick "overwrite earlier results"',  # the page's box (index.html), not a flag
        )
        prediction.run()
        return [Path(output_dir) / name for name in prediction.output_names()]

    def close(self) -> None:
        self.queue.stop()
        for session in self.sessions.values():
            session.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
