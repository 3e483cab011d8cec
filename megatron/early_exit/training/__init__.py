"""Training: DDP and optimizer setup, the loop, training modes, metrics, run layouts.

It stands on the runtime layer it shares with inference and conversion: process groups
(platform/), a rank's model stage (model/build.py) and checkpoints (checkpoint/).
"""
