"""VkD parity options (issue 14): the projector's starting frame (identity, featkd's default; a
uniformly random orthonormal frame as the official code; or a random generator), seeded; weight
decay cannot collapse it."""

from __future__ import annotations

import pytest
import torch

from featkd import ChoiceError, OrthogonalProjector, VkDLoss, orthogonality_error

MAPS = ["matrix_exp", "cayley", "householder"]
RANDOM_INITS = ["random", "random_frame"]


def frame(loss_fn: VkDLoss) -> torch.Tensor:
    return loss_fn.projector.weight.detach()


def test_identity_is_the_default():
    loss_fn = VkDLoss(student_dim=4, teacher_dim=10)
    assert loss_fn.projector.init == "identity"
    assert torch.equal(frame(loss_fn), torch.eye(10, 4))
    assert "init='identity'" in repr(loss_fn)


@pytest.mark.parametrize("init", RANDOM_INITS)
@pytest.mark.parametrize("map", MAPS)
def test_random_frame_is_orthonormal_and_not_the_identity(map, init):
    loss_fn = VkDLoss(student_dim=6, teacher_dim=20, map=map, init=init, seed=0)
    weight = frame(loss_fn)
    assert float(orthogonality_error(weight)) < 1e-5
    assert float((weight - torch.eye(20, 6)).norm()) > 0.5
    assert f"init='{init}'" in repr(loss_fn)


def test_random_frame_is_uniform_over_frames_like_the_official_start():
    """A uniformly (Haar) random frame of D_s columns in D_t dimensions puts on average D_s/D_t
    of each column's energy in any fixed D_s-dimensional subspace (here the identity columns');
    "random" (a random generator) stays much closer to the identity columns."""

    def top_energy(init, seed):
        weight = frame(VkDLoss(student_dim=8, teacher_dim=64, init=init, seed=seed))
        return float(weight[:8].square().sum() / 8)

    uniform = sum(top_energy("random_frame", seed) for seed in range(20)) / 20
    near = sum(top_energy("random", seed) for seed in range(20)) / 20
    assert uniform == pytest.approx(8 / 64, abs=0.03)
    assert near > 0.3


def test_random_frame_starts_at_its_base_and_survives_a_state_dict_round_trip():
    proj = OrthogonalProjector(6, 20, init="random_frame", seed=2, dtype=torch.float64)
    torch.testing.assert_close(proj.weight, proj.base[:, :6], rtol=0, atol=1e-12)
    assert float(orthogonality_error(proj.base)) < 1e-12
    with torch.no_grad():
        proj.generator.normal_(0.0, 0.1)  # as after training
    clone = OrthogonalProjector(6, 20, init="random_frame", seed=9, dtype=torch.float64)
    clone.load_state_dict(proj.state_dict())
    torch.testing.assert_close(clone.weight, proj.weight, rtol=0, atol=0)
    assert "base" not in dict(proj.named_parameters())  # fixed, not trained


@pytest.mark.parametrize("init", RANDOM_INITS)
@pytest.mark.parametrize("map", MAPS)
def test_random_frame_is_reproducible_with_a_seed(map, init):
    def build(seed):
        return frame(VkDLoss(student_dim=6, teacher_dim=20, map=map, init=init, seed=seed))

    assert torch.equal(build(3), build(3))
    assert not torch.equal(build(3), build(4))
    # a torch.Generator is consumed: two draws from it differ, the same state repeats
    assert torch.equal(build(torch.Generator().manual_seed(5)), build(5))
    generator = torch.Generator().manual_seed(5)
    assert not torch.equal(build(generator), build(generator))


def test_global_rng_without_a_seed():
    torch.manual_seed(11)
    first = frame(VkDLoss(student_dim=3, teacher_dim=8, init="random"))
    torch.manual_seed(11)
    assert torch.equal(first, frame(VkDLoss(student_dim=3, teacher_dim=8, init="random")))


def test_seed_on_the_projector_and_reset_parameters():
    proj = OrthogonalProjector(5, 12, init="random", seed=7, dtype=torch.float64)
    drawn = proj.weight.detach()
    proj.reset_parameters(7)
    assert torch.equal(proj.weight.detach(), drawn)
    assert float(orthogonality_error(drawn)) < 1e-12


def test_options_are_checked():
    with pytest.raises(ChoiceError, match=r"init: expected one of 'identity', 'random'"):
        VkDLoss(student_dim=4, teacher_dim=8, init="orthogonal")
    with pytest.raises(ChoiceError, match=r"seed: expected None, an integer seed"):
        VkDLoss(student_dim=4, teacher_dim=8, init="random", seed=-1)


@pytest.mark.parametrize("map", MAPS)
def test_adamw_weight_decay_keeps_the_projector_orthonormal(map):
    # the official DeiT trap: AdamW weight decay on torch's orthogonal parametrisation collapses
    # the projector after one step; featkd's weight is recomputed from a free generator
    torch.manual_seed(0)
    loss_fn = VkDLoss(student_dim=8, teacher_dim=24, map=map, init="random", seed=0)
    optimiser = torch.optim.AdamW(loss_fn.parameters(), lr=1e-3, weight_decay=0.05)
    student = torch.randn(16, 5, 8, requires_grad=True)
    teacher = torch.randn(16, 24, 2, 2)
    before = frame(loss_fn)
    for _ in range(3):
        optimiser.zero_grad()
        loss_fn(student, teacher).backward()
        optimiser.step()
    after = frame(loss_fn)
    assert float(orthogonality_error(after)) < 1e-5
    assert float((after - before).norm()) < 0.1  # a small step, not a collapse


@pytest.mark.parametrize("map", MAPS)
def test_weight_decay_alone_pulls_towards_the_identity_columns(map):
    loss_fn = VkDLoss(student_dim=4, teacher_dim=12, map=map, init="random", seed=2)
    optimiser = torch.optim.AdamW(loss_fn.parameters(), lr=0.5, weight_decay=1.0)
    distance = float((frame(loss_fn) - torch.eye(12, 4)).norm())
    loss_fn.projector.generator.grad = torch.zeros_like(loss_fn.projector.generator)
    optimiser.step()  # zero gradient: only the decay acts, halving the generator
    weight = frame(loss_fn)
    assert float(orthogonality_error(weight)) < 1e-5
    assert float((weight - torch.eye(12, 4)).norm()) < distance


def test_a_seed_gives_the_same_frame_on_every_device(device):
    # an integer seed draws on the CPU and copies, so the frame does not depend on the device
    here = VkDLoss(student_dim=5, teacher_dim=11, init="random", seed=9, device=device)
    cpu = VkDLoss(student_dim=5, teacher_dim=11, init="random", seed=9)
    assert here.projector.generator.device.type == torch.device(device).type
    torch.testing.assert_close(here.projector.generator.cpu(), cpu.projector.generator.detach())
