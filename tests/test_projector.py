"""OrthogonalProjector: orthonormal weights under every map, at init, at random parameters and
after long Adam runs (geotorch-style integration), against independent references for each map,
gradients, autocast, state_dict and errors."""

from __future__ import annotations

import math

import pytest
import torch
from references import ref_householder_columns, ref_stiefel_generator

from featkd import ChoiceError, DTypeError, NonFiniteError, ShapeError, orthogonality_error
from featkd._sync import simulate_accelerator
from featkd.vkd import _stiefel
from featkd.vkd.projector import OrthogonalProjector

MAPS = ["matrix_exp", "cayley", "householder"]


def _bound(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-12


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("shape", [(4, 9), (6, 6), (9, 4)])
def test_identity_init(map, shape, device):
    in_f, out_f = shape
    proj = OrthogonalProjector(in_f, out_f, map=map, device=device)
    expected = torch.eye(out_f, in_f, device=device)
    torch.testing.assert_close(proj.weight, expected, rtol=0, atol=0)
    x = torch.randn(5, in_f, device=device)
    torch.testing.assert_close(proj(x), x @ expected.T, rtol=0, atol=0)


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("shape", [(8, 8), (16, 48), (48, 16), (64, 1024), (192, 3024)])
def test_orthonormal_at_random_init(map, shape, dtype):
    proj = OrthogonalProjector(*shape, map=map, init="random", dtype=dtype)
    weight = proj.weight
    assert weight.shape == (shape[1], shape[0])
    assert orthogonality_error(weight) <= _bound(dtype)
    # really rotated away from the identity columns
    assert (weight - torch.eye(*weight.shape, dtype=dtype)).abs().max() > 0.1


@pytest.mark.parametrize("map", ["matrix_exp", "cayley"])
@pytest.mark.parametrize("scale", [3.0, 30.0])
def test_orthonormal_at_large_generators(map, scale, dtype):
    proj = OrthogonalProjector(48, 400, map=map, init="random", dtype=dtype)
    with torch.no_grad():
        proj.generator.mul_(scale)
    assert orthogonality_error(proj.weight) <= _bound(dtype)


def test_matrix_exp_weight_equals_torch_matrix_exp():
    proj = OrthogonalProjector(6, 30, init="random", dtype=torch.float64)
    with torch.no_grad():
        proj.generator.mul_(4.0)
    full = ref_stiefel_generator(proj.generator.detach())
    torch.testing.assert_close(proj.skew_generator().detach(), full, rtol=0, atol=0)
    expected = torch.linalg.matrix_exp(full)[:, :6]
    torch.testing.assert_close(proj.weight.detach(), expected, rtol=0, atol=1e-6)
    assert (proj.weight.detach() - expected).abs().max() < 1e-10


def test_cayley_weight_equals_dense_solve():
    proj = OrthogonalProjector(5, 12, map="cayley", init="random", dtype=torch.float64)
    full = ref_stiefel_generator(proj.generator.detach())
    eye = torch.eye(12, dtype=torch.float64)
    expected = torch.linalg.solve(eye - full / 2, eye + full / 2)[:, :5]
    torch.testing.assert_close(proj.weight.detach(), expected, rtol=0, atol=1e-12)


def test_householder_weight_equals_product_of_reflections():
    proj = OrthogonalProjector(4, 9, map="householder", init="random", dtype=torch.float64)
    expected = ref_householder_columns(proj.generator.detach())
    torch.testing.assert_close(proj.weight.detach(), expected, rtol=0, atol=1e-12)


def test_wide_projector_has_orthonormal_rows():
    proj = OrthogonalProjector(40, 12, init="random", dtype=torch.float64)
    weight = proj.weight.detach()
    assert weight.shape == (12, 40)
    torch.testing.assert_close(
        weight @ weight.T, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0
    )
    x = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(proj(x), x @ weight.T)


def test_norm_preserving_up_and_orthogonal_projection_down():
    up = OrthogonalProjector(16, 64, init="random", dtype=torch.float64)
    x = torch.randn(7, 16, dtype=torch.float64)
    torch.testing.assert_close(up(x).norm(dim=1), x.norm(dim=1))


@pytest.mark.parametrize("map", MAPS)
def test_gradcheck_through_module(map):
    proj = OrthogonalProjector(3, 7, map=map, init="random", dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    gen = proj.generator.detach().clone().requires_grad_()

    def run(inputs, generator):
        return torch.func.functional_call(proj, {"generator": generator}, (inputs,))

    assert torch.autograd.gradcheck(run, (x, gen))


def test_sync_free_module_matches_default():
    adaptive = OrthogonalProjector(8, 40, init="random", dtype=torch.float64)
    fixed = OrthogonalProjector(8, 40, max_squarings=10, dtype=torch.float64)
    fixed.load_state_dict(adaptive.state_dict())
    torch.testing.assert_close(fixed.weight, adaptive.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0, 4.0, 30.0, 300.0])
@pytest.mark.parametrize("shape", [(8, 40), (40, 8), (24, 30)])
def test_accelerator_default_is_sync_free_and_matches_cpu(shape, scale):
    # on accelerators (simulated) max_squarings=None forms 12 squares and selects one instead of
    # reading the norm bound; both must give the exponential to float64 rounding
    cpu = OrthogonalProjector(*shape, init="random", dtype=torch.float64)
    with torch.no_grad():
        cpu.generator.mul_(scale)
    with simulate_accelerator():
        accelerator = cpu.weight
    torch.testing.assert_close(accelerator, cpu.weight, rtol=0, atol=1e-11)
    float32 = OrthogonalProjector(*shape, dtype=torch.float32)
    float32.load_state_dict({"generator": cpu.generator.float()})
    with simulate_accelerator():
        weight = float32.weight
    assert orthogonality_error(weight) <= _bound(torch.float32)
    torch.testing.assert_close(weight.double(), cpu.weight, rtol=0, atol=5e-5)


@pytest.mark.parametrize("shape", [(8, 40), (40, 8), (24, 30)])
def test_accelerator_default_reaches_its_documented_range(shape):
    # 12 squarings at most: still the exponential at ||A||_2 of 4000 to 5000 (3000 times the
    # random init), where the CPU path plans 11 or 12 itself
    cpu = OrthogonalProjector(*shape, init="random", dtype=torch.float64)
    with torch.no_grad():
        cpu.generator.mul_(3000.0)
    skew, tall = _stiefel.stiefel_blocks(cpu.generator)
    assert torch.linalg.matrix_norm(_stiefel.stiefel_generator_matrix(skew, tall), 2) > 4000
    with simulate_accelerator():
        accelerator = cpu.weight
    torch.testing.assert_close(accelerator, cpu.weight, rtol=0, atol=1e-11)


def _adam_run(shape, map, dtype, steps=1000, random_targets=True, batch=8, seed=0, threads=1):
    """Train the projector with Adam (lr 1e-2); return the worst orthogonality error seen.

    Small shapes run thousands of tiny kernels, where intra-op threads only add overhead (and
    stall badly on a busy machine), so they run single-threaded.
    """
    torch.manual_seed(seed)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        in_f, out_f = shape
        proj = OrthogonalProjector(in_f, out_f, map=map, init="random", dtype=dtype)
        optimiser = torch.optim.Adam(proj.parameters(), lr=1e-2)
        target_map = torch.linalg.qr(torch.randn(max(shape), min(shape), dtype=dtype))[0]
        if out_f < in_f:
            target_map = target_map.T
        worst = 0.0
        for step in range(steps):
            x = torch.randn(batch, in_f, dtype=dtype)
            # random targets make the generator wander far (a stress test); a fixed target
            # map is what distillation looks like
            y = torch.randn(batch, out_f, dtype=dtype) if random_targets else x @ target_map.T
            loss = (proj(x) - y).square().mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step % 250 == 249:
                worst = max(worst, float(orthogonality_error(proj.weight)))
    finally:
        torch.set_num_threads(previous_threads)
    return worst, proj


# 1000 Adam steps at lr 1e-2 (the requirement): square, tall and wide shapes.
SWEEP = [
    ((8, 8), torch.float32),
    ((8, 8), torch.float64),
    ((12, 40), torch.float32),
    ((12, 40), torch.float64),
    ((40, 12), torch.float32),
    ((24, 200), torch.float32),
    ((24, 200), torch.float64),
    ((64, 1024), torch.float64),  # a realistic width in float64 (the 1e-12 bound)
]


def _sweep_id(case):
    (in_f, out_f), dtype = case
    return f"{in_f}x{out_f}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("case", SWEEP, ids=_sweep_id)
def test_stays_orthonormal_after_1000_adam_steps(case):
    shape, dtype = case
    worst, proj = _adam_run(shape, "matrix_exp", dtype)
    assert worst <= _bound(dtype)
    # the run really moved the generator far from the identity
    assert proj.generator.detach().abs().max() > 0.3


@pytest.mark.parametrize("map", ["cayley", "householder"])
def test_other_maps_stay_orthonormal_after_1000_adam_steps(map, dtype):
    worst, _ = _adam_run((12, 40), map, dtype)
    assert worst <= _bound(dtype)


@pytest.mark.slow
def test_vkd_shape_stays_orthonormal_after_1000_adam_steps():
    # DeiT-Ti (192) -> RegNetY-160 (3024), the shape VkD uses; a fixed target map, as in
    # distillation (~50 ms per step on one CPU thread, all threads used here)
    worst, proj = _adam_run(
        (192, 3024), "matrix_exp", torch.float32, random_targets=False, batch=64, threads=None
    )
    assert worst <= 1e-5
    assert proj.generator.detach().abs().max() > 0.05


@pytest.mark.parametrize("map", MAPS)
def test_autocast_computes_in_float32_and_returns_input_dtype(map):
    proj = OrthogonalProjector(8, 24, map=map, init="random")
    x = torch.randn(4, 8)
    reference = x @ proj.weight.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = proj(x)
        out_half = proj(x.to(torch.bfloat16))
        weight = proj.weight
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference)
    assert weight.dtype == torch.float32
    assert orthogonality_error(weight) <= 1e-5
    assert out_half.dtype == torch.bfloat16
    torch.testing.assert_close(out_half.float(), reference, atol=0.05, rtol=0.02)


