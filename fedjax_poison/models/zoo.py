"""Models from the federated-learning literature, for any image shape their layers take.

Parameter counts below are for C = 10 classes; every conv model takes 28 x 28 x 1 and
32 x 32 x 3 images (and larger ones).
"""

import flax.linen as nn

from fedjax_poison.models.layers import HEAD, NORMS, Layers

# VGG's configuration "A" (Simonyan & Zisserman, 2015, Table 1): conv 3x3 widths, M = max-pool.
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
RESNET18_STAGES = (64, 128, 256, 512)  # two BasicBlocks each; stride 2 entering stages 2-4


class _Checked(nn.Module):
    """Checks the config fields it has (norm, groups, width) when the model is built, so a
    bad value stops the run before anything compiles."""

    def __post_init__(self):
        super().__post_init__()
        norm = getattr(self, "norm", "none")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if getattr(self, "groups", 1) < 1:
            raise ValueError(f"groups must be a positive integer, got {self.groups!r}")
        if getattr(self, "width", 1.0) <= 0:
            raise ValueError(f"width must be > 0, got {self.width!r}")


def _scaled(features: int, width: float) -> int:
    return max(1, round(features * width))


def _conv_norm(layers, x, mask, features, kernel_size, stride, norm, groups, use_bias):
    """conv -> norm, the unit VGG and ResNet are made of."""
    x = layers.conv(features, kernel_size, stride, use_bias=use_bias)(x)
    return layers.norm(norm, x, mask, groups)


class LeNet5(_Checked):
    """LeNet-5 (LeCun et al., 1998, "Gradient-based learning applied to document
    recognition"), as FL papers train it on MNIST: conv 5x5 6 -> max-pool -> conv 5x5 16 ->
    max-pool -> dense 120 -> dense 84 -> dense C, ReLU between.

    61,706 params on 28 x 28 x 1, the published count: LeCun et al. pad the 28 x 28 digits
    to 32 x 32 and use unpadded convolutions; here the first convolution pads 2 pixels on
    every side instead, which is the same on 28 x 28 and keeps a 32 x 32 x 3 image at
    32 x 32 (83,126 params, a 6 x 6 x 16 map into the dense 120). Also unlike the original:
    ReLU and max-pooling for tanh and trainable subsampling, every C3 map connected to all
    six S2 maps, and a dense output layer for the RBF units.
    """

    num_classes: int = 10
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):  # x: [B, H, W, C_in], mask [B]
        layers = Layers(self.conv_impl, train)
        x = layers.max_pool(nn.relu(layers.conv(6, 5)(x)))  # [B, 14, 14, 6] on 28 x 28
        x = layers.max_pool(nn.relu(layers.conv(16, 5, padding="valid")(x)))  # [B, 5, 5, 16]
        x = x.reshape(x.shape[0], -1)  # [B, 400]
        for features in (120, 84):
            x = nn.relu(layers.dense(features)(x))
        return layers.dense(self.num_classes, name=HEAD)(x)


class MLP(_Checked):
    """A multilayer perceptron on the flattened image: McMahan et al. (2017, "Communication-
    efficient learning of deep networks from decentralized data")'s MNIST 2NN by default,
    two hidden layers of 200 ReLU units, 199,210 params on 28 x 28 x 1. `conv_impl` picks
    the dense layers' implementation."""

    num_classes: int = 10
    hidden: tuple = (200, 200)
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):  # x: [B, H, W, C_in], mask [B]
        layers = Layers(self.conv_impl, train)
        x = x.reshape(x.shape[0], -1)  # [B, H*W*C_in]
        for features in self.hidden:
            x = nn.relu(layers.dense(int(features))(x))
        return layers.dense(self.num_classes, name=HEAD)(x)


