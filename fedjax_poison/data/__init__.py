"""Data: datasets (a registry of specs: tfds, raw files, synthetic, user-registered) and how
their training examples are split over clients. Nothing here imports the rest of the package."""

from fedjax_poison.data.datasets import (
    SOURCES,
    SPECS,
    DataError,
    Dataset,
    DatasetSpec,
    load_dataset,
    normalize,
    raw_paths,
    synthetic_dataset,
)

__all__ = [
    "SOURCES",
    "SPECS",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "load_dataset",
    "normalize",
    "raw_paths",
    "synthetic_dataset",
]
