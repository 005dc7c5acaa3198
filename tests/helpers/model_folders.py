"""Model folders small enough to compute by hand what a decode step reads, and the CPU hardware config they are
measured against (the roofline's tests and the vLLM backend's decisions)."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

CPU = OmegaConf.create({"name": "cpu", "device": "cpu", "dtype": "bfloat16", "memory_bandwidth_gbs": None})


def small_model_folder(tmp_path, tied: bool = False, quantization: dict | None = None):
    """A 2-layer model folder: embedding 100x8 bf16 (1600 B, rows of 16 B), optional LM head 100x8 bf16 (1600 B),
    one fp32 8x8 layer (256 B); 4 heads of dim 2, 2 KV heads."""
    tensors = {
        "model.embed_tokens.weight": torch.zeros(100, 8, dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(8, 8, dtype=torch.float32),
    }
    if not tied:
        tensors["lm_head.weight"] = torch.zeros(100, 8, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    config = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 8,
        "dtype": "bfloat16",
        "tie_word_embeddings": tied,
    }
    if quantization:
        config["quantization_config"] = quantization
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path
