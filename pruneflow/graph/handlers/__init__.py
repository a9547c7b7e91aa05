"""The graph's own rules, one module per family of ops; importing this package fills the tables of
``pruneflow.graph.registry``. A user's rules plug in the same way (``register_module_handler``, ``register_leaf``).

- ``pointwise``: activations and dropout, which keep channel c in channel c (and a zero at zero, or revive it);
- ``producers``: convs and linear layers, which write spaces, and their reading of spaces (consumers);
- ``norms``: BatchNorms and LayerNorms over the channels, and the norms across channels the graph refuses;
- ``joins``: additions and products (coupling spaces), per-channel scales, concatenations;
- ``gates``: a product (or sum) of two parts of one layer's rows, channel for channel (a GLU MLP, gMLP's gating
  unit, MambaOut's gate): the rows cut in pairs (``ChannelSpace.groups``), a split into equal parts following them;
- ``multipliers``: depthwise convs with a channel multiplier k (FastViT, PiT): their output space expanded into the
  space they read, k entries per channel;
- ``shapes``: flattens, poolings, reductions, permutes, and the shape arithmetic a reshape reads;
- ``reorderings``: splits and reshapes of the channels (a channel shuffle), followed on a probe;
- ``slices``: parts of a space at positions its owner holds (a slice ``x[:, a:b]``, a split by sizes), cut on
  their own; a whole space added to a run of another's channels, embedded in them (RexNet's widening residual);
- ``attention``: torch's ``nn.MultiheadAttention`` (torchvision's ViT), torchvision's Swin and MaxViT attention
  layers, kept whole;
- ``tokens``: a transformer's token stream: parameters added to it or concatenated with it (position embeddings,
  class tokens), patches turned into tokens by a width an attribute holds (torchvision's ViT), the tokens taken for
  the head (after ``joins`` and ``shapes``, whose rules it extends);
- ``recurrent``: ``nn.LSTM``, kept whole: a consumer of its input, its hidden units a space of their own (both
  directions' unit j one channel), masked inside its recurrence;
- ``timm_attention``: timm's multi-head attention, kept whole, pruned in whole heads (if timm is installed);
- ``timm_attention_classes``: BEiT's, EVA's and CaiT's attentions, kept whole, their heads tied to the stream
  (EVA's with a rope whose table is not read, or a q/k norm, in whole heads, the stream losing a head's width per head);
- ``timm_rope``: timm's rotary position embeddings read by EVA's attention: its q/k positions cut by whole frequencies
  of the rope's table, shared by every block, the table cut with them;
- ``timm_coat``: CoaT's factorised attention, kept whole, its heads tied to the stream and cut at the same positions
  in q, k and v with its convolutional relative position encoding's depthwise convs (``channel_splits`` set);
- ``timm_channel_attention``: XCiT's and EdgeNeXt's cross-covariance attention (XCA), a softmax over a head's
  channels: kept whole, cut in whole heads tied to the stream, XCA's ``temperature`` with them;
- ``timm_davit``: DaViT's channel attentions (V1 and V2), kept whole, cut per position of a head (the same from q, k
  and v) tied to the stream, masked by computing them again with the pruned positions out of their softmax;
- ``timm_hieradet``: SAM2's Hiera: a position embedding built from two parameters (each a source of the stream),
  its windows put back, its attention with pooled queries cut in whole heads;
- ``timm_levit``: LeViT's ``LinearNorm`` (a Linear and its BatchNorm1d over the tokens) and its attentions, kept
  whole, their q/k/v rows refused, the stream they read and write prunable;
- ``timm_additive_attention``: SwiftFormer's additive attention, kept whole, its query, key and ``proj`` rows one
  space (``F.normalize`` over channels a masked 0 adds nothing to), ``w_g`` cut with them;
- ``timm_mvitv2``: MViTv2's pooling attention, kept whole and cut in whole heads (masked at ``proj``'s columns), and
  its ``MultiScaleBlock``, kept whole, its stream followed through the pooled shortcut;
- ``timm_split_attention``: SKNet's selective kernel and ResNeSt's split attention, kept whole, their paths one
  space (a softmax over the paths keeps channels independent), their logit rows points of it; Res2Net's equal parts;
- ``timm_halo``: HaloNet's and BoTNet's attentions, kept whole, their q/k/v rows one space cut at the same positions
  in every head (their relative position tables' columns with them), their output its value rows;
- ``timm_efficientvim``: EfficientViM's HSM-SSD mixer, kept whole: its input's channels carried into its hidden state,
  its ``hz_proj`` rows cut in pairs, ``out_proj`` writing both outputs, its state dims refused;
- ``timm_focal_modulation``: FocalNet's focal modulation, kept whole, its query and context rows two spaces;
- ``timm_nextvit``: NextViT's efficient attention, kept whole, its q/k/v heads tied to the stream;
- ``timm_layers``: timm's norm-act modules, ``*Same`` convs, LayerNorms, activations and layer scales (if installed);
- ``timm_metaformer``: MetaFormer's ``Scale``, its parameter cut and the shape it views it by set by the cut;
- ``timm_mobile_attention``: the mobile hybrids' attentions on maps, kept whole, their streams carried and read:
  EfficientViT-MIT's ``LiteMLA`` cut in whole heads, EfficientFormerV2's talking heads by positions per head,
  LowFormer's and CPUBone's ``ConvAttention`` with their q/k/v rows refused;
- ``timm_partial_attention``: the attentions over parts of the stream's channels, kept whole: EfficientViT-MSRA's
  cascaded group attention (the stream cut at the same positions in each head's chunk, each head's values with the
  chunk they are added to, its key rows one space) and SHViT's single-head attention (its split at ``pdim`` set by
  the cut, its values cut with the first part);
- ``timm_mobile_blocks``: MobileViT's and TinyViT's blocks, which timm keeps from ``torch.fx``, read as their
  insides (their streams, MLP widths and MobileViT's heads prunable);
- ``timm_mobilenetv5``: MobileNetV5's multi-query attention (a key dim cut from k and from every head's q, the one
  value head read once per head) and its multi-scale fusion adapter (inputs side by side, an FFN of two convs), kept
  whole;
- ``timm_vit_likes``: the attentions of timm's ViT-likes that read their heads as timm's ``Attention`` does
  (Visformer's, on a map), kept whole, pruned in whole heads.
- ``timm_pyramid_attention``: PVT-v2's, Twins', ConViT's, VOLO's and NesT's attentions (q/k/v rows from several
  Linear layers, keys reduced by a strided conv; Twins' windowed one, ConViT's plain one, VOLO's outlook one, NesT's
  head-minor one), kept whole,
  their heads tied to the stream; Twins' position conv, a producer of it, and its tokens reshaped back to their patch
  embedding's grid;
- ``timm_tnt``: TNT's pixel embedding (its ``proj`` the inner stream, ``pixel_pos`` a source of it, ``in_dim`` set by
  the cut), its attention (``qk`` and ``v``) cut in whole heads, and tokens flattened by ``reshape(..., -1)`` for a
  layer k times their width (k copies side by side: a patch's pixels read by its block's ``proj``);
- ``timm_windows``: window partitions, channels last (reshapes by a width read from a shape, ``window_reverse``,
  patch merging's 2 × 2 neighbours side by side) and timm's Swin window attentions, their heads tied to the stream.
- ``timm_gcvit``: GCViT's window attention, kept whole: Swin's tied heads, or, with the stage's global query (the
  stream itself), its key and value rows channel points of the stream, cut alike in each head's block.
"""

# ``tokens`` after ``joins`` and ``shapes``: its rules for cat, add, [] and mean replace theirs (and call them)
from pruneflow.graph.handlers import (
    attention,
    joins,
    norms,
    pointwise,
    producers,
    recurrent,
    reorderings,
    shapes,
    timm_attention,
    timm_attention_classes,
    timm_hieradet,
    timm_layers,
    timm_levit,
    timm_metaformer,
    timm_pyramid_attention,
    timm_vit_likes,
    timm_windows,
    tokens,
)

__all__ = [
    "attention",
    "joins",
    "norms",
    "pointwise",
    "producers",
    "recurrent",
    "reorderings",
    "shapes",
    "timm_attention",
    "timm_attention_classes",
    "timm_hieradet",
    "timm_layers",
    "timm_levit",
    "timm_metaformer",
    "timm_pyramid_attention",
    "timm_vit_likes",
    "timm_windows",
    "tokens",
]
