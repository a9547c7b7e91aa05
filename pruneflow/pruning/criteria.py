"""Channel importance criteria: small, swappable objects; the lowest-scoring channels are pruned first.

A criterion scores the channels of a channel space — one producer, or a group of producers that
share the space (a residual addition, a depthwise conv carrying it) — and owns whatever it needs
for that: ``taylor`` its accumulation of w·∂L/∂w over training batches, ``explicit`` its lists,
``bn_gamma`` its check that there is a BatchNorm to read. A group's importance combines its
producers' (summed L1, as DepGraph does; the L2 norm over all their kernels; summed |γ|; summed
Taylor terms), so removing channel c is judged by everything that computes it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pruneflow.errors import ConfigError, is_count
from pruneflow.graph import ChannelSpace, PrunableLayer, channels_to_prune
from pruneflow.graph.heads import stream_loss, stream_share, takes_whole_heads, tied_heads_problem, whole_heads_problem


def select_channels(scores: Tensor, count: int, already_pruned: Tensor) -> Tensor:
    """Boolean mask (True = pruned) of the ``count`` lowest-scoring channels, keeping those pruned already.

    Ties break by channel index, so the choice is deterministic on every process.
    """
    pruned = already_pruned.clone()
    extra = count - int(pruned.sum())
    if extra <= 0:
        return pruned
    scores = scores.detach().float().cpu().clone()
    scores[pruned.cpu()] = float("inf")
    order = torch.sort(scores, stable=True).indices
    pruned[order[:extra].to(pruned.device)] = True
    return pruned


def select_by_route(
    routes: Mapping[tuple[str, ...], Sequence[int]],
    scores: Tensor,
    count: int,
    already_pruned: Tensor,
    slots: Mapping[tuple[str, ...], int] | None = None,
) -> Tensor:
    """``select_channels`` on each route of a reordered space (``ChannelSpace.routes``), so that a cut keeping the
    network's shuffles finds a slot on its route for every kept channel: with ``slots`` (the cut's slots per route,
    ``ChannelSpace.route_slots``), each route keeps its best channels up to its slots, pruning more than ``count``
    where the cut has fewer slots on a route than the share would keep; without, ``count`` is shared out in
    proportion to the routes' sizes (largest remainders first). A route keeps what it pruned before."""
    routes = list(routes.items())
    width = sum(len(channels) for _, channels in routes)
    exact = [count * len(channels) / width for _, channels in routes]
    shares = [int(share) for share in exact]
    by_remainder = sorted(range(len(routes)), key=lambda r: (-(exact[r] - shares[r]), r))
    for route in by_remainder[: count - sum(shares)]:
        shares[route] += 1
    if slots is not None:
        fitted = [len(channels) - min(len(channels), slots.get(key, 0)) for key, channels in routes]
        if sum(fitted) < width:  # never every channel: a cut with no slot on any route is left to pad
            shares = fitted
    pruned = already_pruned.clone()
    for (_, route), share in zip(routes, shares, strict=True):
        index = torch.tensor(route, device=pruned.device)
        chosen = select_channels(scores.index_select(0, index.to(scores.device)), share, pruned.index_select(0, index))
        pruned[index] = chosen
    return pruned


