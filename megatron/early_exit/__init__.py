"""Early-exit LLMs on megatron-core.

Importing this package first guards against broken optional GPU accelerators
(transformer-engine, flash-attn): a broken install would otherwise crash
`import megatron.core`. See `platform/accelerators.py`.
"""

from megatron.early_exit.platform.accelerators import guard_broken_accelerators

guard_broken_accelerators()

__version__ = "0.1.0"
