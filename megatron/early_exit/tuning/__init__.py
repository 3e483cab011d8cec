"""EE-Tuning (arXiv 2402.00518): add exits to a pretrained model, then train only the exits.

`add_exits` writes a checkpoint with new exit heads; `ExitTuning` is the training mode
(training/mode.py's interface) that pretrain_early_exit_gpt.py hands the trainer under
`--tune-exit`: frozen backbone, exit-only optimizer, the exit-tuning schedule, and partial
loading of the first k pipeline stages. Nothing here imports training/.
"""

from megatron.early_exit.tuning.session import ExitTuning, freeze_backbone

__all__ = ["ExitTuning", "freeze_backbone"]
