"""The paper's CNNs (Tolpegin et al., Tables 5 and 6) as Flax Linen modules."""

import flax.linen as nn

from fedjax_poison.models.layers import HEAD, Layers


class FashionMnistCNN(nn.Module):
    """Table 6: 2 x (conv 5x5 -> BatchNorm -> ReLU -> max-pool 2) -> dense C; 29,034 params
    with C = 10 classes. Takes 28 x 28 x 1 images (Fashion-MNIST, MNIST)."""

    num_classes: int = 10
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):  # x: [B, 28, 28, 1] float, mask [B]
        layers = Layers(self.conv_impl, train)
        for features in (16, 32):
            x = layers.conv(features, 5)(x)
            x = layers.batch_norm(x, mask)
            x = layers.max_pool(nn.relu(x))
        x = x.reshape(x.shape[0], -1)  # [B, 1568]
        return layers.dense(self.num_classes, name=HEAD)(x)


class Cifar10CNN(nn.Module):
    """Table 5: 3 x (2 x (conv 3x3 -> ReLU -> BatchNorm) -> max-pool 2) -> dense 128 -> dense C.

    551,466 params with C = 10 classes. Takes 32 x 32 x 3 images (CIFAR-10, CIFAR-100).
    `softmax_output=True` reproduces the original code, whose last layer ends in a softmax
    that the cross-entropy then applies a second time.
    """

    num_classes: int = 10
    conv_impl: str = "auto"
    softmax_output: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):  # x: [B, 32, 32, 3] float, mask [B]
        layers = Layers(self.conv_impl, train)
        for features in (32, 64, 128):
            for _ in range(2):
                x = nn.relu(layers.conv(features, 3)(x))
                x = layers.batch_norm(x, mask)
            x = layers.max_pool(x)
        x = x.reshape(x.shape[0], -1)  # [B, 2048]
        x = layers.dense(128)(x)
        x = layers.dense(self.num_classes, name=HEAD)(x)
        return nn.softmax(x) if self.softmax_output else x
