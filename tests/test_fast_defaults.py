"""Speed settings: what ``auto`` resolves to per device, bad values, channels-last equivalence, data
tensors placed on the trainer's device once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from pruneflow import ClassifierModule
from pruneflow.data import SyntheticDataModule
from pruneflow.errors import ConfigError
from pruneflow.experiment import device_defaults
from pruneflow.experiment.device_defaults import SPEED_RULES, resolve_fast_defaults, training_batch_gflops
from pruneflow.models import VGG, ConvNet


def speed_config(**overrides: object) -> DictConfig:
    cfg = OmegaConf.create({"trainer": {"accelerator": "auto", "precision": "auto"}, "channels_last": "auto",
                            "matmul_precision": "auto", "compile": False})  # fmt: skip
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_auto_is_float32_nchw_on_a_cpu_without_avx512(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_defaults, "cpu_has_avx512", lambda: False)
    cfg = speed_config()
    chosen = resolve_fast_defaults(cfg)
    assert (cfg.trainer.precision, cfg.channels_last, cfg.matmul_precision) == ("32-true", False, None)
    assert chosen == {"trainer.precision": "32-true", "channels_last": False, "matmul_precision": None}


def test_an_avx512_cpu_gives_the_mnist_convnet_float32_channels_last_and_a_toy_net_nchw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured on this project's CPU (AVX-512): fp32 channels-last 1.54x fp32 NCHW for MNIST's ConvNet at batch
    128, 0.80x for a toy ConvNet; ``auto`` follows, and the run's model size decides. bf16, faster still there,
    is never picked on a CPU: the cut network would round differently from the masked one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_defaults, "cpu_has_avx512", lambda: True)
    mnist = training_batch_gflops(ConvNet((1, 28, 28), 10), (1, 28, 28), 128)
    toy = training_batch_gflops(ConvNet((1, 16, 16), 10, channels=(4, 8)), (1, 16, 16), 32)
    for gflops, channels_last in ((mnist, True), (toy, False), (float("inf"), True)):
        cfg = speed_config()
        resolve_fast_defaults(cfg, gflops=gflops)
        assert (cfg.trainer.precision, cfg.channels_last, cfg.matmul_precision) == ("32-true", channels_last, None)


def test_the_cpu_rule_follows_pytorchs_cpu_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    for capability, avx512 in (("AVX512", True), ("AVX2", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        assert device_defaults.cpu_has_avx512() is avx512
        expected = SPEED_RULES["cpu-avx512" if avx512 else "cpu"]
        assert device_defaults.speed_rule(on_cuda=False) == expected


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("channels_last", "yes", "channels_last must be true, false or auto, got 'yes'"),
        ("compile", "auto", "compile must be true or false, got 'auto'"),
        ("matmul_precision", "fast", "matmul_precision must be auto, null, highest, high or medium, got 'fast'"),
        ("compile_mode", "fast", "compile_mode must be one of default, reduce-overhead, max-autotune, got 'fast'"),
    ],
)
def test_bad_speed_settings_are_one_line_errors(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        resolve_fast_defaults(speed_config(**{key: value}))


def test_auto_keeps_a_tiny_network_in_fp32_nchw_on_a_gpu_and_gives_a_large_one_bf16_channels_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 autocast and channels-last cost launches a tiny network cannot win back: ``auto`` decides by the
    forward FLOPs of a training batch, against the device's measured threshold."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    mnist = training_batch_gflops(ConvNet((1, 28, 28), 10), (1, 28, 28), 128)
    assert 0.5 < mnist < 2.0  # MNIST's ConvNet at batch 128: about 1.1 GFLOPs
    cifar_vgg = training_batch_gflops(VGG((3, 32, 32), 10), (3, 32, 32), 128)
    threshold = SPEED_RULES["cuda"]
    assert mnist < threshold.bf16_from_gflops <= cifar_vgg
    for gflops, expected in ((mnist, ("32-true", False)), (cifar_vgg, ("bf16-mixed", True))):
        cfg = speed_config()
        resolve_fast_defaults(cfg, gflops=gflops)
        assert (cfg.trainer.precision, cfg.channels_last) == expected
    # On a CPU without AVX-512 fp32 NCHW whatever the size; explicit values always win.
    monkeypatch.setattr(device_defaults, "cpu_has_avx512", lambda: False)
    cfg = speed_config(**{"trainer.accelerator": "cpu"})
    resolve_fast_defaults(cfg, gflops=cifar_vgg)
    assert (cfg.trainer.precision, cfg.channels_last) == ("32-true", False)
    cfg = speed_config(**{"trainer.precision": "bf16-mixed", "channels_last": True})
    resolve_fast_defaults(cfg, gflops=mnist)
    assert (cfg.trainer.precision, cfg.channels_last) == ("bf16-mixed", True)


def test_channels_last_module_computes_what_the_nchw_one_does() -> None:
    torch.manual_seed(0)
    model = ConvNet(input_shape=(1, 16, 16), channels=(8, 16))
    reference = ClassifierModule(ConvNet(input_shape=(1, 16, 16), channels=(8, 16)), torch.optim.SGD, num_classes=10)
    reference.model.load_state_dict(model.state_dict())
    module = ClassifierModule(model, torch.optim.SGD, num_classes=10, channels_last=True)
    assert module.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(module(images), reference(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels_last must be true or false, got 'auto'"):
        ClassifierModule(model, torch.optim.SGD, num_classes=10, channels_last="auto")  # type: ignore[arg-type]


def test_data_tensors_move_to_an_accelerator_once_and_batches_are_cut_there() -> None:
    # The "meta" device stands in for a GPU: tensors there have shapes but no storage.
    data = SyntheticDataModule(num_train=300, num_test=50, input_shape=(1, 8, 8), batch_size=64)
    data.setup()
    device = torch.device("meta")
    data.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0,
                                   strategy=SimpleNamespace(root_device=device))  # fmt: skip
    loader = data.train_dataloader()
    assert loader.images.device == device and data.train_dataloader().images is loader.images  # copied once
    images, labels = next(iter(loader))
    assert images.device == device and tuple(images.shape) == (64, 1, 8, 8) and labels.device == device
    assert data.test_dataloader().images.device == device
    data.on_device = False
    assert data.train_dataloader().images.device.type == "cpu"
    data.on_device = None
    data.trainer.strategy.root_device = torch.device("cpu")
    assert data.train_dataloader().images is data.train_images  # on CPU nothing is copied
