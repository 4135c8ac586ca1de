"""Checks of single config values, shared by the config's validation and the sweep axes.

Every check raises ConfigError with one line naming the field.
"""

import numbers
import re

import ml_collections
import numpy as np

from fedjax_poison import attacks, data, defenses
from fedjax_poison.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value that cannot run; the message names the field."""


def check(ok: bool, field: str, message: str, value) -> None:
    """Raises ConfigError('<field> <message>, got <value>') unless ok."""
    if not ok:
        raise ConfigError(f"{field} {message}, got {_show(value)}")


def _show(value) -> str:
    """A short one-line repr (a ConfigDict's own is multi-line YAML)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


_FLIPS = re.compile(r"\s*(-?[0-9]+\s*:\s*-?[0-9]+\s*(,\s*-?[0-9]+\s*:\s*-?[0-9]+\s*)*)?")


def validate_flips(text, num_classes: int, field: str) -> None:
    """'6:0' or '6:0,1:3': classes in range, a class flipped to another, each source once."""
    check(isinstance(text, str), field, "must be a string like '6:0'", text)
    # ASCII digits only: str.isdigit() also takes '²', which int() then refuses.
    check(_FLIPS.fullmatch(text) is not None, field, "must look like '6:0' or '6:0,1:3'", text)
    flips = attacks.parse_flips(text)
    for source, target in flips:
        ok = 0 <= source < num_classes and 0 <= target < num_classes
        check(ok, field, f"classes must be in [0, {num_classes})", text)
        check(source != target, field, "must flip a class to a different class", text)
    sources = [s for s, _ in flips]
    check(len(set(sources)) == len(sources), field, "names a source class twice", text)


def validate_attack_name(c, name, field: str = "attack.name") -> None:
    """Builds the attack `name` with the config's parameters; ConfigError names the field."""
    check(isinstance(name, str), field, "must be an attack name", name)
    spec = data.SPECS[c.dataset]
    try:
        attacks.make_attack(
            name,
            c.attack,
            num_classes=spec.num_classes,
            image_shape=spec.image_shape,
            clients_per_round=c.clients_per_round,
            head_index=np.zeros((1, spec.num_classes), np.int32),
            num_params=1,  # the model is not built yet: sizes only need to be valid
        )
    except attacks.AttackConfigError as e:
        raise ConfigError(str(e) if field == "attack.name" else f"{field}: {e}") from None


def validate_defense_name(c, name, field: str, num_classes: int) -> None:
    """The defense block with `name` as its rule; ConfigError names the field."""
    check(isinstance(name, str), field, "must be a defense name", name)
    block = ml_collections.ConfigDict(c.defense.to_dict())
    block.name = name
    try:
        defenses.validate(
            block,
            clients_per_round=c.clients_per_round,
            num_clients=c.num_clients,
            num_classes=num_classes,
        )
    except ValueError as e:  # its messages name the defense field
        message = str(e)
        raise ConfigError(
            message if field == "defense.name" else f"{field} {name!r}: {message}"
        ) from None
    for part in name.split("+"):  # a rule whose window starts after the last round never acts
        start = c.defense[part].get("start_round") if part in c.defense else None
        check(
            start is None or start <= c.num_rounds,
            f"defense.{part}.start_round",
            f"must be <= num_rounds ({c.num_rounds}): the rule would never act, and the run "
            f"would be FedAvg called {part}",
            start,
        )
