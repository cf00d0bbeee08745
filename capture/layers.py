"""Which modules are recorded, what they are called, and how to read their output.

Names follow delve 0.1.50 exactly, so CSV columns match: the attribute path joined
with ``-`` (root left out), a module's own ``.name`` attribute wins, and in a plain
list of modules a supported leaf ``i`` is called ``Module-{i}-{ClassName}``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "discover_layers",
    "module_kind",
    "primary_output",
]

#: Leaf module types recorded by default: delve's (Linear, Conv2d, LSTM) and the other convs and RNNs.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.LSTM,
    nn.GRU,
    nn.RNN,
)

_CONV_TYPES = (nn.modules.conv._ConvNd,)
_RECURRENT_TYPES = (nn.RNNBase,)


def module_kind(module: nn.Module) -> str:
    """``"conv"``, ``"recurrent"``, ``"dense"`` or ``"other"``."""
    if isinstance(module, _CONV_TYPES):
        return "conv"
    if isinstance(module, _RECURRENT_TYPES):
        return "recurrent"
    if isinstance(module, nn.Linear):
        return "dense"
    return "other"


def primary_output(module: nn.Module, output: Any) -> torch.Tensor | None:
    """The tensor of a module output that is recorded, samples first.

    Tuples and lists give their first tensor (an LSTM's sequence output), a
    ``PackedSequence`` gives its ``.data``. A recurrent module that is not
    ``batch_first`` returns ``(T, B, H)``: it is transposed to ``(B, T, H)`` so
    that samples always come first.
    """
    out = output
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return out.data
    if not isinstance(out, torch.Tensor):
        return None
    if isinstance(module, _RECURRENT_TYPES) and not getattr(module, "batch_first", False) and out.dim() == 3:
        out = out.transpose(0, 1)
    return out


def _is_default(module: nn.Module) -> bool:
    return isinstance(module, DEFAULT_LAYER_TYPES)


def _walk(module: nn.Module, prefix: str, found: dict[str, nn.Module]) -> None:
    children = module._modules
    if children:
        for name, child in children.items():
            if child is None:
                continue
            _walk(child, name if prefix == "" else f"{prefix}-{name}", found)
        return
    if _is_default(module):
        found[getattr(module, "name", None) or prefix] = module


def _all_named(module: nn.Module, prefix: str, found: dict[str, nn.Module]) -> None:
    if prefix:
        found.setdefault(getattr(module, "name", None) or prefix, module)
    for name, child in module._modules.items():
        if child is not None:
            _all_named(child, name if prefix == "" else f"{prefix}-{name}", found)


def _roots(modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """Name prefixes for the top-level modules, with delve's rules."""
    if isinstance(modules, nn.Module):
        if not modules._modules and _is_default(modules):
            return [(getattr(modules, "name", None) or type(modules).__name__, modules)]
        return [("", modules)]
    if isinstance(modules, Mapping):
        return [(str(k), m) for k, m in modules.items()]
    roots = []
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules: item {i} is a {type(m).__name__}, not a torch.nn.Module")
        roots.append((f"Module-{i}-{type(m).__name__}" if not m._modules and _is_default(m) else "", m))
    return roots


def discover_layers(
    modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module],
    *,
    layer_filter: Callable[[dict[str, nn.Module]], dict[str, nn.Module]] | None = None,
    layers: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """The modules to record, keyed by their delve-style name.

    Parameters
    ----------
    modules : Module, list of Modules or dict of name -> Module
        What to search. Supported leaf layers (:data:`DEFAULT_LAYER_TYPES`) are found recursively.
    layer_filter : callable, optional
        Called with the ``name -> module`` dict, returns the dict to keep (delve's argument).
    layers : iterable of str, optional
        Names or glob patterns to keep. A pattern matches the supported leaves; an exact name may also
        name any other module (a container, an activation), which is then recorded too.
    ignore : iterable of str, optional
        Names or glob patterns to drop.

    Raises
    ------
    ValueError
        When a pattern of ``layers`` or ``ignore`` matches no layer, or nothing is left to record.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    >>> list(discover_layers(net))
    ['0', '3']
    >>> list(discover_layers([nn.Linear(2, 2), nn.Linear(2, 3)]))
    ['Module-0-Linear', 'Module-1-Linear']
    """
    roots = _roots(modules)
    found: dict[str, nn.Module] = {}
    for prefix, module in roots:
        if prefix and not module._modules:
            if _is_default(module):
                found[getattr(module, "name", None) or prefix] = module
        else:
            _walk(module, prefix, found)
    if layer_filter is not None:
        found = dict(layer_filter(dict(found)))
    if layers is not None:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        everything: dict[str, nn.Module] = {}
        for prefix, module in roots:
            _all_named(module, prefix, everything)
        kept: dict[str, nn.Module] = {}
        for pattern in patterns:
            matched = [n for n in found if fnmatch.fnmatchcase(n, pattern)]
            if not matched and pattern in everything:
                kept[pattern] = everything[pattern]
                continue
            if not matched:
                raise ValueError(
                    f"layers: {pattern!r} matches no layer; recordable layers are: {', '.join(found) or '(none)'}"
                )
            for n in matched:
                kept[n] = found[n]
        # keep model order for pattern matches
        order = {n: i for i, n in enumerate(everything)}
        found = dict(sorted(kept.items(), key=lambda kv: order.get(kv[0], len(order))))
    if ignore is not None:
        patterns = [ignore] if isinstance(ignore, str) else list(ignore)
        for pattern in patterns:
            dropped = [n for n in found if fnmatch.fnmatchcase(n, pattern)]
            if not dropped:
                raise ValueError(f"ignore: {pattern!r} matches no layer; layers are: {', '.join(found)}")
            for n in dropped:
                del found[n]
    if not found:
        raise ValueError(
            "modules: no layer to record (no Linear, Conv or RNN layer was found or all were ignored)"
        )
    return found
