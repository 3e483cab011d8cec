"""Packaging: `megatron` is a namespace package shared with the megatron-core wheel."""

from setuptools import find_namespace_packages, setup

setup(
    name="ee-megatron",
    version="0.1.0",
    description="Early-exit LLMs on megatron-core: 3D-parallel training and fast inference",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["megatron.early_exit", "megatron.early_exit.*"]),
    # the C rows kernel is compiled from source on first use (inference/rows_kernel.py)
    package_data={"megatron.early_exit.inference": ["csrc/*.c"]},
    install_requires=[
        "megatron-core==0.16.1",
        "torch>=2.4",
        "numpy",
        "sentencepiece",
        "psutil",
        "packaging",
        "tensorboard",
        "tokenizers",
        "tqdm",
        # generation server
        "pydantic",
        "starlette",
        "uvicorn",
        "jinja2",
    ],
    extras_require={
        # Optional GPU accelerators; used only when they import and work (platform layer).
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "dev": ["pytest", "ruff", "matplotlib"],
        # --wandb-project (heavy: a service binary; optional like in Megatron-LM)
        "wandb": ["wandb==0.31.0"],
    },
    py_modules=["pretrain_early_exit_gpt"],
)
