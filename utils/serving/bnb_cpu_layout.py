"""bitsandbytes 4-bit on a CPU with AVX512-BF16: the repacked weight layout, saved once, set back on load.

On such a CPU, bitsandbytes repacks every Linear4bit's weight into a CPU kernel layout at its first
forward pass (`_convert_weight_packed_for_cpu`: unpack, transpose, dequantize the nested absmax):
about 1 s for a 0.6B model on one core, paid by the first request after every load, cached or not.
The quantized cache stores the result of that very function next to its entry (`cpu_layout.safetensors`)
and sets it back after a cached load, so the first request runs at once.

What is stored is bitsandbytes' own output, not a re-implementation: for each module, the packed
weight and every attribute of the QuantState it left. On load, one module is repacked by
bitsandbytes and compared with the file first; any difference (another bitsandbytes, another CPU)
and nothing is set back: bitsandbytes then repacks at the first forward pass as it always does.
The layout is computed before any forward pass of the model being cached (that pass would repack
the live model in place).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("model_server.quant_cache")

FILE_NAME = "cpu_layout.safetensors"


def _modules(model: Any) -> Iterator[tuple[str, Any]]:
    """Linear4bit modules that bitsandbytes would repack for this CPU (device cpu, AVX512-BF16)."""
    try:
        import bitsandbytes as bnb  # deferred: bitsandbytes
    except ImportError:
        return
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False) \
                and module.weight.device.type == "cpu" and module.weight.quant_state is not None \
                and not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            yield name, module


def _pack(module: Any) -> tuple[Any, Any]:
    """bitsandbytes' repack of one module, on copies (the module itself is left as it is)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu  # deferred: bitsandbytes
    return _convert_weight_packed_for_cpu(module.weight.data, copy.deepcopy(module.weight.quant_state))


def _encode(state: Any, name: str, tensors: dict) -> dict:
    import torch  # deferred: torch

    fields: dict[str, Any] = {}
    for key, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            tensors[f"{name}:{key}"] = value.contiguous()
            fields[key] = {"tensor": True}
        elif isinstance(value, torch.dtype):
            fields[key] = {"dtype": str(value).removeprefix("torch.")}
        elif isinstance(value, torch.Size):
            fields[key] = {"size": list(value)}
        elif value is None or isinstance(value, (bool, int, float, str)):
            fields[key] = {"value": value}
        else:
            raise TypeError(f"{name}: QuantState.{key} is a {type(value).__name__}")
    return fields


def save(model: Any, folder: Path) -> dict | None:
    """Writes the repacked layout of every such module into folder/FILE_NAME; returns what entry.json
    keeps about it (None when the model has no module bitsandbytes repacks here)."""
    from safetensors.torch import save_file  # deferred: safetensors

    tensors: dict[str, Any] = {}
    states: dict[str, dict] = {}
    for name, module in _modules(model):
        try:
            packed, state = _pack(module)
            found: dict[str, Any] = {f"{name}:weight": packed.contiguous()}
            states[name] = _encode(state, name, found)
        except Exception as exc:  # e.g. a layer size the CPU kernel does not take: bitsandbytes decides at run time
            log.debug("%s: no CPU layout saved (%s)", name, exc)
            continue
        tensors.update(found)
    if not states:
        return None
    save_file(tensors, str(folder / FILE_NAME))
    return {"file": FILE_NAME, "modules": states}


def apply(model: Any, folder: Path, meta: dict | None) -> int:
    """Sets the saved layout back on a model just read from `folder`; returns how many modules got it
    (0 when it does not match what bitsandbytes computes here, or there is none)."""
    import torch  # deferred: torch
    from safetensors import safe_open  # deferred: safetensors

    modules = dict(_modules(model))
    states = (meta or {}).get("modules") or {}
    if not states or not set(states) <= set(modules):
        return 0
    with safe_open(str(folder / (meta.get("file") or FILE_NAME)), framework="pt") as handle:
        probe = min(states, key=lambda name: modules[name].weight.numel())  # the smallest: cheap to repack
        modules = {name: modules[name] for name in states}  # the others: bitsandbytes at the first forward
        packed, state = _pack(modules[probe])
        expected = {k: v for k, v in vars(state).items()}
        if not torch.equal(packed, handle.get_tensor(f"{probe}:weight")) or \
                not _same(expected, _decode(states[probe], probe, handle)):
            log.warning("the saved CPU layout differs from bitsandbytes' own: not used (repacked at the first request)")
            return 0
        for name, module in modules.items():
            fields = _decode(states[name], name, handle)
            quant_state = module.weight.quant_state
            for key in [k for k in vars(quant_state) if k not in fields]:
                delattr(quant_state, key)
            for key, value in fields.items():
                setattr(quant_state, key, value)
            module.weight.data = handle.get_tensor(f"{name}:weight")
    return len(modules)


def _decode(fields: dict, name: str, handle: Any) -> dict:
    import torch  # deferred: torch

    out = {}
    for key, spec in fields.items():
        if spec.get("tensor"):
            out[key] = handle.get_tensor(f"{name}:{key}")
        elif "dtype" in spec:
            out[key] = getattr(torch, spec["dtype"])
        elif "size" in spec:
            out[key] = torch.Size(spec["size"])
        else:
            out[key] = spec["value"]
    return out


def _same(a: dict, b: dict) -> bool:
    import torch  # deferred: torch

    if set(a) != set(b):
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor) or value.dtype != other.dtype or not torch.equal(value, other):
                return False
        elif value != other:
            return False
    return True
