"""Test-wide JAX settings: strict rank promotion, several CPU devices for sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
