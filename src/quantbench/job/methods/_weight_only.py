"""What the weight-only integer methods (AWQ, GPTQ, AutoRound, RTN) share: cheap checks of bits and group size, the
compressed-tensors weight scheme, and calibration texts turned into token ids of a fixed maximum length."""

from __future__ import annotations

import re

from quantbench.errors import ConfigError

# compressed-tensors packs 1..8 bits, but vLLM's compressed-tensors WNA16 kernels serve only 4 and 8 (AWQ and RTN
# save that format).
COMPRESSED_TENSORS_BITS = (4, 8)
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
    keep: list[str] | None = None,
    keep_bits: int = 16,
):
    """llm-compressor's modifier that rounds the INT weights of every Linear layer but the LM head (or of `targets`
    but `ignore`): per group of `group_size` input columns, or per output channel for -1; activations untouched
    (W4A16 / W8A16). Layers matching the `keep` patterns ("re:..." names) get a second config group at `keep_bits`
    (compressed-tensors ranks a name pattern above the "Linear" class), or for 16 join the ignore list."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier

    def scheme(num_bits: int, scheme_targets: list[str]) -> QuantizationScheme:
        grouped = group_size > 0
        weights = QuantizationArgs(
            num_bits=num_bits,
            type="int",
            symmetric=symmetric,
            dynamic=False,
            strategy="group" if grouped else "channel",
            group_size=group_size if grouped else None,
        )
        return QuantizationScheme(targets=scheme_targets, weights=weights)

    groups = {"group_0": scheme(bits, targets or ["Linear"])}
    ignore = ["lm_head"] if ignore is None else list(ignore)
    if keep and keep_bits == 16:
        ignore += keep
    elif keep:
        groups["group_1"] = scheme(keep_bits, keep)
    return QuantizationModifier(config_groups=groups, ignore=ignore)


# Named layer groups of a decoder (Llama, Qwen, Mistral module names) that `method.keep` holds at another precision;
# firstN / lastN / endsN: the first, last, or first and last N blocks.
KEEP_GROUPS = {
    "attn": r".*self_attn\.[^.]+$",
    "mlp": r".*mlp\.[^.]+$",
    "down_proj": r".*mlp\.down_proj$",
}
KEEP_BLOCKS = re.compile(r"^(first|last|ends)(\d+)$")


def keep_patterns(keep: str, num_layers: int) -> list[str]:
    """llm-compressor target patterns ("re:...") of `method.keep`: "none", or group names joined by "+"."""
    patterns = []
    for part in [p for p in str(keep).split("+") if p and p != "none"]:
        blocks = KEEP_BLOCKS.match(part)
        if part in KEEP_GROUPS:
            patterns.append("re:" + KEEP_GROUPS[part])
        elif blocks and 0 < int(blocks[2]) <= num_layers:
            n = int(blocks[2])
            first, last = list(range(n)), list(range(num_layers - n, num_layers))
            index = {"first": first, "last": last, "ends": sorted({*first, *last})}[blocks[1]]
            patterns.append(r"re:.*layers\.(" + "|".join(map(str, index)) + r")\.(self_attn|mlp)\.[^.]+$")
        else:
            raise ConfigError(
                f"method.keep={keep!r}: {part!r} is not a layer group; use none, or any of "
                f"{', '.join(KEEP_GROUPS)}, firstN, lastN, endsN (N blocks, 1..{num_layers}) joined by '+'."
            )
    return patterns


def check_keep_bits(bits: int, keep_bits: int, supported: tuple[int, ...]) -> None:
    """Kept layers are stored at more bits than the rest: one of the method's wider widths, or 16 (unquantized)."""
    if keep_bits not in (*supported, 16) or keep_bits <= bits:
        raise ConfigError(
            f"method.keep_bits={keep_bits}: kept layers are stored at more bits than the rest "
            f"(method.bits={bits}): one of {[b for b in (*supported, 16) if b > bits]} (16: unquantized)."
        )


def keep_layout(names: list[str], patterns: list[str], bits: int, keep_bits: int, group_size: int) -> dict[str, str]:
    """Each layer's stored format, as compressed-tensors matches the patterns (re.match on the module name)."""
    kept = f"int{keep_bits}" if keep_bits < 16 else "unquantized"
    base = f"int{bits}"
    suffix = f"-g{group_size}" if group_size > 0 else "-channel"
    return {
        n: (kept + (suffix if keep_bits < 16 else "")) if any(re.match(p[3:], n) for p in patterns) else base + suffix
        for n in names
    }
