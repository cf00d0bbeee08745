"""Which modules are recorded, what they are called, and how to read their output.

Names follow delve 0.1.50 exactly, so CSV columns match: the attribute path joined
with ``-`` (root left out), a module's own ``.name`` attribute wins, and in a plain
list of modules a supported leaf ``i`` is called ``Module-{i}-{ClassName}``.

Types are given as classes or as names, so that a library's layers can be matched without
importing the library: a name is a class's ``__name__`` or its ``module.qualname`` (any class
in the module's MRO counts), e.g. ``"transformers.pytorch_utils.Conv1D"`` (GPT-2's dense layer).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "DEFAULT_LAYER_TYPE_NAMES",
    "OPAQUE_TYPES",
    "LayerType",
    "discover_layers",
    "module_kind",
    "primary_output",
    "type_matcher",
]

#: A layer type: a module class, or a class name / ``module.qualname`` (matched along the MRO).
LayerType = type[nn.Module] | str

#: Module types recorded by default: delve's (Linear, Conv2d, LSTM), the other convs and RNNs (leaves),
#: and whole ``nn.MultiheadAttention`` modules (their attention output, see :data:`OPAQUE_TYPES`).
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
    nn.MultiheadAttention,
)
#: Types recorded by default that are matched by name (their library is not imported): Hugging Face's
#: ``Conv1D``, a dense layer of GPT-2 style models (``y = x @ W + b``, despite its name).
DEFAULT_LAYER_TYPE_NAMES: tuple[str, ...] = ("transformers.pytorch_utils.Conv1D",)
_DENSE_TYPE_NAMES = frozenset(DEFAULT_LAYER_TYPE_NAMES)

#: Modules whose forward uses their children's weights directly instead of calling the children, so a
#: hook on a child never fires. Such a module is recorded whole (for ``nn.MultiheadAttention`` its
#: output is the attention output, i.e. what ``out_proj`` computes) and its children are never listed.
OPAQUE_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

_CONV_TYPES = (nn.modules.conv._ConvNd,)
_RECURRENT_TYPES = (nn.RNNBase,)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _has_type_name(module: nn.Module, names: frozenset[str] | set[str]) -> bool:
    return any(c.__name__ in names or _qualified(c) in names for c in type(module).__mro__)


def type_matcher(
    layer_types: Iterable[LayerType], argument: str = "layer_types"
) -> Callable[[nn.Module], bool]:
    """A predicate: whether a module is of one of ``layer_types`` (classes or names).

    Raises
    ------
    TypeError
        An item is neither a ``torch.nn.Module`` subclass nor a non-empty string.

    Examples
    --------
    >>> is_norm = type_matcher([nn.LayerNorm, "Embedding"])
    >>> is_norm(nn.LayerNorm(2)), is_norm(nn.Embedding(3, 2)), is_norm(nn.Linear(2, 2))
    (True, True, False)
    >>> type_matcher(["torch.nn.modules.linear.Linear"])(nn.Linear(2, 2))
    True
    """
    items = [layer_types] if isinstance(layer_types, (str, type)) else list(layer_types)
    classes: list[type] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, type) and issubclass(item, nn.Module):
            classes.append(item)
        elif isinstance(item, str) and item:
            names.add(item)
        else:
            raise TypeError(
                f"{argument}: item {i} ({item!r}) is neither a torch.nn.Module subclass nor a class name "
                "such as 'Conv1D' or 'transformers.pytorch_utils.Conv1D'"
            )
    class_tuple = tuple(classes)

    def match(module: nn.Module) -> bool:
        return isinstance(module, class_tuple) or (bool(names) and _has_type_name(module, names))

    return match


_default_match = type_matcher((*DEFAULT_LAYER_TYPES, *DEFAULT_LAYER_TYPE_NAMES))


def module_kind(module: nn.Module) -> str:
    """``"conv"``, ``"recurrent"``, ``"dense"`` or ``"other"``."""
    if isinstance(module, _CONV_TYPES):
        return "conv"
    if isinstance(module, _RECURRENT_TYPES):
        return "recurrent"
    if isinstance(module, nn.Linear) or _has_type_name(module, _DENSE_TYPE_NAMES):
        return "dense"
    return "other"


def primary_output(module: nn.Module, output: Any) -> torch.Tensor | None:
    """The tensor of a module output that is recorded, samples first.

    Tuples and lists give their first item, mappings (a Hugging Face ``ModelOutput``) their first
    value, a ``PackedSequence`` its ``.data``. A recurrent module or a ``nn.MultiheadAttention`` that
    is not ``batch_first`` returns ``(T, B, H)``: it is transposed to ``(B, T, H)`` so that samples
    always come first.
    """
    out = output
    while True:
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        elif isinstance(out, Mapping) and out:
            out = next(iter(out.values()))
        else:
            break
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return out.data
    if not isinstance(out, torch.Tensor):
        return None
    time_first = isinstance(module, (*_RECURRENT_TYPES, nn.MultiheadAttention))
    if time_first and not getattr(module, "batch_first", False) and out.dim() == 3:
        out = out.transpose(0, 1)
    return out


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(module, OPAQUE_TYPES):
        return []
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _join(prefix: str, name: str) -> str:
    return name if prefix == "" else f"{prefix}-{name}"


def _name(module: nn.Module, prefix: str) -> str:
    return getattr(module, "name", None) or prefix


def _recorded_whole(module: nn.Module, match: Callable[[nn.Module], bool], leaves_only: bool) -> bool:
    """Whether discovery records ``module`` itself (by default only leaves and opaque modules)."""
    if not match(module):
        return False
    return not leaves_only or not module._modules or isinstance(module, OPAQUE_TYPES)


def _walk(
    module: nn.Module,
    prefix: str,
    found: dict[str, nn.Module],
    match: Callable[[nn.Module], bool],
    leaves_only: bool,
) -> None:
    if prefix and _recorded_whole(module, match, leaves_only):
        found[_name(module, prefix)] = module
    for name, child in _children(module):
        _walk(child, _join(prefix, name), found, match, leaves_only)


def _all_named(module: nn.Module, prefix: str, found: dict[str, nn.Module], hidden: dict[str, str]) -> None:
    """Every module by name; ``hidden`` gets the children of opaque modules (never called) -> parent."""
    if prefix:
        found.setdefault(_name(module, prefix), module)
    if isinstance(module, OPAQUE_TYPES):
        for name in module._modules:
            hidden[_join(prefix, name)] = prefix
    for name, child in _children(module):
        _all_named(child, _join(prefix, name), found, hidden)


def _roots(
    modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module], match: Callable[[nn.Module], bool]
) -> list[tuple[str, nn.Module]]:
    """Name prefixes for the top-level modules, with delve's rules."""

    def unit(m: nn.Module) -> bool:  # a module recorded as one layer, not searched
        return (not m._modules or isinstance(m, OPAQUE_TYPES)) and match(m)

    if isinstance(modules, nn.Module):
        if unit(modules):
            return [(_name(modules, type(modules).__name__), modules)]
        return [("", modules)]
    if isinstance(modules, Mapping):
        return [(str(k), m) for k, m in modules.items()]
    roots = []
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules: item {i} is a {type(m).__name__}, not a torch.nn.Module")
        roots.append((f"Module-{i}-{type(m).__name__}" if unit(m) else "", m))
    return roots


