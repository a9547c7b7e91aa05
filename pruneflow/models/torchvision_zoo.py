"""torchvision's classification models as a pruneflow model config: ``model=torchvision model.name=resnet18``.

Nothing is downloaded: the network starts from torchvision's initialisation, or from a local
``state_dict`` file (``model.weights``). ``num_classes`` and the input channels come from the data;
``cifar_stem`` gives a ResNet the CIFAR stem of He et al. (3×3 stride-1 conv, no max-pool), so
32×32 images are not shrunk to 8×8 before the first block.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from pruneflow.errors import ConfigError

log = logging.getLogger(__name__)

# Models whose training forward returns auxiliary logits unless told otherwise.
WITHOUT_AUX_LOGITS = {"googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False}}


def classification_model_names() -> list[str]:
    import torchvision  # imported here: only runs that use it pay for it

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_classifier(
    name: str,
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    cifar_stem: bool = False,
    weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """torchvision's ``name`` for ``num_classes`` classes and images of ``input_shape`` (C, H, W)."""
    import torchvision

    names = classification_model_names()
    if name not in names:
        raise ConfigError(f"model.name={name!r} is not a torchvision classification model; choose one of: "
                          f"{', '.join(names)}")  # fmt: skip
    network = torchvision.models.get_model(name, weights=None, num_classes=int(num_classes),
                                           **WITHOUT_AUX_LOGITS.get(name, {}))  # fmt: skip
    if cifar_stem:
        _cifar_stem(name, network)
    channels = int(input_shape[0])
    first_name, first = next((n, m) for n, m in network.named_modules() if isinstance(m, nn.Conv2d))
    if first.in_channels != channels:
        replace_module(network, first_name, conv_like(first, in_channels=channels))
    if weights is not None:
        load_weights(network, name, weights, num_classes)
    return network


def load_weights(network: nn.Module, name: str, weights: str | os.PathLike[str], num_classes: int) -> None:
    """``network`` (the model ``name``) starts from the local ``state_dict`` file ``weights``; one line where the
    file does not fit it."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state.get("state_dict", state))
    except RuntimeError as exc:
        raise ConfigError(f"model.weights={str(weights)!r} does not fit {name} with {num_classes} classes: "
                          f"{str(exc).splitlines()[0]}") from exc  # fmt: skip
    log.info("%s starts from %s", name, weights)


def _cifar_stem(name: str, network: nn.Module) -> None:
    conv = getattr(network, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(getattr(network, "maxpool", None), nn.MaxPool2d):
        raise ConfigError(f"model.cifar_stem=true is for ResNets (a conv1 and a maxpool); {name} has neither")
    network.conv1 = conv_like(conv, kernel_size=3, stride=1, padding=1)
    network.maxpool = nn.Identity()


def conv_like(conv: nn.Conv2d, **changes: object) -> nn.Conv2d:
    """A fresh conv with ``conv``'s settings but ``changes`` (new weights: a shape may change)."""
    arguments = {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size,
        "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
        "bias": conv.bias is not None,
    }  # fmt: skip
    return nn.Conv2d(**{**arguments, **changes})


def replace_module(network: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at dotted ``name`` to ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, child, module)
