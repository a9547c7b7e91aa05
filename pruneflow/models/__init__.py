"""pruneflow's model zoo: classifiers whose conv → BatchNorm → activation blocks are named for pruning."""

from pruneflow.models.blocks import ACTIVATIONS, make_activation
from pruneflow.models.convnet import ConvNet
from pruneflow.models.resnet import ResNet
from pruneflow.models.vgg import VGG

__all__ = ["ACTIVATIONS", "VGG", "ConvNet", "ResNet", "make_activation"]
