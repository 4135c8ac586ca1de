"""Backdoors: a pixel-pattern trigger that makes the model predict a target label.

BadNets (Gu et al., 2017) in federated learning (Bagdasaryan et al., AISTATS 2020): a
malicious client stamps the trigger on a share of its examples and relabels them with
the target. DBA (Xie et al., ICLR 2020) splits the trigger into `parts` local triggers,
one per malicious client (client id mod parts); the test images carry the whole trigger.
The blended backdoor (Chen et al. 2017) blends a whole-image key pattern into the image
instead of stamping a patch.
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


def chosen_examples(y, count, ctx, share: float) -> jax.Array:
    """[k, n] bool: round(share * count) of each poisoning client's real examples, drawn
    anew each round (padding never)."""
    k, n = y.shape
    noise = jax.random.uniform(ctx.key, (k, n))
    noise = jnp.where(jnp.arange(n)[None, :] < count[:, None], noise, 2.0)  # padding last
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    quota = jnp.round(share * count.astype(jnp.float32)).astype(rank.dtype)  # [k]
    return ctx.poisoned[:, None] & (rank < quota[:, None])


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
        hit = chosen_examples(y, count, ctx, share)  # [k, n]
        stamp = pieces[ctx.client_ids % parts]  # [k, H, W]
        where = hit[:, :, None, None, None] & stamp[:, None, :, :, None]
        return jnp.where(where, value, x), jnp.where(hit, target, y)

    def trigger(x):
        return jnp.where(jnp.asarray(mask)[:, :, None], value, x)

    return Attack(poison_data, clean_updates, "backdoor", trigger, target)


def blend(x: jax.Array, pattern: jax.Array, alpha: float) -> jax.Array:
    """(1 - alpha) x + alpha pattern, rounded back to uint8 (images [..., H, W, C])."""
    pattern = pattern.reshape((1,) * (x.ndim - pattern.ndim) + pattern.shape)
    mixed = (1.0 - alpha) * x.astype(jnp.float32) + alpha * pattern.astype(jnp.float32)
    return jnp.clip(jnp.round(mixed), 0, 255).astype(jnp.uint8)


def blended(
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    target: int = 0,
    share: float = 0.5,
    alpha: float = 0.2,
    pattern_seed: int = 0,
) -> Attack:
    """The blended backdoor (Chen et al., "Targeted backdoor attacks on deep learning
    systems using data poisoning", 2017): on `share` of each poisoning client's examples
    (exactly round(share * count), drawn anew each round) the image becomes
    (1 - alpha) x + alpha k, k a key pattern of uniform random pixels [H, W, C] drawn once
    from `pattern_seed` (the paper's random-noise key; its alpha_train 0.2), labelled
    `target`. Test images carry the same blend.
    Knows: its own data, the key pattern and the target."""
    check(0 <= target < num_classes, "blended.target", f"in [0, {num_classes})", target)
    check(0 < share <= 1, "blended.share", "in (0, 1]", share)
    check(0 < alpha <= 1, "blended.alpha", "in (0, 1]", alpha)
    ok = isinstance(pattern_seed, int) and pattern_seed >= 0
    check(ok, "blended.pattern_seed", "an integer >= 0", pattern_seed)
    rng = np.random.default_rng(pattern_seed)
    pattern = jnp.asarray(rng.integers(0, 256, tuple(image_shape)), jnp.uint8)

    def poison_data(x, y, count, ctx):
        hit = chosen_examples(y, count, ctx, share)
        where = hit[:, :, None, None, None]
        return jnp.where(where, blend(x, pattern, alpha), x), jnp.where(hit, target, y)

    def trigger(x):
        return blend(x, pattern, alpha)

    return Attack(poison_data, clean_updates, "backdoor", trigger, target)
