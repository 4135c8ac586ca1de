"""Lists what a run can be made of: every member of every registry with its paper and its
config block, and every config field with its default and meaning.

    python -m fedjax_poison.list [attacks|defenses|models|datasets|partitions|fields]
    python -m fedjax_poison.list fields --config=configs/cifar.py   # that file's defaults

With no argument, all of them. Members registered by a config file are listed when the file
is given with --config.
"""

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from fedjax_poison import errors
from fedjax_poison.registry import Registry

KINDS = ("attacks", "defenses", "models", "datasets", "partitions", "fields")


def format_block(registry: Registry, name: str) -> str:
    """'field=default, ...' of a member's block, spelled as its config fields."""
    block = registry.block(name)
    return ", ".join(f"{registry.field_of(name, k)}={v!r}" for k, v in block.items()) or "-"


def member_lines(registry: Registry, extra=lambda name: "") -> list[str]:
    """Two lines a member: its name and summary; its block."""
    lines = []
    for name in registry:
        member = registry.member(name)
        lines.append(f"  {name}{extra(name)}: {member.summary}")
        lines.append(f"      {format_block(registry, name)}")
    return lines


def attack_lines() -> list[str]:
    from fedjax_poison import attacks

    return member_lines(attacks.ATTACKS)


def defense_lines() -> list[str]:
    from fedjax_poison import defenses

    lines = ["rules (the last part of defense.name):", *member_lines(defenses.DEFENSES)]
    lines += ["pre-aggregators (before a rule, joined by '+'):"]
    return lines + member_lines(defenses.PRE_AGGREGATORS)


def model_lines() -> list[str]:
    from fedjax_poison import models

    def shape(name):
        taken = models.input_shape(name)
        return f" [{'x'.join(map(str, taken))} images]" if taken else " [any image shape]"

    return member_lines(models.MODELS, shape)


def dataset_lines() -> list[str]:
    from fedjax_poison import data

    lines = []
    for name, spec in data.SPECS.items():
        sources = [s for s, ok in (("tfds", spec.tfds_name), ("files", spec.read_files)) if ok]
        shape = "x".join(map(str, spec.image_shape))
        lines.append(
            f"  {name}: {shape} images, {spec.num_classes} classes; sources "
            f"{', '.join(sources + ['synthetic'])}; model {spec.recipe['model']['name']}"
        )
    return lines


def partition_lines() -> list[str]:
    from fedjax_poison.data import partition

    return member_lines(partition.PARTITIONS)


def field_lines(config) -> list[str]:
    """Every field of `config` outside the members' blocks: default and meaning."""
    from fedjax_poison.config.field_help import help_for

    lines, blocks = [], 0
    for field, value in flatten(config.to_dict()):
        meaning = help_for(field)
        if meaning is None:  # a field of a member's block: listed with its member
            blocks += 1
            continue
        lines.append(f"  {field} = {value!r}\n      {meaning}")
    lines.append(f"  ... and {blocks} fields of the members' blocks (listed with each member)")
    return lines


def flatten(d: dict, prefix: str = ""):
    """(dotted field, value) of every leaf of a nested dict, in order."""
    for key, value in d.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def load_config(path: str | None):
    """The config of a config file (which may register members), else the paper's
    Fashion-MNIST config."""
    from fedjax_poison.config import configuration

    if path is None:
        return configuration.paper_config("fashion_mnist")
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("listed_config", file)
    if spec is None:
        raise OSError(f"{file} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedjax_poison.list",
        description="List the registered attacks, defenses, models, datasets, partitions and "
        "the config fields.",
    )
    parser.add_argument("kind", nargs="?", choices=KINDS, help="what to list (default: all)")
    parser.add_argument("--config", help="a config file: its registrations and defaults")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (errors.UserError, OSError, ImportError, AttributeError) as e:
        print(f"error: --config={args.config}: {e}", file=sys.stderr)
        return 2
    listers = {
        "attacks": attack_lines,
        "defenses": defense_lines,
        "models": model_lines,
        "datasets": dataset_lines,
        "partitions": partition_lines,
        "fields": lambda: field_lines(config),
    }
    for kind in [args.kind] if args.kind else KINDS:
        print(f"{kind}:")
        print("\n".join(listers[kind]()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
