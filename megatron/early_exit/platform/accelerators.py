"""Optional GPU accelerators: used only when they import *and* work.

megatron-core wraps `import transformer_engine` in `try/except ImportError`. A broken
install (missing shared library, ABI mismatch) raises OSError/RuntimeError instead and
crashes `import megatron.core`. We probe each accelerator once, in isolation, and turn a
broken one into a clean ImportError for everybody else by blocking it in `sys.modules`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_OPTIONAL = ("transformer_engine", "flash_attn")
_status: AcceleratorStatus | None = None


@dataclass
class AcceleratorStatus:
    """Which optional accelerators imported cleanly, and why the others did not."""

    available: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def usable(self, name: str) -> bool:
        return self.available.get(name, False)


def guard_broken_accelerators(force: bool = False) -> AcceleratorStatus:
    """Probe optional accelerators once; block broken ones so imports fall back.

    Set EE_DISABLE_ACCELERATORS=1 to block them all (useful to test the fallback path).
    """
    global _status
    if _status is not None and not force:
        return _status
    status = AcceleratorStatus()
    disable_all = os.environ.get("EE_DISABLE_ACCELERATORS") == "1"
    for name in _OPTIONAL:
        if disable_all:
            _block(name)
            status.available[name] = False
            status.reasons[name] = "disabled by EE_DISABLE_ACCELERATORS=1"
            continue
        if name in sys.modules and sys.modules[name] is None:
            status.available[name] = False
            status.reasons[name] = "blocked"
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:  # not installed: the normal CPU case
            status.available[name] = False
            status.reasons[name] = f"not installed ({exc})"
            _block(name)
        except Exception as exc:  # installed but broken: block it so megatron-core falls back
            status.available[name] = False
            status.reasons[name] = f"broken install, falling back: {type(exc).__name__}: {exc}"
            log.warning("%s is installed but fails to import (%s); using fallbacks", name, exc)
            _block(name)
        else:
            status.available[name] = True
    _status = status
    return status


def accelerator_status() -> AcceleratorStatus:
    return guard_broken_accelerators()


def _block(name: str) -> None:
    # Drop half-imported submodules, then make `import name` raise ImportError.
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    sys.modules[name] = None  # type: ignore[assignment]
