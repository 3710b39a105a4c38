"""The empirical NTK (ntksap_fast.analysis.ntk) against closed forms and torch.func.jacrev."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from ntksap_fast import apply_masks
from ntksap_fast.analysis import report
from ntksap_fast.analysis.ntk import check_ntk_size, empirical_ntk, ntk_eigenvalues


def linear(d_in=5, d_out=3) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out).double()


def bool_mask(shape, p=0.5, seed=1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


def closed_form_linear_ntk(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """f(x) = W x: NTK[(a, i), (b, j)] = delta_ij * sum_k keep_ik x_ak x_bk (keep = 1: x_a . x_b delta_ij)."""
    b, o = x.shape[0], keep.shape[0]
    e = torch.einsum("ik,ak,bk->aib", keep.double(), x, x)
    return torch.einsum("aib,ij->aibj", e, torch.eye(o, dtype=torch.float64)).reshape(b * o, b * o)


def test_linear_ntk_closed_form_dense_and_masked():
    model = linear()
    x = torch.randn(4, 5, dtype=torch.float64)
    dense = empirical_ntk(model, x)
    assert dense.shape == (12, 12) and dense.dtype == torch.float64
    torch.testing.assert_close(dense, torch.kron(x @ x.T, torch.eye(3, dtype=torch.float64)))
    keep = bool_mask((3, 5))
    torch.testing.assert_close(empirical_ntk(model, x, {"weight": keep}), closed_form_linear_ntk(x, keep))


def test_linear_eigenvalues_are_gram_eigenvalues_repeated():
    model = linear()
    eig = ntk_eigenvalues(model, input_shape=(5,), batch_size=4, seed=7)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(7)).double()  # the documented inputs
    want = torch.linalg.eigvalsh(x @ x.T).repeat_interleave(3).sort(descending=True).values
    assert torch.all(eig[:-1] >= eig[1:])
    torch.testing.assert_close(eig, want)


def test_mlp_ntk_matches_jacrev_and_leaves_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double().train()
    model[2].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4, dtype=torch.float64)
    masks = {"0.weight": bool_mask((6, 4)), "2.weight": bool_mask((2, 6), seed=2)}
    params = dict(model.named_parameters())

    def f(w0, w2):
        return functional_call(
            model, {**params, "0.weight": w0 * masks["0.weight"], "2.weight": w2 * masks["2.weight"]}, (x,)
        ).reshape(-1)

    jacs = jacrev(f, argnums=(0, 1))(params["0.weight"].detach(), params["2.weight"].detach())
    jac = torch.cat([j.reshape(6, -1) * m.reshape(1, -1) for j, m in zip(jacs, masks.values())], 1)
    torch.testing.assert_close(empirical_ntk(model, x, masks), jac @ jac.T)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model[2].weight.requires_grad and model[0].weight.requires_grad


def test_ntk_size_limit_and_bad_masks():
    model = linear()
    with pytest.raises(ValueError, match="max_jacobian_entries=20"):
        empirical_ntk(model, torch.randn(4, 5, dtype=torch.float64), max_jacobian_entries=20)
    with pytest.raises(ValueError, match="masks"):
        empirical_ntk(model, torch.randn(4, 5, dtype=torch.float64), {"bias": torch.ones(3, dtype=torch.bool)})


def test_check_ntk_size_agrees_with_the_computation():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))  # P = 32, O = 3
    assert check_ntk_size(model, input_shape=(5,), batch_size=8) == 8 * 3 * 32
    before = [m.training for m in model.modules()]
    for limit, words in (
        (8 * 32 - 1, "at least batch \\* params = 256"),
        (8 * 3 * 32 - 1, "batch \\* outputs \\* params = 768"),
    ):
        with pytest.raises(ValueError, match=words):
            check_ntk_size(model, input_shape=(5,), batch_size=8, max_jacobian_entries=limit)
        with pytest.raises(ValueError, match=words):
            ntk_eigenvalues(model, input_shape=(5,), batch_size=8, max_jacobian_entries=limit)
    ntk_eigenvalues(model, input_shape=(5,), batch_size=8, max_jacobian_entries=8 * 3 * 32)
    assert [m.training for m in model.modules()] == before
    with pytest.raises(ValueError, match="batch_size"):
        check_ntk_size(model, input_shape=(5,), batch_size=0)


def test_ntk_of_a_model_carrying_masks_equals_the_ntk_with_those_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    masks = {"0.weight": torch.rand(6, 4) < 0.5, "2.weight": torch.rand(3, 6) < 0.5}
    want = ntk_eigenvalues(model, masks, input_shape=(4,))
    apply_masks(model, masks)  # its weight attributes are computed tensors, not leaves: deepcopy refuses them
    weight = model[0].weight
    torch.testing.assert_close(ntk_eigenvalues(model, input_shape=(4,)), want)
    assert model[0].weight is weight  # the model's own attribute is back


def test_report_re_exports_the_ntk_functions():
    """Code written against ntksap_fast.analysis.report (as the README showed) still imports them."""
    assert (report.check_ntk_size, report.empirical_ntk, report.ntk_eigenvalues) == (
        check_ntk_size,
        empirical_ntk,
        ntk_eigenvalues,
    )
