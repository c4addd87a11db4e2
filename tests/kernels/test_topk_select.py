"""The radix-select top-k (kernels/topk_select.py) in Triton's interpreter against ``torch.topk``.

Exactly k entries per row, the same multiset of values as ``torch.topk``, each value at its
index, indices increasing (index order), ties at the k-th value taken from the lowest indices;
rows with every value tied, -inf and NaN, k = 1 and k = L, rows longer than one block.
"""

from __future__ import annotations

import pytest
import torch
from sae_kernels.topk_select import topk, topk_bf16


def check(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = topk_bf16(scores, k)
    ref = scores.topk(k, dim=1).values
    assert vals.shape == idx.shape == (scores.shape[0], k)
    assert torch.equal(vals.float().sort(1).values, ref.float().sort(1).values)
    assert torch.equal(scores.gather(1, idx), vals)
    assert (idx.diff(dim=1) > 0).all(), "index order, no repeats"
    return vals, idx


@pytest.mark.parametrize("B,L,k", [(3, 5000, 7), (2, 300, 300), (4, 9000, 64), (5, 17, 1)],
                         ids=["rows_over_one_block", "k_equals_L", "k64", "k1"])
def test_matches_torch_topk(triton_ops, B, L, k):
    g = torch.Generator().manual_seed(L)
    check(torch.randn(B, L, generator=g).to(torch.bfloat16), k)


def test_ties_go_to_the_lowest_indices(triton_ops):
    scores = torch.zeros(2, 50, dtype=torch.bfloat16)
    scores[0, 40] = 1.0
    vals, idx = check(scores, 5)
    assert idx[0].tolist() == [0, 1, 2, 3, 40] and idx[1].tolist() == [0, 1, 2, 3, 4]
    g = torch.Generator().manual_seed(0)
    check(((torch.randn(6, 3000, generator=g) * 2).round() / 2).to(torch.bfloat16), 64)  # many ties at the cut


def test_infinities_nan_and_signed_zero(triton_ops):
    s = torch.tensor([[-float("inf"), 3.0, -0.0, 0.0, float("inf"), -2.0, float("nan"), 1.0]], dtype=torch.bfloat16)
    vals, idx = topk_bf16(s, 3)
    assert idx.tolist() == [[1, 4, 6]]  # NaN ranks above +inf, as in torch.topk
    vals, idx = topk_bf16(s, 7)
    assert -float("inf") not in vals.float().tolist()[0]


def test_dispatch_and_bad_input(triton_ops, monkeypatch):
    s = torch.randn(3, 40).to(torch.bfloat16)
    _, idx = topk(s, 4)
    assert (idx.diff(dim=1) > 0).all()  # the radix kernel (index order)
    monkeypatch.setenv("SAE_TOPK_KERNEL", "torch")
    assert topk(s, 4)[1].equal(s.topk(4, sorted=False).indices)
    monkeypatch.setenv("SAE_TOPK_KERNEL", "fastest")
    with pytest.raises(ValueError, match="SAE_TOPK_KERNEL='fastest'"):
        topk(s, 4)
    monkeypatch.delenv("SAE_TOPK_KERNEL")
    monkeypatch.setenv("SAE_KERNEL_BACKEND", "eager")
    vals, _ = topk(s, 4)
    torch.testing.assert_close(vals.float().sort(1).values, s.topk(4).values.float().sort(1).values)
    with pytest.raises(ValueError, match="bf16"):
        topk_bf16(s.float(), 4)
    with pytest.raises(ValueError, match="k=41"):
        topk_bf16(s, 41)


def test_a_kernel_that_cannot_run_falls_back_to_torch_topk(triton_ops, monkeypatch, caplog):
    import sae_kernels.topk_select as T

    monkeypatch.setattr(T, "_failed", {})

    def broken(scores, k):
        raise RuntimeError("ptxas: unsupported architecture")

    monkeypatch.setattr(T, "topk_bf16", broken)
    s = torch.randn(3, 40).to(torch.bfloat16)
    with pytest.raises(ValueError, match="k=41"):  # a bad call is the caller's error, not a reason to fall back
        topk(s, 41)
    assert not T._failed
    with caplog.at_level("WARNING"):
        vals, _ = topk(s, 4)
        topk(s, 4)
    torch.testing.assert_close(vals.float().sort(1).values, s.topk(4).values.float().sort(1).values)
    assert caplog.text.count("failed on cpu") == 1 and "cpu" in T._failed
