"""The channel graph: traced once, read by selection, every strategy, the telemetry and compaction.

A model is traced with ``torch.fx`` into **channel spaces**. A space is a set of channels that share
an index everywhere they flow; cutting channel ``c`` of a space removes it from every tensor that
carries it. For each space the graph knows

- its **producers** (``PrunableLayer``): the weights that write channel ``c`` — a conv's kernel row
  ``weight[c]`` (and ``bias[c]``), a linear layer's output feature ``c``, a depthwise conv reading the
  space, which carries channel ``c`` to its own channel ``c`` and owns row ``c`` — each with its
  **norm** (the BatchNorm, or LayerNorm over the channels, applied directly to its output) and its
  **channel point**, where an activation mask removes the channel for good: the norm's output when
  there is one (after β: an all-zero input channel leaves BatchNorm as ``γ·(0 − 0)/√(0 + ε) + β = β``),
  else the producer's;
- its **consumers**: the weights that read it — a dense conv's input slice ``weight[:, c]``, a linear
  layer's input feature ``c``, or after a flatten its feature block ``c·k … (c+1)·k − 1`` — at an
  offset when the space reaches them through ``torch.cat`` along channels;
- its **points** (``ChannelPoint``): the norms that read it among other channels — a BatchNorm after a
  concatenation (DenseNet's pre-activation ``norm1``) or an addition, a LayerNorm over a residual stream
  (ConvNeXt's) — each writes β into the space's channels again, so the space is masked there too, at its
  offset, and cut from the norm's entries. A **LayerNorm over the channels** (``LAYER_NORMS``: ``nn.LayerNorm``
  over the last dim of a channels-last tensor, torchvision's ``LayerNorm2d`` over dim 1, exact types) also
  mixes the channels: its mean and variance count every channel it reads, so masking its input is not
  enough for the masked network to equal the cut one, whose LayerNorm counts the kept channels only. The
  ``activation`` strategy therefore recomputes it over the kept channels (``strategies.mask_layer_norm``)
  wherever it is a channel point;
- its **scales** (``ChannelScale``): per-channel parameters read outside their module (``get_attr``) and
  multiplied into it — ConvNeXt's ``layer_scale``, (C, 1, 1) — which keep a zero channel at zero and are cut
  with the space's channels; a parameter of any other shape is a tensor outside the graph, and refused;
- its **sources** (``ChannelSource``): parameters that write its channels themselves, added into it or
  concatenated with it along the tokens (a ViT's ``pos_embed``, ``cls_token``): masked by the ``activation``
  strategy (multiplied by the keep mask), cut with the space's channels;
- its **groups**: written or read by a grouped conv (ResNeXt, RegNet), a space is cut at the same
  positions in each of the conv's groups, scored by the criterion summed over the groups, so the
  conv keeps its group count and every group keeps an equal width;
- whether it is **coupled**: several producers' outputs meet in a residual addition or an elementwise
  product (a squeeze-and-excitation scale times its input), so the space is pruned as a group: masked
  at every producer's channel point (a sum or product of zeros is zero) and cut from every member;
- its **routes**, where it is **reordered** on its way: a channel shuffle (ShuffleNet's ``view`` to
  (N, groups, C/groups, H, W), ``transpose``, ``view`` back) or a ``chunk``/``split`` of the channels moves
  each channel to a position of its own, so a traced value may carry its channels position by position
  (``_Value.layout``) and each reader records where each channel of a space reaches it (``Consumer.at``,
  ``ChannelPoint.at``). A reshape is followed on a **probe**: a small tensor of channel indices (distinct
  primes for the other dims) goes through the same ``view``/``transpose``/``permute`` ops, with sizes read from
  ``x.size()`` as the probe has them; where every index along dim 1 or the last dim holds one channel again, the
  channels are readable again, reordered, and anything else reading a reshape mid-way refuses the space. A
  depthwise conv reading several spaces (a shuffled stream, a concatenation) carries each channel at its
  position: a ``ChannelPoint`` of each, its rows cut with the channels. A reordered space's **route** of a
  channel is the set of modules that read it (``channel_routes``): a cut that keeps the network's own shuffles
  and splits hands a cut network's channels to readers by position at the cut widths, so it places each kept
  channel on a slot of the same route (``compaction.cut``), and the criteria keep no more channels on a route
  than the cut network has slots there (``route_slots``, traced at those widths). A split by constant sizes that
  its owner holds in attributes the cut can set (``register_split_sizes``: FasterNet's ``dim_conv3`` and
  ``dim_untouched``, CSPNet's ``expand_chs // 2``) reorders nothing: it is recorded (``ChannelSpace.splits``), the
  criteria keep each part's share (``split_slots``), the cut cuts each part on its own and sets the owner's sizes to
  the channels each keeps (``reordered`` stays False: nothing to place, no zero channels). A slice ``x[:, a:b]`` at
  positions so held is such a part too (RexNet's ``x[:, 0:in_channels]``), and a whole space added to a run of
  another's channels is **embedded** in them (``handlers.slices``): its producers' rows become points of the wider
  space, its readers read the wider space's channels there;
- its **heads**, where it is a Swin attention's q, k and v rows: torchvision's ``ShiftedWindowAttention`` (exact
  type) is kept whole, a leaf; its ``qkv`` reads the residual stream (a consumer) and writes the q, k, v rows of
  every head, a space of its own whose ``proj`` reads the value rows; ``proj`` writes the attention's output, a
  producer of the stream. Both are masked at the attention's output, the only place their channels exist
  outside it. The attention takes its head width from its input's width, so the heads' space is **tied** to the
  stream (``tied_to``): pruned with it or not at all, as many positions per head as the stream keeps per head
  (the stream is pruned in multiples of the heads, ``multiple``), the same from q and k. ``_patch_merging_pad``
  (Swin's patch merging) places the stream 4 times side by side. MaxViT's ``PartitionAttentionLayer`` (exactly as
  torchvision builds it) is a leaf too: the stream it reads is written again by its attention's ``merge`` and its
  MLP's second layer (residuals, so coupled), read by ``to_qkv`` and the MLP's first layer, normalised by its two
  LayerNorms; ``to_qkv``'s rows are a heads space tied to the stream, whose head width is the attention's own
  ``head_dim`` (``head_width_of``: the cut sets it; its scale, fixed at construction, stays). torch's
  ``nn.MultiheadAttention`` (torchvision's ViT; exact type, called as self-attention) is a leaf whose one width,
  ``embed_dim``, is its query's, its heads' and its output's: its packed ``in_proj`` (``PackedInProjection``, the
  attention's own tensors) reads the stream and writes a heads space tied to it; its ``out_proj`` writes the stream
  itself; the cut rebuilds it at the kept width. A flatten after an adaptive pooling to 1 × 1 is (N, C), not
  channel-major: a LayerNorm there (MaxViT's classifier) is a point;
- a module **called more than once** (CoaT's MLP shared by its parallel streams) computes the same channels on
  every call that reads what its first call read: it is that call again, pruned once; a module with tensors of its
  own called on different spaces fits no cut of either, so every space it reads or writes is refused;
- why it is **not prunable**, if it is not: an op the graph does not understand (its name goes to the
  log, once), a reshuffle by position it cannot follow (slicing, a split of unknown sizes), a grouped conv
  reading a concatenation, a norm across channels other than the known LayerNorms (GroupNorm, a LayerNorm
  subclass, a LayerNorm over more than the channels), channels read along another dim than theirs, a parameter tied
  to another module's or read outside its module (``F.conv2d(x, self.conv.weight)``), an activation
  with f(0) ≠ 0 between a channel point and a reader, the network's output, a submodule ``torch.fx`` cannot
  trace (an **opaque leaf**, kept whole by ``capture``: every space it reads, or whose tensors its output
  meets, is refused naming it). Nothing is guessed: a model whose own forward ``torch.fx`` cannot trace, outside
  every submodule, has no prunable space.

Each traced value knows where its channels are: at dim 1 (a conv's output, and what a conv reads) or at
the last dim (a linear layer's output, and what a linear layer reads, unless flattened channel-major). A
``permute`` (``torch.permute``, ``Tensor.permute``, torchvision's ``Permute``) moves them; one that moves them
anywhere else, a pooling or reduction of channels-last values, an addition of values with their channels at
different dims, is refused. ConvNeXt is read this way: each stage's residual stream (the stem or
downsampling conv, every depthwise conv, every block's second linear layer, the LayerNorms, the layer scales)
is one coupled space, and each block's hidden width another.

The package, below ``pruning`` and ``compaction`` (both read it; it imports neither): ``records`` (the spaces and
what reads and writes them), ``values`` (what a traced tensor carries), ``union`` (the union of spaces), ``capture``
(the fx graph, with the registered leaves and the opaque ones kept whole), ``tracer`` (one handler per node of it),
``registry`` (the tables of handlers and how to extend
them), ``handlers`` (the graph's own rules, one module per family of ops), ``leaves`` (a layer taught in a few
lines), ``routes`` (routes and slots of reordered spaces), ``layers`` (what the graph knows of layer types).
"""

