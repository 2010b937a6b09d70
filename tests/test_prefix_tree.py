"""Prefix-tree packing (nanofast.prefix_tree): each packed sequence gets what its own forward
gives it, forward and backward, while shared tokens are computed once."""
from __future__ import annotations

import pytest
import torch

from nanofast.model import GPT, GPTConfig
from nanofast.prefix_tree import pack_prefix_tree

V = 61


def _model(dtype=torch.float32, n_head=3, n_kv_head=1, sequence_len=16) -> GPT:
    # 3 query heads over 1 KV head (GQA, not a power of two); sequence_len 16 makes the long
    # window 16, which the longer sequences below exceed: the window mask binds
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=V, n_layer=4, n_head=n_head, n_kv_head=n_kv_head,
                          n_embd=n_head * 32, window_pattern="SL"), compute_dtype=dtype)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # away from the zero-initialised projections: every path matters
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _groups() -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(3)

    def rnd(n: int) -> list[int]:
        return torch.randint(0, V, (n,), generator=g).tolist()

    prompt, other, branch = rnd(7), rnd(3), rnd(4)
    return [
        [prompt + rnd(5), prompt + branch + rnd(9), prompt + branch + rnd(2), prompt[:4] + rnd(2), prompt],
        [other + rnd(1)],                      # a group of one
        [rnd(1)],                              # a sequence of one token
        [other + rnd(40), other + rnd(33), rnd(5)],  # past the 16-token window; a second root in the group
        [prompt + branch, prompt + branch],    # identical sequences share every token
    ]


def _loss_weights(groups, seed=5) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(len(s), V, generator=g) for s in seqs] for seqs in groups]


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 0.1, 0.05)])
def test_packed_sequences_get_their_own_forward_and_gradients(dtype, atol, rtol):
    groups = _groups()
    model = _model(dtype)
    weights = _loss_weights(groups)
    idx, tree, rows = pack_prefix_tree(groups)
    assert idx.shape == (1, len({(gi, r) for gi, g in enumerate(rows) for s in g for r in s}))
    assert idx.size(1) < sum(len(s) for seqs in groups for s in seqs)  # the shared tokens once
    logits = model(idx, kv=tree)
    packed_loss = sum((logits[r] * w).sum() for g, ws in zip(rows, weights) for r, w in zip(g, ws))
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = 0.0
    for g, seqs, ws in zip(rows, groups, weights):
        for r, seq, w in zip(g, seqs, ws):
            own = model(torch.tensor([seq]))[0]
            torch.testing.assert_close(logits[r], own, atol=atol, rtol=rtol)
            loss = loss + (own * w).sum()
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n].float(), p.grad.float(), atol=atol * 10, rtol=rtol, msg=n)
    assert any(g.abs().max() > 0 for g in packed_grads.values())


def test_the_tree_layout_and_who_attends_to_whom():
    groups = [[[5, 6, 7], [5, 6, 8, 9], [5, 1]], [[2], [3, 4]]]
    idx, tree, rows = pack_prefix_tree(groups)
    assert idx.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert rows == [[[0, 1, 2], [0, 1, 3, 4], [0, 5]], [[6], [7, 8]]]
    assert tree.positions.tolist() == [0, 1, 2, 2, 3, 1, 0, 0, 1]
    assert tree.prev_tokens.tolist()[1:5] == [5, 6, 6, 8] and tree.prev_tokens[8] == 3
    assert tree.has_prev.tolist() == [False, True, True, True, True, True, False, False, True]
    # a block per sequence: its own tokens as queries (padding repeats the last), its path as keys
    assert tree.query_rows.tolist() == [[0, 1, 2], [3, 4, 4], [5, 5, 5], [6, 6, 6], [7, 8, 8]]
    assert tree.key_rows.tolist() == [[0, 1, 2, 0], [0, 1, 3, 4], [0, 5, 0, 0], [6, 6, 6, 6], [7, 8, 7, 7]]
    assert tree.slots.tolist() == [0, 1, 2, 3, 4, 6, 9, 12, 13]
    # Who attends to whom: equal scores (q = k = 0) and one-hot values average each token's keys.
    parent = {1: 0, 2: 1, 3: 1, 4: 3, 5: 0, 8: 7}
    N = idx.size(1)
    zeros = torch.zeros(1, N, 1, N)
    for window, reach in ((-1, N), (1, 1)):
        seen = tree.attention(zeros, zeros, torch.eye(N)[None, :, None], window)[0, :, 0]
        for r in range(N):
            want, a = {r}, r
            while a in parent and len(want) <= reach:  # ancestors within the window
                a = parent[a]
                want.add(a)
            assert set(seen[r].nonzero().flatten().tolist()) == want, (window, r)
            torch.testing.assert_close(seen[r].sum(), torch.tensor(1.0))


def test_the_window_masks_by_position_not_by_packed_order():
    model = _model(sequence_len=16)
    seqs = [list(range(1, 30)), list(range(1, 4)) + list(range(40, 60))]
    idx, tree, rows = pack_prefix_tree([seqs])
    logits = model(idx, kv=tree)
    assert not torch.equal(tree.masks[16], tree.masks[128])  # the long window (16) cut keys the short (128) keeps
    for r, seq in zip(rows[0], seqs):
        torch.testing.assert_close(logits[r], model(torch.tensor([seq]))[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("groups", [[], [[]], [[[1], []]]])
def test_empty_input_is_rejected(groups):
    with pytest.raises(ValueError, match="groups must be"):
        pack_prefix_tree(groups)
