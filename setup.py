"""t5x_like: a JAX/Flax NNX research framework in the line of T5X."""

import pathlib

import setuptools

_CORE = [
    "jax>=0.10.0,<0.13",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.6,<0.3",
    "orbax-checkpoint>=0.12.0,<0.13",
    "seqio>=0.0.19,<0.1",
    "tensorflow-datasets>=4.9.7,<5",
    "tensorflow-text>=2.18,<3",
    "tensorflow>=2.18,<3",
    "gin-config>=0.5.0,<0.6",
    "sentencepiece>=0.2.0,<0.3",
    "numpy>=1.26,<3",
    "absl-py>=2.1,<3",
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.8,<4",
    # Hugging Face checkpoint import / export (t5x_like/convert): safetensors only, and
    # the tokenizers library for a model that ships only a tokenizer.json.
    "safetensors>=0.4.3,<1",
    "tokenizers>=0.20,<1",
]

setuptools.setup(
    name="t5x_like",
    version="0.1.0",
    description="JAX/Flax NNX framework for T5-style pretraining, fine-tuning and inference.",
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["t5x_like", "t5x_like.*", "models", "models.*",
                                               "partitioning", "partitioning.*"]),
    package_data={"t5x_like": ["data/corpus/*", "data/corpus/**/*"]},
    include_package_data=True,
    install_requires=_CORE,
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            # Hugging Face parity tests (tests/test_hf_parity.py). torch must stay pinned
            # to 2.13.0, the CPU wheel that lies on disk on these machines: any other
            # version (or a range) makes pip fetch a CUDA build of several GB.
            "torch==2.13.0",
            "transformers>=4.50,<6",  # checked with 4.57.6 and 5.24.0
            # The TPU compiler (libtpu, pinned by jax[tpu] to this jax): tests compile for
            # TPU topologies ahead of time (tests/test_precompile.py); no TPU needed.
            "jax[tpu]>=0.10.0,<0.13",
        ],
        "tpu": ["jax[tpu]>=0.10.0,<0.13"],
        "gpu": ["jax[cuda12]>=0.10.0,<0.13"],
    },
)
