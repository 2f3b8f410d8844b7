"""A collection of small torch CNNs written in the styles their fields publish them in (not
copies): reinforcement learning (the Nature DQN, CleanRL's and Stable-Baselines3's Atari
networks, channels-last observations, an IMPALA stack with and without residual blocks, a
dueling head), GANs (DCGAN's discriminator, a WGAN critic, a discriminator of flat images),
meta-learning (Conv-4 backbones, a functional MAML forward), continual and federated learning,
adversarial robustness, the recipes and d2l. Each ports, and the Flax model of its spec gives
its output, or is refused with the reason named: the figures docs/porting.md reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import fast_only, port_round_trip
from torch import nn

from lenet_port import PortError, port


class NatureDQN(nn.Module):
    def __init__(self, n_actions=6):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 32, 8, stride=4)
        self.conv2 = nn.Conv2d(32, 64, 4, stride=2)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=1)
        self.fc4 = nn.Linear(7 * 7 * 64, 512)
        self.head = nn.Linear(512, n_actions)

    def forward(self, x):
        x = x.float() / 255
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.fc4(x.view(x.size(0), -1)))
        return self.head(x)


class CleanRLQ(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512),
            nn.ReLU(), nn.Linear(512, n))

    def forward(self, x):
        return self.network(x / 255.0)


class SB3Policy(nn.Module):
    """A feature extractor (NatureCNN) and a linear head, the observation normalised."""
    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 32, 8, 4, 0), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 0),
                                 nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 0), nn.ReLU(), nn.Flatten())
        self.linear = nn.Sequential(nn.Linear(3136, 512), nn.ReLU())
        self.action_net = nn.Linear(512, 3)

    def forward(self, obs):
        return self.action_net(self.linear(self.cnn(obs.float() / 255.0)))


class GymNHWC(nn.Module):
    """Observations as a gym wrapper gives them, (N, H, W, C): permuted in forward."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 8, 4)
        self.fc = nn.Linear(16 * 15 * 15, 4)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2) / 255.0
        return self.fc(F.relu(self.conv(x)).flatten(1))


class ImpalaLite(nn.Module):
    """IMPALA's conv sequence without its residual blocks: conv, max-pool 3 s2 p1."""
    def __init__(self):
        super().__init__()
        layers = []
        c = 3
        for out in (16, 32, 32):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.MaxPool2d(3, 2, padding=1)]
            c = out
        self.seq = nn.Sequential(*layers)
        self.fc = nn.Linear(32 * 8 * 8, 256)
        self.out = nn.Linear(256, 15)

    def forward(self, x):
        x = self.seq(x / 255.0)
        x = torch.flatten(F.relu(x), 1)
        return self.out(F.relu(self.fc(x)))


class Impala(nn.Module):
    """IMPALA with its residual blocks: refused (a residual)."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.res = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 32 * 32, 15)

    def forward(self, x):
        x = self.pool(self.conv(x))
        x = x + self.res(F.relu(x))
        return self.fc(x.flatten(1))


def conv_block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                         nn.MaxPool2d(2))


class Conv4(nn.Module):
    """A meta-learning Conv-4 backbone with a classifier head."""
    def __init__(self, ways=5):
        super().__init__()
        self.encoder = nn.Sequential(conv_block(3, 32), conv_block(32, 32), conv_block(32, 32),
                                     conv_block(32, 32))
        self.classifier = nn.Linear(32 * 5 * 5, ways)

    def forward(self, x):
        x = self.encoder(x)
        return self.classifier(x.view(x.size(0), -1))


class Conv4Omniglot(nn.Module):
    """Omniglot Conv-4: strided convs, features averaged, a mean over (2, 3)."""
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *[m for i, o in ((1, 64), (64, 64), (64, 64), (64, 64))
              for m in (nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o, momentum=1.0,
                                                                 track_running_stats=True),
                        nn.ReLU())])
        self.classifier = nn.Linear(64, 20)

    def forward(self, x):
        return self.classifier(self.features(x).mean([2, 3]))


class DCGANDisc(nn.Module):
    def __init__(self, nc=3, ndf=16):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, input):
        return self.main(input).view(-1, 1).squeeze(1)


class WGANCritic(nn.Module):
    """An MNIST critic that ends in (N, 1, 1, 1) and returns it reshaped to (N,)."""
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(64, 1, 7, 1, 0))

    def forward(self, x):
        return self.net(x).reshape(-1)


class FlatInputGAN(nn.Module):
    """A GAN discriminator that takes flat (N, 784) images and reshapes them."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 4, 2, 1)
        self.fc = nn.Linear(8 * 14 * 14, 1)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        return torch.sigmoid(self.fc(F.leaky_relu(self.conv(x), 0.2).flatten(1)))


