"""Sequences that share prefixes, packed as a tree so that each shared token is forwarded once.

RL's policy step trains groups of answers to one prompt: as right-padded rows, every answer
forwards its own copy of the prompt (and pads to the longest row). Packed, a group is one tree: the
prompt's tokens once, each answer a branch from its last token (answers that begin alike share
their first tokens too). Every token keeps what it had in its own row:
- its position (its depth in the tree), so rotary sees the same angles;
- its previous token (its parent's), so the smear gate mixes the same embedding;
- the keys it attends to: its ancestors and itself, a causal row of its own sequence.
So each token's output is its row's, up to the GEMMs' rounding (other row counts, other blocking),
and a loss over the trained tokens is the padded batch's with its gradients.

Layout: the packed tokens are idx (1, N), group after group, each sequence's new tokens after the
tokens it shares. Each token belongs to the first sequence that brought it, and the sequences
attend as blocks, one SDPA call for all: a block's queries are its sequence's own tokens (the
first answer of a group owns the prompt too), its keys the sequence's whole path from the root,
causal by position. Attention then costs what the padded rows' would, less the shared tokens'
queries, and never (group x group): a group of 16 answers of 256 tokens is 16 blocks, not one
of 4,000 x 4,000. Groups are the caller's: tokens are shared only within one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanofast.kernels import vendor


@dataclass
class PrefixTree:
    """The packed batch's layout, passed to `GPT.forward(idx, targets, kv=tree)`: N packed tokens,
    attending as S blocks of at most Q queries over at most K keys; all on the model's device."""
    positions: torch.Tensor    # (N,) int64 depth of each token = its position in its sequences
    prev_tokens: torch.Tensor  # (N,) int64 its parent's token (any id at a root)
    has_prev: torch.Tensor     # (N,) bool: not a root (the smear applies)
    query_rows: torch.Tensor   # (S, Q) int64 packed rows a block queries (padding repeats its last query)
    key_rows: torch.Tensor     # (S, K) int64 the block's sequence from its root: key j at position j (padding: the root)
    slots: torch.Tensor        # (N,) int64 each packed row's query slot in the flattened (S * Q) blocks
    logits_rows: torch.Tensor | None = None  # (M,) int64 rows whose outputs go through the head; None: all
    masks: dict = field(default_factory=dict)  # window -> (S, Q, K) mask, built by the first layer using it

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        """Each packed token attends to its ancestors and itself, with a left window of `window`
        positions (flash-attn's rule: -1 unlimited). q (1, N, Hq, D), k, v (1, N, Hkv, D) ->
        (1, N, Hq, D), differentiable."""
        mask = self.masks.get(window)
        if mask is None:
            reach = vendor.left_window(window)
            query_pos = self.positions[self.query_rows][:, :, None]  # (S, Q, 1)
            key_pos = torch.arange(self.key_rows.size(1), device=self.key_rows.device)
            mask = key_pos <= query_pos  # causal on the path; keys past the path's end are past every query
            if reach is not None:
                mask &= key_pos >= query_pos - reach
            mask = self.masks[window] = mask[:, None]
        qb = q[0][self.query_rows].transpose(1, 2)  # (S, Hq, Q, D)
        kb, vb = (t[0][self.key_rows].transpose(1, 2) for t in (k, v))  # (S, Hkv, K, D)
        y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=qb.size(1) != kb.size(1))
        return y.transpose(1, 2).flatten(0, 1)[self.slots][None]


def pack_prefix_tree(groups: list[list[list[int]]], device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, PrefixTree, list[list[list[int]]]]:
    """Pack `groups` (each a list of token sequences; sequences of one group share their common
    prefixes) as trees.

    Returns idx (1, N) int64 of the packed tokens, the `PrefixTree` (logits_rows None), and per group
    per sequence the packed row of each of its tokens: sequence s's token t is packed row
    rows[g][s][t], whose output is the one s's own forward gives at position t.
    """
    if not groups or any(not seqs or any(not s for s in seqs) for seqs in groups):
        raise ValueError("groups must be a non-empty list of non-empty lists of non-empty token sequences")
    tokens: list[int] = []
    parents: list[int] = []  # packed row of each token's parent; -1 at a root
    depths: list[int] = []
    rows: list[list[list[int]]] = []
    blocks: list[tuple[list[int], int]] = []  # (a sequence's rows, where its own tokens begin)
    for seqs in groups:
        child: dict[tuple[int, int], int] = {}  # (parent row, token) -> row
        group_rows = []
        for seq in seqs:
            parent, path, first_own = -1, [], None
            for t in seq:
                row = child.get((parent, t))
                if row is None:
                    # a sequence's new tokens follow the ones it shares: once one is new, so is the rest
                    first_own = len(path) if first_own is None else first_own
                    row = child[(parent, t)] = len(tokens)
                    tokens.append(int(t))
                    parents.append(parent)
                    depths.append(len(path))
                path.append(row)
                parent = row
            group_rows.append(path)
            if first_own is not None:  # a sequence another one holds whole queries nothing of its own
                blocks.append((path, first_own))
        rows.append(group_rows)
    N, S = len(tokens), len(blocks)
    Q = max(len(path) - own for path, own in blocks)
    K = max(len(path) for path, _ in blocks)
    query_rows = torch.empty((S, Q), dtype=torch.int64)
    key_rows = torch.empty((S, K), dtype=torch.int64)
    slots = torch.empty(N, dtype=torch.int64)
    for b, (path, own) in enumerate(blocks):
        n = len(path) - own
        path_rows = torch.tensor(path)
        query_rows[b] = path_rows[torch.arange(own, own + Q).clamp_max(len(path) - 1)]  # padding repeats the last
        key_rows[b, :len(path)], key_rows[b, len(path):] = path_rows, path[0]
        slots[path_rows[own:]] = b * Q + torch.arange(n)
    parent_rows = torch.tensor(parents)
    has_prev = parent_rows >= 0
    idx = torch.tensor(tokens, dtype=torch.int64)
    prev = torch.where(has_prev, idx[parent_rows.clamp_min(0)], idx)
    tree = PrefixTree(positions=torch.tensor(depths).to(device), prev_tokens=prev.to(device),
                      has_prev=has_prev.to(device), query_rows=query_rows.to(device), key_rows=key_rows.to(device),
                      slots=slots.to(device))
    return idx[None].to(device), tree, rows
