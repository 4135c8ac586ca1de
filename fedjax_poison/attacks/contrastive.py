"""Chameleon (Dai & Li, "Chameleon: Adapting to Peer Images for Planting Durable Backdoors
in Federated Learning", ICML 2023): a backdoor made durable through the embedding.

A backdoor fades once its attackers leave because the honest clients' images of the
poisoned images' original class (interferers) pull the triggered images back, and those
of the target class (facilitators) hold them in place. Chameleon trains the encoder (every
layer but the output Dense) with a supervised contrastive loss that moves the triggered
images, labelled with the target, next to the facilitators and away from the interferers;
then, the encoder frozen, the output layer with cross-entropy on the poisoned and clean mix.
The attackers send the resulting model minus the global model in place of their own update.

The trigger is the `backdoor` attack's (same pattern, size and stamp), so the run's
triggered test set and success measure are the backdoor's. The attackers of a round
collude, as the authors' single attacker does: one update, crafted from the union of
their real examples, kept in the server state (Attack.init / Attack.learn) between the
learn step and the update seam. Shapes: [k] clients, [n] examples of a client, [d]
flattened parameters, [S] steps, [B] examples a step, [F] embedding features.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from fedjax_poison.attacks.backdoor import PATTERNS, backdoor
from fedjax_poison.attacks.base import Attack, check, clean_data, own_state, replace_rows
from fedjax_poison.attacks.model_poisoning import finite, onto_ball
from fedjax_poison.attacks.trigger_search import any_examples, needs_model, step_batches

# The authors' SGD for both stages (their momentum_contrastive / decay_contrastive too).
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def supervised_contrastive(z: jax.Array, labels: jax.Array, tau: float) -> jax.Array:
    """[] the supervised contrastive loss (Khosla et al., 2020) of embeddings z [B, F] with
    labels [B]: each row is L2-normalized; anchor i's loss is
        -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) ),
    P(i) the other rows of its label (0 for an anchor without one); the mean over anchors.
    A poisoned image labelled with the target has the other poisoned images and the target
    class's images as positives, every other image (its own class's too) as a negative."""
    z = z * lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=1, keepdims=True), 1e-24))
    b = z.shape[0]
    self_pair = jnp.eye(b, dtype=bool)
    logits = z @ z.T / tau  # [B, B]
    log_prob = logits - jax.nn.logsumexp(jnp.where(self_pair, -jnp.inf, logits), 1, keepdims=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_pair
    count = positive.sum(axis=1)
    per_anchor = -jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / jnp.maximum(count, 1)
    return jnp.mean(per_anchor)


def chameleon(
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    num_params: int,
    head_index: np.ndarray,
    target: int = 2,
    share: float = 7 / 64,
    pattern: str = "square",
    size: int = 4,
    tau: float = 0.07,
    encoder_lr: float = 0.005,
    encoder_steps: int = 16,
    head_lr: float = 0.001,
    head_steps: int = 16,
    batch: int = 64,
    radius: float = 5.0,
) -> Attack:
    """Chameleon: the poisoning clients send one crafted update in place of their own.
    From the global model, on batches of `batch` of their examples (drawn with
    replacement from all of the round's poisoning clients) whose first round(share x batch)
    carry the backdoor's trigger (`pattern`, `size`) and the label `target`:
    (1) `encoder_steps` SGD steps (`encoder_lr`, momentum 0.9, weight decay 5e-4) on every
    layer but the output one, of the supervised contrastive loss (temperature `tau`) of
    their embeddings (the output layer's input); (2) the encoder frozen, `head_steps` such
    steps (`head_lr`) on the output layer's kernel (head_index [F, C], its positions in the
    flattened parameters; the output bias stays as it is), of the cross-entropy. The
    update, the model minus the global model, is projected onto the L2 ball of `radius`
    (0: none).
    Knows: its own data, the global model of the round (and how to apply it), the trigger
    and the target.
    """
    h, w, _ = image_shape
    check(isinstance(num_params, int) and num_params >= 1, "num_params", "an integer >= 1",
          num_params)  # fmt: skip
    check(0 <= target < num_classes, "chameleon.target", f"in [0, {num_classes})", target)
    check(finite(share) and 0 < share <= 1, "chameleon.share", "in (0, 1]", share)
    check(pattern in PATTERNS, "chameleon.pattern", f"one of {PATTERNS}", pattern)
    check(1 <= size <= min(h, w) - 2, "chameleon.size", f"in [1, {min(h, w) - 2}]", size)
    check(finite(tau) and tau > 0, "chameleon.tau", "a finite number > 0", tau)
    for field, lr in (("encoder_lr", encoder_lr), ("head_lr", head_lr)):
        check(finite(lr) and 0 < lr <= 1, f"chameleon.{field}", "in (0, 1]", lr)
    for field, steps in (("encoder_steps", encoder_steps), ("head_steps", head_steps)):
        ok = isinstance(steps, int) and steps >= 0
        check(ok, f"chameleon.{field}", "an integer >= 0", steps)
    check(isinstance(batch, int) and batch >= 2, "chameleon.batch", "an integer >= 2", batch)
    poisoned_rows = round(share * batch)
    check(poisoned_rows >= 1, "chameleon.share", f"at least 1 / (2 batch) = {0.5 / batch}", share)
    check(finite(radius) and radius >= 0, "chameleon.radius", "a finite number >= 0", radius)
    stamp = backdoor(
        image_shape=image_shape, num_classes=num_classes, target=target, pattern=pattern, size=size
    ).trigger
    hit = jnp.arange(batch) < poisoned_rows  # [B]: the rows of a batch that are poisoned
    # [d] True on the output kernel's coordinates (head_index [F, C]) in the flat parameters.
    head_index = np.asarray(head_index)
    inside = head_index.size > 0 and 0 <= head_index.min() and head_index.max() < num_params
    check(bool(inside), "head_index", f"positions in [0, {num_params})", head_index.shape)
    on_head = np.zeros((num_params,), bool)
    on_head[head_index.reshape(-1)] = True
    on_head = jnp.asarray(on_head)

    def keep(head, encoder):
        """[d] the head's coordinates of `head`, the rest of `encoder`."""
        return jnp.where(on_head, head, encoder)

    def poisoned_batch(images, labels, rows):
        """(x [B, H, W, C] float32 pixels, y [B]) of the examples at rows [B]."""
        xb, yb = images[rows], labels[rows]
        xb = jnp.where(hit[:, None, None, None], stamp(xb), xb).astype(jnp.float32)
        return xb, jnp.where(hit, target, yb)

    def sgd(loss, start, lr, images, labels, index):
        """start after one SGD step (momentum, weight decay) of loss(p, x, y) per row of
        index [S, B]."""
        tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(lr, MOMENTUM))

        def step(carry, rows):
            p, opt = carry
            grad = jax.grad(loss)(p, *poisoned_batch(images, labels, rows))
            moves, opt = tx.update(grad, opt, p)
            return (optax.apply_updates(p, moves), opt), None

        return lax.scan(step, (start, tx.init(start)), index)[0][0]

    def craft(x, y, count, ctx):
        """[d] the colluding attackers' update: the two stages from the global model."""
        params, model_loss, model_features = needs_model(ctx, "chameleon", "model_features")
        flat, unravel = ravel_pytree(params)
        if flat.shape[0] != num_params:
            raise ValueError(
                f"chameleon: the model has {flat.shape[0]} parameters, not {num_params}"
            )
        k, n = y.shape
        images, labels = x.reshape(k * n, *x.shape[2:]), y.reshape(k * n)
        k_encoder, k_head = jax.random.split(jax.random.fold_in(ctx.key, 0xC4A))

        def contrastive(p, xb, yb):  # p [d]: the encoder's coordinates count, the head's not
            return supervised_contrastive(model_features(unravel(keep(flat, p)), xb), yb, tau)

        index = step_batches(k_encoder, count, ctx.poisoned, n, encoder_steps, batch)
        encoder = keep(flat, sgd(contrastive, flat, encoder_lr, images, labels, index))
        cross_entropy = lambda p, xb, yb: model_loss(unravel(keep(p, encoder)), xb, yb)
        index = step_batches(k_head, count, ctx.poisoned, n, head_steps, batch)
        crafted = keep(sgd(cross_entropy, encoder, head_lr, images, labels, index), encoder)
        update = onto_ball(crafted - flat, radius)
        # A diverged global model (NaN, inf) trains to nothing usable: send no change.
        return jnp.where(jnp.isfinite(update).all(), update, 0.0)

    def init():
        """(update [d] float32, fresh [] bool: crafted for this round's poisoning clients)."""
        return jnp.zeros((num_params,), jnp.float32), jnp.zeros((), bool)

    def learn(x, y, count, ctx):
        update, fresh = own_state(attack, ctx)
        # Without examples nothing is crafted: poisoning clients keep their own (empty)
        # update; a round nobody poisons leaves the state as it was.
        stale = (update, fresh & ~ctx.poisoned.any())
        found = any_examples(count, ctx)
        return lax.cond(found, lambda: (craft(x, y, count, ctx), jnp.ones((), bool)), lambda: stale)

    def poison_updates(updates, ctx):
        update, fresh = own_state(attack, ctx)
        return replace_rows(updates, update, ctx.poisoned & fresh)

    def trigger(x, state):
        del state
        return stamp(x)

    attack = Attack(clean_data, poison_updates, "backdoor", trigger, target, init, learn)
    return attack
