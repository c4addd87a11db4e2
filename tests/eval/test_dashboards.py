"""Latent dashboards (sae.eval.dashboards) against hand computations, and their HTML."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sae.eval.dashboards import (
    Dashboard,
    Histogram,
    Neighbour,
    TokenEffect,
    activation_histogram,
    add_panels,
    decoder_neighbours,
    logit_effects,
)
from sae.eval.examples import Example, LatentExamples
from sae.eval.report import _examples_html


def test_histogram_bins_by_hand():
    h = activation_histogram(torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 2.5]), bins=3)
    assert h.edges == pytest.approx([1.0, 2.0, 3.0, 4.0])
    # [1,2): 1.0 | [2,3): 2.0, 2.5 | [3,4]: 3.0, 4.0, 4.0 (the maximum falls in the last bin)
    assert h.counts == [1, 2, 3]
    assert activation_histogram(torch.tensor([0.5, 0.5]), bins=5) == Histogram([0.5, 0.5], [2])
    assert activation_histogram(torch.tensor([]), bins=5) is None


def test_decoder_neighbours_by_hand(monkeypatch):
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, 0.0], [0.0, 0.0]])
    # Cosines of row 0 with rows 1..4: 0, 1/sqrt(2), -1, 0 (zero row) -> best: 2, then 1 and 4 tie at 0.
    got = decoder_neighbours(W, [0, 2], k=2)
    assert [n.latent for n in got[0]][0] == 2 and got[0][0].cosine == pytest.approx(1 / math.sqrt(2))
    assert got[0][1].cosine == pytest.approx(0.0) and got[0][1].latent in (1, 4)
    # Row 2 (1,1): rows 0 and 1 both at 1/sqrt(2); never itself.
    assert sorted(n.latent for n in got[1]) == [0, 1]
    assert all(n.cosine == pytest.approx(1 / math.sqrt(2)) for n in got[1])
    # Chunked over rows gives the same answer (the block boundary falls between latent and neighbour).
    import sae.eval.dashboards as dash

    monkeypatch.setattr(dash, "_CHUNK", 2)
    assert decoder_neighbours(W, [0, 2], k=2)[1] == got[1]
    assert decoder_neighbours(W, [0], k=2)[0][0] == Neighbour(2, pytest.approx(1 / math.sqrt(2)))
    assert decoder_neighbours(W, [0], k=10)[0][-1].latent == 3  # k above L-1: every other latent, -1 last


@pytest.mark.parametrize("chunk", [65536, 3])
def test_logit_effects_by_hand(monkeypatch, chunk):
    import sae.eval.dashboards as dash

    monkeypatch.setattr(dash, "_CHUNK", chunk)  # 3: the unembedding in blocks of 3 and 1 rows
    W_U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [0.5, 0.5]])  # 4 tokens, d = 2
    (up, down), = logit_effects(torch.tensor([[2.0, 1.0]]), W_U, k=2)
    # logits = W_U @ (2, 1) = (2, 1, -4, 1.5)
    assert [(e.token_id, e.value) for e in up] == [(0, 2.0), (3, 1.5)]
    assert [(e.token_id, e.value) for e in down] == [(2, -4.0), (1, 1.0)]
    assert up[0].token == "0"  # no tokenizer: ids as text
    with pytest.raises(ValueError, match="d=3 but the unembedding takes d=2"):
        logit_effects(torch.ones(1, 3), W_U, k=2)


def test_add_panels_reads_directions_in_model_space_and_explains_what_is_missing():
    W_dec = torch.tensor([[2.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    W_U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    boards = [Dashboard(), Dashboard()]
    assert add_panels(boards, W_dec, [0, 1], neighbours=1, tokens=1, W_U=W_U, out_scale=2.0) == ""
    # Directions (1, 0) and (0, 2) after the output scale 2 is undone.
    assert boards[0].promoted == [TokenEffect("0", 0, 1.0)] and boards[0].suppressed == [TokenEffect("2", 2, -1.0)]
    assert boards[1].promoted == [TokenEffect("1", 1, 2.0)]
    assert [n.latent for n in boards[0].neighbours] == [2]
    boards = [Dashboard()]
    assert "not a causal LM" in add_panels(boards, W_dec, [0], neighbours=1, tokens=3)
    assert boards[0].promoted == [] and boards[0].neighbours
    assert "d=2 but the unembedding takes d=3" in add_panels([Dashboard()], W_dec, [0], neighbours=0, tokens=3,
                                                            W_U=torch.ones(5, 3))


def test_dashboard_html_has_every_panel():
    board = Dashboard(Histogram([0.0, 1.0, 2.0], [3, 1]), [TokenEffect(" cat", 5, 1.5)], [TokenEffect("<b>", 6, -2.0)],
                      [Neighbour(9, 0.5), Neighbour(4, 0.25)])
    le = LatentExamples(4, 0.1, 2.0, [Example(0, 1, ["a", "b"], [0.0, 2.0], 1, 2.0)], board)
    other = LatentExamples(9, 0.1, 2.0, [], Dashboard())
    page = _examples_html([le, other])
    assert page.count("<rect") == 2 and "activations when firing (4 tokens)" in page
    heights = [float(h) for h in re.findall(r"height='([\d.]+)'><title>", page)]
    assert heights[0] == pytest.approx(3 * heights[1], rel=0.01)  # bars in proportion to counts
    assert "title='+1.5 (token 5)'> cat</span>" in page and "&lt;b&gt;" in page  # token text escaped
    assert "<a href='#latent-9'>9</a>" in page and "<a href='#latent-4'>" in page
    assert page.count("class='panel'") == 3
    assert "promoted tokens: why" in _examples_html([LatentExamples(1, 0.1, 1.0, [], Dashboard(
        neighbours=[Neighbour(2, 0.1)]))], "why")
