"""Speed, named for what it measures: end-to-end output tokens/s (what `vllm bench throughput` reports) and
decode-only tokens/s (the tokens after the first over the time after the first token), computed once for every
backend from the timed generations and the time-to-first-token runs. Numbers by hand."""

from __future__ import annotations

import pytest

from quantbench.job.bench import decode_tokens_per_s, speed_metrics


def test_decode_only_speed_leaves_out_the_first_token_and_its_time():
    # 2 streams of 11 tokens: 2 * 10 = 20 tokens after the first ones, in (total - time to first token)
    values, why = decode_tokens_per_s(2, 11, seconds=[1.1, 2.6, 0.85], ttft=[0.6, 0.6, 0.6])
    assert values == pytest.approx([40.0, 10.0, 80.0])  # 20 / 0.5, 20 / 2.0, 20 / 0.25
    assert why is None


def test_speed_metrics_give_both_figures_with_their_spread_and_keep_every_repeat():
    runs = [{"streams": 2, "seconds": [1.1, 2.6, 0.85], "ttft_s": [0.6, 0.6, 0.6]}]
    metrics, tags = speed_metrics(runs, output_tokens=11)
    # end to end: 22 tokens / 1.1, 2.6, 0.85 s = 20, 8.46, 25.88 tokens/s; the prefill halves the median here
    assert metrics["tokens_per_s_2_streams"] == pytest.approx(20.0)
    assert (metrics["tokens_per_s_2_streams_min"], metrics["tokens_per_s_2_streams_max"]) == pytest.approx(
        (8.4615, 25.882), rel=1e-4
    )
    assert metrics["decode_tokens_per_s_2_streams"] == pytest.approx(40.0)
    assert (
        metrics["decode_tokens_per_s_2_streams_min"],
        metrics["decode_tokens_per_s_2_streams_max"],
    ) == pytest.approx((10.0, 80.0))
    assert metrics["ttft_s_2_streams"] == pytest.approx(0.6)
    assert tags == {}
    # the benchmark JSON keeps each repeat's figures
    assert runs[0]["decode_tokens_per_s"] == pytest.approx([40.0, 10.0, 80.0])
    assert runs[0]["tokens_per_s"] == pytest.approx([20.0, 8.4615, 25.882], rel=1e-4)


def test_a_repeat_no_longer_than_its_first_token_leaves_no_decode_figure_and_says_why():
    runs = [
        {"streams": 1, "seconds": [1.0, 0.5], "ttft_s": [0.5, 0.5]},  # the second repeat: no time after the first token
        {"streams": 8, "seconds": [2.0, 2.0], "ttft_s": [1.0, 1.0]},
    ]
    metrics, tags = speed_metrics(runs, output_tokens=5)
    assert "decode_tokens_per_s_1_stream" not in metrics and "tokens_per_s_1_stream" in metrics
    assert metrics["decode_tokens_per_s_8_streams"] == pytest.approx(32.0)  # 8 * 4 tokens / 1.0 s
    assert runs[0]["decode_tokens_per_s"] == [pytest.approx(8.0), None]  # 4 tokens / 0.5 s; none for the second
    assert tags["decode_tokens_per_s_unavailable"] == (
        "1_stream: the generation took no longer than its first token (repeat 2: 0.5 s in all, 0.5 s to the first token)"
    )
    assert runs[0]["decode_unavailable"] in tags["decode_tokens_per_s_unavailable"]


def test_one_output_token_has_nothing_decoded_after_it():
    runs = [{"streams": 1, "seconds": [0.2], "ttft_s": [0.1]}]
    metrics, tags = speed_metrics(runs, output_tokens=1)
    assert sorted(k for k in metrics if "decode" in k) == []
    assert tags == {"decode_tokens_per_s_unavailable": "1_stream: output_tokens=1: no token is decoded after the first"}