class MadryMNIST(nn.Module):
    """The adversarial-robustness MNIST model with its normalisation inside."""
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(7 * 7 * 64, 1024)
        self.fc2 = nn.Linear(1024, 10)

    def forward(self, x):
        x = (x - 0.1307) / 0.3081
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        return self.fc2(F.relu(self.fc1(x.view(-1, 7 * 7 * 64))))


class NormalizedCIFAR(nn.Module):
    """A robustness-benchmark wrapper: per-channel mean and std buffers, then a small CNN."""
    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1))
        self.register_buffer("sigma", torch.tensor([0.2471, 0.2435, 0.2616]).view(3, 1, 1))
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 8 * 8, 10)

    def forward(self, x):
        x = (x - self.mu) / self.sigma
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class FedAvgCNN(nn.Module):
    """FedAvg's MNIST CNN: 5×5 'same' convs, pools, 512 units; the input reshaped in forward."""
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding="same")
        self.conv2 = nn.Conv2d(32, 64, 5, padding="same")
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 64 * 7 * 7)
        return self.fc2(F.relu(self.fc1(x)))


class FedCIFAR(nn.Module):
    """A federated CIFAR CNN that moves its input to its device."""
    def __init__(self):
        super().__init__()
        self.device = torch.device("cpu")
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = x.to(self.device)
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5).contiguous()
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class RecipeNet(nn.Module):
    """The 'Defining a neural network' recipe."""
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout2d(0.25)
        self.dropout2 = nn.Dropout2d(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class ChannelLessMNIST(nn.Module):
    """Takes (N, 28, 28) and adds the channel itself."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 5)
        self.fc = nn.Linear(10 * 12 * 12, 10)

    def forward(self, x):
        x = torch.unsqueeze(x, 1)
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


class AvalancheSimpleCNN(nn.Module):
    """Continual learning's SimpleCNN: dropout in the features, adaptive max-pool."""
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(32, 32, 3, 1, 0),
            nn.ReLU(inplace=True), nn.MaxPool2d(2, 2), nn.Dropout(0.25),
            nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(64, 64, 3, 1, 0),
            nn.ReLU(inplace=True), nn.MaxPool2d(2, 2), nn.Dropout(0.25),
            nn.Conv2d(64, 64, 1, 1, 0), nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(1),
            nn.Dropout(0.25))
        self.classifier = nn.Sequential(nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class CeilStem(nn.Module):
    """A GoogLeNet-style stem: max-pools with ceil_mode=True, LRN-free."""
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.avg = nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.avg(self.pool2(F.relu(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


class D2LLeNetSigmoid(nn.Module):
    """d2l's LeNet with sigmoid and avg-pool, the input reshaped by a module."""
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2, 2), nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(),
            nn.Linear(84, 10))

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 28, 28))


class STNLike(nn.Module):
    """A spatial transformer's localisation branch: refused (a branch)."""
    def __init__(self):
        super().__init__()
        self.loc = nn.Sequential(nn.Conv2d(1, 8, 7), nn.MaxPool2d(2), nn.ReLU())
        self.fc_loc = nn.Linear(8 * 11 * 11, 6)
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x):
        theta = self.fc_loc(self.loc(x).flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.size(), align_corners=False)
        return self.fc(F.grid_sample(x, grid, align_corners=False).flatten(1))


