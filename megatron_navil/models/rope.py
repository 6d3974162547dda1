"""2D rotary position embedding of the vision encoder, exactly as transformers' Qwen2-VL vision
tower computes it (NaViL's released code follows it).

Layouts:
  positions  [t, 2] int: ``(row, col)`` of each patch in its own grid (ops.patch_positions)
  cos, sin   [t, head_dim] float32
  x          [t, heads, head_dim] (``_thd``), any float dtype

Frequencies: ``VisionRotaryEmbedding(dim=head_dim // 2, theta)``, i.e.
``inv_freq[j] = 1 / theta ** (2j / (head_dim/2))`` for ``j < head_dim / 4``. The angles of a
patch are ``[row * inv_freq, col * inv_freq]`` (``head_dim / 2`` values: rows first, then
columns), repeated twice to ``head_dim`` and applied with ``rotate_half`` (the first and second
halves of each head form the rotated pairs). Computed in float32, cast back to ``x``'s dtype.
"""

from __future__ import annotations

import torch


def vision_rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``[head_dim // 4]`` float32 inverse frequencies (one set for rows, one for columns)."""
    dim = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def vision_rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [t, head_dim]`` float32 for ``positions [t, 2]`` = (row, col)."""
    inv_freq = vision_rope_inv_freq(head_dim, theta).to(positions.device)
    freqs = (positions.float()[..., None] * inv_freq).flatten(1)  # [t, 2 * hd/4]: rows, cols
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_vision_rope(x_thd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [t, heads, head_dim]`` by ``cos, sin [t, head_dim]`` (float32 math)."""
    x = x_thd.float()
    out = x * cos[:, None] + rotate_half(x) * sin[:, None]
    return out.to(x_thd.dtype)
