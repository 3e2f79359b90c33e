"""Name -> class/function registries. A registry holds nothing but that mapping."""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable


class Registry:
    """Maps names to classes or functions, filled by the ``register`` decorator."""

    def __init__(self, kind: str, defined_in: str):
        self.kind = kind
        self.defined_in = defined_in  # hint for the unknown-name error
        self._entries: dict[str, Any] = {}

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            key = name or obj.__name__
            if key in self._entries:
                first = self._entries[key]
                raise KeyError(
                    f"{self.kind} name {key!r} is registered twice: by "
                    f"{_where(first)} and by {_where(obj)}; rename one of them"
                )
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}.{hint} Registered: {sorted(self._entries)}. "
                f"If it is defined elsewhere, import its module first ({self.defined_in} "
                f"imports the built-in ones)."
            )
        return self._entries[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {self.names()})"


def _where(obj: Any) -> str:
    module = inspect.getmodule(obj)
    return f"{getattr(obj, '__qualname__', obj)!s} in {module.__name__ if module else '?'}"


MODELS = Registry("model arch", "lavis_lite.models")
LLMS = Registry("LLM backbone", "lavis_lite.models.llm")
PROCESSORS = Registry("processor", "lavis_lite.data.processors")
DATASETS = Registry("dataset builder", "lavis_lite.data.builders")
TASKS = Registry("task", "lavis_lite.tasks")
LR_SCHEDULERS = Registry("lr scheduler", "lavis_lite.runner.optim")
RUNNERS = Registry("runner", "lavis_lite.runner")
STRATEGIES = Registry("training strategy", "lavis_lite.runner.strategy")
