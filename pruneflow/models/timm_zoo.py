"""timm's models as a pruneflow model config: ``model=timm model.name=resnet18`` (``pip install -e ".[timm]"``).

Nothing is downloaded: the network starts from timm's initialisation, or from a local ``state_dict`` file
(``model.weights``). ``num_classes`` and the input channels come from the data, and so does the image size
where the model takes one (``img_size``: ViTs, Swin, MaxViT); a model built for one size only, or one that
cannot run on the data's images, is refused in one line before training.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pruneflow.errors import ConfigError
from pruneflow.models.torchvision_zoo import load_weights

log = logging.getLogger(__name__)


def _timm() -> Any:
    try:
        import timm  # imported here: only runs that use it pay for it, and it is an optional extra
    except ImportError:
        raise ConfigError('model=timm needs timm, which is not installed: pip install -e ".[timm]"') from None
    return timm


def timm_classifier(
    name: str,
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    weights: str | os.PathLike[str] | None = None,
    **model_arguments: Any,
) -> nn.Module:
    """timm's ``name`` for ``num_classes`` classes and images of ``input_shape`` (C, H, W); ``model_arguments``
    go to ``timm.create_model`` (``drop_path_rate=0.1``, say)."""
    timm = _timm()
    if not timm.is_model(name):
        nearest = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {' or '.join(nearest)}?" if nearest else "; timm.list_models() lists them"
        raise ConfigError(f"model.name={name!r} is not a timm model{hint}")
    channels, size = int(input_shape[0]), tuple(int(s) for s in input_shape[1:])
    arguments = {"pretrained": False, "num_classes": int(num_classes), "in_chans": channels, **model_arguments}
    network = _created(timm, name, arguments, size)
    _check_runs(network, name, (channels, *size))
    if weights is not None:
        load_weights(network, name, weights, num_classes)
    return network


def _created(timm: Any, name: str, arguments: dict[str, Any], size: tuple[int, ...]) -> nn.Module:
    """The model built for images of ``size`` where it takes an ``img_size``, else as timm builds it."""
    try:
        return timm.create_model(name, img_size=size, **arguments)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise ConfigError(f"model=timm model.name={name}: {str(exc).splitlines()[0]}") from exc
    return timm.create_model(name, **arguments)


def _check_runs(network: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    """One forward pass on a zero image, in eval mode, so a model that cannot take the data's images says so
    now, in one line, rather than at the first training step."""
    training = network.training
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, *shape))
    except Exception as exc:  # any failure here means the same: this model does not run on these images
        fixed = getattr(network, "pretrained_cfg", {}).get("input_size")
        hint = f" (timm builds it for {fixed[1]}×{fixed[2]} px images)" if fixed else ""
        raise ConfigError(f"model=timm model.name={name} cannot run on {'×'.join(map(str, shape))} images{hint}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc  # fmt: skip
    finally:
        network.train(training)
