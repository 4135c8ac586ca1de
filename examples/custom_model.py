"""A user's model: a small all-convolutional network written with Flax's own layers.

    python -m examples.custom_model [WORKDIR]      # from the checkout

registers it for any image shape, checks it against the model contract (logits, an output
layer named `head`, the mask), and trains it under label flipping on synthetic
Fashion-MNIST-shaped data.
"""

import sys

import flax.linen as nn

import fedjax_poison
from fedjax_poison import models, testing
from fedjax_poison.config import configuration


class TinyCNN(nn.Module):
    """conv 3x3 (`width`) -> ReLU -> conv 3x3 stride 2 (2 x `width`) -> ReLU -> head."""

    num_classes: int = 10
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):  # x [B, H, W, C], mask [B] (unused:
        del train, mask  # no BatchNorm statistics to keep padded examples out of)
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)  # [B, H/2 * W/2 * 2 * width]
        return nn.Dense(self.num_classes, name=models.HEAD)(x)


fedjax_poison.register_model("tiny_cnn", TinyCNN)


def config():
    """The paper's Fashion-MNIST setup with TinyCNN, 30% flipping 6 -> 0, and its twin."""
    c = configuration.smoke(configuration.paper_config("fashion_mnist"))
    c.num_rounds, c.eval_every, c.tensorboard = 8, 4, False
    c.batch_size, c.lr = 16, 0.01
    c.model.name = "tiny_cnn"  # its block, model.tiny_cnn.*, is in the config once registered
    c.model.tiny_cnn.width = 8
    c.sweep.malicious_fraction = (0.0, 0.3)
    return c


def main(workdir=None) -> dict:
    """{malicious_fraction: final row of the summary}."""
    testing.check_model("tiny_cnn", image_shape=(28, 28, 1))
    result = fedjax_poison.run(config(), workdir, name="custom_model")
    rows = {r["malicious_fraction"]: r for r in result.summary["final"]}
    for fraction, row in sorted(rows.items()):
        print(
            f"{fraction:.0%} malicious: accuracy {row['accuracy_window']:.3f}, "
            f"source recall {row['source_recall_window']:.3f}"
        )
    return rows


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
