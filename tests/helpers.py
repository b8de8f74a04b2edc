"""Models and helpers shared by the tests (fixtures live in conftest.py).

Imported as ``from helpers import ...``: pytest's default ("prepend") import mode puts ``tests/``
(the directory of the root conftest.py) on ``sys.path``, for ``tests/passes/`` too.
"""

import torch
import torch.nn as nn

# -- models -----------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    """conv-bn-relu, a residual add, a concat and a Linear head: the shapes fxptqat must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y) + y
        return self.fc(torch.flatten(torch.cat([z, y], 1), 1))


class TwoCats(nn.Module):
    """conv0's output feeds two torch.cat nodes: torch.ao can put its quantizer in only one cat's
    sharing group (a pattern ``traceable_models`` draws only rarely)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 1, 1, bias=False)
        self.conv1 = nn.Conv2d(1, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(2, 1, 1, bias=False)

    def forward(self, x):
        v1 = self.conv0(x)
        return torch.cat([self.conv2(torch.cat([v1, self.conv1(x)], 1)), v1], 1)


class Twice(nn.Module):
    """One Linear called at two places."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.h = nn.Linear(4, 2)

    def forward(self, x):
        return self.h(self.l(torch.relu(self.l(x))))


def make_small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
    return net


# -- state --------------------------------------------------------------------------------------------


def state_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
