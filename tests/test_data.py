"""Tests of data loading, normalization and partitions, with numbers checkable by hand."""

import gzip
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_poison import data
from fedjax_poison.data import partition

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


# --- partitions ----------------------------------------------------------------------


def test_partition_iid_paper_sizes_disjoint_and_covering():
    indices = partition.partition_iid(60000, 50, 4, np.random.default_rng(0))
    assert indices.shape == (50, 1200)  # 15,000 batches of 4, 300 per client
    np.testing.assert_array_equal(np.sort(indices.ravel()), np.arange(60000))


def test_partition_iid_deals_batches_round_robin():
    # 26 examples, batches of 2: 13 batches; 3 clients get 4 each, the 13th is dropped.
    perm = np.random.default_rng(7).permutation(26)
    indices = partition.partition_iid(26, 3, 2, np.random.default_rng(7))
    assert indices.shape == (3, 8)
    batches = perm.reshape(13, 2)
    for c in range(3):
        np.testing.assert_array_equal(indices[c], batches[[c, c + 3, c + 6, c + 9]].ravel())
    assert set(batches[12]).isdisjoint(indices.ravel())


def test_partition_iid_too_few_batches():
    with pytest.raises(data.DataError, match="num_clients=6: 10 training examples make 5 batches"):
        partition.partition_iid(10, 6, 2, np.random.default_rng(0))  # 5 batches, 6 clients


def _histograms(labels, indices, count):
    rows = np.split(indices, np.cumsum(count)[:-1])
    return np.stack([np.bincount(labels[row], minlength=10) for row in rows])


def test_partition_dirichlet_counts_and_skew():
    labels = np.repeat(np.arange(10), 600)  # 6000 examples, 600 per class
    for alpha, check in [(0.05, lambda top: top.mean() > 0.6), (1000.0, lambda top: top < 0.2)]:
        indices, count = partition.partition_dirichlet(
            labels, 20, alpha, np.random.default_rng(1), 10
        )
        assert count.sum() == 6000 and count.min() >= 1 and count.dtype == np.int32
        assert indices.shape == (6000,)  # ragged: each example once, client after client
        np.testing.assert_array_equal(np.sort(indices), np.arange(6000))
        hist = _histograms(labels, indices, count)
        top = hist.max(1) / count  # share of each client's most common class
        assert np.all(check(top)), (alpha, top)


def test_partition_dirichlet_no_client_left_empty():
    labels = np.arange(30) % 10
    indices, count = partition.partition_dirichlet(labels, 25, 0.01, np.random.default_rng(0), 10)
    assert count.sum() == 30 and count.min() >= 1
    np.testing.assert_array_equal(np.sort(indices), np.arange(30))


def test_partition_dirichlet_many_small_clients_quickly():
    # 20,000 clients over 60,000 labels at alpha 0.1: thousands start empty and each takes
    # one example of the largest client (a heap, not a scan of all clients per empty one).
    labels = np.arange(60_000) % 10
    indices, count = partition.partition_dirichlet(
        labels, 20_000, 0.1, np.random.default_rng(0), 10
    )
    assert count.min() >= 1 and count.sum() == 60_000
    np.testing.assert_array_equal(np.sort(indices), np.arange(60_000))


def test_split_accepts_ragged_and_padded_partitions_alike():
    labels = np.arange(12) % 3
    padded = lambda *, labels: (np.array([[0, 1, 2], [3, 4, 4]]), np.array([3, 2]))
    ragged = lambda *, labels: (np.array([0, 1, 2, 3, 4]), np.array([3, 2]))
    for name, factory in [("test_padded", padded), ("test_ragged", ragged)]:
        partition.PARTITIONS.register(name, factory, replace=True)
        indices, count = partition.split(
            name, {}, labels, num_clients=2, batch_size=1, num_classes=3, rng=None
        )
        assert indices.tolist() == [0, 1, 2, 3, 4] and count.tolist() == [3, 2]
    bad = lambda *, labels: (np.array([0, 1, 2]), np.array([3, 2]))  # 3 entries for 5
    partition.PARTITIONS.register("test_bad", bad, replace=True)
    with pytest.raises(data.DataError, match="sum\\(count\\) = 5"):
        partition.split(
            "test_bad", {}, labels, num_clients=2, batch_size=1, num_classes=3, rng=None
        )


def test_make_client_data_stores_each_example_once_and_a_range_per_client():
    x = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1) + 10  # example i has pixel 10 + i
    y = np.array([0, 1, 2, 3, 4, 5])
    cd = partition.make_client_data(x, y, np.array([0, 1, 2, 3, 4]), np.array([3, 2]))
    assert cd.x.shape == (5, 1, 1, 1) and cd.x.dtype == np.uint8
    np.testing.assert_array_equal(cd.x[:, 0, 0, 0], [10, 11, 12, 13, 14])
    assert cd.y.tolist() == [0, 1, 2, 3, 4] and cd.y.dtype == np.int32
    assert cd.start.tolist() == [0, 3] and cd.count.tolist() == [3, 2]
    assert partition.class_counts(cd, 6).tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]]
    full = partition.make_client_data(x, y, np.array([[5, 0]]))
    assert full.count.tolist() == [2] and full.y.tolist() == [5, 0]


