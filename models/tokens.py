"""Per-token-row tables: constants with own rows for the P prefix tokens (class, register, distillation)."""
from __future__ import annotations

import torch


def token_rows(table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table`` shaped to broadcast against ``like`` [..., N, C]: a [P + 1, C] table gives token i < P row i
    and every later token row P; any other table is returned as it is (scalar, or per channel)."""
    table = table.to(like.dtype)
    if table.dim() != 2:
        return table
    rows = torch.arange(like.shape[-2], device=table.device).clamp(max=table.shape[0] - 1)
    return table[rows]
