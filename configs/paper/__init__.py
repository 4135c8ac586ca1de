"""The paper's experiments as config files, and what they share.

Each file's `get_config(arg)` takes `key=value` pairs, e.g.
`--config=configs/paper/label_flipping.py:dataset=cifar10`.
"""

from fedjax_poison.config.configuration import ConfigError

DATASETS = ("fashion_mnist", "cifar10")
# The flips (source:target) the paper studies per dataset (PAPER.md).
FLIPS = {"fashion_mnist": ("6:0", "1:3", "4:6"), "cifar10": ("5:3", "0:2", "1:9")}


def parse_arg(arg: str | None, **choices: tuple[str, ...]) -> dict[str, str]:
    """'dataset=cifar10' -> {'dataset': 'cifar10'}; every key defaults to its first choice.

    `choices` names the keys a config accepts and their allowed values; an unknown key,
    a value not allowed or an item without '=' stops with a message saying what is.
    """
    args = {key: values[0] for key, values in choices.items()}
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in choices:
            allowed = ", ".join(f"{k}=" for k in choices)
            raise ConfigError(f"config argument {item!r}: expected one of {allowed}")
        if value not in choices[key]:
            raise ConfigError(f"config argument {key} must be one of {choices[key]}, got {value!r}")
        args[key] = value
    return args