def test_round_buffers_hold_each_client_then_zeros():
    from fedjax_poison.round import simulation

    x = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1) + 10
    cd = partition.make_client_data(x, np.arange(6), np.array([0, 1, 2, 3, 4]), np.array([3, 2]))
    bx, by, count = simulation.client_examples(
        simulation.ClientData(*map(jnp.asarray, cd)), jnp.array([1, 0]), 4
    )
    np.testing.assert_array_equal(bx[:, :, 0, 0, 0], [[13, 14, 0, 0], [10, 11, 12, 0]])
    np.testing.assert_array_equal(by, [[3, 4, 0, 0], [0, 1, 2, 0]])
    assert count.tolist() == [2, 3]


# --- normalization -------------------------------------------------------------------


def test_normalize_known_pixels():
    cifar, fmnist = data.SPECS["cifar10"], data.SPECS["fashion_mnist"]
    x = np.zeros((2, 32, 32, 3), np.uint8)
    x[0, 0, 0] = 255
    out = jax.jit(data.normalize, static_argnums=1)(x, cifar)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], (1 - np.array(cifar.mean)) / cifar.std, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0, 0], (1 - 0.485) / 0.229, rtol=1e-6)
    np.testing.assert_allclose(out[1, 5, 5, 2], -0.406 / 0.225, rtol=1e-6)
    pixels = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
    np.testing.assert_allclose(data.normalize(pixels, fmnist).ravel(), [0.0, 0.2, 1.0])


# --- synthetic -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(data.SPECS))
def test_synthetic_shapes_determinism_and_balance(name):
    ds = data.load_dataset(name, "synthetic", synthetic_sizes=(200, 50), seed=3)
    h, w, c = data.SPECS[name].image_shape
    assert ds.source == "synthetic" and ds.spec is data.SPECS[name]
    assert ds.x_train.shape == (200, h, w, c) and ds.x_test.shape == (50, h, w, c)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    num_classes = data.SPECS[name].num_classes
    assert (
        np.bincount(ds.y_train, minlength=num_classes).tolist()
        == [200 // num_classes] * num_classes
    )
    again = data.synthetic_dataset(data.SPECS[name], 200, 50, seed=3)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    other = data.synthetic_dataset(data.SPECS[name], 200, 50, seed=4)
    assert not np.array_equal(ds.x_train, other.x_train)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_synthetic_classes_separable_but_not_trivially(name):
    ds = data.synthetic_dataset(data.SPECS[name], 2000, 500, seed=0)
    x_tr = ds.x_train.reshape(2000, -1) / 255.0
    x_te = ds.x_test.reshape(500, -1) / 255.0
    means = np.stack([x_tr[ds.y_train == c].mean(0) for c in range(10)])  # [C, H*W*C]
    dist = ((x_te[:, None, :] - means[None]) ** 2).sum(-1)  # [500, C]
    accuracy = (dist.argmin(1) == ds.y_test).mean()
    assert 0.5 < accuracy < 0.99, accuracy  # chance is 0.1


# --- raw files -----------------------------------------------------------------------


def _write_idx(path, magic, array, *, cut=0):
    header = np.array([magic, *array.shape], ">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - cut])


def _write_fake_fmnist(root, num_train=12, num_test=5):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, m in [("train", num_train), ("t10k", num_test)]:
        arrays[prefix] = rng.integers(0, 256, (m, 28, 28)), rng.integers(0, 10, m)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, arrays[prefix][0])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, arrays[prefix][1])
    return arrays


def test_files_fashion_mnist_fake(tmp_path):
    arrays = _write_fake_fmnist(tmp_path)
    ds = data.load_dataset("fashion_mnist", "files", str(tmp_path))
    assert ds.source == "files" and ds.x_train.shape == (12, 28, 28, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_test.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])
    assert data.load_dataset("fashion_mnist", "auto", str(tmp_path)).source == "files"


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_files_fashion_mnist_real():
    ds = data.load_dataset("fashion_mnist", "files")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10


def _write_fake_cifar(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6 * per_batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * per_batch)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        part = slice(b * per_batch, (b + 1) * per_batch)
        rows = images[part].transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # CHW rows
        batch = {b"batch_label": name.encode(), b"labels": labels[part].tolist(), b"data": rows}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder, images, labels


