"""Checkpoints, for every tool that reads or writes them: training, inference, conversion.

* `files`: the directory layout (tracker, `iter_N/`), and `ee_args.json`, the flags that
  rebuild the model and its tokenizer.
* `store`: atomic, reshardable save and load of a model stage (and its optimizer) with
  megatron-core's `dist_checkpointing`.
"""
