"""Kernel registry: maps (operation, platform, backend) to implementations, and the one
fallback policy of ejnsa.

Every public function of ejnsa runs its operation through `kernel_registry.call`, so a new
implementation (another kernel language, a faster variant for one backend) plugs in by
registering itself, without touching the API.

The policy (docs/index.md, "Which implementation runs")
--------------------------------------------------------
- platform None or "auto": the implementations that run compiled on this machine, best
  first: higher priority, then an exact backend before Backend.ANY, then Triton before XLA.
  Triton counts only where its runtime says it runs compiled (a CUDA GPU with jax-triton);
  never its CPU interpreter, which is for testing kernel logic.
- platform "triton" (or any named platform): that platform's implementations, then the
  XLA ones. A named platform that cannot run here at all raises RuntimeError saying why.
- An implementation that cannot serve a configuration raises `Unsupported` (a
  NotImplementedError) before doing any work; `call` then tries the next candidate. No
  implementation imports another as a hidden fallback.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import jax


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


class Unsupported(NotImplementedError):
    """Raised by an implementation that cannot serve a configuration (say why); the
    resolver then runs the next implementation in the order of the policy."""


# What to install for a platform whose implementations are missing.
_INSTALL_HINT = {
    Platform.TRITON: "ejnsa's Triton kernels need the triton package: pip install 'ejnsa[cuda]' on a CUDA machine "
                     "(or 'ejnsa[test]' to run them on a CPU through Triton's interpreter)",
}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    platform: Platform
    backend: Backend
    priority: int
    fn: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a platform tells whether it runs here.

    compiled(): True when its kernels run compiled on this machine (platform=None may
      pick them). require(what): raises RuntimeError saying why `what` cannot run here,
      for a platform named explicitly (it may still run, e.g. in an interpreter).
    """

    compiled: Callable[[], bool]
    require: Callable[[str], None]


def parse_platform(platform) -> Platform | None:
    """None for None / "auto"; a Platform for its member or its name (any case)."""
    if platform is None or isinstance(platform, Platform):
        return platform
    if isinstance(platform, str):
        if platform.lower() == "auto":
            return None
        try:
            return Platform(platform.lower())
        except ValueError:
            raise ValueError(
                f"platform must be None, 'auto', {', '.join(repr(p.value) for p in Platform)}, got {platform!r}"
            ) from None
    raise TypeError(f"platform must be None, a str or an ejnsa.Platform, got {type(platform).__name__}")


def _as_backend(backend: Backend | str) -> Backend:
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        try:
            return Backend(backend.lower())
        except ValueError:
            pass
    raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {backend!r}")


def current_backend() -> Backend:
    """The backend of JAX's default device, where a jitted computation runs."""
    name = jax.default_backend()
    if name in ("gpu", "cuda", "rocm"):
        return Backend.GPU
    if name == "tpu":
        return Backend.TPU
    return Backend.CPU


