"""Backdoors: a pixel-pattern trigger that makes the model predict a target label.

BadNets (Gu et al., 2017) in federated learning (Bagdasaryan et al., AISTATS 2020): a
malicious client stamps the trigger on a share of its examples and relabels them with
the target. DBA (Xie et al., ICLR 2020) splits the trigger into `parts` local triggers,
one per malicious client (client id mod parts); the test images carry the whole trigger.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_poison.attacks.base import Attack, check, clean_updates

PATTERNS = ("square", "checkerboard")


def trigger_pixels(pattern: str, size: int, image_shape: tuple[int, int, int]):
    """(mask [H, W] bool, value [H, W] uint8): a size x size patch one pixel from the
    bottom-right corner; 'square' is white, 'checkerboard' alternates white and black."""
    h, w, _ = image_shape
    mask = np.zeros((h, w), bool)
    mask[h - 1 - size : h - 1, w - 1 - size : w - 1] = True
    rows, cols = np.indices((h, w))
    value = np.full((h, w), 255, np.uint8)
    if pattern == "checkerboard":
        value = np.where((rows + cols) % 2 == 0, 255, 0).astype(np.uint8)
    return mask, value


def split_trigger(mask: np.ndarray, parts: int) -> np.ndarray:
    """[P, H, W] bool: the trigger's rows dealt into `parts` horizontal strips (DBA's local
    triggers); their union is the whole trigger."""
    rows = np.flatnonzero(mask.any(axis=1))
    pieces = np.zeros((parts, *mask.shape), bool)
    for i, strip in enumerate(np.array_split(rows, parts)):
        pieces[i, strip] = mask[strip]
    return pieces


def backdoor(
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    target: int = 0,
    share: float = 0.5,
    pattern: str = "square",
    size: int = 4,
    parts: int = 1,
) -> Attack:
    """Stamp the trigger on `share` of each poisoning client's examples (exactly
    round(share * count), drawn anew each round) and label them `target`.

    parts 1: BadNets' one trigger; parts > 1: DBA, client i stamps strip i mod parts.
    Knows: its own data, the trigger and the target.
    """
    h, w, _ = image_shape
    check(0 <= target < num_classes, "backdoor.target", f"in [0, {num_classes})", target)
    check(0 < share <= 1, "backdoor.share", "in (0, 1]", share)
    check(pattern in PATTERNS, "backdoor.pattern", f"one of {PATTERNS}", pattern)
    check(1 <= size <= min(h, w) - 2, "backdoor.size", f"in [1, {min(h, w) - 2}]", size)
    check(1 <= parts <= size, "backdoor.parts", f"in [1, size={size}]", parts)
    mask, value = trigger_pixels(pattern, size, image_shape)
    pieces = jnp.asarray(split_trigger(mask, parts))  # [P, H, W]
    value = jnp.asarray(value)[:, :, None]  # [H, W, 1]

    def poison_data(x, y, count, ctx):
        k, n = y.shape
        noise = jax.random.uniform(ctx.key, (k, n))
        noise = jnp.where(jnp.arange(n)[None, :] < count[:, None], noise, 2.0)  # padding last
        rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
        quota = jnp.round(share * count.astype(jnp.float32)).astype(rank.dtype)  # [k]
        hit = ctx.poisoned[:, None] & (rank < quota[:, None])  # [k, n]
        stamp = pieces[ctx.client_ids % parts]  # [k, H, W]
        where = hit[:, :, None, None, None] & stamp[:, None, :, :, None]
        return jnp.where(where, value, x), jnp.where(hit, target, y)

    def trigger(x):
        return jnp.where(jnp.asarray(mask)[:, :, None], value, x)

    return Attack(poison_data, clean_updates, "backdoor", trigger, target)
