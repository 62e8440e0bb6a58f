"""Darknet YOLOv3 / yolov3-tiny as a PyTorch module: a ``.cfg`` parser, a ``.weights`` loader and
the network, for the ``torch`` backend of the ``detect`` stage.

Layers: ``convolutional`` (batch norm, leaky or linear), ``maxpool`` (Darknet's padding: ``size - 1``
pixels, all but half of them right and bottom, so yolov3-tiny's size-2 stride-1 pool keeps the
size), ``upsample`` (nearest), ``route`` (channel concatenation), ``shortcut`` (addition) and
``yolo``. The output is what OpenCV's Darknet importer gives: per YOLO layer, rows ``cx, cy, w, h,
objectness, objectness x P(class)`` with the box relative to the network input, rows ordered by
cell (row-major) then anchor.

The weights file is read as raw little-endian numbers (``np.fromfile``): nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Darknet's batch-norm epsilon (``normalize_cpu``), which OpenCV's importer uses too.
BN_EPS = 1e-6


class DarknetError(ValueError):
    """A cfg or weights file this loader cannot use (unknown layer, wrong size)."""


def parse_cfg(text: str) -> list[dict[str, str]]:
    """Sections of a Darknet cfg, in order: ``{"type": name, key: value, ...}`` (comments dropped)."""
    sections: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append({"type": line.strip("[]").strip()})
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1][key.strip()] = value.strip()
    if not sections or sections[0]["type"] not in ("net", "network"):
        raise DarknetError("a Darknet cfg starts with a [net] section")
    return sections


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


class YoloHead(nn.Module):
    """Decode one YOLO layer's map into rows relative to the network input.

    Anchors are in input pixels: box sizes are divided by the size of the input actually given
    (as Darknet, which resizes the network to its input, and OpenCV do), not the cfg's width.
    """

    def __init__(self, anchors: list[tuple[float, float]], classes: int):
        super().__init__()
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)
        self.classes = classes

    def forward(self, x: torch.Tensor, input_wh: tuple[int, int]) -> torch.Tensor:
        n, _, h, w = x.shape
        a = len(self.anchors)
        p = x.float().view(n, a, 5 + self.classes, h, w).permute(0, 3, 4, 1, 2)  # N, H, W, A, 5 + C
        gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        cx = (p[..., 0].sigmoid() + gx[..., None]) / w
        cy = (p[..., 1].sigmoid() + gy[..., None]) / h
        bw = p[..., 2].exp() * self.anchors[:, 0] / input_wh[0]
        bh = p[..., 3].exp() * self.anchors[:, 1] / input_wh[1]
        obj = p[..., 4].sigmoid()
        cls = p[..., 5:].sigmoid() * obj[..., None]
        rows = torch.cat([torch.stack([cx, cy, bw, bh, obj], -1), cls], -1)
        return rows.reshape(n, h * w * a, 5 + self.classes)


class Darknet(nn.Module):
    """The network a Darknet cfg describes; ``forward`` returns one row tensor per YOLO layer."""

    def __init__(self, cfg_text: str):
        super().__init__()
        sections = parse_cfg(cfg_text)
        net = sections[0]
        channels = [int(net.get("channels", 3))]  # output channels of each layer; [0] is the input
        self.layers = nn.ModuleList()
        self.kinds: list[str] = []
        self.links: list[list[int]] = []  # absolute indices of the layers a route / shortcut reads
        for i, s in enumerate(sections[1:]):
            kind, c_in = s["type"], channels[-1]
            link: list[int] = []
            if kind == "convolutional":
                filters, size, stride = int(s["filters"]), int(s.get("size", 1)), int(s.get("stride", 1))
                bn = int(s.get("batch_normalize", 0))
                pad = size // 2 if int(s.get("pad", 0)) else int(s.get("padding", 0))
                act = s.get("activation", "linear")
                if act not in ("leaky", "linear"):
                    raise DarknetError(f"layer {i}: activation {act!r} is not supported")
                layer = nn.Sequential()
                layer.add_module("conv", nn.Conv2d(c_in, filters, size, stride, pad, bias=not bn))
                if bn:
                    layer.add_module("bn", nn.BatchNorm2d(filters, eps=BN_EPS))
                if act == "leaky":
                    layer.add_module("act", nn.LeakyReLU(0.1))
                c_out = filters
            elif kind == "maxpool":
                size, stride = int(s.get("size", 2)), int(s.get("stride", 2))
                layer = _DarknetMaxPool(size, stride, int(s.get("padding", size - 1)))
                c_out = c_in
            elif kind == "upsample":
                layer, c_out = nn.Upsample(scale_factor=int(s.get("stride", 2)), mode="nearest"), c_in
            elif kind == "route":
                if "groups" in s:
                    raise DarknetError(f"layer {i}: route with groups is not supported")
                link = [j if j >= 0 else i + j for j in _ints(s["layers"])]
                layer, c_out = nn.Identity(), sum(channels[j + 1] for j in link)
            elif kind == "shortcut":
                if s.get("activation", "linear") != "linear":
                    raise DarknetError(f"layer {i}: shortcut activation is not supported")
                link = [int(s["from"]) if int(s["from"]) >= 0 else i + int(s["from"])]
                layer, c_out = nn.Identity(), c_in
            elif kind == "yolo":
                mask = _ints(s["mask"])
                pairs = _ints(s["anchors"].replace(" ", ""))
                anchors = [(float(pairs[2 * m]), float(pairs[2 * m + 1])) for m in mask]
                layer, c_out = YoloHead(anchors, int(s["classes"])), c_in
            else:
                raise DarknetError(f"layer {i}: [{kind}] is not supported")
            self.layers.append(layer)
            self.kinds.append(kind)
            self.links.append(link)
            channels.append(c_out)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        input_wh = (x.shape[3], x.shape[2])
        outs: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        for layer, kind, link in zip(self.layers, self.kinds, self.links):
            if kind == "route":
                x = torch.cat([outs[j] for j in link], 1) if len(link) > 1 else outs[link[0]]
            elif kind == "shortcut":
                x = x + outs[link[0]]
            elif kind == "yolo":
                rows.append(layer(x, input_wh))
            else:
                x = layer(x)
            outs.append(x)
        return rows

    def load_darknet_weights(self, path: Path) -> dict[str, int]:
        """Load a Darknet ``.weights`` file: a header (major, minor, revision as int32, then
        ``seen`` as int64 when the version is 0.2 or later, as int32 before), then per convolution
        its biases (or batch-norm beta, gamma, mean, variance) and kernel, as float32.

        Returns:
            The header: {"major", "minor", "revision", "seen"}.

        Raises:
            DarknetError: the file is shorter or longer than the network needs.
        """
        raw = np.fromfile(path, dtype=np.uint8)
        major, minor, revision = (int(v) for v in raw[:12].view("<i4"))
        wide = (major * 10 + minor) >= 2 and major < 1000 and minor < 1000
        seen_end = 12 + (8 if wide else 4)
        seen = int(raw[12:seen_end].view("<i8" if wide else "<i4")[0])
        body = raw[seen_end:]
        if len(body) % 4:
            raise DarknetError(f"{path}: {len(body)} bytes after the header is not a whole number of float32")
        values, pos = body.view("<f4"), 0

        def take(t: torch.Tensor) -> None:
            nonlocal pos
            n = t.numel()
            if pos + n > len(values):
                raise DarknetError(f"{path}: ends after {pos} weights; the cfg needs more (truncated, or another cfg)")
            t.data.copy_(torch.from_numpy(values[pos:pos + n].copy()).view_as(t))
            pos += n

        for layer, kind in zip(self.layers, self.kinds):
            if kind != "convolutional":
                continue
            conv = layer.conv
            if hasattr(layer, "bn"):
                bn = layer.bn
                for t in (bn.bias, bn.weight, bn.running_mean, bn.running_var):
                    take(t)
            else:
                take(conv.bias)
            take(conv.weight)
        if pos != len(values):
            raise DarknetError(f"{path}: {len(values) - pos} weights left over after the last layer (another cfg?)")
        return {"major": major, "minor": minor, "revision": revision, "seen": seen}


class _DarknetMaxPool(nn.Module):
    """Darknet's max pool: ``padding`` pixels of -inf, ``padding // 2`` left and top, the rest right
    and bottom; output ``(size_in + padding - size) // stride + 1``."""

    def __init__(self, size: int, stride: int, padding: int):
        super().__init__()
        self.size, self.stride = size, stride
        self.pad = (padding // 2, padding - padding // 2, padding // 2, padding - padding // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, self.pad, value=float("-inf")), self.size, self.stride)


def load_darknet(cfg_text: str, weights: Path) -> Darknet:
    """The network of ``cfg_text`` with the weights of ``weights``, in eval mode on the CPU."""
    model = Darknet(cfg_text)
    model.load_darknet_weights(weights)
    return model.eval()
