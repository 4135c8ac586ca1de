"""A config file that brings its own parts: the attack, defense and model of the examples,
registered when the file is loaded, used like built-in ones.

    python launch.py --config=examples/plugins_config.py --workdir=runs/plugins
    python -m fedjax_poison.compare_defenses --config=examples/plugins_config.py \\
        --attacks=reverse_mean,label_flip --defenses=norm_filter,median --seeds=0,1 \\
        --workdir=runs/plugins_matrix

(from the checkout). Synthetic Fashion-MNIST-shaped data; `:files` reads the real files.
"""

from examples import custom_attack, custom_defense, custom_model  # noqa: F401  (they register)
from fedjax_poison.config import configuration


def get_config(arg: str | None = None):
    c = configuration.smoke(configuration.paper_config("fashion_mnist"))
    if arg == "files":
        c.data.source = "files"
    elif arg:
        raise configuration.ConfigError(f"unknown variant {arg!r}: use no variant or ':files'")
    c.num_rounds, c.eval_every, c.tensorboard = 8, 4, False
    c.batch_size, c.lr = 16, 0.01
    c.model.name = "tiny_cnn"
    c.attack.name = "reverse_mean"
    c.defense.name = "norm_filter"
    c.attack.malicious_fraction = 0.3
    return c
