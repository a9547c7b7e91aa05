"""pruneflow's model zoo: classifiers whose conv → BatchNorm → activation blocks are named for pruning,
and torchvision's and timm's classification models by name."""

from pruneflow.models.blocks import ACTIVATIONS, make_activation
from pruneflow.models.convnet import ConvNet
from pruneflow.models.resnet import ResNet
from pruneflow.models.small_torchvision import convnext, mobilenet_v2, mobilenet_v3, vit
from pruneflow.models.timm_zoo import timm_classifier
from pruneflow.models.torchvision_zoo import torchvision_classifier
from pruneflow.models.vgg import VGG

__all__ = [
    "ACTIVATIONS", "VGG", "ConvNet", "ResNet", "convnext", "make_activation", "mobilenet_v2", "mobilenet_v3",
    "timm_classifier", "torchvision_classifier", "vit",
]
