"""Reference paged attention over a ragged batch, in plain torch (CPU and GPU).

Queries of each sequence are gathered into a padded [B, heads, max_q, head_dim] block and
attend to that sequence's cached keys, gathered through its page table. A faster kernel
can replace this behind the same signature.
"""

from __future__ import annotations

import torch

from worker.kernels.paged_attention import reference_sdpa
from worker.step_inputs import PaddedAttentionGroup


def attention_mask(group: PaddedAttentionGroup, sliding_window: int | None) -> torch.Tensor:
    """[B, 1, max_q, max_kv] bool: causal, within the sequence, within the window."""
    max_kv = group.kv_index.shape[1]
    kv_pos = torch.arange(max_kv, device=group.kv_index.device)
    q_pos = group.q_pos[:, :, None]
    mask = (kv_pos[None, None, :] <= q_pos) & (kv_pos[None, None, :] < group.kv_len[:, None, None])
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > q_pos - sliding_window
    # Padded query rows attend to key 0 so softmax has no all-masked row (their output is dropped).
    mask[:, :, 0] |= ~group.q_valid
    return mask[:, None]


def padded_group_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    groups: list[PaddedAttentionGroup],
    masks: list[torch.Tensor],
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q: [T, heads, head_dim]; keys/values: one layer's cache [slots, kv_heads, head_dim];
    softcap > 0 soft-caps the scores (`reference_sdpa`).

    Returns [T, heads, head_dim].
    """
    if len(groups) == 1:  # one group covers every token, already in flat order
        return _group_attention(q, keys, values, groups[0], masks[0], scale, softcap)
    out = torch.empty_like(q)
    for group, mask in zip(groups, masks):
        out[group.token_index] = _group_attention(q, keys, values, group, mask, scale, softcap)
    return out


def _group_attention(q, keys, values, group: PaddedAttentionGroup, mask: torch.Tensor, scale: float,
                     softcap: float) -> torch.Tensor:
    """The group's valid query rows, in padded-row order (= its token_index order)."""
    q_padded = q[group.q_index].transpose(1, 2)  # [B, H, max_q, D]
    k = keys[group.kv_index].transpose(1, 2)  # [B, KVH, max_kv, D]
    v = values[group.kv_index].transpose(1, 2)
    out = reference_sdpa(q_padded, k, v, mask, scale, softcap)
    return out.transpose(1, 2).flatten(0, 1)[group.q_rows]
