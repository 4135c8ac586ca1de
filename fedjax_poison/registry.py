"""One convention for every family of parts a run is assembled from: attacks, defenses,
pre-aggregators, models, datasets and partitions.

A `Registry` maps a name to a factory. A factory's keyword arguments with defaults are the
member's config block (`attack.<name>.*`, `defense.<name>.*`, `model.*`, `data.<name>.*`);
those without a default are sizes the run fills in (the family's `sizes`: the number of
classes, the clients per round, ...). A block is validated by building the member: the
factory checks its own arguments and raises ValueError naming the argument, which the
registry turns into a ConfigError naming the config field. A new member is one factory and
one `register` call, from the package or from a user's script.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import keyword
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from fedjax_poison.errors import UserError

# What a config field can hold (ml_collections keeps the type of its default).
FIELD_TYPES = (bool, int, float, str, tuple)


def short(value) -> str:
    """A one-line repr of at most 80 characters (a ConfigDict's own is multi-line YAML)."""
    value = value.to_dict() if hasattr(value, "to_dict") else value
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


class RegistryError(UserError, ValueError):
    """A name that is not registered, a block that does not build, or a bad registration;
    the message names the config field."""


@dataclasses.dataclass(frozen=True)
class Member:
    """A registered factory with its config block (the defaults of its keyword arguments)
    and what its family records about it (a model's input shape, a paper)."""

    name: str
    factory: Callable[..., Any]
    block: Mapping[str, Any]
    info: Mapping[str, Any]

    @property
    def summary(self) -> str:
        """The first line of the factory's docstring (its paper, usually)."""
        doc = inspect.getdoc(self.factory) or ""
        return doc.strip().split("\n\n")[0].replace("\n", " ")


def is_builtin(factory) -> bool:
    """Whether `factory` is one of the package's own members."""
    return getattr(factory, "__module__", "").startswith("fedjax_poison.")


def signature_block(factory: Callable, sizes: Sequence[str], skip: Sequence[str] = ()) -> dict:
    """The config block of `factory`: its keyword arguments with defaults, less sizes and
    `skip`. Raises RegistryError for an argument the run cannot fill in (no default, not a
    size) or a default that a config field cannot hold."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{factory!r} is not a factory with a signature: {e}") from None
    block = {}
    for p in params:
        if p.name in skip or p.name in sizes:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise RegistryError(
                f"{getattr(factory, '__name__', factory)}: *{p.name} cannot be "
                "a config field; name every argument"
            )
        if p.default is inspect.Parameter.empty:
            raise RegistryError(
                f"{getattr(factory, '__name__', factory)}: argument {p.name!r} has no default "
                f"and is not one of the sizes the run fills in ({', '.join(sizes) or 'none'}); "
                "give it a default: that is its config field"
            )
        if not isinstance(p.default, FIELD_TYPES):
            raise RegistryError(
                f"{getattr(factory, '__name__', factory)}: the default of {p.name!r} is "
                f"{p.default!r}; a config field holds a bool, int, float, str or tuple"
            )
        block[p.name] = p.default
    return block


class Registry(Mapping[str, Callable]):
    """name -> factory for one family; iterating gives the names in registration order.

    family: what a member is ('attack'); field: the config field that names one
    ('attack.name'); blocks: where a member's block lives ('attack.{name}'; 'model' for a
    family whose one chosen member's block is the section itself); sizes: the arguments the
    run fills in; skip: arguments that are neither (Flax's parent and name); reserved: the
    section's own fields, which no member may be named after.
    """

    def __init__(
        self,
        family: str,
        field: str,
        blocks: str,
        sizes: Sequence[str] = (),
        skip: Sequence[str] = (),
        reserved: Sequence[str] = (),
    ):
        self.family, self.field, self.blocks = family, field, blocks
        self.sizes, self.skip, self.reserved = tuple(sizes), tuple(skip), tuple(reserved)
        self._members: dict[str, Member] = {}

    def register(self, name: str, factory: Callable, *, replace: bool = False, **info) -> Callable:
        """Adds `factory` as `name` (a Python identifier) and returns it. A name registered
        from user code may be registered again (a script or config file run twice: the
        latest wins); a built-in member is replaced only with replace=True."""
        if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
            raise RegistryError(f"a {self.family} name must be an identifier, got {name!r}")
        if name in self.reserved:
            section = self.field.split(".")[0]
            raise RegistryError(f"{self.family} name {name!r} is a field of the {section} block")
        if name in self._members and not replace and is_builtin(self._members[name].factory):
            raise RegistryError(
                f"{self.family} {name!r} is built in; pass replace=True to replace it"
            )
        if not callable(factory):
            raise RegistryError(f"{self.family} {name!r}: {factory!r} is not callable")
        block = signature_block(factory, self.sizes, self.skip)
        self._members[name] = Member(name, factory, block, dict(info))
        return factory

    def __getitem__(self, name: str) -> Callable:
        return self._members[name].factory

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def member(self, name: str) -> Member:
        self.check_name(name)
        return self._members[name]

    def block(self, name: str) -> dict:
        """A copy of the member's config block (its defaults)."""
        return dict(self.member(name).block)

    def check_name(self, name) -> None:
        """RegistryError naming the field and the closest registered name, unless `name` is one."""
        if isinstance(name, str) and name in self._members:
            return
        close = difflib.get_close_matches(str(name), list(self._members), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close and isinstance(name, str) else ""
        raise RegistryError(
            f"{self.field} {short(name)} is not a registered {self.family}{hint}; choose from "
            f"{sorted(self._members)}"
        )

    def field_of(self, name: str, argument: str) -> str:
        """The config field of a member's argument: 'defense.krum.num_byzantine'."""
        return f"{self.blocks.format(name=name)}.{argument}"

    def build(self, name: str, block: Mapping[str, Any] | None = None, **sizes):
        """The member `name` built from its block (missing fields: their defaults) and the
        sizes it takes. A field the factory does not take, or a ValueError/TypeError the
        factory raises, becomes a RegistryError naming the field."""
        member = self.member(name)
        block = dict(block or {})
        unknown = sorted(set(block) - set(member.block))
        if unknown:
            field = self.field_of(name, unknown[0])
            close = difflib.get_close_matches(unknown[0], list(member.block), n=1)
            hint = f" (did you mean {self.field_of(name, close[0])}?)" if close else ""
            raise RegistryError(f"{field} is not a field of {self.family} {name!r}{hint}")
        params = inspect.signature(member.factory).parameters
        kwargs = {p: sizes[p] for p in params if p in sizes and p in self.sizes}
        kwargs.update({p: block.get(p, default) for p, default in member.block.items()})
        try:
            return member.factory(**kwargs)
        except UserError:
            raise
        except (ValueError, TypeError) as e:
            raise RegistryError(self.field_message(name, str(e))) from None

    def field_message(self, name: str, message: str) -> str:
        """A member's error message with the argument it starts with spelled as the config
        field ('iters must be >= 1' -> 'defense.dnc.iters must be >= 1'), else prefixed by
        the member's name."""
        first = message.split(" ", 1)[0]
        if first in self.member(name).block:
            return f"{self.field_of(name, first)}{message[len(first) :]}"
        return f"{self.field} {name!r}: {message}"
