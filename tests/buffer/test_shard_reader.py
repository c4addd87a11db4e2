"""ShardReader: exactly-once epochs across ranks, seeded determinism, exact resume, transcoder
pairs, held-out split, normalisation, and corrupted or truncated shards reported by name."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from sae.buffer.reader import ShardReader
from sae.buffer.writer import ShardWriter
from sae.harvest.harvester import Chunk

D = 6


def write_fake_buffer(folder, n_rows: int, shard_tokens: int, dtype: str = "float32"):
    """Hook point ``a``: row r has a[r, 0] = r; ``b`` = 2a + 1 (a 'target' aligned with ``a``)."""
    header = {"hookpoints": {"a": {"d": D}, "b": {"d": D}}, "hookpoint_order": ["a", "b"]}
    w = ShardWriter(folder, header, shard_tokens, dtype)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n_rows, 37):  # chunks that do not line up with shards
        r = torch.arange(start, min(start + 37, n_rows))
        a = torch.randn(len(r), D, generator=gen) * 3 + 1
        a[:, 0] = r.float()
        w.append(Chunk({"a": a, "b": 2 * a + 1}, r.int(), (r % 16).int(), r // 16))
    return w.finish()


@pytest.fixture
def buffer(tmp_path):
    write_fake_buffer(tmp_path, 1000, 96)  # 11 shards: 10 x 96 + 1 x 40
    return tmp_path


def rows_of(reader, n_batches=None):
    out = []
    for i, b in enumerate(reader):
        out.append(b.x[:, 0].long())
        if n_batches is not None and i + 1 == n_batches:
            break
    return out


def test_every_row_once_per_epoch_across_two_ranks(buffer):
    readers = [ShardReader(buffer, 50, hookpoint="a", epochs=2, heldout_shards=1, mixing_shards=2, rank=r,
                           world_size=2) for r in range(2)]
    streams = [torch.cat(rows_of(r)) for r in readers]
    per_epoch = [96 * sum(len(w) for w in r.windows(0)) for r in readers]  # 10 training shards: 5 per rank
    assert per_epoch == [480, 480] and [s.numel() for s in streams] == [960, 960]
    for e in range(2):
        ranks = [s[e * n:(e + 1) * n] for s, n in zip(streams, per_epoch)]
        assert set(ranks[0].tolist()).isdisjoint(ranks[1].tolist())
        assert sorted(torch.cat(ranks).tolist()) == list(range(960))  # the short last shard is held out
    assert not torch.equal(streams[0][:480], streams[0][480:])  # a new order each epoch


def test_seed_fixes_the_order_and_shuffles_across_shards(buffer):
    a = torch.cat(rows_of(ShardReader(buffer, 64, hookpoint="a", seed=3, epochs=1)))
    b = torch.cat(rows_of(ShardReader(buffer, 64, hookpoint="a", seed=3, epochs=1, prefetch=0)))
    c = torch.cat(rows_of(ShardReader(buffer, 64, hookpoint="a", seed=4, epochs=1)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == sorted(c.tolist()) == list(range(960))
    first = a[:64]  # one batch mixes rows of several shards of its window
    assert len(set((first // 96).tolist())) >= 2


def test_state_dict_resumes_exactly_mid_window_and_across_epochs(buffer):
    full = rows_of(ShardReader(buffer, 70, hookpoint="a", seed=1, mixing_shards=3), 40)  # > 2 epochs
    reader = ShardReader(buffer, 70, hookpoint="a", seed=1, mixing_shards=3)
    head = rows_of(reader, 17)
    state = reader.state_dict()
    resumed = ShardReader(buffer, 70, hookpoint="a", seed=1, mixing_shards=3)
    resumed.load_state_dict(state)
    tail = rows_of(resumed, 23)
    assert all(torch.equal(x, y) for x, y in zip(head + tail, full))
    with pytest.raises(ValueError, match="does not match"):
        ShardReader(buffer, 70, hookpoint="a", seed=2).load_state_dict(state)


def test_transcoder_pairs_come_from_the_same_tokens(buffer):
    reader = ShardReader(buffer, 128, hookpoint="a", target_hookpoint="b", epochs=1)
    assert (reader.d_in, reader.d_out) == (D, D)
    n = 0
    for batch in reader:
        torch.testing.assert_close(batch.y, 2 * batch.x + 1)
        n += batch.x.shape[0]
    assert n == 960


def test_heldout_shards_are_disjoint_from_training(buffer):
    reader = ShardReader(buffer, 32, hookpoint="a", heldout_shards=2, epochs=1)
    held = torch.cat([b.x[:, 0] for b in reader.heldout_batches(100)]).long()
    train = torch.cat(rows_of(reader))
    assert held.tolist() == list(range(1000 - 96 - 40, 1000))  # the last two shards, in order
    assert set(train.tolist()).isdisjoint(held.tolist()) and train.numel() == 1000 - 136
    assert len(reader.heldout_batches(2)) == 2
    with pytest.raises(ValueError, match="too few for heldout_shards=11"):
        ShardReader(buffer, 32, hookpoint="a", heldout_shards=11)


def test_normalisation_from_manifest_statistics(buffer):
    ref = torch.cat([load_file(str(p))["activations"] for p in sorted((buffer / "b").glob("*.safetensors"))])
    scaled = ShardReader(buffer, 1000, hookpoint="b", epochs=1, normalize="scale")
    assert scaled.x_norm.scale == pytest.approx(math.sqrt(D) / ref.double().norm(dim=1).mean().item(), rel=1e-9)
    x = torch.cat([b.x for b in scaled] + [b.x for b in scaled.heldout_batches(9)])
    assert x.norm(dim=1).mean().item() == pytest.approx(math.sqrt(D), rel=1e-5)
    centered = ShardReader(buffer, 1000, hookpoint="b", epochs=1, normalize="center_scale")
    x = torch.cat([b.x for b in centered] + [b.x for b in centered.heldout_batches(9)]).double()
    assert x.mean(0).abs().max().item() < 1e-4
    assert x.pow(2).sum(1).mean().item() == pytest.approx(D, rel=1e-4)
    assert centered.normalization["x"]["mode"] == "center_scale"


def test_bfloat16_shards_read_without_a_conversion_pass(tmp_path):
    """Unnormalised bf16 shards come out as bf16 (the trainer converts on its device: no host pass,
    half the bytes to copy); normalised ones as float32, normalised in float32."""
    write_fake_buffer(tmp_path, 300, 100, dtype="bfloat16")
    raw = torch.cat([b.x for b in ShardReader(tmp_path, 64, hookpoint="a", epochs=1)])
    assert raw.dtype == torch.bfloat16 and raw.shape == (200, D)
    scaled = torch.cat([b.x for b in ShardReader(tmp_path, 64, hookpoint="a", epochs=1, normalize="scale")])
    assert scaled.dtype == torch.float32
    reader = ShardReader(tmp_path, 64, hookpoint="a", epochs=1, normalize="scale")
    torch.testing.assert_close(scaled, raw.float() * reader.x_norm.scale)


def test_flipped_byte_is_reported_by_shard_name(buffer):
    path = buffer / "a" / "shard_000003.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard .*a/shard_000003.safetensors is corrupt: its xxh3_64 checksum"):
        ShardReader(buffer, 64, hookpoint="a", verify="open")
    lazy = ShardReader(buffer, 64, hookpoint="a", epochs=1)  # lazy: fails when the shard is first used
    with pytest.raises(ValueError, match=r"a/shard_000003.safetensors is corrupt"):
        rows_of(lazy)
    ShardReader(buffer, 64, hookpoint="b", verify="open")  # the other hook point's shards are intact


def test_truncated_or_missing_shard_is_reported_by_name_on_open(buffer):
    path = buffer / "b" / "shard_000007.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"b/shard_000007.safetensors is truncated: \d+ bytes, the manifest says"):
        ShardReader(buffer, 64, hookpoint="a", target_hookpoint="b", verify="none")
    (buffer / "a" / "shard_000001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"a/shard_000001.safetensors listed in the manifest is missing"):
        ShardReader(buffer, 64, hookpoint="a")


def test_wrong_hookpoint_names_are_clear_errors(buffer):
    with pytest.raises(ValueError, match=r"holds hook points \['a', 'b'\]; choose one with data.hookpoint"):
        ShardReader(buffer, 64)
    with pytest.raises(ValueError, match=r"data.target_hookpoint='c' is not in buffer"):
        ShardReader(buffer, 64, hookpoint="a", target_hookpoint="c")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardReader(buffer / "a", 64)


def test_finite_epochs_need_equal_shares_across_ranks(buffer):
    with pytest.raises(ValueError, match="10 training shards over 3 ranks gives ranks unequal epochs"):
        ShardReader(buffer, 32, hookpoint="a", epochs=1, rank=0, world_size=3)
    endless = [ShardReader(buffer, 32, hookpoint="a", rank=r, world_size=3) for r in range(3)]
    assert sorted(s for r in endless for w in r.windows(0) for s in w) == list(range(10))