def _never_called(pattern: str, parent: str, module: nn.Module) -> ValueError:
    return ValueError(
        f"layers: {pattern!r} is never called: its parent {parent!r} ({type(module).__name__}) uses its "
        f"weights directly, so a hook on it never fires; record {parent!r} instead (its output is what "
        f"{pattern!r} computes)"
    )


def _select(
    roots: list[tuple[str, nn.Module]], found: dict[str, nn.Module], patterns: list[str]
) -> dict[str, nn.Module]:
    """The layers named or matched by ``patterns`` (see :func:`discover_layers`), in model order."""
    everything: dict[str, nn.Module] = {}
    hidden: dict[str, str] = {}
    for prefix, module in roots:
        _all_named(module, prefix, everything, hidden)
    kept: dict[str, nn.Module] = {}
    for pattern in patterns:
        matched = [n for n in found if fnmatch.fnmatchcase(n, pattern)]
        if not matched and pattern in hidden:
            raise _never_called(pattern, hidden[pattern], everything[hidden[pattern]])
        if not matched:  # any other module: by exact name, or a glob over every module's name
            matched = [n for n in everything if fnmatch.fnmatchcase(n, pattern)]
            found = {**found, **{n: everything[n] for n in matched}}
        if not matched:
            raise ValueError(
                f"layers: {pattern!r} matches no layer; recordable layers are: {', '.join(found) or '(none)'}"
            )
        for n in matched:
            kept[n] = found[n]
    order = {n: i for i, n in enumerate(everything)}
    return dict(sorted(kept.items(), key=lambda kv: order.get(kv[0], len(order))))