def test_half_parameters_compute_in_float32():
    proj = OrthogonalProjector(8, 24, init="random", dtype=torch.bfloat16)
    assert proj.weight.dtype == torch.float32
    out = proj(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("map", MAPS)
def test_state_dict_round_trip(map, device):
    source = OrthogonalProjector(6, 20, map=map, init="random", device=device)
    with torch.no_grad():
        source.generator.mul_(3.0)
    assert list(source.state_dict()) == ["generator"]
    target = OrthogonalProjector(6, 20, map=map, device=device)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.weight, source.weight, rtol=0, atol=0)


def test_extra_repr():
    text = repr(OrthogonalProjector(192, 3024, map="cayley"))
    assert "in_features=192" in text
    assert "out_features=3024" in text
    assert "map='cayley'" in text
    assert "init='identity'" in text
    assert "max_squarings" in repr(OrthogonalProjector(4, 8, max_squarings=6))


def test_tokens_and_extra_batch_dimensions(device):
    proj = OrthogonalProjector(5, 11, init="random", device=device)
    x = torch.randn(2, 3, 7, 5, device=device)
    out = proj(x)
    assert out.shape == (2, 3, 7, 11)
    torch.testing.assert_close(out, x @ proj.weight.T)


def test_gradient_reaches_generator_only_through_weight():
    proj = OrthogonalProjector(4, 10, init="random")
    proj(torch.randn(3, 4)).sum().backward()
    assert proj.generator.grad is not None
    # the strictly upper triangle of the top block and its diagonal are unused
    top = proj.generator.grad[:4]
    assert torch.count_nonzero(top.triu()) == 0


