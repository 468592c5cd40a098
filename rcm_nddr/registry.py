"""Plug-in registries: components are registered under a name and built from config by that name.

Third-party packages add components through entry-point groups (``rcm_nddr.tasks``, ...), and a
config can name extra modules under ``plugins:`` (a dotted module name or a path to a ``.py`` file).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from rcm_nddr.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """An unknown or duplicate component name, or a plug-in that could not be loaded."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> component map with a ``register`` decorator that refuses duplicate names."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered (by {_origin(self._items[name])}); "
                    f"refusing to register {_origin(obj)} under the same name"
                )
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            self.load_entry_points()
        if name not in self._items:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items)) or '(none)'}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def load_entry_points(self) -> None:
        """Import every module or object advertised under this registry's entry-point group."""
        if self._entry_points_loaded or self.entry_point_group is None:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            try:
                ep.load()
            except Exception as exc:
                raise RegistryError(
                    f"entry point {ep.name!r} = {ep.value!r} of group {self.entry_point_group!r} failed to load: {exc}"
                ) from exc


def installed_names(group: str) -> list[str]:
    """The names an entry-point group advertises (the built-in components and installed plug-ins), read
    from the package metadata without importing anything."""
    return sorted({ep.name for ep in entry_points(group=group)})


def _origin(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def import_plugin(spec: str) -> None:
    """Import a plug-in module by dotted name or by path to a ``.py`` file (once per process)."""
    if spec.endswith(".py") or "/" in spec:
        path = Path(spec).expanduser().resolve()
        module_name = "rcm_nddr_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        if module_name in sys.modules:
            return
        if not path.is_file():
            raise RegistryError(f"plug-in file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[module_name]
            raise
        return
    try:
        importlib.import_module(spec)
    except ImportError as exc:
        raise RegistryError(f"plug-in module {spec!r} could not be imported: {exc}") from exc


def options_error(component: Callable[..., Any], args: tuple[Any, ...], options: Mapping[str, Any]) -> str | None:
    """Why ``component(*args, **options)`` cannot be called with these options (an unknown or missing
    one), naming the options it takes; None when the call binds. Used to check config and command-line
    options of task types and datasets before anything is built."""
    signature = inspect.signature(component)
    try:
        signature.bind(*args, **options)
    except TypeError as exc:
        taken = [
            p.name
            for p in list(signature.parameters.values())[len(args) :]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        return f"{exc} (it takes: {', '.join(taken) or 'no options'})"
    return None


TASKS: Registry = Registry("task type", "rcm_nddr.tasks")
DATASETS: Registry = Registry("dataset", "rcm_nddr.datasets")
#: loss weightings by name (``loss.weighting.type``)
WEIGHTINGS: Registry = Registry("loss weighting", "rcm_nddr.weightings")


def discover(plugins: Iterable[str] = ()) -> None:
    """Register the built-in task types, datasets and loss weightings, the config's plug-ins and the entry
    points."""
    importlib.import_module("rcm_nddr.tasks")
    importlib.import_module("rcm_nddr.data")
    importlib.import_module("rcm_nddr.objectives")
    for spec in plugins:
        import_plugin(spec)
    TASKS.load_entry_points()
    DATASETS.load_entry_points()
    WEIGHTINGS.load_entry_points()
