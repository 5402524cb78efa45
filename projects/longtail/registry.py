"""Registering a method's class or builder under its config value.

fvcore's ``Registry.register`` keys an entry by its ``__name__``; the project's registries (losses,
classifier layers, memory policies) are keyed by the value a config names (``"ebl"``,
``"cosine"``, ``"mfs"``), so they register through :func:`register_as`.
"""
__all__ = ["register_as"]


def register_as(registry, name: str):
    """Decorator: add the class or function to ``registry`` under ``name``; a class also gets
    ``name`` as its ``name`` attribute (the config value it answers to)."""

    def wrap(obj):
        if isinstance(obj, type):
            obj.name = name
        registry._do_register(name, obj)  # fvcore has no public way to choose the key
        return obj

    return wrap