class MAMLFunctional(nn.Module):
    """Meta-learning's functional forward: F.conv2d with the module's own parameters."""
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.1)
        self.b1 = nn.Parameter(torch.zeros(8))
        self.w2 = nn.Parameter(torch.randn(5, 8 * 13 * 13) * 0.01)
        self.b2 = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        x = F.max_pool2d(F.relu(F.conv2d(x, self.w1, self.b1)), 2)
        return F.linear(x.flatten(1), self.w2, self.b2)


class DuelingDQN(nn.Module):
    """A dueling head: value and advantage streams combined: refused (a branch)."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(4, 16, 8, 4), nn.ReLU(), nn.Flatten())
        self.v = nn.Linear(16 * 20 * 20, 1)
        self.a = nn.Linear(16 * 20 * 20, 6)

    def forward(self, x):
        h = self.conv(x / 255.0)
        a = self.a(h)
        return self.v(h) + a - a.mean(1, keepdim=True)


COLLECTION = {
    "NatureDQN": (NatureDQN, (4, 84, 84), None),
    "CleanRLQ": (CleanRLQ, (4, 84, 84), None),
    "SB3Policy": (SB3Policy, (1, 84, 84), None),
    "GymNHWC": (GymNHWC, (64, 64, 3), None),
    "ImpalaLite": (ImpalaLite, (3, 64, 64), None),
    "Impala": (Impala, (3, 64, 64), "takes two tensors of the network (pool, res)"),
    "Conv4": (Conv4, (3, 84, 84), None),
    "Conv4Omniglot": (Conv4Omniglot, (1, 28, 28), None),
    "DCGANDisc": (DCGANDisc, (3, 64, 64), None),
    "WGANCritic": (WGANCritic, (1, 28, 28), None),
    "FlatInputGAN": (FlatInputGAN, (784,), "input_shape must be (C, H, W)"),
    "MadryMNIST": (MadryMNIST, (1, 28, 28), None),
    "NormalizedCIFAR": (NormalizedCIFAR, (3, 32, 32), None),
    "FedAvgCNN": (FedAvgCNN, (1, 28, 28), None),
    "FedCIFAR": (FedCIFAR, (3, 32, 32), None),
    "RecipeNet": (RecipeNet, (1, 28, 28), None),
    "ChannelLessMNIST": (ChannelLessMNIST, (28, 28), None),
    "AvalancheSimpleCNN": (AvalancheSimpleCNN, (3, 32, 32), None),
    "CeilStem": (CeilStem, (3, 32, 32), None),
    "D2LLeNetSigmoid": (D2LLeNetSigmoid, (1, 28, 28), None),
    "STNLike": (STNLike, (1, 28, 28), "reshapes (N, 6) to (N, 2, 3)"),
    "MAMLFunctional": (MAMLFunctional, (1, 28, 28), None),
    "DuelingDQN": (DuelingDQN, (4, 84, 84), "a residual or a branch"),
}
"""Each network, the shape of one input as it takes it, and what refuses it (None: it ports)."""


def test_the_collections_count() -> None:
    """19 of the 23 port (docs/porting.md says so)."""
    assert len(COLLECTION) == 23
    assert sum(refusal is None for _, _, refusal in COLLECTION.values()) == 19


@pytest.mark.parametrize("name", fast_only(list(COLLECTION), "CleanRLQ", "Impala"))
def test_each_network_ports_or_is_refused_for_its_reason(name: str) -> None:
    cls, shape, refusal = COLLECTION[name]
    torch.manual_seed(0)
    module = cls()
    if refusal is not None:
        with pytest.raises(PortError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
            port(module, shape)
        return
    port_round_trip(module, shape, torch.rand(6, *shape) * 255)  # pixel values, as RL scales
