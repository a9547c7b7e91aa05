"""Report: how many of a ShuffleNetV2 stage's channels an exact cut can remove with the forward unchanged.

    python examples/shufflenet_cut_bound.py                       # the four torchvision ShuffleNetV2 models
    python examples/shufflenet_cut_bound.py --widths 48 96 --blocks 3 7

Every block of a torchvision ShuffleNetV2 stage ends in ``channel_shuffle(cat(a, b), 2)``: output channel
``2i`` is ``a[i]`` and ``2i + 1`` is ``b[i]``. A stride-1 block first splits its input with ``chunk(2)``: the
first half passes through as ``a``, the second half is read by the block's branch, whose output is ``b``.
A cut that keeps the forward and the order of the kept channels (what ``pruneflow.compaction.cut`` did before it
learned to place a reordered space's channels by route) must:

- cut ``a`` and ``b`` of each shuffle at the same offsets (the smaller network interleaves its halves again);
- cut as many channels from each half of a ``chunk`` (the smaller network splits at its own middle).

The stride-2 block that opens a stage cuts a set ``E`` of offsets from both of its branch outputs. Everything
after it follows from ``E``: the cut offsets in the first half pass on, doubled by the next shuffle, and the
branch output of each later block is cut where its pass-through half is. So each ``chunk`` is one linear
equation on ``E``'s indicator vector (cut channels in the first half − in the second half = 0); this script
finds every cut size ``|E|`` that satisfies all of a stage's equations, by dynamic programming over the
offsets. A stage with few blocks can be cut to almost any multiple of 8; the 7-block stage of most widths
only not at all, or whole: no exact cut of its width exists without reordering its channels, which is why
``pruneflow.compaction.cut`` reorders them (each kept channel placed where the cut network's shuffles hand it to
the modules that read it in the masked one).
"""

from __future__ import annotations

import argparse

from torch import nn


def chunk_balances(width: int, blocks: int) -> list[tuple[int, ...]]:
    """For each offset ``t`` of the stage's first branch outputs (``width`` of them, the stage being twice as
    wide): what cutting ``t`` does to each later ``chunk``'s balance — channels it takes from the first half
    minus channels from the second — for the ``blocks`` stride-1 blocks after the opening one."""
    rows = []
    for offset in range(width):
        cut = {2 * offset, 2 * offset + 1}  # where the opening block's shuffle puts a[offset] and b[offset]
        row = []
        for _ in range(blocks):
            passed = {position for position in cut if position < width}  # the chunk's first half
            row.append(len(passed) - (len(cut) - len(passed)))
            cut = {doubled for position in passed for doubled in (2 * position, 2 * position + 1)}
        rows.append(tuple(row))
    return rows


def feasible_cuts(width: int, blocks: int) -> list[int]:
    """Every number of offsets (of ``width``) an exact, order-keeping cut can remove from the stage."""
    rows = chunk_balances(width, blocks)
    # What the offsets from t on can still add to each balance: a partial sum beyond it never returns to 0.
    reach = [[0] * blocks for _ in range(width + 1)]
    for offset in range(width - 1, -1, -1):
        reach[offset] = [reach[offset + 1][k] + abs(rows[offset][k]) for k in range(blocks)]
    states: dict[tuple[int, ...], set[int]] = {(0,) * blocks: {0}}
    for offset, row in enumerate(rows):
        following: dict[tuple[int, ...], set[int]] = {}
        for balance, sizes in states.items():
            for taken in (False, True):
                after = tuple(b + r for b, r in zip(balance, row, strict=True)) if taken else balance
                if any(abs(value) > reach[offset + 1][k] for k, value in enumerate(after)):
                    continue
                following.setdefault(after, set()).update(size + taken for size in sizes)
        states = following
    return sorted(states.get((0,) * blocks, set()))


def torchvision_stages(name: str) -> list[tuple[int, int]]:
    """(branch width, stride-1 blocks) of each stage of a torchvision ShuffleNetV2 model."""
    import torchvision

    model = getattr(torchvision.models, name)()
    stages: list[nn.Sequential] = [model.stage2, model.stage3, model.stage4]
    return [(stage[0].branch2[-3].out_channels, len(stage) - 1) for stage in stages]


def describe(cuts: list[int], width: int) -> str:
    inner = [size for size in cuts if 0 < size < width]
    if not inner:
        return f"none (only 0 or all {width})"
    half = min(inner, key=lambda size: abs(size - width / 2))
    return f"{len(inner)} sizes from {inner[0]} to {inner[-1]} (nearest to half: {half}, {half / width:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[f"shufflenet_v2_x{s}" for s in ("0_5", "1_0", "1_5", "2_0")])
    parser.add_argument("--widths", nargs="+", type=int, help="branch widths of stages to check instead")
    parser.add_argument("--blocks", nargs="+", type=int, help="stride-1 blocks of each of --widths' stages")
    args = parser.parse_args()
    if args.widths:
        if not args.blocks or len(args.blocks) != len(args.widths):
            parser.error(f"--blocks needs one count per width ({len(args.widths)}), got {args.blocks}")
        studies = {"given": list(zip(args.widths, args.blocks, strict=True))}
    else:
        studies = {name: torchvision_stages(name) for name in args.models}
    for name, stages in studies.items():
        for index, (width, blocks) in enumerate(stages):
            cuts = feasible_cuts(width, blocks)
            print(f"{name} stage {index + 2}: {2 * width} channels, {blocks} chunk+shuffle blocks after the first: "
                  f"exact cuts of its {width} offsets: {describe(cuts, width)}")  # fmt: skip


if __name__ == "__main__":
    main()
