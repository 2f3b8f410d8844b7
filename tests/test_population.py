"""Populations of seeds trained as one program (lenet_jax.population, lenet_torch.population):
member m is what a single run at seed m trains, batch norm statistics per member, dropout
streams per member."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import SLOW, without_dropout

from lenet_jax.loss import loss_fn as jax_loss
from lenet_jax.model import build as jax_build
from lenet_jax.model import get_weights
from lenet_jax.optim import make_tx
from lenet_jax.population import Population, member
from lenet_jax.trainer import make_step, split_for_training
from lenet_parity.battery import TRAJ_PARAM_TOL
from lenet_spec import BatchNorm, Conv, Dropout, Flatten, Linear, MaxPool, ReLU, Spec, load_spec
from lenet_torch.loss import loss_fn as torch_loss
from lenet_torch.model import build as torch_build
from lenet_torch.optim import make_optimizer
from lenet_torch.population import Population as TorchPopulation

MEMBER_TOL = TRAJ_PARAM_TOL
"""Max |Δ| between a member's parameters (and batch statistics) and the single run's at its
seed after a few steps: the parity battery's trajectory bound. Not bit for bit: batching the
members' matrix products changes how the kernels block and order their sums, which float32
rounds differently (measured, 4 SGD steps with momentum on lenet5_bn: 1.5e-8 in JAX), and on
random batches such a difference can tip a max-pool window or ReLU input sitting near a tie
onto its other side (torch, seed 7 of the test: 1.9e-5 in conv1.weight after 3 steps). A wrong
seed, batch or statistic is O(0.1) away: members start that far apart."""

SMALL_BN = Spec("small_bn", (1, 12, 12), (
    Conv(4, 3), BatchNorm(), ReLU(), MaxPool(2), Flatten(), Linear(10)))
"""A small network with batch statistics (cheap to compile, for the fast tier)."""

DROPOUT = Spec("dropout", (1, 12, 12), (
    Conv(4, 3), ReLU(), MaxPool(2), Flatten(), Linear(16), ReLU(), Dropout(0.5), Linear(10)))
"""A small network whose training draws dropout masks."""

SEEDS = [0, 5, 7]


def _data(spec: Spec, steps: int, members: int, batch: int = 16, pool: int = 128):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((pool, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, pool)
    return x, y, rng.integers(0, pool, (steps, members, batch))


def _gap(a, b) -> float:
    return max(float(jnp.max(jnp.abs(p - q))) for p, q in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("name", ["small_bn", pytest.param("lenet5_bn", marks=SLOW),
                                  pytest.param("dropout", marks=SLOW)])
def test_jax_member_is_the_single_run_at_its_seed(name: str) -> None:
    spec = {"small_bn": SMALL_BN, "dropout": DROPOUT}.get(name) or load_spec(name)
    x, y, idx = _data(spec, 4, len(SEEDS))
    images, labels = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(y.astype(np.int32))
    idx = idx.astype(np.int32)
    tx = make_tx("sgd", 0.05, 0.9, 5e-4)
    pop = Population(spec, SEEDS, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    for k in range(2):  # one step per call, then two in one lax.scan
        values, _ = pop.train_step(images, labels, idx[k], k)
        assert values.shape == (len(SEEDS),)
    values, correct = pop.train_steps(images, labels, idx[2:], 2)
    assert values.shape == (len(SEEDS), 2) and correct.shape == (len(SEEDS),)
    alone_step = None  # one compiled single-run step: the seed is its argument
    for m, seed in enumerate(SEEDS):
        graphdef, _, params, stats, rest = split_for_training(jax_build(spec, seed))
        alone_step = alone_step or jax.jit(make_step(graphdef, tx, jax_loss("ce")))
        state = (params, stats, tx.init(params))
        for k in range(4):
            state, alone, _ = alone_step(state, rest, images, labels, idx[k, m], np.int32(k),
                                         np.uint32(seed), np.float32(1))
        assert _gap(state[:2], member(pop.state[:2], m)) < MEMBER_TOL, seed
        np.testing.assert_allclose(values[m, -1], alone, rtol=1e-5)
        single = get_weights(nnx.merge(graphdef, state[0], state[1], rest))
        mine = pop.weights(m)
        assert set(mine) == set(single)
        assert max(np.max(np.abs(mine[k] - single[k])) for k in single) < MEMBER_TOL
    # the members differ: their own seeds, batches (and masks)
    assert _gap(member(pop.state[0], 0), member(pop.state[0], 1)) > 1e-2
    loss_sum, correct = pop.evaluate(images[:32], labels[:32])
    assert loss_sum.shape == (len(SEEDS),) and np.all(np.asarray(correct) <= 32)


def test_torch_member_is_the_single_run_at_its_seed() -> None:
    spec = without_dropout(load_spec("lenet5_bn"))  # torch's members draw their own masks
    x, y, idx = _data(spec, 3, len(SEEDS))
    images, labels, idx = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(idx)
    pop = TorchPopulation(spec, SEEDS, optimizer="sgd", lr=0.05, momentum=0.9,
                          weight_decay=5e-4)
    values, correct = pop.train_step(images, labels, idx[0], 0)
    assert values.shape == (len(SEEDS),) and correct.shape == (len(SEEDS),)
    values, correct = pop.train_steps(images, labels, idx[1:], 1)
    assert values.shape == (len(SEEDS), 2) and correct.shape == (len(SEEDS),)
    for m, seed in enumerate(SEEDS):
        net = torch_build(spec, seed=seed, kernels="stock")
        opt = make_optimizer(net, "sgd", 0.05, momentum=0.9, weight_decay=5e-4)
        for k in range(3):
            opt.zero_grad()
            torch_loss("ce")(net(images[idx[k, m]]), labels[idx[k, m]]).backward()
            opt.step()
        mine = pop.weights(m)
        for name, value in net.state_dict().items():
            gap = np.max(np.abs(value.detach().numpy() - mine[name]))
            assert gap < MEMBER_TOL, (seed, name, gap)
    loss_sum, correct = pop.evaluate(images[:32], labels[:32])
    assert loss_sum.shape == (len(SEEDS),) and bool((correct <= 32).all())


@SLOW
def test_torch_population_draws_a_mask_per_member() -> None:
    x, y, idx = _data(DROPOUT, 1, 2)
    pop = TorchPopulation(DROPOUT, [3, 3], lr=0.1)  # two copies of one network
    idx = torch.from_numpy(idx)
    idx[:, 1] = idx[:, 0]  # on the same batch
    pop.train_step(torch.from_numpy(x), torch.from_numpy(y), idx[0], 0)
    a, b = pop.weights(0), pop.weights(1)
    assert max(np.max(np.abs(a[k] - b[k])) for k in a) > 1e-4  # only the masks differ