class KernelRegistry:
    """Holds implementations and resolves them by the policy of the module docstring."""

    def __init__(self) -> None:
        self._specs: dict[str, list[KernelSpec]] = {}
        self._runtimes: dict[Platform, Runtime] = {}
        self._missing: dict[Platform, str] = {}

    def register(
        self,
        name: str,
        platform: Platform | str,
        backend: Backend | str,
        priority: int = 0,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering `fn` as an implementation of `name`."""
        platform, backend = parse_platform(platform), _as_backend(backend)
        if platform is None:
            raise ValueError("an implementation is registered for a platform, not 'auto'")

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

    def set_runtime(self, platform: Platform, runtime: Runtime) -> None:
        """Declares how `platform` tells whether it runs here (platforms without one, like
        XLA, always run)."""
        self._runtimes[platform] = runtime

    def set_missing(self, platform: Platform, reason: str) -> None:
        """Records why `platform`'s implementations could not be loaded (named in errors)."""
        self._missing[platform] = reason

    def _compiled_here(self, platform: Platform) -> bool:
        runtime = self._runtimes.get(platform)
        return runtime is None or runtime.compiled()

    def candidates(
        self,
        name: str,
        platform: Platform | str | None = None,
        backend: Backend | str | None = None,
    ) -> list[KernelSpec]:
        """The implementations of `name` in the order `call` tries them.

        backend None means this machine's backend (and, with platform None, only platforms
        that run compiled here); a given backend keeps the implementations registered for
        it or for Backend.ANY.
        """
        if name not in self._specs:
            raise ValueError(f"no operation named {name!r} is registered; known: {sorted(self._specs)}")
        p = parse_platform(platform)
        b = current_backend() if backend is None else _as_backend(backend)
        specs = self._specs[name]

        def fits(s: KernelSpec) -> bool:
            return b == Backend.ANY or s.backend in (b, Backend.ANY)

        def rank(s: KernelSpec) -> tuple:
            return (-s.priority, s.backend != b, s.platform != Platform.TRITON)

        if p is None:
            found = [s for s in specs if fits(s) and (backend is not None or self._compiled_here(s.platform))]
            return sorted(found, key=rank)
        # A named platform runs where it can (an interpreter too): its backend filter
        # applies only when the caller gives one.
        named = sorted((s for s in specs if s.platform == p and (backend is None or fits(s))), key=rank)
        fallback = sorted((s for s in specs if s.platform == Platform.XLA and s.platform != p and fits(s)), key=rank)
        return named + fallback

    def get(
        self,
        name: str,
        platform: Platform | str | None = None,
        backend: Backend | str | None = None,
    ) -> Callable[..., Any]:
        """The first implementation `call` would try for `platform` on `backend`.

        With no platform and no backend: what platform=None picks on this machine (XLA on a
        CPU; Triton only where it runs compiled). Raises ValueError naming what is
        registered when nothing matches.
        """
        found = self.candidates(name, platform, backend)
        p = parse_platform(platform)
        if not found or (p is not None and found[0].platform != p):
            raise ValueError(self._none_found(name, p, backend))
        return found[0].fn

    def call(self, name: str, *args, platform: Platform | str | None = None) -> Any:
        """Runs `name` on `args` with the first candidate that serves them (see the policy)."""
        p = parse_platform(platform)
        if p is not None:
            self._require(name, p)
        tried = []
        for spec in self.candidates(name, p):
            try:
                return spec.fn(*args)
            except Unsupported as e:
                tried.append(f"{spec.platform.value}/{spec.backend.value}: {e}")
        raise NotImplementedError(f"no implementation of {name!r} serves this call; tried " + "; ".join(tried)
                                  if tried else self._none_found(name, p, None))

    def _require(self, name: str, platform: Platform) -> None:
        # The platform must be installed (some operation registered for it); an operation
        # it has no kernel for runs the fallback of the policy (XLA).
        if not any(s.platform == platform for specs in self._specs.values() for s in specs):
            hint = self._missing.get(platform) or _INSTALL_HINT.get(platform, "")
            raise RuntimeError(f"{name}(platform={platform.value!r}): no {platform.value} implementation is "
                               f"available" + (f"; {hint}" if hint else ""))
        runtime = self._runtimes.get(platform)
        if runtime is not None:
            runtime.require(f"{name}(platform={platform.value!r})")

    def _none_found(self, name: str, platform: Platform | None, backend) -> str:
        have = [(s.platform.value, s.backend.value) for s in self._specs.get(name, [])]
        msg = (f"no implementation of {name!r} for platform={platform and platform.value}, "
               f"backend={backend and _as_backend(backend).value}; registered (platform, backend): {have}")
        hint = None if platform is None else self._missing.get(platform) or _INSTALL_HINT.get(platform)
        return msg + (f"; {hint}" if hint else "")

    def list(self, name: str | None = None) -> list[KernelSpec]:
        """Every registered implementation (of `name`, if given), sorted by name."""
        names = sorted(self._specs) if name is None else [name]
        return [s for n in names for s in sorted(self._specs.get(n, []), key=lambda s: (s.platform, s.backend))]

    def names(self) -> list[str]:
        return sorted(self._specs)


kernel_registry = KernelRegistry()
