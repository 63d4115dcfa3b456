"""The one DAVIS scanner (`scripts.davis`) and the one format table each (`readers.VIDEO_FORMATS`,
`annotations.ANNOTATION_FORMATS`) that every job asks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import data, davis
from scripts.annotations import ANNOTATION_FORMATS, annotation_kind, check_annotation_format
from scripts.batch import read_datalist
from scripts.dicom_seg import is_dicom
from scripts.errors import InputError
from scripts.predict import video_name
from scripts.readers import VIDEO_FORMATS, open_video, video_kind


def write_root(root: Path, names: list[str], sequences: tuple[str, ...] = ("seq2", "seq10")) -> None:
    """A DAVIS root whose frames carry their own index as grey level, named `names` (not zero-padded)."""
    for seq in sequences:
        (root / "JPEGImages" / seq).mkdir(parents=True)
        (root / "Annotations" / seq).mkdir(parents=True)
        for name in names:
            value = int(name)
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(root / "JPEGImages" / seq / f"{name}.png")
            Image.fromarray(np.full((8, 8), 1, np.uint8)).save(root / "Annotations" / seq / f"{name}.png")


def test_training_evaluation_batch_and_inference_read_frames_in_one_natural_order(tmp_path: Path) -> None:
    write_root(tmp_path / "set", ["10", "2", "1"])
    sequences = data.list_sequences(tmp_path / "set")  # training's (data.py re-exports the scanner)
    assert data.list_sequences is davis.list_sequences
    assert [s.name for s in sequences] == ["seq2", "seq10"]
    assert [f.name for f in sequences[0].frames] == ["1.png", "2.png", "10.png"]
    assert [m.name for m in sequences[0].masks] == ["1.png", "2.png", "10.png"]
    source = open_video(tmp_path / "set" / "JPEGImages" / "seq2")  # inference's
    assert [int(source[t][0, 0, 0]) for t in range(len(source))] == [1, 2, 10]
    videos = read_datalist(tmp_path / "set")  # batch inference's: the first label map annotates frame "1"
    assert [v.name for v in videos] == ["seq2", "seq10"] and videos[0].mask_frame == (0,)


def test_a_missing_label_map_names_the_file(tmp_path: Path) -> None:
    write_root(tmp_path / "set", ["0", "1"], ("a",))
    (tmp_path / "set" / "Annotations" / "a" / "1.png").unlink()
    with pytest.raises(InputError, match=r"1\.png: label map missing for frame"):
        davis.list_sequences(tmp_path / "set")


def test_one_format_table_answers_every_job(tmp_path: Path) -> None:
    assert set(VIDEO_FORMATS.values()) == {"nifti", "video", "dicom"}
    assert [video_kind(Path(f"x{s}")) for s in (".NII.GZ", ".mp4", ".avi", ".dcm", ".png")] == [
        "nifti",
        "video",
        "video",
        "dicom",
        None,
    ]
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"")
    (tmp_path / "frames").mkdir()
    assert video_kind(tmp_path / "series") == "dicom" and is_dicom(tmp_path / "series")
    assert video_kind(tmp_path / "frames") == "frames" and not is_dicom(tmp_path / "frames")
    assert video_name("clip.nii.gz") == "clip" and video_name("clip.MP4") == "clip" and video_name("seq") == "seq"
    assert set(ANNOTATION_FORMATS) == {".png", ".nii", ".nii.gz"}
    assert annotation_kind("m.png") == "png" and annotation_kind("m.nii.gz") == "nifti"
    with pytest.raises(
        InputError, match=r"^m\.jpg: unsupported annotation format '\.jpg'; use \.png, \.nii or \.nii\.gz$"
    ):
        check_annotation_format(tmp_path / "m.jpg", shown="m.jpg")
    with pytest.raises(InputError, match=r"unsupported video format '\.gif'; use a frame folder, \.nii, \.nii\.gz"):
        (tmp_path / "v.gif").write_bytes(b"")
        open_video(tmp_path / "v.gif")
