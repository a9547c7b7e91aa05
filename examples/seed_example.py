"""The seed example: why zeroing a kernel does not keep it at zero, and why masking the activation does.

    python examples/seed_example.py

1. Scalar chain x1 = w1·in, x2 = w2·x1, x3 = w3·x2 with w = (1, 0, 1): ∂x3/∂w = (w3·w2·in, w3·x1, x2)
   = (0, in, 0). The zeroed w2 gets the largest gradient: it depends on its input x1, not on w2.
2. Two 3-channel convs, the middle output channel of conv1 pruned, one backward pass, through
   pruneflow's own strategies: with ``weight`` the pruned kernel's gradient is non-zero (the next step
   moves it); with ``activation`` it is exactly zero. conv2's input at that channel — and so the
   gradient of conv2's input slice for it — is zero in both.
"""

from __future__ import annotations

import torch
from torch import nn

from pruneflow.graph import find_prunable_layers
from pruneflow.pruning.strategies import make_strategy

PRUNED_CHANNEL = 1


def scalar_chain(input_value: float = 2.0) -> dict[str, float]:
    """Gradients of x3 with respect to (w1, w2, w3) at w = (1, 0, 1)."""
    weights = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    x1 = weights[0] * input_value
    x2 = weights[1] * x1
    x3 = weights[2] * x2
    x3.backward()
    assert weights.grad is not None
    return {f"dx3/dw{i + 1}": float(g) for i, g in enumerate(weights.grad)}


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def two_conv_example(strategy: str, seed: int = 0) -> dict[str, float]:
    """One forward/backward of TwoConv with conv1's middle channel pruned by ``strategy``."""
    torch.manual_seed(seed)
    model = TwoConv()
    images = torch.randn(4, 3, 8, 8)
    layer = next(layer for layer in find_prunable_layers(model) if layer.name == "conv1")
    pruned = torch.zeros(3, dtype=torch.bool)
    pruned[PRUNED_CHANNEL] = True
    make_strategy(strategy).apply(layer, pruned)

    seen: dict[str, torch.Tensor] = {}
    model.conv2.register_forward_pre_hook(lambda module, inputs: seen.update(conv2_input=inputs[0].detach()))
    model(images).square().mean().backward()
    assert model.conv1.weight.grad is not None and model.conv2.weight.grad is not None
    return {
        "conv1 pruned kernel |w|": float(model.conv1.weight[PRUNED_CHANNEL].detach().norm()),
        "conv1 pruned kernel |grad|": float(model.conv1.weight.grad[PRUNED_CHANNEL].norm()),
        "conv1 kept kernels |grad|": float(model.conv1.weight.grad[~pruned].norm()),
        "conv2 input at channel, max|x|": float(seen["conv2_input"][:, PRUNED_CHANNEL].abs().max()),
        "conv2 input-slice |grad|": float(model.conv2.weight.grad[:, PRUNED_CHANNEL].norm()),
    }


def main() -> None:
    print("Scalar chain x1=w1·in, x2=w2·x1, x3=w3·x2 at w=(1, 0, 1), in=2:")
    for name, value in scalar_chain(2.0).items():
        print(f"  {name} = {value:g}")
    rows = {strategy: two_conv_example(strategy) for strategy in ("weight", "activation")}
    columns = list(next(iter(rows.values())))
    width = max(len(c) for c in columns)
    print(f"\nTwo 3-channel convs, conv1 channel {PRUNED_CHANNEL} pruned, one backward:")
    print(f"  {'':{width}}  " + "  ".join(f"{s:>12}" for s in rows))
    for column in columns:
        print(f"  {column:{width}}  " + "  ".join(f"{rows[s][column]:12.6g}" for s in rows))


if __name__ == "__main__":
    main()
