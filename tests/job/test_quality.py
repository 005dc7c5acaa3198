"""Distribution-level quality: KL divergence from the baseline's next-token distribution, its 99th percentile, top-1
agreement and perplexity, on fixed held-out text; checked against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from quantbench.job import quality
from quantbench.errors import ConfigError


class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token logits are the same at every position."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.device = torch.device("cpu")

    def forward(self, input_ids):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, n, -1).clone())


def plan(**kw) -> quality.QualityPlan:
    cfg = {"dataset": "embedded:tiny", "num_tokens": 64, "seq_len": 16, "batch_size": 2, "seed": 0} | kw
    return quality.plan(OmegaConf.create(cfg))


def test_hand_computed_kl_agreement_and_perplexity(tmp_path):
    ids = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])
    base = quality.baseline(FixedLogits([0.0, 0.0]), ids, plan(), tmp_path / "b.pt")  # p = (0.5, 0.5)
    assert torch.allclose(base.exp(), torch.full((2, 3, 2), 0.5))
    q = quality.compare(FixedLogits([math.log(0.9), math.log(0.1)]), ids, base, batch_size=1).metrics  # q = (0.9, 0.1)
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108
    assert q["quality_kl_mean"] == pytest.approx(kl, rel=1e-5)
    assert q["quality_kl_p99"] == pytest.approx(kl, rel=1e-5)
    # targets at positions 1..3: (1, 0, 1) and (1, 0, 0) -> three 0.1s and three 0.9s
    assert q["quality_ppl"] == pytest.approx(math.exp(-(3 * math.log(0.1) + 3 * math.log(0.9)) / 6), rel=1e-5)
    assert q["quality_top1_agreement"] == 1.0  # argmax of a tie is token 0, as is q's
    assert q["quality_tokens"] == 6


def test_per_window_figures_are_what_the_report_resamples(tmp_path):
    ids = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])
    base = quality.baseline(FixedLogits([0.0, 0.0]), ids, plan(), tmp_path / "b.pt")
    w = quality.compare(FixedLogits([math.log(0.9), math.log(0.1)]), ids, base, batch_size=1).per_window
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert w["kl_mean"] == pytest.approx([kl, kl], rel=1e-5)
    # window 1 predicts targets (1, 0, 1), window 2 (1, 0, 0)
    assert w["nll_mean"] == pytest.approx(
        [-(2 * math.log(0.1) + math.log(0.9)) / 3, -(math.log(0.1) + 2 * math.log(0.9)) / 3], rel=1e-5
    )
    assert w["top1_agreement"] == [1.0, 1.0]


def test_the_baseline_against_itself_is_exactly_zero_and_is_cached(tmp_path):
    ids = torch.randint(0, 3, (4, 8))
    model = FixedLogits([0.3, -1.0, 2.0])
    base = quality.baseline(model, ids, plan(), tmp_path / "b.pt")
    assert (tmp_path / "b.pt").exists()
    again = quality.baseline(FixedLogits([9.0, 9.0, 9.0]), ids, plan(), tmp_path / "b.pt")  # read, not recomputed
    assert torch.equal(base, again)
    q = quality.compare(model, ids, base, batch_size=3).metrics
    assert q["quality_kl_mean"] == 0 and q["quality_kl_p99"] == 0 and q["quality_top1_agreement"] == 1


def test_two_jobs_storing_the_same_baseline_at_once_both_succeed_and_agree(tmp_path, monkeypatch):
    """Jobs that share the cache (a Ray sweep, pytest-xdist) may compute one baseline at the same time: here a second
    job stores it between the first's write and its move into place. Both get the baseline; the file holds it."""
    ids, model, path = torch.randint(0, 3, (2, 6)), FixedLogits([0.3, -1.0, 2.0]), tmp_path / "b.pt"
    real_save, interleaved = torch.save, []

    def save_then_let_another_job_finish(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if not interleaved:
            interleaved.append(f)
            quality.baseline(model, ids, plan(), path)  # the other job: computes, writes and moves its file

    monkeypatch.setattr(quality.torch, "save", save_then_let_another_job_finish)
    first = quality.baseline(model, ids, plan(), path)
    assert interleaved and torch.equal(first, torch.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["b.pt"]  # no temporary file left behind


def test_a_flipped_argmax_counts_as_disagreement():
    ids = torch.zeros(1, 5, dtype=torch.long)
    base = torch.log_softmax(torch.tensor([2.0, 0.0]), -1).expand(1, 4, 2)
    q = quality.compare(FixedLogits([0.0, 2.0]), ids, base, batch_size=1).metrics
    assert q["quality_top1_agreement"] == 0.0 and q["quality_kl_mean"] > 0


def test_the_embedded_held_out_text_never_asks_an_evaluated_question(tiny_root):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_root / "model")
    ids = quality.windows(tok, plan(num_tokens=512, seq_len=64))
    assert ids.shape == (8, 64)
    text = tok.decode(ids.flatten())
    assert "Q:" not in text and "lives in" in text
    assert torch.equal(ids, quality.windows(tok, plan(num_tokens=512, seq_len=64)))  # fixed text, fixed tokens


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"dataset": "my/corpus"}, "quality.dataset='my/corpus'"),
        ({"seq_len": 4}, "seq_len=4"),
        ({"num_tokens": 8}, "num_tokens=8"),
    ],
)
def test_bad_settings_are_refused_by_name(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        plan(**override)


def test_quality_none_plans_nothing():
    assert quality.plan(OmegaConf.create({"name": "none", "dataset": None})) is None


def test_the_baseline_is_keyed_by_the_window_shape_and_the_models_content(tmp_path):
    """The same tokens cut at another seq_len are other windows (a [4, 64] baseline cannot score [8, 32] windows), and
    a local model folder retrained in place is another model: each gets its own cached baseline."""
    from helpers.synthetic_store import tiny_model

    from quantbench.job.models import SourceModel

    folder = tiny_model(tmp_path / "model")
    source = SourceModel(name="m", reference=str(folder), path_or_id=str(folder))
    tokens = torch.arange(256)
    by_64 = quality.baseline_path(tmp_path, source, "bfloat16", "cpu", tokens.view(4, 64))
    by_32 = quality.baseline_path(tmp_path, source, "bfloat16", "cpu", tokens.view(8, 32))
    assert by_64 != by_32
    assert quality.windows_id(tokens.view(4, 64)) != quality.windows_id(tokens.view(8, 32))
    assert by_64 == quality.baseline_path(tmp_path, source, "bfloat16", "cpu", tokens.view(4, 64))  # same: reused
    tiny_model(folder, seed=1)  # retrained in place: same path, other weights
    assert quality.baseline_path(tmp_path, source, "bfloat16", "cpu", tokens.view(4, 64)) != by_64


def test_a_job_with_another_seq_len_does_not_take_the_cached_baseline(tiny_root, tmp_path):
    """Through the pipeline's own path: quality.windows then baseline_path, as two jobs with quality.seq_len=64 and 32
    over the same 256 tokens of held-out text would."""
    from transformers import AutoTokenizer

    from quantbench.job.models import SourceModel

    tok = AutoTokenizer.from_pretrained(tiny_root / "model")
    source = SourceModel(name="tiny", reference="embedded:tiny", path_or_id=str(tiny_root / "model"))
    paths = {
        n: quality.baseline_path(
            tmp_path, source, "bfloat16", "cpu", quality.windows(tok, plan(num_tokens=256, seq_len=n))
        )
        for n in (64, 32)
    }
    assert paths[64] != paths[32]
