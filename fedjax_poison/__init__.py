"""fedjax-poison: a vectorized simulator of data poisoning in federated learning (JAX/Flax).

import fedjax_poison
from fedjax_poison.config import configuration
config = configuration.smoke(configuration.paper_config("fashion_mnist"))
result = fedjax_poison.run(config)      # RunResult(workdir, summary, history)

A user's own parts join the built-in ones by name, before the config that uses them is
built (in a script, or in a config file given to launch.py):

fedjax_poison.register_attack(name, factory)      # attack.name, sweep.attack
fedjax_poison.register_defense(name, factory)     # defense.name, sweep.defense
fedjax_poison.register_model(name, module_class)  # model.name
fedjax_poison.register_dataset(name, arrays=...)  # dataset (also load=..., tfds_name=...)
fedjax_poison.register_partition(name, factory)   # data.partition

`fedjax_poison.testing` has the contract checks every built-in member passes; examples/
has one script for each kind.
"""

__all__ = [
    "RunResult",
    "register_attack",
    "register_dataset",
    "register_defense",
    "register_model",
    "register_partition",
    "run",
]
__version__ = "0.3.0"


def __getattr__(name: str):
    """The API loads JAX on first use, not on `import fedjax_poison`."""
    if name in __all__:
        from fedjax_poison.runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedjax_poison' has no attribute {name!r}")