def discover_layers(
    modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module],
    *,
    layer_filter: Callable[[dict[str, nn.Module]], dict[str, nn.Module]] | None = None,
    layers: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    layer_types: Iterable[LayerType] | None = None,
) -> dict[str, nn.Module]:
    """The modules to record, keyed by their delve-style name.

    Parameters
    ----------
    modules : Module, list of Modules or dict of name -> Module
        What to search. By default the leaves of :data:`DEFAULT_LAYER_TYPES` and
        :data:`DEFAULT_LAYER_TYPE_NAMES` are found recursively, and whole ``nn.MultiheadAttention``
        modules (see :data:`OPAQUE_TYPES`).
    layer_filter : callable, optional
        Called with the ``name -> module`` dict, returns the dict to keep (delve's argument).
    layers : iterable of str, optional
        Names or glob patterns to keep. A pattern matches the layers found; one that matches none of
        them matches the name of any module (a block, a ``LayerNorm``, an ``Embedding``, an activation),
        which is then recorded too.
    ignore : iterable of str, optional
        Names or glob patterns to drop.
    layer_types : iterable of Module classes or class names, optional
        Record the modules of these types instead of the defaults, containers (whole blocks) included;
        names match without importing the library (see :func:`type_matcher`).

    Raises
    ------
    ValueError
        When a pattern of ``layers`` or ``ignore`` matches no layer, names a child that its parent never
        calls (``out_proj`` of a ``nn.MultiheadAttention``), or nothing is left to record.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    >>> list(discover_layers(net))
    ['0', '3']
    >>> list(discover_layers([nn.Linear(2, 2), nn.Linear(2, 3)]))
    ['Module-0-Linear', 'Module-1-Linear']
    >>> enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    >>> list(discover_layers(enc))
    ['self_attn', 'linear1', 'linear2']
    >>> list(discover_layers(enc, layer_types=[nn.LayerNorm, "Dropout"], layers=["norm*"]))
    ['norm1', 'norm2']
    """
    match = _default_match if layer_types is None else type_matcher(layer_types)
    leaves_only = layer_types is None
    roots = _roots(modules, match)
    found: dict[str, nn.Module] = {}
    for prefix, module in roots:
        _walk(module, prefix, found, match, leaves_only)
    if layer_filter is not None:
        found = dict(layer_filter(dict(found)))
    if layers is not None:
        found = _select(roots, found, [layers] if isinstance(layers, str) else list(layers))
    if ignore is not None:
        patterns = [ignore] if isinstance(ignore, str) else list(ignore)
        for pattern in patterns:
            dropped = [n for n in found if fnmatch.fnmatchcase(n, pattern)]
            if not dropped:
                raise ValueError(f"ignore: {pattern!r} matches no layer; layers are: {', '.join(found)}")
            for n in dropped:
                del found[n]
    if not found:
        what = "no layer of the default types" if layer_types is None else "no module of layer_types"
        raise ValueError(
            f"modules: no layer to record ({what} was found, or all were ignored); name modules with "
            "layers= or choose types with layer_types="
        )
    return found
