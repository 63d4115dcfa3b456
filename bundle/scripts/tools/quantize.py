"""int8 calibration, the developer command behind `--runtime onnxruntime --quantized FILE` (`scripts.int8`).

    python -m scripts.tools.quantize --dataset_dir DIR[,DIR…] --output FILE [--ckpt_path PATH] [--variant lite]
        [--split_file PATH] [--frames_per_sequence 5] [--overwrite]

It writes an int8 calibration file (`scripts.int8.Int8Calibration`): the activation ranges of the key encoder's and
the decoder's graphs while the float32 network propagates the first annotation of each *training* sequence of
`--dataset_dir` (the `train` split of `--split_file`; sequences listed as `val` are never read),
`--frames_per_sequence` frames of each, evenly spaced.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from scripts import prepare_job
from scripts.errors import InputError, OneLineParser
from scripts.int8 import FLOAT_NODES, INT8_STEPS, Int8Calibration, quiet_quantizer, weights_digest

FRAMES_PER_SEQUENCE = 5


class RangeCollector:
    """onnxruntime's MinMax calibrator over one graph, fed one input at a time (it keeps only the running range)."""

    def __init__(self, model: bytes, folder: Path, name: str) -> None:
        import onnx
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator

        path = folder / f"{name}.onnx"
        path.write_bytes(model)
        self.inputs = [i.name for i in onnx.load_from_string(model).graph.input]
        with quiet_quantizer():
            self.calibrator = create_calibrator(
                path,
                None,
                augmented_model_path=folder / f"{name}.augmented.onnx",
                calibrate_method=CalibrationMethod.MinMax,
            )
        self.count = 0

    def add(self, feeds: Mapping[str, np.ndarray]) -> None:
        batch = iter([{name: feeds[name] for name in self.inputs}])

        class Reader:
            def get_next(self) -> dict | None:
                return next(batch, None)

        self.calibrator.collect_data(Reader())
        self.count += 1

    def ranges(self) -> dict[str, tuple[float, float]]:
        data = self.calibrator.compute_data()
        return {
            name: (float(np.min(data[name].range_value[0])), float(np.max(data[name].range_value[1]))) for name in data
        }


