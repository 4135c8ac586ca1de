"""The `defense.` config block: the shared fields, then one block per rule and
pre-aggregator with arguments (`defense.krum.num_byzantine`, `defense.pca.window`, ...),
derived from the registries."""

from __future__ import annotations

import ml_collections

from fedjax_poison.defenses import registry


def default_config() -> ml_collections.ConfigDict:
    """The `defense.` block of an experiment config."""
    c = ml_collections.ConfigDict()
    # One of DEFENSES, after any pre-aggregators joined by '+': 'nnm+krum', 'bucketing+median'.
    c.name = "fedavg"
    c.mode = "filter"  # detect | filter | block (block: pca only); see the package docstring
    for name, block in registry.blocks().items():
        c[name] = ml_collections.ConfigDict(block)
    return c


def block_for(name: str, mode: str = "filter", **fields) -> ml_collections.ConfigDict:
    """The `defense.` block running `name` ('krum', 'nnm+krum') with `fields` set in every
    part of it that takes them: block_for('nnm+krum', num_byzantine=2) sets
    defense.nnm.num_byzantine and defense.krum.num_byzantine. A field no part takes raises
    RegistryError."""
    c = default_config()
    c.name, c.mode = name, mode
    pre, rule = registry.split_name(name)
    for field, value in fields.items():
        parts = [p for p in (*pre, rule) if p in c and field in c[p]]
        if not parts:
            raise registry.RegistryError(f"no part of defense {name!r} takes a field {field!r}")
        for part in parts:
            c[part][field] = value
    return c