def select_per_head(
    scores: Tensor, heads: int, per_head: int, already_pruned: Tensor, parts: int = 3, values_alike: bool = False,
    alike: bool = False,
) -> Tensor:
    """An attention's q, k, v rows (``ChannelSpace.heads``): in every head the ``per_head`` query/key positions of
    lowest summed q and k score (cut from q and k alike: a product of a kept and a pruned position is 0 anyway) and
    the ``per_head`` lowest value positions, keeping those pruned already. Rows of separate q, k and v layers
    (``parts`` 1, coupled), or of one layer whose q, k and v lose the same positions (``alike``: its space cut in
    ``groups`` of q, k and v, CoaT's): the ``per_head`` positions of lowest summed score in every head, from all
    three. ``values_alike`` (``ChannelSpace.values_alike``): the same value positions in every head, of lowest score
    summed over the heads."""
    if parts == 1 or alike:
        rows = scores.detach().float().view(parts, heads, -1).sum(0)
        before = already_pruned.view(parts, heads, -1).any(0)
        pruned = torch.stack([select_channels(rows[h], per_head, before[h]) for h in range(heads)])
        return pruned.flatten().repeat(parts).to(already_pruned.device)
    q, k, v = scores.detach().float().view(3, heads, -1)
    before_q, before_k, before_v = already_pruned.view(3, heads, -1)
    pruned_qk = torch.stack([select_channels(q[h] + k[h], per_head, before_q[h] | before_k[h]) for h in range(heads)])
    pruned_v = torch.stack([select_channels(v[h], per_head, before_v[h]) for h in range(heads)])
    if values_alike:
        pruned_v = select_channels(v.sum(0), per_head, before_v.any(0)).expand(heads, -1)
    return torch.stack([pruned_qk, pruned_qk, pruned_v]).flatten().to(already_pruned.device)


