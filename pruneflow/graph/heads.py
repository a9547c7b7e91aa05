"""What a cut of an attention's q, k, v rows must keep where its head width follows the stream it reads
(``ChannelSpace.tied_to``: torchvision's Swin and MaxViT attentions): the same query/key positions from q and k,
as many positions in every head and of values, and as many per head as the stream keeps per head. The cut checks
it on the masks it is given; an explicit channel list (``mask.criterion=explicit``) is checked before training.
An attention cut in whole heads (``ChannelSpace.whole_heads``: timm's) loses each head's q, k and v rows together
or none of them (``takes_whole_heads``); where it is also tied (DaViT's channel attention, XCiT's XCA, EVA's with a
rope: its heads' output is reshaped by its input's width, and a position inside a head cannot go), the stream loses a
head's width for each head it loses (``whole_heads_problem``).

An attention tied to a stream follows the share of it the stream loses, which is rounded to whole multiples of the
stream's ``multiple`` (``stream_share``): the criteria select both at that share, so they agree."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pruneflow.graph.records import ChannelSpace
from pruneflow.graph.routes import channels_to_prune


def tied_heads_problem(space: ChannelSpace, pruned: Tensor, stream_kept: int | None) -> str | None:
    """Why pruning ``pruned`` (a bool per q/k/v row of ``space``) cannot be cut while the stream it is tied to
    keeps ``stream_kept`` channels (None: heads of a width of their own, tied to no stream: EfficientFormerV2's);
    None where it can."""
    heads = space.heads
    rows = pruned.view(space.parts, heads, -1)
    q, k, v = rows[0], rows[min(1, space.parts - 1)], rows[-1]
    counts = {int(n) for n in (*q.sum(1), *v.sum(1))}
    kept_per_head = q.shape[1] - min(counts)
    if space.values_alike and not (v == v[:1]).all():
        return "its heads' outputs are read head-minor, so every head must keep the same value positions"
    if space.rope is not None and (not (q == q[:1]).all() or not whole_frequencies(space, q[0])):
        return (f"its q/k positions are rotated by rope {space.rope.owner}: whole frequencies of it, the same in every "
                f"head (frequency f is the positions p with {space.rope.at}[p] == f)")  # fmt: skip
    if torch.equal(q, k) and len(counts) == 1 and stream_kept in (None, heads * kept_per_head):
        return None
    if stream_kept is None:
        return "an attention's heads must keep the same query/key positions in q and k, as many in every head"
    return (
        f"an attention's heads must keep the same query/key positions in q and k, as many in every head and of "
        f"values, and {stream_kept // heads} each (its input keeps {stream_kept} channels for {heads} heads)"
    )


def whole_frequencies(space: ChannelSpace, pruned: Tensor) -> bool:
    """Whether ``pruned`` (a bool per position of one head) takes every position of a frequency of ``space``'s rope
    or none."""
    at = torch.tensor(space.rope.at)
    taken = torch.zeros(space.rope.count, dtype=torch.bool).index_fill_(0, at[pruned.cpu()], True)
    return torch.equal(taken[at], pruned.cpu())


def takes_whole_heads(space: ChannelSpace, pruned: Tensor) -> bool:
    """Whether ``pruned`` (a bool per q/k/v row of ``space``) takes every q, k and v row of a head or none."""
    per_head = pruned.view(3, space.heads, -1)
    return torch.equal(per_head.all(-1).all(0), per_head.any(-1).any(0))


def whole_heads_problem(space: ChannelSpace, pruned: Tensor, stream_kept: int) -> str | None:
    """Why pruning ``pruned`` (a bool per q/k/v row of ``space``, an attention cut in whole heads and tied to its
    stream) cannot be cut while the stream keeps ``stream_kept`` channels; None where it can."""
    kept_heads = space.heads - int(pruned.view(3, space.heads, -1).all(-1).all(0).sum())
    width = space.width // (3 * space.heads)
    if takes_whole_heads(space, pruned) and stream_kept == kept_heads * width:
        return None
    return (
        f"attention {space.heads_of} is cut in whole heads of {width} channels, and its input keeps one head's "
        f"width per kept head ({stream_kept} channels for {kept_heads} heads)"
    )


def stream_share(stream: ChannelSpace, amount: float) -> float:
    """The share of its channels ``stream``, read by attentions tied to it, loses at ``amount``: whole multiples
    of ``ChannelSpace.multiple``, as ``Criterion.select`` prunes it."""
    return stream_loss(stream, amount) / stream.width


def stream_loss(stream: ChannelSpace, amount: float) -> int:
    """The channels ``stream`` loses at ``amount``: whole multiples of its heads' width (``multiple``), and, where it
    is cut at the same positions in each of its ``groups`` (EdgeNeXt's scales), of as many positions in each."""
    unit = math.lcm(stream.multiple, stream.groups)
    return unit * channels_to_prune(stream.width // unit, amount)