def merge_ranges(*tables: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The union of MinMax ranges (graphs of several frame sizes share their tensor names)."""
    merged: dict[str, tuple[float, float]] = {}
    for table in tables:
        for name, (lo, hi) in table.items():
            old = merged.get(name, (lo, hi))
            merged[name] = (min(lo, old[0]), max(hi, old[1]))
    return merged


def calibrate(
    network: torch.nn.Module,
    sequences: Sequence,
    frames_per_sequence: int = FRAMES_PER_SEQUENCE,
    mem_every: int = 5,
    mem_size: int = 8,
    top_k: int | None = 30,
) -> Int8Calibration:
    """Measure the int8 steps' activation ranges on `sequences` (`scripts.davis.Sequence`: frames and label maps).

    Each sequence's frame-0 annotation (all its objects) is propagated forward by the float32 network (batch norm
    folded, as `--runtime torch`) through the inference job's `PropagationInferer` and `MemoryBank` with the given
    memory settings; the key encoder's input and the decoder's inputs of `frames_per_sequence` evenly spaced frames
    feed the calibrators, so the decoder sees real memory readouts. Sequences without foreground on frame 0 are
    skipped. Graphs are built per frame size, as at inference, and their ranges merged.
    """
    import onnxruntime

    from scripts.annotations import read_label_map
    from scripts.inferer import ModelPropagator, PropagationInferer
    from scripts.memory import MemoryBank
    from scripts.readers import open_video
    from scripts.runtime import DECODE_IO, KEY_IO, DecodeStep, KeyStep, RuntimeNetwork, onnx_bytes

    if frames_per_sequence < 1:
        raise ValueError(f"frames_per_sequence must be >= 1, got {frames_per_sequence}")
    network = network.eval()
    collectors: dict[tuple, RangeCollector] = {}
    chosen: set[int] = set()
    calls = {"key": 0, "decode": 0}
    used: list[str] = []

    with tempfile.TemporaryDirectory(prefix="tcmn-calibration-") as folder:

        def collector(key: tuple, step: torch.nn.Module, inputs: list[torch.Tensor], io_spec: tuple) -> RangeCollector:
            if key not in collectors:
                model = onnx_bytes(step, [t.float() for t in inputs], io_spec)
                collectors[key] = RangeCollector(model, Path(folder), f"graph{len(collectors)}")
            return collectors[key]

        class Recorder(RuntimeNetwork):
            """The float32 network (`--runtime torch`) that hands the chosen frames' step inputs to the collectors."""

            def encode_key(self, image: torch.Tensor):
                if calls["key"] in chosen:
                    feed = image.float().contiguous()
                    collector(("key", *image.shape[-2:]), KeyStep(self.network), [feed], KEY_IO).add(
                        {"image": feed.numpy()}
                    )
                calls["key"] += 1
                return super().encode_key(image)

            def decode(self, readout, f16, f8, f4, size, valid=None):
                if calls["decode"] + 1 in chosen:  # decode call i segments frame i + 1
                    inputs = [t.float().contiguous() for t in (readout, f16, f8, f4)]
                    size = (int(size[0]), int(size[1]))
                    key = ("decode", *size, *(d for t in inputs[1:] for d in t.shape[-2:]))
                    graph = collector(key, DecodeStep(self.network, size), inputs, DECODE_IO)
                    graph.add({name: t.numpy() for name, t in zip(DECODE_IO[0], inputs)})
                calls["decode"] += 1
                return super().decode(readout, f16, f8, f4, size, valid)

        recorder = Recorder(network, "torch")
        memory = functools.partial(MemoryBank, mem_size=mem_size, top_k=top_k)
        # the inference job's propagator: label values to objects 1..K, frames in, the network sized to fit
        propagator = ModelPropagator(recorder, PropagationInferer(memory, mem_every=mem_every, device="cpu", amp=False))
        for sequence in sequences:
            labels = read_label_map(sequence.masks[0])
            if not labels.any():
                continue
            source = open_video(sequence.frames[0].parent)
            steps = len(source) - 1  # propagated frames after the annotated frame 0
            # key calls: 0 the annotated frame (pinned), then one per propagated frame; decode calls: one per frame
            picks = sorted({int(round(x)) for x in np.linspace(1, steps, min(frames_per_sequence, steps))})
            chosen.clear()
            calls.update(key=0, decode=0)
            chosen.update(picks)
            for _ in propagator.propagate(source, {0: labels}):
                pass
            if picks:
                used.append(sequence.key)
        if not used:
            raise InputError("no training sequence with foreground on frame 0 and at least 2 frames to calibrate on")
        ranges = {
            step: merge_ranges(*(c.ranges() for key, c in collectors.items() if key[0] == step)) for step in INT8_STEPS
        }
        counts = {step: sum(c.count for key, c in collectors.items() if key[0] == step) for step in INT8_STEPS}
    source = {
        "sequences": used,
        "frames_per_sequence": frames_per_sequence,
        "key_frames": counts["key"],
        "decoder_calls": counts["decode"],
        "memory": {"mem_every": mem_every, "mem_size": mem_size, "top_k": top_k},
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }
    return Int8Calibration(network.variant, weights_digest(network), ranges, source)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    bundle = Path(__file__).resolve().parents[2]
    parser = OneLineParser(
        prog="python -m scripts.tools.quantize",
        description="Write the int8 calibration file of --runtime onnxruntime --quantized FILE: activation ranges of "
        "the key encoder's and decoder's graphs, measured on the training sequences of --dataset_dir.",
    )
    parser.add_argument("--dataset_dir", required=True, help="DAVIS-layout dataset root(s), comma-separated")
    parser.add_argument("--output", required=True, type=Path, help="the int8 calibration file to write (JSON)")
    parser.add_argument(
        "--ckpt_path", type=Path, default=None, help="the network weights (default: the variant's shipped weights)"
    )
    parser.add_argument("--variant", default="lite", choices=sorted(FLOAT_NODES), help="the network's size")
    parser.add_argument(
        "--split_file",
        type=Path,
        default=bundle / "configs" / "splits.json",
        help="JSON mapping '<dataset>/<sequence>' to train or val: only train sequences are read (unlisted ones "
        "count as train)",
    )
    parser.add_argument(
        "--frames_per_sequence",
        type=int,
        default=FRAMES_PER_SEQUENCE,
        help="propagated frames of each sequence whose step inputs are measured, evenly spaced",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    if args.frames_per_sequence < 1:
        parser.error(f"--frames_per_sequence {args.frames_per_sequence}: a positive integer")
    parser.check_output_file("--output", args.output, args.overwrite)
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    from scripts.davis import list_sequences
    from scripts.network import TCMN, load_network_weights, weights_file
    from scripts.runtime import check_runtime

    prepare_job()  # as every job: one-line input errors, denormals flushed (as the inference it calibrates for)
    args = parse_args(argv)
    check_runtime("onnxruntime")
    if args.threads:
        torch.set_num_threads(args.threads)
    everything = list_sequences(args.dataset_dir)
    sequences = list_sequences(args.dataset_dir, "train", args.split_file)
    print(
        f"calibrating on {len(sequences)} training sequences of {args.dataset_dir} "
        f"({len(everything) - len(sequences)} listed as val in {args.split_file} left out)",
        flush=True,
    )
    if not sequences:
        raise InputError(
            f"--dataset_dir {args.dataset_dir}: no training sequences (every one is val in {args.split_file})"
        )
    ckpt_path = weights_file(args.variant) if args.ckpt_path is None else args.ckpt_path
    network = load_network_weights(TCMN(args.variant, pretrained=False), ckpt_path, "cpu").eval()
    with torch.inference_mode():
        calibration = calibrate(network, sequences, args.frames_per_sequence)
    calibration.source = {"dataset_dir": args.dataset_dir, "split": "train", **calibration.source}
    path = calibration.save(args.output)
    used = calibration.source
    print(
        f"wrote {path}: ranges of {len(calibration.ranges['key'])} key-encoder and {len(calibration.ranges['decode'])} "
        f"decoder tensors from {used['key_frames']} frames and {used['decoder_calls']} decoder calls of "
        f"{len(used['sequences'])} sequences; use it with --runtime onnxruntime --quantized {path}"
    )
    return path


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # a bad input ends the command with one line, as the bundle's jobs do
        raise SystemExit(f"error: {err}") from None
