"""fedjax-poison: a vectorized simulator of data poisoning in federated learning (JAX/Flax).

import fedjax_poison
from fedjax_poison.config import configuration
config = configuration.smoke(configuration.paper_config("fashion_mnist"))
result = fedjax_poison.run(config)      # RunResult(workdir, summary, history)
"""

__all__ = ["RunResult", "run"]
__version__ = "0.2.0"


def __getattr__(name: str):
    """`run` and `RunResult` load JAX on first use, not on `import fedjax_poison`."""
    if name in __all__:
        from fedjax_poison.runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedjax_poison' has no attribute {name!r}")
