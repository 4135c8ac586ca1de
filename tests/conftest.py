"""Test-wide settings: strict rank promotion, several CPU devices for sharding tests, figures
closed after each test."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests compile the same programs many times; reuse them across tests and runs. Every
# program is kept, the small ones too: most tests compile a few of well under a second, and
# reading them back is what brings the quick tier under 3 minutes on 2 cores.
jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(os.path.expanduser("~"), ".cache", "fedjax_poison_tests"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(autouse=True)
def close_figures():
    """Each test's figures are closed after it, as a program's would be when it exits."""
    yield
    plt.close("all")