class VGG11(_Checked):
    """VGG-11, configuration "A" of Simonyan & Zisserman (2015, "Very deep convolutional
    networks for large-scale image recognition"), in its CIFAR form (as in the widely used
    kuangliu/pytorch-cifar): each conv 3x3 -> norm -> ReLU, five max-pools, global average
    pool, one dense C on the 512 features, no 4096-wide layers. 9,231,114 params with
    BatchNorm (conv biases kept).

    norm: 'batch', 'group' (`groups` groups) or 'none'. width: multiplies every conv's
    channels (0.25 for a 16-to-128-channel net that trains in minutes on a CPU). On 28 x 28
    the max-pools keep a last partial window (28 -> 14 -> 7 -> 4 -> 2 -> 1).
    """

    num_classes: int = 10
    norm: str = "batch"
    groups: int = 2
    width: float = 1.0
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):  # x: [B, H, W, C_in], mask [B]
        layers = Layers(self.conv_impl, train)
        for v in VGG11_LAYERS:
            if v == "M":
                x = layers.max_pool(x)
                continue
            f = _scaled(v, self.width)
            x = nn.relu(_conv_norm(layers, x, mask, f, 3, 1, self.norm, self.groups, True))
        x = x.mean((1, 2))  # [B, 512 * width]; the map is 1 x 1 on 28 x 28 and 32 x 32
        return layers.dense(self.num_classes, name=HEAD)(x)


class BasicBlock(nn.Module):
    """He et al. (2016)'s basic residual block: conv 3x3 (stride s) -> norm -> ReLU -> conv
    3x3 -> norm, plus the input (through conv 1x1 stride s -> norm where the shape changes),
    then ReLU. Convolutions without bias unless norm is 'none'."""

    features: int
    stride: int
    norm: str
    groups: int
    conv_impl: str

    @nn.compact
    def __call__(self, x, train: bool, mask):  # x: [B, H, W, Cin] -> [B, H/s, W/s, features]
        layers = Layers(self.conv_impl, train)
        fields = (self.norm, self.groups, self.norm == "none")
        y = nn.relu(_conv_norm(layers, x, mask, self.features, 3, self.stride, *fields))
        y = _conv_norm(layers, y, mask, self.features, 3, 1, *fields)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv_norm(layers, x, mask, self.features, 1, self.stride, *fields)
        return nn.relu(y + x)


class ResNet18(_Checked):
    """ResNet-18 (He et al., 2016, "Deep residual learning for image recognition") in its
    CIFAR form (kuangliu/pytorch-cifar): a 3x3 stem of 64 channels and no max-pool, stages
    of 64/128/256/512 channels with two BasicBlocks each (stride 2 and a 1x1 projection
    shortcut entering stages 2-4), global average pool, dense C. 11,173,962 params with
    BatchNorm; the same with GroupNorm, which has the same scale and bias.

    norm: 'group' by default, the FL convention: BatchNorm's statistics degrade under
    non-IID clients (Hsieh et al., 2020, "The non-IID data quagmire of decentralized machine
    learning"), and Reddi et al. (2021, "Adaptive federated optimization") train this
    ResNet-18 with GroupNorm of two groups (`groups` = 2). 'batch' and 'none' selectable.
    width: multiplies every stage's channels.
    """

    num_classes: int = 10
    norm: str = "group"
    groups: int = 2
    width: float = 1.0
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):  # x: [B, H, W, C_in], mask [B]
        layers = Layers(self.conv_impl, train)
        stem = _scaled(RESNET18_STAGES[0], self.width)
        bias = self.norm == "none"
        x = nn.relu(_conv_norm(layers, x, mask, stem, 3, 1, self.norm, self.groups, bias))
        for stage, features in enumerate(RESNET18_STAGES):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                f = _scaled(features, self.width)
                x = BasicBlock(f, stride, self.norm, self.groups, self.conv_impl)(x, train, mask)
        x = x.mean((1, 2))  # [B, 512 * width]: 4 x 4 pooled on 32 x 32
        return layers.dense(self.num_classes, name=HEAD)(x)
