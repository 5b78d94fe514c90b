"""LoRA (Hu et al., 2021): low-rank adapters on the model's linear layers, the base weights frozen.

A targeted `nn.Linear` stays the same module under the same name (its class becomes `LoraLinear`), keeps its
weight, frozen, and gains `lora_A` (r, in) and `lora_B` (out, r):

    y = x W^T + b + dropout(x) A^T B^T * alpha / r

B starts at zero, so the adapted model starts as the base model exactly. The base weights keep their names, so a
model folder loads into the model as before, and only the adapters reach DeepSpeed's optimizer (which takes the
parameters that need a gradient). `merged_state_dict` folds the adapters into the weights (the model folder's
layout); `adapters_enabled(model, False)` switches every adapter off, which leaves the base model.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from astrai_ds.errors import ConfigError


class LoraLinear(nn.Linear):
    """An `nn.Linear` with a low-rank adapter (see the module's docstring). Made by `apply_lora`, never built."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return y
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.lora_scale


def lora_targets(model: nn.Module, target: list[str]) -> list[str]:
    """Names of the linear layers `target` picks: a plain name matches a layer's own name (`wq` matches every
    block's query projection), `re:PATTERN` a regular expression matched against the whole dotted name."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = []
    for name in linear:
        leaf = name.rsplit(".", 1)[-1]
        for t in target:
            if (t.startswith("re:") and re.fullmatch(t[3:], name)) or t == leaf:
                chosen.append(name)
                break
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(f"lora.target {target} matches none of the model's linear layers; their names are "
                          f"{', '.join(kinds)} (or give 're:PATTERN' over the dotted names, e.g. "
                          f"'re:layers\\.0\\..*')")
    return chosen


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, target: list[str]) -> list[str]:
    """Add adapters to the linear layers `target` picks and freeze every other parameter; returns their names.
    The adapters' A is drawn from the torch RNG (seed it the same on every rank), B is zero."""
    names = lora_targets(model, target)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        dtype = m.weight.dtype
        a = torch.empty(r, m.in_features, dtype=dtype, device=m.weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise their weights
        m.__class__ = LoraLinear
        m.lora_A = nn.Parameter(a)
        m.lora_B = nn.Parameter(torch.zeros(m.out_features, r, dtype=dtype, device=m.weight.device))
        m.lora_scale, m.lora_dropout, m.lora_enabled = alpha / r, dropout, True
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


@contextmanager
def adapters_enabled(model: nn.Module, enabled: bool):
    """Within the block every adapter is on (True) or off (False: the base model)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.lora_enabled for m in layers]
    for m in layers:
        m.lora_enabled = enabled
    try:
        yield
    finally:
        for m, state in zip(layers, before):
            m.lora_enabled = state


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with its adapters folded in: W + B A * scale for every `X.lora_A`/`X.lora_B` pair, the
    adapters themselves left out (the base model's layout). Merged in fp32, then cast back to W's dtype."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[:-len(".lora_A")]
            w = out[f"{prefix}.weight"]
            delta = state[f"{prefix}.lora_B"].float() @ state[key].float() * scale
            out[f"{prefix}.weight"] = (w.float() + delta).to(w.dtype)
    return out
