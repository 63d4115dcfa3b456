"""The DICOM SEG never costs the other outputs: what it needs is checked before propagation (Type 2 attributes a
source lacks are given empty values), and a SEG that still fails to be written leaves the other outputs in place
with one line naming it. Real DICOM series built with pydicom; the unmarked tests run in-process with the
copy-first-frame propagator, the slow one through `python -m monai.bundle run inference`."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from test_batch import dicom_series
from test_cli import infer, run_all, series, succeeded

from scripts.baselines import CopyFirstFrame
from scripts.errors import InputError
from scripts.predict import Prediction

MISSING = ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName")


class NeverCalled:
    """A propagator that fails the test if the job gets as far as propagating."""

    def propagate(self, source, annotations):
        pytest.fail("the job propagated before refusing the DICOM SEG")


def ct_series(directory: Path, frames: np.ndarray, **changes: object) -> dict[Path, bytes]:
    """`dicom_series` made a CT series lacking the Type 2 attributes `MISSING`, with `changes` applied; returns
    every file's bytes (to show the source is never written)."""
    dicom_series(directory, frames)
    for file in directory.iterdir():
        ds = pydicom.dcmread(file)
        ds.Modality = "CT"
        for keyword in MISSING:
            delattr(ds, keyword)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(file)
    return {file: file.read_bytes() for file in directory.iterdir()}


@pytest.fixture
def mask(tmp_path: Path, echo_clip) -> Path:
    Image.fromarray(echo_clip[1][0]).save(tmp_path / "mask.png")
    return tmp_path / "mask.png"


def test_a_ct_series_without_type2_attributes_gets_its_seg(
    tmp_path: Path, echo_clip, mask: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No PatientBirthDate (nor sex, study id, accession number, referring physician): the SEG is written with them
    empty, the source files are untouched, and highdicom's INFO chatter stays out of the log."""
    frames = echo_clip[0][..., 0]
    before = ct_series(tmp_path / "ct", frames)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        Prediction(str(tmp_path / "ct"), str(mask), CopyFirstFrame(), str(out)).run()
    assert sorted(p.name for p in out.iterdir()) == ["ct_seg.dcm", "ct_seg.nii.gz"]
    seg = hd.seg.segread(out / "ct_seg.dcm")
    assert all(seg.get(keyword) in ("", None) for keyword in MISSING)
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[pydicom.dcmread(f).SOPInstanceUID for f in sorted(before, reverse=True)],
        combine_segments=True,
    )
    np.testing.assert_array_equal(masks, series(out / "ct_seg.nii.gz"))
    assert {file: file.read_bytes() for file in before} == before
    assert not [r for r in caplog.records if r.name.startswith("highdicom") and r.levelno < logging.WARNING]


def test_a_seg_the_source_cannot_take_is_found_before_propagation(
    tmp_path: Path, echo_clip, mask: Path, capsys: pytest.CaptureFixture
) -> None:
    """PatientSex 'X' (not one of M, F, O): asked for, the SEG is refused before any propagation; by default the job
    says so in one note and writes the NIfTI alone."""
    ct_series(tmp_path / "ct", echo_clip[0][..., 0], PatientSex="X")
    asked = Prediction(str(tmp_path / "ct"), str(mask), NeverCalled(), str(tmp_path / "asked"), save_dicom_seg=True)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'ct'}: cannot write a DICOM SEG referencing it \(.*'X'"):
        asked.run()
    assert not (tmp_path / "asked").exists()
    Prediction(str(tmp_path / "ct"), str(mask), CopyFirstFrame(), str(tmp_path / "default")).run()
    assert [p.name for p in (tmp_path / "default").iterdir()] == ["ct_seg.nii.gz"]
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "no DICOM SEG written" in note[0] and "'X'" in note[0], note


def test_a_seg_that_fails_to_be_written_keeps_the_other_outputs(tmp_path: Path, echo_clip) -> None:
    """A file-size limit above the label buffer and the NIfTI but below the SEG (20 segments, bit-packed per frame
    and segment): the NIfTI and PNGs are written and kept, and the one error line names the SEG and what was kept."""
    frames = echo_clip[0][..., 0]
    ct_series(tmp_path / "ct", frames)
    stripes = (np.arange(frames.shape[2]) * 20 // frames.shape[2] + 1).astype(np.uint8)
    Image.fromarray(np.broadcast_to(stripes, frames.shape[1:]).copy()).save(tmp_path / "stripes.png")
    out = tmp_path / "out"
    job = Prediction(str(tmp_path / "ct"), str(tmp_path / "stripes.png"), CopyFirstFrame(), str(out), save_png=True)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (frames.size + 4096, limits[1]))  # the buffer is T×H×W bytes
    try:
        with pytest.raises(InputError) as error:
            job.run()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert str(error.value) == (
        f"{out / 'ct_seg.dcm'}: the DICOM SEG was not written (cannot write the results: File too large); the other "
        f"outputs were written: {out / 'ct_seg.nii.gz'}, {out / 'ct'}/ (PNG label maps)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["ct", "ct_seg.nii.gz"]  # no staging, no partial SEG
    np.testing.assert_array_equal(series(out / "ct_seg.nii.gz")[3], np.broadcast_to(stripes, frames.shape[1:]))
    assert len(list((out / "ct").iterdir())) == len(frames)


@pytest.mark.slow
def test_inference_on_a_ct_series_without_patient_birth_date(
    tmp_path: Path, checkpoint: Path, echo_clip, mask: Path
) -> None:
    """The reported case through the command line: the NIfTI and the SEG are written, and the closing line names
    both; no highdicom INFO lines in the output."""
    ct_series(tmp_path / "ct", echo_clip[0][..., 0])
    out = tmp_path / "out"
    result = run_all({"ct": infer(checkpoint, video=tmp_path / "ct", mask=mask, output_dir=out)})["ct"]
    succeeded(result)
    assert sorted(p.name for p in out.iterdir()) == ["ct_seg.dcm", "ct_seg.nii.gz"]
    closing = result.stdout.strip().splitlines()[-1]
    assert str(out / "ct_seg.dcm") in closing and str(out / "ct_seg.nii.gz") in closing, closing
    assert "highdicom" not in result.stdout + result.stderr
    assert hd.seg.segread(out / "ct_seg.dcm").PatientBirthDate == ""
