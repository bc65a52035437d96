"""UNet++ (Zhou et al. 2018): nested dense skips, deep supervision, pruning to depth L1..Lk.

Node X(i,j) sits at level i (resolution 1/2**i) and column j. X(i,0) is the encoder; for
j >= 1, X(i,j) = Up(X(i+1,j-1), skips=[X(i,0), ..., X(i,j-1)]). Head k reads X(0,k). Head k
needs only the nodes with i + j <= k, so pruning to depth k is UNet++ of depth k with the
same weights: `prune(k)` builds exactly that standalone network.

The encoder is the classic one (`encoder="none"`) or any smp encoder; on an smp encoder the
nodes take its widths, start at half resolution, and the heads' logits are upsampled by 2.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.blocks import OutConv, Up, make_encoder
from pipeline.models.config import ModelConfig


def node(i: int, j: int) -> str:
    return f"x{i}_{j}"


class UNetPlusPlus(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.depth = depth = config.depth
        upsampling, norm = config.upsampling, config.norm
        self.encoder = make_encoder(
            config.encoder, config.in_channels, config.channels, norm, padding=1,
            weights=config.encoder_weights,
        )  # fmt: skip
        channels = self.encoder.channels
        self.size_multiple = self.encoder.size_multiple
        self.nodes = nn.ModuleDict()
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                self.nodes[node(i, j)] = Up(
                    channels[i + 1], j * channels[i], channels[i], upsampling, norm
                )
        heads = config.heads
        if heads is None:
            heads = tuple(range(1, depth + 1)) if config.deep_supervision else (depth,)
        if not heads or any(not 1 <= k <= self.depth for k in heads):
            raise ValueError(f"heads must lie in 1..{self.depth}, got {heads}")
        self.heads = nn.ModuleDict(
            {str(k): OutConv(channels[0], config.out_channels) for k in heads}
        )

    @property
    def head_depths(self) -> list[int]:
        return sorted(int(k) for k in self.heads)

    def forward_heads(self, x: torch.Tensor, depth: int | None = None) -> dict[int, torch.Tensor]:
        """Logits of every head up to `depth`, computing only the nodes those heads need."""
        depth = self.depth if depth is None else depth
        if not 1 <= depth <= self.depth:
            raise ValueError(f"depth must lie in 1..{self.depth}, got {depth}")
        self.encoder.check_input(x)
        size = x.shape[-2:]
        grid = {(i, 0): f for i, f in enumerate(self.encoder.features(x, depth))}
        for j in range(1, depth + 1):
            for i in range(depth - j + 1):
                skips = [grid[i, k] for k in range(j)]
                grid[i, j] = self.nodes[node(i, j)](grid[i + 1, j - 1], skips)
        return {
            k: self.encoder.to_input_size(self.heads[str(k)](grid[0, k]), size)
            for k in self.head_depths
            if k <= depth
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Training with several heads: a list of logits, shallowest first (deep supervision).
        Otherwise: the deepest head's logits (B, out_channels, H, W)."""
        outs = self.forward_heads(x)
        if self.training and len(outs) > 1:
            return list(outs.values())
        return outs[max(outs)]

    def prune(self, depth: int, keep_heads: bool = False) -> UNetPlusPlus:
        """A standalone UNet++ holding only the nodes head `depth` needs, with their weights.

        Its output equals this model's head `depth`; deeper nodes are gone, and so are the
        shallower heads unless `keep_heads` (the UNet++ paper counts its pruned models' params
        with them: a 1x1 conv each).
        """
        if str(depth) not in self.heads:
            raise ValueError(f"no head at depth {depth}; heads: {self.head_depths}")
        heads = tuple(k for k in self.head_depths if k <= depth) if keep_heads else (depth,)
        pruned = UNetPlusPlus(self.config.pruned(depth, heads))
        own = self.state_dict()
        pruned.load_state_dict({k: own[k] for k in pruned.state_dict()})
        return pruned.train(self.training)
