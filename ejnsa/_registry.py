"""Kernel registry: maps (operation, platform, backend) to an implementation.

Every public function of ejnsa resolves the function that does the work through
`kernel_registry.get`, so a new implementation (another kernel language, a faster
variant for one backend) plugs in by registering itself, without touching the API.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any


class Platform(str, enum.Enum):
    """The language an implementation is written in."""

    XLA = "xla"
    TRITON = "triton"


class Backend(str, enum.Enum):
    """The device an implementation runs on. ANY means every JAX backend."""

    CPU = "cpu"
    GPU = "gpu"
    TPU = "tpu"
    ANY = "any"


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    platform: Platform
    backend: Backend
    priority: int
    fn: Callable[..., Any]


def _as_platform(platform: Platform | str) -> Platform:
    if isinstance(platform, Platform):
        return platform
    if isinstance(platform, str):
        try:
            return Platform(platform.lower())
        except ValueError:
            pass
    raise ValueError(f"platform must be one of {[p.value for p in Platform]}, got {platform!r}")


def _as_backend(backend: Backend | str) -> Backend:
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        try:
            return Backend(backend.lower())
        except ValueError:
            pass
    raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {backend!r}")


class KernelRegistry:
    """Holds implementations and picks one.

    `get(name, platform, backend)` returns the highest-priority implementation that
    matches. An implementation registered for Backend.ANY serves every backend, but an
    exact backend match wins over ANY at equal priority. With `platform=None` every
    platform is a candidate, Triton first on GPUs (where it is registered), so that a
    GPU gets its kernels and everything else falls back to the XLA implementation.
    """

    def __init__(self) -> None:
        self._specs: dict[str, list[KernelSpec]] = {}

    def register(
        self,
        name: str,
        platform: Platform | str,
        backend: Backend | str,
        priority: int = 0,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering `fn` as an implementation of `name`."""
        platform, backend = _as_platform(platform), _as_backend(backend)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            specs = self._specs.setdefault(name, [])
            if any(s.platform == platform and s.backend == backend and s.priority == priority for s in specs):
                raise ValueError(
                    f"an implementation of {name!r} for ({platform.value}, {backend.value}) "
                    f"at priority {priority} is already registered"
                )
            specs.append(KernelSpec(name, platform, backend, priority, fn))
            return fn

        return decorator

    def _candidates(self, name: str, platform: Platform | None, backend: Backend | None) -> list[KernelSpec]:
        specs = self._specs.get(name, [])
        out = []
        for s in specs:
            if platform is not None and s.platform != platform:
                continue
            if backend is not None and backend != Backend.ANY and s.backend not in (backend, Backend.ANY):
                continue
            out.append(s)

        def rank(s: KernelSpec) -> tuple:
            exact = backend is not None and s.backend == backend
            # Triton before XLA when the caller named no platform: only GPU entries are
            # registered for Triton, so this prefers kernels exactly where they run.
            triton_first = platform is None and s.platform == Platform.TRITON
            return (-s.priority, not exact, not triton_first)

        return sorted(out, key=rank)

    def get(
        self,
        name: str,
        platform: Platform | str | None = None,
        backend: Backend | str | None = None,
    ) -> Callable[..., Any]:
        """The best implementation of `name` for `platform` and `backend`.

        Raises ValueError naming what is registered when nothing matches.
        """
        if name not in self._specs:
            raise ValueError(f"no operation named {name!r} is registered; known: {sorted(self._specs)}")
        p = None if platform is None else _as_platform(platform)
        b = None if backend is None else _as_backend(backend)
        found = self._candidates(name, p, b)
        if not found:
            have = [(s.platform.value, s.backend.value) for s in self._specs[name]]
            raise ValueError(
                f"no implementation of {name!r} for platform={p and p.value}, backend={b and b.value}; "
                f"registered (platform, backend): {have}"
            )
        return found[0].fn

    def list(self, name: str | None = None) -> list[KernelSpec]:
        """Every registered implementation (of `name`, if given), sorted by name."""
        names = sorted(self._specs) if name is None else [name]
        return [s for n in names for s in sorted(self._specs.get(n, []), key=lambda s: (s.platform, s.backend))]

    def names(self) -> list[str]:
        return sorted(self._specs)


kernel_registry = KernelRegistry()