from pruneflow.graph import handlers  # noqa: F401  (fills the tables of handlers)
from pruneflow.graph.layers import LAYER_NORMS, is_depthwise, is_layer_norm, is_producer, norm_width
from pruneflow.graph.records import (
    ChannelGraph,
    ChannelPoint,
    ChannelScale,
    ChannelSource,
    ChannelSpace,
    Consumer,
    PrunableLayer,
)
from pruneflow.graph.registry import (
    register_function_handler,
    register_method_handler,
    register_module_handler,
    register_split_sizes,
)
from pruneflow.graph.routes import channel_routes, channels_to_prune, route_slots
from pruneflow.graph.tracer import Tracer, find_prunable_layers, trace_channel_graph
from pruneflow.graph.union import UnionFind
from pruneflow.graph.values import UNKNOWN, Parts, Value

__all__ = [
    "LAYER_NORMS",
    "UNKNOWN",
    "ChannelGraph",
    "ChannelPoint",
    "ChannelScale",
    "ChannelSource",
    "ChannelSpace",
    "Consumer",
    "Parts",
    "PrunableLayer",
    "Tracer",
    "UnionFind",
    "Value",
    "channel_routes",
    "channels_to_prune",
    "find_prunable_layers",
    "is_depthwise",
    "is_layer_norm",
    "is_producer",
    "norm_width",
    "register_function_handler",
    "register_method_handler",
    "register_module_handler",
    "register_split_sizes",
    "route_slots",
    "trace_channel_graph",
]
