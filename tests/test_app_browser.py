"""The browser app end to end in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Open the embedded sample, paint frame 0, propagate, scrub to the last frame and compare the overlay's pixels with the
`inference` command's result for the same mask; correct a frame, propagate again, export, and compare the exported
NIfTI with the command's output for the same two annotations. Screenshots of each step go to the test's output
folder (and to $TCMN_APP_SCREENSHOTS when set, which is how the README's were made). Skips, saying why, where
Chromium or Playwright is missing (`.ci/run` installs both).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import uvicorn
from conftest import REPO, SAMPLE, SAMPLE_SEQUENCE
from monai.bundle import ConfigParser
from PIL import Image
from test_cli import TRUSTED_CONFIGS, bundle_command, config_files, succeeded

from scripts.annotations import read_label_series
from scripts.app import create_app
from scripts.app_state import AppState
from scripts.overlay import PALETTE

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIZE = 64  # the network's short side, in the app and in the command it is compared with
# the polygon painted on frame 0 (label 1): an outline of the right vocal fold, corners in image pixels
POLYGON = [(511, 124), (376, 124), (242, 192), (216, 270), (101, 326), (64, 414), (183, 511), (302, 511), (312, 458)]
POLYGON += [(419, 353), (458, 185)]
BRUSH = (330, 300, 40)  # x, y, size: the brush dab of the correction on frame 12 (label 2)
WEIGHTS = REPO / "bundle" / "models" / "model.pt"  # the shipped weights, so the screenshots show real propagation
MATCH = 0.995  # the share of pixels the app and the command must agree on (two processes, two thread counts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(checkpoint: Path, masks: list[Path], frames: list[int], out: Path) -> subprocess.Popen:
    """The README's inference command on the sample, started in the background."""
    command = bundle_command(
        "inference",
        "inference.json",
        ckpt_path=checkpoint,
        device="cpu",
        size=SIZE,
        progress="false",
        mask=",".join(map(str, masks)),
        mask_frame=",".join(map(str, frames)),
        output_dir=out,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": TRUSTED_CONFIGS}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    stdout, stderr = proc.communicate(timeout=600)
    succeeded(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


def _fill_polygon(points: list[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
    """The page's polygon fill (app.js `fillPolygon`): even-odd rule at pixel centres, corners on pixel corners."""
    mask = np.zeros(shape, np.uint8)
    for y in range(max(0, min(p[1] for p in points)), min(shape[0], max(p[1] for p in points))):
        centre, crossings = y + 0.5, []
        for (ax, ay), (bx, by) in zip(points, points[1:] + points[:1]):
            if (ay <= centre) != (by <= centre):
                crossings.append(ax + (centre - ay) * (bx - ax) / (by - ay))
        crossings.sort()
        for left, right in zip(crossings[::2], crossings[1::2]):
            mask[y, max(0, math.ceil(left - 0.5)) : min(shape[1], math.ceil(right - 0.5))] = 1
    return mask


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    share = float((a == b).mean())
    print(f"app and command agree on {share:.2%} of the pixels")
    return share


@pytest.fixture
def browser():
    """Headless Chromium, or a skip that names what is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium; .ci/run does it)")
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install .[dev])"
    )
    with playwright_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except playwright_api.Error as err:
            pytest.skip(f"{CHROMIUM} does not start here: {str(err).splitlines()[0]}")
        yield browser
        browser.close()


@pytest.fixture
def server(tmp_path: Path):
    """The app in this process (uvicorn on a free port) with the shipped weights at --size 64."""
    checkpoint = WEIGHTS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command's OMP_NUM_THREADS=1: same arithmetic, same labels
    parser = ConfigParser()  # the app command's propagator: app.json over inference.json
    parser.read_config(config_files("app.json"))
    parser.update({"ckpt_path": str(checkpoint), "device": "cpu", "size": SIZE})
    parser.get_parsed_content("load_weights")
    propagator = parser.get_parsed_content("propagator")
    state = AppState(propagator, None, tmp_path / "app_out", sample=SAMPLE / "JPEGImages" / SAMPLE_SEQUENCE)
    port = _free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    while not uvicorn_server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state, checkpoint
    uvicorn_server.should_exit = True
    thread.join(timeout=30)
    state.close()
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_annotate_propagate_correct_export_in_chromium(browser, server, tmp_path: Path) -> None:
    url, state, checkpoint = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page(viewport={"width": 1320, "height": 900})
    step = iter(range(1, 100))

    def screenshot(name: str) -> None:
        page.screenshot(path=str(shots / f"{next(step):02d}_{name}.png"))

    def labels_of(t: int) -> np.ndarray:
        response = page.request.get(f"{url}/api/videos/1/labels/{t}")
        assert response.ok and response.headers["x-labels"] == "annotation", response.text()
        return np.frombuffer(response.body(), np.uint8).reshape(512, 512)

    def click_image(x: float, y: float) -> None:
        box = page.locator("#ui-canvas").bounding_box()
        page.mouse.click(box["x"] + x * box["width"] / 512, box["y"] + y * box["height"] / 512)

    def go_to(t: int) -> None:
        while int(page.locator("#stage").get_attribute("data-frame")) != t:
            current = int(page.locator("#stage").get_attribute("data-frame"))
            page.keyboard.press("ArrowRight" if t > current else "ArrowLeft")
            page.wait_for_function(f"document.querySelector('#stage').dataset.frame != '{current}'")

    def propagated() -> str:
        page.eval_on_selector("#job-state", "e => { e.dataset.state = 'asked'; }")
        page.click("#propagate")
        page.wait_for_function("['done', 'failed'].includes(document.querySelector('#job-state').dataset.state)")
        text = page.locator("#job-state").inner_text()
        assert page.locator("#job-state").get_attribute("data-state") == "done", text
        return text

    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    page.click("#open-sample")
    page.wait_for_selector("#stage[data-frame='0']")
    assert page.locator("#message").is_hidden()
    screenshot("opened")

    # paint frame 0: a polygon of label 1, closed with Enter
    page.click("button[data-tool=polygon]")
    for x, y in POLYGON:
        click_image(x, y)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#frame-info').dataset.kind == 'annotation'")
    first = _fill_polygon(POLYGON, (512, 512))
    np.testing.assert_array_equal(labels_of(0), first)
    Image.fromarray(first).save(tmp_path / "frame0.png")
    cli_first = _command(checkpoint, [tmp_path / "frame0.png"], [0], tmp_path / "cli_first")
    screenshot("painted")

    # propagate, scrub to the last frame with the arrow keys, compare the overlay's pixels with the command's result
    assert "23 frame(s) recomputed" in propagated()
    go_to(23)
    page.wait_for_function("document.querySelector('#frame-info').dataset.kind == 'result'")
    screenshot("propagated_last_frame")
    rgba = np.asarray(
        page.evaluate(
            "Array.from(document.querySelector('#overlay-canvas').getContext('2d').getImageData(0, 0, 512, 512).data)"
        ),
        np.uint8,
    ).reshape(512, 512, 4)
    codes = {tuple(c): k for k, c in enumerate(PALETTE.tolist())}
    shown = np.vectorize(lambda r, g, b, a: codes[(r, g, b)] if a else 0)(*np.moveaxis(rgba, -1, 0)).astype(np.uint8)
    np.testing.assert_array_equal(shown, state.sessions["1"].results[23])  # the page shows the server's labels
    _finish(cli_first)
    expected = read_label_series(tmp_path / "cli_first" / f"{SAMPLE_SEQUENCE}_seg.nii.gz")
    assert _agreement(shown, expected[23]) >= MATCH and (expected[23] == 1).mean() > 0.05  # the fold was followed

    # correct frame 12 with a brush dab of a new label (on top of its propagated labels), propagate again
    go_to(12)
    page.click("#add-label")
    page.click("button[data-tool=brush]")
    page.eval_on_selector(
        "#brush-size", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(BRUSH[2])
    )
    propagated_12 = np.asarray(state.sessions["1"].results[12]).copy()
    click_image(BRUSH[0] + 0.5, BRUSH[1] + 0.5)
    page.wait_for_function("document.querySelector('#frame-info').dataset.kind == 'annotation'")
    correction = propagated_12.copy()
    yy, xx = np.mgrid[:512, :512]
    correction[(xx - BRUSH[0]) ** 2 + (yy - BRUSH[1]) ** 2 <= (BRUSH[2] / 2) ** 2] = 2
    np.testing.assert_array_equal(labels_of(12), correction)
    Image.fromarray(correction).save(tmp_path / "frame12.png")
    cli_both = _command(checkpoint, [tmp_path / "frame0.png", tmp_path / "frame12.png"], [0, 12], tmp_path / "cli")
    screenshot("corrected")
    assert "22 frame(s) recomputed" in propagated()  # every frame but the two pinned ones
    screenshot("propagated_again")

    # export into the output folder and compare with the command's files
    page.check("input[name=destination][value=folder]")
    page.click("#export")
    page.wait_for_selector("#export-state[data-done=true]")
    assert page.locator("#message").is_hidden(), page.locator("#message").inner_text()
    screenshot("exported")
    _finish(cli_both)
    name = f"{SAMPLE_SEQUENCE}_seg.nii.gz"
    exported, command = nib.load(tmp_path / "app_out" / name), nib.load(tmp_path / "cli" / name)
    assert exported.shape == command.shape == (512, 512, 1, 24)
    np.testing.assert_array_equal(exported.affine, command.affine)
    np.testing.assert_array_equal(exported.header.get_zooms(), command.header.get_zooms())
    ours, theirs = read_label_series(tmp_path / "app_out" / name), read_label_series(tmp_path / "cli" / name)
    np.testing.assert_array_equal(ours[[0, 12]], theirs[[0, 12]])
    assert _agreement(ours, theirs) >= MATCH and set(np.unique(theirs)) == {0, 1, 2}
    if os.environ.get("TCMN_APP_SCREENSHOTS"):
        shutil.copytree(shots, os.environ["TCMN_APP_SCREENSHOTS"], dirs_exist_ok=True)
