"""What the weight-only integer methods (AWQ, GPTQ, AutoRound, RTN) share: cheap checks of bits and group size, the
compressed-tensors weight scheme, and calibration texts turned into token ids of a fixed maximum length."""

from __future__ import annotations

from quantbench.errors import ConfigError

# Group sizes offered when a configured one does not fit; -1 means one scale per output channel (no groups).
CANDIDATE_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def check_bits(method: str, bits: int, supported: tuple[int, ...], why: str) -> None:
    if bits not in supported:
        raise ConfigError(f"method.bits={bits}: {method} supports {list(supported)} bits ({why}).")


def check_group_size(method: str, group_size: int, model_config) -> None:
    """A group of input columns shares one scale, so the group size must divide every layer's input width."""
    widths = input_widths(model_config)
    if group_size == -1 or (group_size > 0 and all(w % group_size == 0 for w in widths.values())):
        return
    valid = [-1] + [g for g in CANDIDATE_GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    named = ", ".join(f"{k}={v}" for k, v in widths.items())
    raise ConfigError(
        f"method.group_size={group_size}: {method} needs a group size that divides every layer's input "
        f"width ({named}); valid choices: {valid} (-1 = one scale per output channel)."
    )


def input_widths(model_config) -> dict[str, int]:
    """Input widths of a decoder's linear layers, from its config: attention and MLP inputs (hidden_size), the MLP
    down projection (intermediate_size) and the attention output projection (heads x head_dim, when different)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = int(cfg.hidden_size)
    widths = {"hidden_size": hidden}
    if getattr(cfg, "intermediate_size", None):
        widths["intermediate_size"] = int(cfg.intermediate_size)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(cfg, "head_dim", 0) or (hidden // heads if heads else 0))
    if heads and head_dim and heads * head_dim != hidden:
        widths["num_attention_heads*head_dim"] = heads * head_dim
    return widths


def encode(tokenizer, texts: list[str], max_len: int) -> list[dict[str, list[int]]]:
    """Token ids and attention masks of the calibration texts, each cut to `max_len` tokens; empty texts dropped."""
    enc = tokenizer(list(texts), truncation=True, max_length=int(max_len))
    return [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
        if len(ids) > 0
    ]


def int_weight_modifier(
    bits: int,
    group_size: int,
    symmetric: bool,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
):
    """llm-compressor's modifier that rounds the INT weights of every Linear layer but the LM head (or of `targets`
    but `ignore`): per group of `group_size` input columns, or per output channel for -1; activations untouched
    (W4A16 / W8A16)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier

    grouped = group_size > 0
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        dynamic=False,
        strategy="group" if grouped else "channel",
        group_size=group_size if grouped else None,
    )
    scheme = QuantizationScheme(targets=targets or ["Linear"], weights=weights)
    return QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"] if ignore is None else ignore)
