"""The confusion matrix on device, and everything a report derives from it on the host."""

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison import data as data_lib
from fedjax_poison.attacks import Flips
from fedjax_poison.round import sharding


def confusion_matrix(labels: jax.Array, preds: jax.Array, mask: jax.Array, num_classes: int):
    """[C, C] int32 counts, rows = true class, columns = predicted class."""
    flat = labels * num_classes + preds
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[flat].add(mask.astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


class TestSet:
    """The test set batched for evaluation, on device: x [T, b, H, W, C] u8, y/mask [T, b]."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int):
        batch_size = min(batch_size, len(y))
        num_batches = -(-len(y) // batch_size)
        pad = num_batches * batch_size - len(y)
        self.x = jnp.asarray(np.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))).reshape(
            num_batches, batch_size, *x.shape[1:]
        )
        self.y = jnp.asarray(np.pad(y, (0, pad))).reshape(num_batches, batch_size)
        self.mask = jnp.asarray(np.arange(num_batches * batch_size) < len(y)).reshape(
            num_batches, batch_size
        )


def make_evaluate(
    model: nn.Module,
    spec: data_lib.DatasetSpec,
    groups: int = 1,
    shard: Callable = lambda tree: tree,
    devices_in_use: int = 1,
) -> Callable[..., jax.Array]:
    """Returns evaluate(params, batch_stats, x, y, mask) -> confusion [C, C], for one model.

    With groups > 1, the test batches are split into that many groups, placed by `shard`
    (over a mesh's clients axis), and each device counts its own. On CPU the batches are
    cut to cache-sized ones (`sharding.cpu_chunk`, with `devices_in_use` devices of this
    process running at once); elsewhere they stay as the test set holds them.
    """
    chunk = sharding.cpu_chunk(math.prod(spec.image_shape), devices_in_use)  # images

    def rechunk(batches):
        """[T, b, ...] -> [T * b / c, c, ...], c the largest divisor of b up to `chunk`."""
        if jax.default_backend() != "cpu":
            return batches
        t, b = batches[0].shape[:2]
        c = max(d for d in range(1, min(b, chunk) + 1) if b % d == 0)
        if c == b or 4 * c < chunk:  # already small, or no divisor near the target
            return batches
        return tuple(a.reshape(t * b // c, c, *a.shape[2:]) for a in batches)

    def evaluate(params, batch_stats, x, y, mask):
        batches = rechunk((x, y, mask))
        if groups == 1 or batches[0].shape[0] % groups:
            return count(params, batch_stats, batches)
        split = lambda a: a.reshape(groups, a.shape[0] // groups, *a.shape[1:])
        grouped = shard(tuple(split(a) for a in batches))
        per_group = jax.vmap(count, in_axes=(None, None, 0))(params, batch_stats, grouped)
        return per_group.sum(0)

    def count(params, batch_stats, batches):
        """The confusion matrix of batches (x [T, b, ...], y [T, b], mask [T, b])."""

        def one_batch(conf, batch):
            xb, yb, mb = batch
            logits = model.apply(
                {"params": params, "batch_stats": batch_stats},
                data_lib.normalize(xb, spec),
                train=False,
            )
            preds = jnp.argmax(logits, -1)
            return conf + confusion_matrix(yb, preds, mb, spec.num_classes), None

        init = jnp.zeros((spec.num_classes, spec.num_classes), jnp.int32)
        return jax.lax.scan(one_batch, init, batches)[0]

    return evaluate


def summarize(confusion: np.ndarray, flips: Flips) -> dict:
    """Accuracy, per-class recall/precision and the attack's scores from one confusion matrix.

    With several flip pairs, source_recall, target_precision and attack_success_rate are
    means over the pairs; with none, they are NaN.
    """
    confusion = np.asarray(confusion, np.float64)
    true_counts, pred_counts = confusion.sum(1), confusion.sum(0)
    diag = np.diag(confusion)
    recall = diag / np.maximum(true_counts, 1)
    precision = diag / np.maximum(pred_counts, 1)
    sources = [s for s, _ in flips]
    targets = [t for _, t in flips]
    success = [confusion[s, t] / max(true_counts[s], 1) for s, t in flips]
    mean = lambda values: float(np.mean(values)) if len(values) else float("nan")
    return {
        "accuracy": float(diag.sum() / max(confusion.sum(), 1)),
        "recall": recall.tolist(),
        "precision": precision.tolist(),
        "source_recall": mean(recall[sources]),
        "target_precision": mean(precision[targets]),
        "attack_success_rate": mean(success),
    }


def backdoor_success(triggered: np.ndarray, target: int) -> float:
    """Share of triggered test images whose true class is not `target` that are predicted
    as `target`, from the confusion matrix [C, C] of the triggered test set."""
    triggered = np.asarray(triggered, np.float64)
    others = np.arange(triggered.shape[0]) != target
    return float(triggered[others, target].sum() / max(triggered[others].sum(), 1))
