"""method.keep (RTN's mixed precision): named layer groups to llm-compressor patterns, and the layout they give.
The quantized layout, its bits_per_weight and its disk size are checked end to end in tests/e2e/test_search_study.py."""

from __future__ import annotations

import pytest

from quantbench.errors import ConfigError
from quantbench.job.methods._weight_only import keep_layout, keep_patterns

NAMES = [f"model.layers.{i}.{part}" for i in range(4) for part in
         ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip


def test_groups_and_blocks_select_the_layers_they_name():
    layout = keep_layout(NAMES, keep_patterns("down_proj+first1", 4), 4, 16, 128)
    kept = sorted(n for n, f in layout.items() if f == "unquantized")
    assert kept == sorted([n for n in NAMES if n.endswith("down_proj") or ".layers.0." in n])
    assert set(layout.values()) == {"unquantized", "int4-g128"}
    ends = keep_layout(NAMES, keep_patterns("ends1", 4), 4, 8, 64)
    assert {n.split(".")[2] for n, f in ends.items() if f == "int8-g64"} == {"0", "3"}
    assert keep_patterns("none", 4) == [] and keep_layout(NAMES, [], 4, 16, 128) == dict.fromkeys(NAMES, "int4-g128")


@pytest.mark.parametrize("keep", ["first5", "lm_head", "attn,mlp"])
def test_an_unknown_group_is_refused_naming_the_choices(keep):
    with pytest.raises(ConfigError, match="down_proj, firstN, lastN, endsN"):
        keep_patterns(keep, 4)


def test_rtn_refuses_kept_layers_at_no_more_bits_and_resolves_blocks_from_the_model():
    from omegaconf import OmegaConf
    from transformers import LlamaConfig

    from quantbench.job.methods.rtn import RTN

    config = LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=768, num_attention_heads=4)
    hardware = OmegaConf.create({"device": "cpu", "dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="method.keep_bits=4: kept layers are stored at more bits"):
        RTN("rtn", keep="down_proj", keep_bits=4).validate(config, hardware)
    method = RTN("rtn", keep="last2", keep_bits=8)
    method.validate(config, hardware)
    layout = method.layout(NAMES)
    assert {n.split(".")[2] for n, f in layout.items() if f == "int8-g128"} == {"2", "3"}
    assert RTN("rtn").layout(NAMES) is None  # uniform: no layout logged
