"""Shared network blocks: embeddings, attention, residual blocks."""

from genlab.nn.attention import Attention, SpatialAttention, multihead_attention
from genlab.nn.blocks import Downsample, ResBlock, Upsample, group_norm
from genlab.nn.embeddings import TimestepEmbedder, timestep_embedding

__all__ = [
    "Attention",
    "Downsample",
    "ResBlock",
    "SpatialAttention",
    "TimestepEmbedder",
    "Upsample",
    "group_norm",
    "multihead_attention",
    "timestep_embedding",
]
