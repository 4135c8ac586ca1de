import jax.numpy as jnp
import numpy as np

from fedjax_poison.round import metrics


def test_confusion_matrix_counts_and_mask():
    labels = jnp.array([0, 0, 1, 2, 2, 2])
    preds = jnp.array([0, 1, 1, 2, 0, 2])
    mask = jnp.array([True, True, True, True, True, False])
    conf = metrics.confusion_matrix(labels, preds, mask, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_summarize_attack_scores_by_hand():
    # rows = true class, columns = predicted class
    conf = np.array([[8, 0, 2], [0, 10, 0], [5, 0, 5]])
    s = metrics.summarize(conf, ((2, 0),))
    assert s["accuracy"] == 23 / 30
    np.testing.assert_allclose(s["recall"], [0.8, 1.0, 0.5])
    np.testing.assert_allclose(s["precision"], [8 / 13, 1.0, 5 / 7])
    assert s["source_recall"] == 0.5
    assert s["target_precision"] == 8 / 13
    assert s["attack_success_rate"] == 0.5


def test_summarize_without_flips_has_nan_attack_scores():
    s = metrics.summarize(np.eye(3) * 4, ())
    assert s["accuracy"] == 1.0 and np.isnan(s["source_recall"])


def test_test_set_batches_pad_and_mask():
    x = np.zeros((5, 2, 2, 1), np.uint8)
    y = np.arange(5, dtype=np.int32)
    t = metrics.TestSet(x, y, 2)
    assert t.x.shape == (3, 2, 2, 2, 1) and t.mask.sum() == 5
