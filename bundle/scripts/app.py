"""The browser app: a FastAPI server around `scripts.app_state` and the static page in ``bundle/app``.

Started by ``python -m monai.bundle run app --meta_file … --config_file "['bundle/configs/inference.json',
'bundle/configs/app.json']"``; it serves on 127.0.0.1 unless ``--host`` says otherwise, and blocks until Ctrl-C.
``app.json`` is a layer over ``inference.json``, so the app's propagator, weights and model flags are the inference
job's own. Every refusal is the CLI's one-line message, sent as JSON ``{"detail": …}``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.background import BackgroundTask

from scripts.app_state import AccessError, AppState, Busy, VideoSession, inside, safe_name
from scripts.errors import InputError

STATIC = Path(__file__).resolve().parents[1] / "app"
UPLOAD_PATHS = ("/api/upload", "/masks")


@contextlib.contextmanager
def _refused_upload(folder: Path) -> Iterator[None]:
    """A refused upload leaves nothing behind, and its message names the file as the user sent it, not the copy."""
    try:
        yield
    except InputError as err:
        shutil.rmtree(folder, ignore_errors=True)
        raise type(err)(str(err).replace(f"{folder}{os.sep}", "")) from err


class OpenRequest(BaseModel):
    path: str


class ExportRequest(BaseModel):
    destination: str = "download"  # download|folder
    save_png: bool = False
    save_overlay: bool = False
    overlay_format: str = "mp4"
    overwrite: bool = False


class UploadLimit:
    """Refuse an upload over the limit from its Content-Length, before any byte of it is read or stored."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT") and scope["path"].endswith(UPLOAD_PATHS):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            detail = None
            if length is None or not length.isdigit():
                status, detail = 411, "uploads must state their size (Content-Length)"
            elif int(length) > self.limit:
                status = 413
                detail = f"upload of {int(length) / 2**20:.1f} MiB is over the limit of {self.limit / 2**20:.0f} MiB"
                detail += " (--max_upload_mb); put the video under --data_dir instead"
            if detail is not None:
                await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: AppState) -> FastAPI:
    """The FastAPI application serving ``state`` and the page."""
    app = FastAPI(title="TCMN annotate-propagate-correct", docs_url=None, redoc_url=None)
    app.state.tcmn = state

    for error, status in ((AccessError, 403), (Busy, 409), (InputError, 400), (LookupError, 404)):

        def handler(request: Request, exc: Exception, status: int = status) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)

        app.add_exception_handler(error, handler)

    def session(video: str) -> VideoSession:
        return state.session(video)

    @app.get("/api/info")
    def info() -> dict:
        return {
            "data_dir": state.data_dir is not None,
            "sample": state.sample is not None and state.sample.exists(),
            "max_upload_bytes": state.max_upload_bytes,
            "output_dir": str(state.output_dir),
        }

    @app.get("/api/browse")
    def browse(path: str = "") -> dict:
        return state.browse(path)

    @app.post("/api/open")
    def open_path(request: OpenRequest) -> dict:
        return state.open_data(request.path).describe()

    @app.post("/api/open_sample")
    def open_sample() -> dict:
        return state.open_sample().describe()

    @app.post("/api/upload")
    async def upload(request: Request) -> dict:
        """One video file, or the files of a frame folder or DICOM series (form field ``folder`` names it)."""
        form = await request.form(max_files=100_000, max_fields=10)
        files = [f for f in form.getlist("files") if hasattr(f, "filename")]
        if not files:
            raise InputError("upload: no file received")
        folder = state.upload_folder()
        with _refused_upload(folder):
            target = folder
            if len(files) > 1 or form.get("folder"):
                target = folder / safe_name(str(form.get("folder") or "upload"))
                target.mkdir()
            for file in files:
                with open(target / safe_name(file.filename or ""), "wb") as out:
                    while chunk := await file.read(2**20):
                        out.write(chunk)
            path = target if len(files) > 1 or form.get("folder") else target / safe_name(files[0].filename or "")
            return (await run_in_threadpool(state.open, path)).describe()

    @app.get("/api/videos/{video}")
    def describe(video: str) -> dict:
        return session(video).describe()

    @app.delete("/api/videos/{video}")
    def close(video: str) -> dict:
        state.close_session(session(video))
        return {"closed": video}

    @app.get("/api/videos/{video}/frames/{t}")
    def frame(video: str, t: int) -> Response:
        return Response(session(video).frame_jpeg(t), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/api/videos/{video}/labels/{t}")
    def labels(video: str, t: int) -> Response:
        """The label map drawn on frame t as raw ``H×W`` bytes (exact, unlike a decoded image); kind in a header."""
        kind, values = session(video).labels(t)
        body = b"" if values is None else np.ascontiguousarray(values, np.uint8).tobytes()
        return Response(body, media_type="application/octet-stream", headers={"X-Labels": kind})

    @app.put("/api/videos/{video}/annotations/{t}")
    async def annotate(video: str, t: int, request: Request) -> dict:
        current = session(video)
        body = await request.body()
        height, width = current.info.height, current.info.width
        if len(body) != height * width:
            raise InputError(f"annotation of frame {t}: {len(body)} bytes, expected {height}×{width} label values")
        current.set_annotation(t, np.frombuffer(body, np.uint8).reshape(height, width))
        return current.describe()

    @app.delete("/api/videos/{video}/annotations/{t}")
    def unannotate(video: str, t: int) -> dict:
        current = session(video)
        current.set_annotation(t, np.zeros((current.info.height, current.info.width), np.uint8))
        return current.describe()

    @app.post("/api/videos/{video}/masks")
    async def load_mask(video: str, request: Request, frame: int = 0) -> dict:
        """A mask file (PNG or NIfTI label map), read as --mask/--mask_frame would read it."""
        current = session(video)
        form = await request.form(max_files=1, max_fields=1)
        file = form.get("file")
        if not hasattr(file, "filename"):
            raise InputError("mask upload: no file received")
        folder = state.upload_folder()
        with _refused_upload(folder):
            path = folder / safe_name(file.filename or "")
            path.write_bytes(await file.read())
            frames = await run_in_threadpool(current.load_mask_file, path, frame)
        shutil.rmtree(folder)  # the annotations are kept as the session's own PNGs
        return {**current.describe(), "loaded": frames}

    @app.post("/api/videos/{video}/data_masks")
    def load_data_mask(video: str, request: OpenRequest, frame: int = 0) -> dict:
        """A mask file from --data_dir, read as --mask/--mask_frame would read it."""
        current = session(video)
        frames = current.load_mask_file(inside(state.data_dir, request.path), frame)
        return {**current.describe(), "loaded": frames}

    @app.post("/api/videos/{video}/propagate")
    def propagate(video: str) -> dict:
        return state.queue.status(state.queue.submit(session(video)))

    @app.get("/api/jobs/{job}")
    def job_status(job: str) -> dict:
        if job not in state.queue.jobs:
            raise LookupError(f"no propagation job {job}")
        return state.queue.status(state.queue.jobs[job])

    @app.post("/api/jobs/{job}/cancel")
    def cancel(job: str) -> dict:
        if job not in state.queue.jobs:
            raise LookupError(f"no propagation job {job}")
        state.queue.cancel(state.queue.jobs[job])
        return state.queue.status(state.queue.jobs[job])

    @app.post("/api/videos/{video}/export")
    def export(video: str, request: ExportRequest) -> Response:
        """Into --output_dir (the CLI's overwrite rules), or as a download: the file itself, or a zip of several."""
        current = session(video)
        options = request.model_dump(exclude={"destination"})
        if request.destination == "folder":
            written = state.export(current, state.output_dir, **options)
            return JSONResponse({"written": [str(p) for p in written]})
        if request.destination != "download":
            raise InputError(f"export: destination {request.destination!r} is not 'download' or 'folder'")
        folder = state.upload_folder()
        written = state.export(current, folder, **options)
        cleanup = BackgroundTask(shutil.rmtree, folder, ignore_errors=True)
        if len(written) == 1 and written[0].is_file():
            return FileResponse(written[0], filename=written[0].name, background=cleanup)
        archive = folder / f"{written[0].name.removesuffix('_seg.nii.gz')}_results.zip"
        with zipfile.ZipFile(archive, "w") as zipped:
            for path in written:
                for item in sorted([path, *path.rglob("*")]) if path.is_dir() else [path]:
                    if item.is_file():
                        zipped.write(item, item.relative_to(folder).as_posix())
        return FileResponse(archive, filename=archive.name, background=cleanup)

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    app.add_middleware(UploadLimit, limit=state.max_upload_bytes)
    return app


class _Server(uvicorn.Server):
    """Uvicorn's server, printing the URL once it listens (not before, so the URL works when it appears)."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"TCMN app: open {self.url} in a browser (Ctrl-C stops it)", flush=True)


class AppServer:
    """The ``app`` job: build the state, print the URL, serve until Ctrl-C, then remove the app's scratch files."""

    def __init__(
        self,
        propagator,
        host: str = "127.0.0.1",
        port: int = 8765,
        data_dir: str | None = None,
        output_dir: str = "out",
        max_upload_mb: int = 2048,
        sample: str | None = None,
    ) -> None:
        self.host, self.port = str(host), int(port)
        self.state = AppState(propagator, data_dir, output_dir, int(max_upload_mb) * 2**20, sample)

    def run(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # a taken port: one line, before serving
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as err:
                self.state.close()
                raise InputError(f"--host {self.host} --port {self.port}: cannot listen there ({err.strerror or err})")
        host = f"[{self.host}]" if ":" in self.host else self.host
        config = uvicorn.Config(create_app(self.state), host=self.host, port=self.port, log_level="warning")
        try:
            _Server(config, f"http://{host}:{self.port}/").run()
        finally:
            self.state.close()
