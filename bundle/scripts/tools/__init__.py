"""Developer commands, apart from the product: benchmarks, int8 calibration, data packing, held-out clips, the ONNX
export and the GPU session scripts. Each is `python -m scripts.tools.<name>` (argparse; `--help` lists its options)
from `bundle/`, or with `bundle` on `PYTHONPATH`; none is needed to run the bundle's jobs."""
