"""Row-wise lazy AdamW (`bora_pyro.inference.rows`)."""

import copy

import pytest
import torch

from bora_pyro.inference.rows import LazyAdamW, resolve_storage


def _grad(step, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + step))


def _lazy(table, glob, **kw):
    return LazyAdamW([{"params": [glob], "name": "global"}, {"params": [table], "name": "rows", "rows": True}],
                     compute=torch.device("cpu"), **kw)


def _lazy_step(opt, table, glob, index, step):
    rows = opt.gather(index)[id(table)]
    opt.zero_grad()
    (rows * _grad(step, rows.shape)).sum().backward()  # gradient of the rows: the drawn tensor
    glob.grad = _grad(-step, glob.shape)
    opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_every_row_every_step_is_adamw(weight_decay):
    """All rows present at every step: the same values as torch's AdamW (to 1e-6)."""
    table, glob = torch.randn(5, 7), torch.randn(7)
    ref_table, ref_glob = torch.nn.Parameter(table.clone()), torch.nn.Parameter(glob.clone())
    ref = torch.optim.AdamW([ref_glob, ref_table], lr=0.01, weight_decay=weight_decay)
    glob = torch.nn.Parameter(glob)
    opt = _lazy(table, glob, lr=0.01, weight_decay=weight_decay)
    for step in range(20):
        _lazy_step(opt, table, glob, torch.arange(5), step)
        ref.zero_grad()
        ref_table.grad, ref_glob.grad = _grad(step, (5, 7)), _grad(-step, (7,))
        ref.step()
    torch.testing.assert_close(table, ref_table.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(glob.detach(), ref_glob.detach(), atol=1e-6, rtol=1e-6)


def test_absent_rows_keep_values_and_moments_and_bias_correction_counts_each_rows_steps():
    table, glob = torch.randn(4, 3), torch.nn.Parameter(torch.randn(3))
    opt = _lazy(table, glob, lr=0.1)
    for step in range(6):  # rows 0 and 1 only
        _lazy_step(opt, table, glob, torch.tensor([1, 0]), step)
    untouched = table[2:].clone()
    state = opt.state[table]
    assert state["row_step"].tolist() == [6, 6, 0, 0]
    assert state["exp_avg"][2:].abs().sum() == 0
    before = table[3].clone()
    rows = opt.gather(torch.tensor([3]))[id(table)]
    opt.zero_grad()
    (rows * torch.tensor([[1.0, -2.0, 0.5]])).sum().backward()
    opt.step()
    # A row's first update, whatever the global step: AdamW's first step, lr * sign(g) (to eps).
    torch.testing.assert_close(table[3], before - 0.1 * torch.tensor([1.0, -1.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(table[2], untouched[0])
    assert state["row_step"].tolist() == [6, 6, 0, 1]


def test_state_dict_round_trip_continues_exactly():
    def make():
        table, glob = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.nn.Parameter(torch.zeros(4))
        return table, glob, _lazy(table, glob, lr=0.05)

    table, glob, opt = make()
    index = [torch.tensor([0, 3]), torch.tensor([5]), torch.tensor([3, 2, 1])]
    for step in range(3):
        _lazy_step(opt, table, glob, index[step], step)
    saved = copy.deepcopy(opt.state_dict())  # its tensors are the live ones, as in torch
    values = table.clone(), glob.detach().clone()
    for step in range(3, 6):
        _lazy_step(opt, table, glob, index[step % 3], step)
    table2, glob2, opt2 = make()
    table2.copy_(values[0])
    with torch.no_grad():
        glob2.copy_(values[1])
    opt2.load_state_dict(saved)
    for step in range(3, 6):
        _lazy_step(opt2, table2, glob2, index[step % 3], step)
    assert torch.equal(table, table2) and torch.equal(glob, glob2)


def test_storage_choice():
    cpu = torch.device("cpu")
    assert resolve_storage("auto", cpu, 10**12) == cpu
    assert resolve_storage("host", cpu, 1) == cpu
    with pytest.raises(ValueError, match="adapter_storage='hots' is not valid"):
        resolve_storage("hots", cpu, 1)
    with pytest.raises(ValueError, match=r"one \[D, P\] table"):
        LazyAdamW([{"params": [torch.zeros(3)], "rows": True}], compute=cpu, lr=0.1)
