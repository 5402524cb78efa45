"""Registering a method's class or builder under its config value, with the keys only it reads.

fvcore's ``Registry.register`` keys an entry by its ``__name__``; the project's registries (losses,
classifier layers, memory policies) are keyed by the value a config names (``"ebl"``,
``"cosine"``, ``"mfs"``), so they register through :func:`register_as`. An entry may also name the
config keys that it alone reads (``keys``); :func:`refuse_keys_of_unselected` then refuses such a
key set away from its default while another entry is selected, where it could not take effect.
"""
from typing import Dict, Iterable, Tuple

__all__ = ["register_as", "owned_keys", "refuse_keys_of_unselected", "flat_keys",
           "lookup_key"]


def register_as(registry, name: str, keys: Iterable[str] = ()):
    """
    Decorator: add the class or function to ``registry`` under ``name``; a class also gets
    ``name`` as its ``name`` attribute (the config value it answers to).

    Args:
        keys: full config keys or config nodes (every key below them) that only this entry
            reads, e.g. ``("MODEL.SEESAW",)``; stored as the entry's ``config_keys``. A key may be
            owned by several entries (it is then in use when any of them is selected).
    """

    def wrap(obj):
        if isinstance(obj, type):
            obj.name = name
        obj.config_keys = tuple(keys)
        registry._do_register(name, obj)  # fvcore has no public way to choose the key
        return obj

    return wrap


def flat_keys(node, prefix: str) -> Dict[str, object]:
    """``{full key: value}`` of every leaf at or below ``node`` (named ``prefix``)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flat_keys(value, f"{prefix}.{key}"))
    return out


def lookup_key(cfg, key: str):
    """The value (or node) of the dotted ``key`` in ``cfg``."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def owned_keys(registry) -> Dict[str, Tuple[str, ...]]:
    """``{entry name: its config_keys}`` of every entry of ``registry`` (empty when none)."""
    return {name: tuple(getattr(obj, "config_keys", ())) for name, obj in registry}


def refuse_keys_of_unselected(cfg, registry, selected: str, selector: str) -> None:
    """
    Refuse, naming each key, the config keys owned (``register_as(keys=...)``) only by entries of
    ``registry`` other than ``selected`` whose value in ``cfg`` differs from the project's
    default (``add_longtail_config(get_cfg())``): nothing would read them, so the run would
    silently differ from what the config says.

    Args:
        selected: the selected entry's name (the value of ``selector``; may be absent from the
            registry, e.g. "" for "none").
        selector: the config key that selects the entry, for the message (e.g.
            ``"MODEL.LONGTAIL.CLS_LOSS"``).
    """
    owners = owned_keys(registry)
    in_use = owners.get(selected, ())
    from detectron2.config import get_cfg

    from .config import add_longtail_config

    default = add_longtail_config(get_cfg())
    readers: Dict[str, list] = {}  # changed key -> the unselected entries that read it
    for name in sorted(owners):
        if name == selected:
            continue
        for node in owners[name]:
            got = flat_keys(lookup_key(cfg, node), node)
            ref = flat_keys(lookup_key(default, node), node)
            for key, value in got.items():
                if any(key == k or key.startswith(k + ".") for k in in_use):
                    continue
                if value != ref.get(key):
                    readers.setdefault(key, []).append(name)
    if readers:
        bad = [f"{key} {lookup_key(cfg, key)!r} (read only by {selector} "
               + " / ".join(repr(n) for n in names) + ")" for key, names in sorted(readers.items())]
        raise ValueError(
            f"{selector} is {selected!r}, so these keys would be ignored: " + "; ".join(bad)
            + f". Select the {selector} that reads them, or remove them (defaults and meaning: "
            "longtail/config.py).")