def test_errors():
    with pytest.raises(ChoiceError, match=r"map: expected one of .*'matrix_exp'.*got 'expm'"):
        OrthogonalProjector(4, 8, map="expm")
    with pytest.raises(ChoiceError, match="init"):
        OrthogonalProjector(4, 8, init="orthogonal")
    with pytest.raises(ChoiceError, match="in_features: expected an integer >= 1, got 0"):
        OrthogonalProjector(0, 8)
    with pytest.raises(ChoiceError, match="out_features"):
        OrthogonalProjector(4, 2.5)
    with pytest.raises(ChoiceError, match="max_squarings: only used by map='matrix_exp'"):
        OrthogonalProjector(4, 8, map="cayley", max_squarings=4)
    with pytest.raises(ChoiceError, match="max_squarings"):
        OrthogonalProjector(4, 8, max_squarings=-1)
    with pytest.raises(ChoiceError, match="dtype"):
        OrthogonalProjector(4, 8, dtype=torch.int64)
    proj = OrthogonalProjector(4, 8)
    with pytest.raises(ShapeError, match=r"x: expected last dimension in_features=4, got 5"):
        proj(torch.randn(3, 5))
    with pytest.raises(DTypeError, match="x: expected a floating-point tensor"):
        proj(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match="scalar"):
        proj(torch.tensor(1.0))
    with pytest.raises(ChoiceError, match="householder"):
        OrthogonalProjector(4, 8, map="householder").skew_generator()


def test_diverged_generator_is_reported():
    proj = OrthogonalProjector(4, 12)
    with torch.no_grad():
        proj.generator[6, 1] = math.inf
    with pytest.raises(NonFiniteError, match="generator: expected finite values"):
        proj(torch.randn(2, 4))


def test_dtype_given_as_a_string_is_a_featkd_error():
    # an AttributeError ('str' object has no attribute 'is_floating_point') before
    with pytest.raises(ChoiceError, match="dtype: expected None or one of torch.float16"):
        OrthogonalProjector(4, 8, dtype="float32")


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0])
def test_unneeded_squares_stay_out_of_value_and_gradient(scale):
    """The accelerator path forms all 12 squares and selects one; with a small, rank-1 ``B``
    (a non-normal companion core) the squares beyond the needed one must not reach the weight
    or its gradient: the weight is float64's to float32 rounding and the gradient finite."""
    gen = torch.Generator().manual_seed(0)
    proj = OrthogonalProjector(16, 64, init="random", seed=0)
    with torch.no_grad():
        proj.generator[16:] = (
            torch.outer(torch.randn(48, generator=gen), torch.randn(16, generator=gen)) / 8
        )
        proj.generator.mul_(scale)
    exact = OrthogonalProjector(16, 64, dtype=torch.float64)
    exact.load_state_dict({"generator": proj.generator.double()})
    with simulate_accelerator():
        weight = proj.weight
        weight.sum().backward()
    torch.testing.assert_close(weight.double(), exact.weight, rtol=0, atol=1e-6)
    assert torch.isfinite(proj.generator.grad).all()
