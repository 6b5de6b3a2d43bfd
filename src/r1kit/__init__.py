"""r1kit: the DeepSeek-R1 system, every stage runnable on a laptop CPU and scalable on existing engines.

Stages (one package each): ``models`` (policies, DeepSeek-V3), ``data`` (tasks and templates),
``rewards`` (verifiers shared by reward and evaluation), ``rollout`` (sampling engines),
``train`` (GRPO losses, step, loop, checkpoints), ``eval`` (pass@1 over k, maj@k), ``cli``.
"""

__version__ = "0.1.0"
