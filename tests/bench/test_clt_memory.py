"""The latent-parallel CLT memory model (``python -m sae.bench.clt_memory``) counts what the code allocates."""

from __future__ import annotations

import pytest

from sae.bench.clt_memory import GIB, CLTShape, main
from sae.models import SAEConfig, build_sae


@pytest.mark.parametrize(("activation", "acausal"), [("jumprelu", False), ("topk", False), ("jumprelu", True)])
def test_parameters_per_rank_equal_a_real_latent_shard(activation, acausal):
    n, m, L = 3, 4, 8
    clt = build_sae(SAEConfig(architecture="clt", clt_layers=n, clt_activation=activation, clt_acausal=acausal,
                              num_latents=L, k=2, transcode=True), n * m, n * m, seed=0)
    shape = CLTShape(n, m, L, acausal=acausal)
    assert shape.params_per_rank(1, activation == "jumprelu") == sum(p.numel() for p in clt.parameters())
    for rank in range(2):
        shard = clt.latent_shard(rank, 2)
        assert shape.params_per_rank(2, activation == "jumprelu") == sum(p.numel() for p in shard.parameters())
    with pytest.raises(ValueError, match="do not split over 3 ranks"):
        shape.params_per_rank(3)


def test_ranks_to_fit_and_the_printed_table(capsys):
    s = CLTShape(30, 576, 32 * 576)
    w = s.ranks_to_fit(80 * GIB)
    assert w > 1 and s.bytes_per_rank(w) <= 0.9 * 80 * GIB < s.bytes_per_rank(w // 2 if w % 2 == 0 else 1)
    main(["--expansions", "2,32"])
    out = capsys.readouterr().out
    assert "| 2x | 1,152 |" in out and f"| 32x | 18,432 | {s.params_per_rank() / 1e9:.2f}G |" in out
