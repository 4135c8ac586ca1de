"""Test-wide JAX settings: strict rank promotion, several CPU devices for sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests compile the same programs many times; reuse them across tests and runs.
jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(os.path.expanduser("~"), ".cache", "fedjax_poison_tests"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