def select_frequencies(
    scores: Sequence[Tensor], space: ChannelSpace, per_head: int, already_pruned: Tensor, pruned: Tensor
) -> Tensor:
    """``pruned`` (``select_per_head``'s choice for ``space``) with its q/k positions replaced by whole frequencies
    of its rope (``ChannelSpace.rope``): the ``per_head`` positions of the frequencies of lowest q and k score summed
    over every head of every attention the table reaches (``scores``: one per q/k/v space), the same in each, keeping
    frequencies pruned already (a position of theirs pruned)."""
    rope = space.rope
    at = torch.tensor(rope.at)
    position_scores = sum(s.detach().float().cpu().view(3, space.heads, -1)[:2].sum((0, 1)) for s in scores)
    frequency_scores = torch.zeros(rope.count).index_add_(0, at, position_scores)
    before = torch.zeros(rope.count, dtype=torch.bool)
    before[at[already_pruned.view(3, space.heads, -1)[:2].any(0).any(0).cpu()]] = True
    frequencies = select_channels(frequency_scores, per_head // rope.positions, before)
    rows = pruned.view(3, space.heads, -1).clone()
    rows[:2] = frequencies[at].to(rows.device)
    return rows.flatten()


def select_whole_heads(scores: Tensor, heads: int, count: int, already_pruned: Tensor) -> Tensor:
    """An attention's q, k, v rows pruned by whole heads (``mask.heads``): each head scored by the mean of its q, k
    and v rows' scores (a head lives in all three), the ``count`` lowest heads pruned with every row of theirs,
    keeping heads pruned already (a gradual schedule's earlier choices)."""
    per_head = scores.detach().float().view(3, heads, -1)
    before = already_pruned.view(3, heads, -1).all(-1).all(0)
    pruned_heads = select_channels(per_head.mean(dim=(0, 2)), count, before.to(per_head.device))
    return pruned_heads.view(1, heads, 1).expand_as(per_head).flatten().to(already_pruned.device)


def select_blocks(scores: Tensor, block: int, count: int, already_pruned: Tensor) -> Tensor:
    """A space normalised in groups of ``block`` channels (``ChannelSpace.block``: a GroupNorm's): the ``count``
    groups of lowest mean score pruned with every channel of theirs, keeping groups pruned already."""
    per_block = scores.detach().float().view(-1, block)
    before = already_pruned.view(-1, block).all(-1)
    pruned = select_channels(per_block.mean(-1), count, before.to(per_block.device))
    return pruned.view(-1, 1).expand_as(per_block).flatten().to(already_pruned.device)


def select_in_groups(
    scores: Tensor, space: ChannelSpace, amount: float, already_pruned: Tensor, loss: int | None = None
) -> Tensor:
    """A space cut in groups (a grouped conv's, a gate's pairs: ``ChannelSpace.groups``): the same positions in every
    group, scored summed over the groups; each part of a split by sizes the cut sets (``ChannelSpace.splits``) keeps
    its best position where it would keep none (a part cut to nothing would leave its reader no input), the next
    lowest pruned in its place. ``loss``: the channels the whole space loses, where it is not ``amount`` of each group
    rounded (a stream losing whole multiples of its heads' width: ``stream_loss``)."""
    blocks, size = space.groups, space.width // space.groups
    count = channels_to_prune(size, amount) if loss is None else loss // blocks
    position_scores = scores.detach().float().cpu().view(blocks, -1).sum(0)
    before = already_pruned.view(blocks, -1).any(0).cpu()
    parts = [torch.arange(split.start + sum(split.sizes[:k]), split.start + sum(split.sizes[: k + 1])) % size
             for split in space.splits for k in range(len(split.sizes)) if split.sizes[k]]  # fmt: skip
    positions = select_channels(position_scores, count, before)
    for _ in parts:  # each protection can empty at most one more part
        emptied = [part for part in parts if positions[part].all()]
        if not emptied:
            break
        for part in emptied:  # its best position not pruned before is kept
            best = part[position_scores[part].masked_fill(before[part], float("-inf")).argmax()]
            position_scores[best] = float("inf")
        positions = select_channels(position_scores, count, before)
    return positions.repeat(blocks).to(already_pruned.device)


def producer_weight(layer: PrunableLayer) -> Tensor:
    """The producer's effective weight, flattened per output channel (works under parametrizations too)."""
    return layer.producer.weight.detach().flatten(1).float()


class Criterion:
    """Scores a space's channels; ``select`` prunes the lowest up to an amount, keeping earlier choices."""

    name: ClassVar[str]
    whole_heads = False  # mask.heads: an attention's q, k, v space loses whole heads (``select_whole_heads``)

    def check(self, spaces: Sequence[ChannelSpace]) -> None:
        """Refuse, before training, spaces this criterion cannot score."""

    def bind(self, network: nn.Module) -> None:
        """The network whose spaces it scores (a group importance reads the consumers' modules by name)."""

    def scores(self, space: ChannelSpace) -> Tensor:
        raise NotImplementedError

    def select(self, space: ChannelSpace, amount: float, already: Tensor) -> Tensor:
        if space.tied_to is not None:  # an attention's q/k/v rows lose the share its stream loses, rounded as it is
            amount = stream_share(space.tied_to, amount)
        if space.heads > 1 and (self.whole_heads or space.whole_heads):  # timm's heads: whole ones only, always
            return select_whole_heads(self.scores(space), space.heads, channels_to_prune(space.heads, amount), already)
        if space.head_rows:
            per_head = channels_to_prune(space.width // (space.parts * space.heads), amount)
            alike = space.parts > 1 and space.groups == space.parts  # q, k and v cut at the same positions
            scores = self.scores(space)
            pruned = select_per_head(scores, space.heads, per_head, already, space.parts, space.values_alike, alike)
            if space.rope is not None:  # q/k positions by whole frequencies, the same wherever the table reaches
                scores = [self.scores(reader) for reader in space.rope.spaces if reader.prunable]
                return select_frequencies(scores, space, per_head, already, pruned)
            return pruned
        if space.block > 1:  # normalised by a GroupNorm: its whole groups only
            count = channels_to_prune(space.width // space.block, amount)
            return select_blocks(self.scores(space), space.block, count, already)
        # read by attentions whose head width follows it: whole multiples of their heads (as many as the groups below
        # take from each of theirs, where their count is a multiple of the heads: NextViT's grouped conv, one per head)
        if space.multiple > 1 and space.groups > 1 and space.groups % space.multiple:  # EdgeNeXt's scales' XCA
            return select_in_groups(self.scores(space), space, amount, already, stream_loss(space, amount))
        if space.multiple > 1 and space.groups % space.multiple:
            count = space.multiple * channels_to_prune(space.width // space.multiple, amount)
            return select_channels(self.scores(space), count, already)
        if space.groups > 1:  # before its routes: a gate's pairs split by sizes the cut sets (MambaOut's)
            return select_in_groups(self.scores(space), space, amount, already)
        if space.routes:
            slots = space.route_slots(amount) if space.route_slots is not None else None
            count = channels_to_prune(space.width, amount)
            return select_by_route(space.routes, self.scores(space), count, already, slots)
        return select_channels(self.scores(space), channels_to_prune(space.width, amount), already)

    @property
    def steps_to_select(self) -> int:
        """Optimizer steps it gathers evidence over, once a pruning event is due, before it can select."""
        return 0

    def ready(self) -> bool:
        """Whether it can select now; one that gathers evidence over training steps starts doing so."""
        return True

    def before_optimizer_step(self, layers: Sequence[PrunableLayer]) -> None:
        """Called once per optimizer step, before it, with the step's whole gradient in ``.grad`` (every
        micro-batch of an accumulation window backpropagated, no gradient mask applied yet)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` wrote (the callback's state holds it)."""


class L1(Criterion):
    """Σ|w| over every producer's kernel of the channel."""

    name = "l1"

    def scores(self, space: ChannelSpace) -> Tensor:
        return sum(producer_weight(layer).abs().sum(1) for layer in space.producers)


class L2(Criterion):
    """‖w‖₂ over all the producers' kernels of the channel together."""

    name = "l2"

    def scores(self, space: ChannelSpace) -> Tensor:
        return sum(producer_weight(layer).pow(2).sum(1) for layer in space.producers).sqrt()


class Random(Criterion):
    """Uniform scores seeded by (seed, space name) only, so every process of a distributed run draws alike."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, space: ChannelSpace) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(space.name.encode()))
        return torch.rand(space.width, generator=generator)


class BnGamma(Criterion):
    """Σ|γ| over the affine BatchNorms of the space's producers (Liu et al. 2017, network slimming)."""

    name = "bn_gamma"

    def check(self, spaces: Sequence[ChannelSpace]) -> None:
        for space in spaces:
            if not self._gammas(space):
                raise ConfigError(
                    f"mask.criterion=bn_gamma needs an affine BatchNorm after {space.name}, which has none; "
                    "choose another criterion or leave it out of mask.layers"
                )

    @staticmethod
    def _gammas(space: ChannelSpace) -> list[Tensor]:
        norms = [layer.norm for layer in space.producers if layer.norm is not None]
        return [norm.weight.detach().abs().float() for norm in norms if norm.weight is not None]

    def scores(self, space: ChannelSpace) -> Tensor:
        return sum(self._gammas(space))


class Taylor(Criterion):
    """First-order Taylor estimate of the loss change from removing a channel: |Σ w·∂L/∂w| over the
    kernels of every producer, summed over ``batches`` optimizer steps gathered just before selecting."""

    name = "taylor"

    def __init__(self, batches: int = 8) -> None:
        self.batches = batches  # checked by make_criterion
        self.pending: int | None = None  # gathered steps while gathering, else None
        self.sums: dict[str, Tensor] = {}

    @property
    def steps_to_select(self) -> int:
        return self.batches

    def ready(self) -> bool:
        if self.pending is None:
            self.pending, self.sums = 0, {}
            return False
        if self.pending < self.batches:
            return False
        self.pending = None
        return True

    def before_optimizer_step(self, layers: Sequence[PrunableLayer]) -> None:
        if self.pending is None:
            return
        for layer in layers:
            contribution = taylor_contribution(layer)
            if contribution is not None:
                previous = self.sums.get(layer.name)
                self.sums[layer.name] = contribution if previous is None else previous + contribution
        self.pending += 1

    def scores(self, space: ChannelSpace) -> Tensor:
        missing = [layer.name for layer in space.producers if layer.name not in self.sums]
        if missing:
            raise RuntimeError(f"no gradients were gathered for {', '.join(missing)} before selecting by taylor")
        return sum(self.sums[layer.name].float().cpu() for layer in space.producers).abs()

    def state_dict(self) -> dict[str, Any]:
        return {
            "taylor_pending": -1 if self.pending is None else self.pending,
            "taylor_scores": {name: score.cpu() for name, score in self.sums.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "taylor_pending" in state:
            self.pending = None if state["taylor_pending"] < 0 else int(state["taylor_pending"])
            self.sums = dict(state["taylor_scores"])


def taylor_contribution(layer: PrunableLayer) -> Tensor | None:
    """Σ w·∂L/∂w per output channel for the gradient now in ``.grad``; call before the optimizer step."""
    weight = layer.producer.weight
    grad = weight.grad if weight.grad is not None else _parametrized_grad(layer)
    if grad is None:
        return None
    return (weight.detach() * grad).flatten(1).sum(1)


def _parametrized_grad(layer: PrunableLayer) -> Tensor | None:
    return parametrized_grad(layer.producer)


def parametrized_grad(module: nn.Module) -> Tensor | None:
    """The gradient of a parametrized weight's stored original, where ``module.weight`` is computed."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or "weight" not in parametrizations:
        return None
    return parametrizations["weight"].original.grad


class Explicit(Criterion):
    """The channels a user lists per producer; a list for any producer of a space prunes the whole space."""

    name = "explicit"

    def __init__(self, channels: Mapping[str, Sequence[int]]) -> None:
        if not channels:
            raise ConfigError("mask.criterion=explicit needs mask.channels, e.g. mask.channels={features.0:[0,3]}")
        self.channels = {str(name): [int(c) for c in indices] for name, indices in channels.items()}

    @property
    def patterns(self) -> list[str]:
        """The layers it names: the default ``mask.layers``."""
        return list(self.channels)

    def check(self, spaces: Sequence[ChannelSpace]) -> None:
        widths = {layer.name: space.width for space in spaces for layer in space.producers}
        groups = {layer.name: space.groups for space in spaces for layer in space.producers}
        for name, indices in self.channels.items():
            width = widths.get(name)
            if width is None:
                selected = ", ".join(widths)
                raise ConfigError(f"mask.channels names {name!r}, which is not a selected prunable layer: {selected}")
            bad = [i for i in indices if not 0 <= i < width]
            if bad:
                raise ConfigError(f"mask.channels[{name}] has indices {bad} outside 0..{width - 1} ({width} channels)")
            if len(set(indices)) >= width:
                raise ConfigError(f"mask.channels[{name}] would remove all {width} channels; keep at least one")
            blocks = groups[name]
            mask = torch.zeros(width, dtype=torch.bool)
            mask[indices] = True
            if not (mask.view(blocks, -1) == mask[: width // blocks]).all():
                raise ConfigError(
                    f"mask.channels[{name}] must name the same positions in each of its {blocks} groups of "
                    f"{width // blocks} channels (a grouped conv writes or reads them), e.g. "
                    f"{[g * (width // blocks) for g in range(blocks)]}"
                )
        for space in spaces:  # a group loses the union of its producers' lists
            union = {index for layer in space.producers for index in self.channels.get(layer.name, [])}
            if space.grouped and len(union) >= space.width:
                raise ConfigError(
                    f"mask.channels for {', '.join(space.names)} together remove all {space.width} channels of the "
                    f"group {'+'.join(space.names)}, which share them; keep at least one"
                )
            if space.whole_heads and union:
                check_whole_heads(space, sorted(union))
            if space.block > 1 and union:
                check_whole_blocks(space, sorted(union))
        for space in spaces:
            if space.head_rows and space.tied_to is not None:
                self._check_tied_heads(space)

    def _named(self, space: ChannelSpace) -> Tensor:
        """The channels of ``space`` its producers' lists name together."""
        named = torch.zeros(space.width, dtype=torch.bool)
        for layer in space.producers:
            named[self.channels.get(layer.name, [])] = True
        return named

    def _check_tied_heads(self, heads: ChannelSpace) -> None:
        """An attention whose head width follows the stream it reads: a list for the stream needs one for the
        attention's q, k, v rows that the cut can follow, and the other way round (``tied_heads_problem``)."""
        stream = heads.tied_to
        stream_pruned, heads_pruned = self._named(stream), self._named(heads)
        if not stream_pruned.any() and not heads_pruned.any():
            return
        check = whole_heads_problem if heads.whole_heads else tied_heads_problem
        problem = check(heads, heads_pruned, stream.width - int(stream_pruned.sum()))
        if problem:
            raise ConfigError(
                f"mask.channels for {stream.name} ({int(stream_pruned.sum())} channels) and {heads.name} "
                f"({int(heads_pruned.sum())} q/k/v rows) cannot be cut: the attention's head width follows the "
                f"stream it reads, so name its q/k/v rows too: {problem} (or rank them: mask.criterion=l1)"
            )

    def select(self, space: ChannelSpace, amount: float, already: Tensor) -> Tensor:
        mask = already.clone()
        for layer in space.producers:
            mask[self.channels.get(layer.name, [])] = True
        if mask.all():
            raise ConfigError(f"mask.channels would remove all {space.width} channels of the group {space.names}")
        return mask


def check_whole_blocks(space: ChannelSpace, indices: Sequence[int]) -> None:
    """Refuse an explicit list that names part of a group of a space a GroupNorm normalises in groups."""
    named = torch.zeros(space.width, dtype=torch.bool)
    named[list(indices)] = True
    blocks = named.view(-1, space.block)
    if not torch.equal(blocks.all(-1), blocks.any(-1)):
        raise ConfigError(
            f"mask.channels[{space.name}] must name whole groups of the GroupNorm that normalises it in groups of "
            f"{space.block} channels, e.g. {list(range(space.block))}"
        )


def check_whole_heads(space: ChannelSpace, indices: Sequence[int]) -> None:
    """Refuse an explicit list that names part of a head of an attention pruned in whole heads (timm's)."""
    mask = torch.zeros(space.width, dtype=torch.bool)
    mask[list(indices)] = True
    if takes_whole_heads(space, mask):
        return
    rows, width = space.width // 3, space.width // (3 * space.heads)
    example = [part * rows + row for part in range(3) for row in range(width)]
    raise ConfigError(
        f"mask.channels[{space.name}] must name whole heads of attention {space.heads_of} ({space.heads} heads of "
        f"{width}): each head's q, k and v rows, e.g. head 0 is {example}"
    )


CRITERIA: dict[str, type[Criterion]] = {cls.name: cls for cls in (L1, L2, Random, BnGamma, Taylor, Explicit)}
EXPLICIT = Explicit.name
CRITERION_NAMES = tuple(CRITERIA)


def make_criterion(
    name: str, channels: Mapping[str, Sequence[int]] | None = None, taylor_batches: int = 8, seed: int = 0
) -> Criterion:
    """The criterion called ``name`` with the settings it uses; ``channels`` must be left unset for the others."""
    if name not in CRITERIA:
        raise ConfigError(f"unknown mask.criterion {name!r}; choose one of: {', '.join(CRITERION_NAMES)}")
    if not is_count(taylor_batches) or taylor_batches < 1:
        raise ConfigError(f"mask.taylor_batches must be a positive integer, got {taylor_batches!r}")
    if not is_count(seed) or seed < 0:
        raise ConfigError(f"mask.seed must be a non-negative integer, got {seed!r}")
    if channels and name != EXPLICIT:
        raise ConfigError(f"mask.channels is only used with mask.criterion=explicit, not {name!r}")
    if name == EXPLICIT:
        return Explicit(channels or {})
    if name == Taylor.name:
        return Taylor(taylor_batches)
    if name == Random.name:
        return Random(seed)
    return CRITERIA[name]()