def test_files_cifar10_fake(tmp_path):
    folder, images, labels = _write_fake_cifar(tmp_path)
    for data_dir in [tmp_path, folder]:  # the parent or the batches folder itself
        ds = data.load_dataset("cifar10", "files", str(data_dir))
        assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(ds.x_train, images[:20])
        np.testing.assert_array_equal(ds.x_test, images[20:])
        np.testing.assert_array_equal(ds.y_train, labels[:20])
        assert ds.y_train.dtype == np.int32 and ds.x_train.flags.c_contiguous
    # Channel c of pixel (i, j) sits at c * 1024 + i * 32 + j of a row.
    with open(folder / "data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][1]
    assert ds.x_train[1, 2, 5, 1] == row[1024 + 2 * 32 + 5]
    assert data.load_dataset("cifar10", "auto", str(tmp_path)).source == "files"


def test_files_mnist_fake_reads_like_fashion_mnist(tmp_path):
    arrays = _write_fake_fmnist(tmp_path)
    ds = data.load_dataset("mnist", "files", str(tmp_path))
    np.testing.assert_array_equal(ds.x_test[..., 0], arrays["t10k"][0])
    assert ds.spec.class_names[7] == "7"


def test_files_cifar100_fake_reads_the_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    fine, coarse = [0, 99, 35, 98, 7], [0, 19, 14, 14, 3]
    for name, part in (("train", slice(0, 3)), ("test", slice(3, 5))):
        rows = images[part].transpose(0, 3, 1, 2).reshape(-1, 3072)
        batch = {b"data": rows, b"fine_labels": fine[part], b"coarse_labels": coarse[part]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    ds = data.load_dataset("cifar100", "files", str(tmp_path))  # the archive's folder inside
    assert ds.y_train.tolist() == [0, 99, 35] and ds.y_test.tolist() == [98, 7]
    np.testing.assert_array_equal(ds.x_test, images[3:])
    names = ds.spec.class_names
    assert len(names) == 100 and (names[35], names[98]) == ("girl", "woman")


def test_files_missing_names_file_and_fix(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_dataset("fashion_mnist", "files", str(tmp_path))
    message = str(e.value)
    assert "train-images-idx3-ubyte.gz not found" in message
    assert "apt-get install dataset-fashion-mnist" in message and "synthetic" in message


def test_files_truncated_gzip(tmp_path):
    _write_fake_fmnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])  # cut the compressed stream
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz is not a complete gzip"):
        data.load_dataset("fashion_mnist", "files", str(tmp_path))


def test_files_short_payload_and_wrong_magic(tmp_path):
    _write_fake_fmnist(tmp_path)
    # Header says 10 images: 16 + 10 * 784 = 7,856 bytes; one image short is 7,072.
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, np.zeros((10, 28, 28)), cut=784)
    with pytest.raises(data.DataError, match="7,072 bytes after decompression, expected 7,856"):
        data.load_dataset("fashion_mnist", "files", str(tmp_path))
    _write_fake_fmnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2051, np.zeros(12))
    with pytest.raises(data.DataError, match="magic number 2051, expected 2049"):
        data.load_dataset("fashion_mnist", "files", str(tmp_path))


def test_files_corrupt_cifar(tmp_path):
    folder, _, _ = _write_fake_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="data_batch_3 is not a readable CIFAR-10"):
        data.load_dataset("cifar10", "files", str(tmp_path))
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3071), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(data.DataError, match=r"data_batch_3: expected uint8 data \[k, 3072\]"):
        data.load_dataset("cifar10", "files", str(tmp_path))


def test_auto_without_data_lists_the_ways(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_dataset("cifar10", "auto", str(tmp_path))
    message = str(e.value)
    for way in ["requirements-tfds.txt", "TFDS_DATA_DIR", "cifar-10-python.tar.gz"]:
        assert way in message
    assert str(tmp_path) in message and "data.source=synthetic" in message


def test_unknown_name_or_source():
    with pytest.raises(data.DataError, match="'cifar10', 'cifar100', 'fashion_mnist', 'mnist'"):
        data.load_dataset("svhn")
    with pytest.raises(ValueError, match="'auto', 'tfds', 'files', 'synthetic'"):
        data.load_dataset("cifar10", "disk")


# --- tensorflow-datasets -------------------------------------------------------------


def _write_tfds_metadata(tfds, name, data_dir, sizes):
    """What a prepared array_record copy has besides its records: dataset_info.json etc."""
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_dir, dataset_name=name, filetype_suffix="array_record"
    )
    splits = [
        tfds.core.SplitInfo(name=s, shard_lengths=[m], num_bytes=0, filename_template=template)
        for s, m in sizes.items()
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_tfds_prepared_copy_offline(name, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    _write_tfds_metadata(tfds, name, str(tmp_path), {"train": 7, "test": 7})
    # The records are mocked; metadata, format detection and decoding to arrays are real.
    policy = tfds.testing.MockPolicy.USE_FILES
    with tfds.testing.mock_data(num_examples=7, policy=policy, data_dir=str(tmp_path)):
        ds = data.load_dataset(name, "tfds", str(tmp_path))
        auto = data.load_dataset(name, "auto", str(tmp_path))
    shape = data.SPECS[name].image_shape
    assert ds.source == "tfds" and auto.source == "tfds"
    assert ds.x_train.shape == (7, *shape) and ds.x_test.shape == (7, *shape)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.y_train.shape == (7,) and 0 <= ds.y_train.min() and ds.y_train.max() < 10


def test_tfds_unprepared_without_tensorflow_says_what_to_install(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: preparing would download")
    with pytest.raises(data.DataError, match="requirements-tfds.txt"):
        data.load_dataset("fashion_mnist", "tfds", str(tmp_path))
