"""Datasets through tensorflow-datasets (optional: requirements-tfds.txt).

A copy prepared in the array_record format is read without TensorFlow; preparing a copy
(the first run, with network), or reading one prepared as tfrecord, needs TensorFlow.
"""

import importlib.util
import os

import numpy as np

from fedjax_poison.data.raw_files import DataError

FIX = "`pip install -r requirements-tfds.txt`, or use data.source=files or synthetic"


def _has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def data_dir_or_default(data_dir: str | None) -> str:
    """Where tensorflow-datasets keeps prepared copies."""
    default = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    return os.path.expanduser(data_dir or default)


def _builder(tfds_name: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # optional: requirements-tfds.txt

    return tfds.builder(tfds_name, data_dir=data_dir)


def ready(tfds_name: str, data_dir: str | None) -> bool:
    """Whether a prepared copy exists that can be read without downloading.

    A folder that does not exist is answered without asking tensorflow-datasets, which
    would log a warning about it.
    """
    if not os.path.isdir(os.path.join(data_dir_or_default(data_dir), tfds_name)):
        return False
    try:
        builder = _builder(tfds_name, data_dir)
    except ImportError:
        return False
    if not builder.is_prepared():
        return False
    formats = {f.value for f in builder.info.available_file_formats()}
    return "array_record" in formats or _has_tensorflow()


def load(tfds_name: str, data_dir: str | None) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test), downloading and preparing the copy if needed."""
    try:
        builder = _builder(tfds_name, data_dir)
    except ImportError as e:
        raise DataError(f"data.source=tfds needs `pip install tensorflow-datasets` ({e})") from e
    if not builder.is_prepared():
        if not _has_tensorflow():
            raise DataError(
                f"{tfds_name} is not prepared in {builder.data_dir}, and preparing it needs "
                f"TensorFlow: {FIX}; or place there a copy prepared elsewhere with "
                f"`tfds build {tfds_name} --file_format=array_record`"
            )
        builder.download_and_prepare(file_format="array_record")
        builder = _builder(tfds_name, data_dir)
    formats = {f.value for f in builder.info.available_file_formats()}
    arrays = []
    for split in ("train", "test"):
        if "array_record" in formats:
            source = builder.as_data_source(split=split)
            examples = [source[i] for i in range(len(source))]
            x = np.stack([ex["image"] for ex in examples])
            y = np.array([ex["label"] for ex in examples])
        elif _has_tensorflow():
            import tensorflow_datasets as tfds

            batch = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
            x, y = tfds.as_numpy(batch)
        else:
            raise DataError(
                f"{builder.data_dir} holds {sorted(formats)} files, which need "
                f"TensorFlow to read: {FIX}"
            )
        arrays += [np.asarray(x, np.uint8), np.asarray(y, np.int32)]
    return tuple(arrays)
