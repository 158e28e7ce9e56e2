"""Row-wise lazy AdamW (`bora_pyro.inference.rows`)."""

import copy
import functools

import numpy as np
import pytest
import torch

import bora_pyro
from bora_pyro.data import build_corpus
from bora_pyro.inference import loop
from bora_pyro.inference.rows import LazyAdamW, resolve_storage
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm


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


# ----------------------------------------------------------------------------- staging

def _staging_run(staging, steps, *, compute="cpu", storage="cpu", state_at=None):
    """``steps`` steps on a ``[12, 5]`` table and a global ``[5]`` with random, overlapping row
    sets (fixed seeds): K grows (2, 5, 9, then any 1..12) and row 3 is in every step. Returns
    the table, the global parameter, the state dict at step ``state_at`` (on the CPU), the
    optimiser and each step's K."""
    g = torch.Generator().manual_seed(7)
    table = torch.randn(12, 5, generator=g).to(storage)
    glob = torch.nn.Parameter(torch.randn(5, generator=g).to(compute))
    opt = LazyAdamW([{"params": [glob], "name": "global"}, {"params": [table], "name": "rows", "rows": True}],
                    compute=torch.device(compute), lr=0.05, weight_decay=0.1, staging=staging)
    saved, ks = None, []
    for step in range(steps):
        k = (2, 5, 9)[step] if step < 3 else int(torch.randint(1, 13, (), generator=g))
        ks.append(k)
        others = torch.randperm(11, generator=g)[:k - 1]
        index = torch.cat([torch.tensor([3]), others + (others >= 3).long()])[torch.randperm(k, generator=g)]
        rows = opt.gather(index)[id(table)]
        opt.zero_grad()
        (rows * _grad(step, rows.shape).to(compute)).sum().backward()
        glob.grad = _grad(-step, glob.shape).to(compute)
        opt.step()
        if step == state_at:
            saved = copy.deepcopy(_to_cpu(opt.state_dict()))
    opt.flush()
    return table.cpu(), glob.detach().cpu(), saved, opt, ks


def _to_cpu(state):
    return {"state": {k: {n: t.cpu() for n, t in s.items()} for k, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def _assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name in a["state"][k]:
            assert torch.equal(a["state"][k][name], b["state"][k][name]), (k, name)


def test_staged_deferred_write_back_is_bit_identical_to_the_direct_path():
    """30 steps of random, overlapping rows (K growing, one row in every step): the staged
    path (slots, lazy write-back) leaves exactly the tables and state of the direct one, and a
    state dict taken mid-run (which applies the queued write-back) is the direct one's."""
    direct = _staging_run(False, 30, state_at=14)
    staged = _staging_run(True, 30, state_at=14)
    assert direct[3].staging is False and staged[3].staging is True
    assert torch.equal(direct[0], staged[0]) and torch.equal(direct[1], staged[1])
    _assert_same_state(direct[2], staged[2])
    _assert_same_state(_to_cpu(direct[3].state_dict()), _to_cpu(staged[3].state_dict()))
    # the two slots alternate and each grew to the largest K it held: 3 [K, 5] buffers + [K]
    ks = staged[4]
    assert staged[3].state_bytes()["staging"] == (max(ks[0::2]) + max(ks[1::2])) * (3 * 5 + 1) * 4


def test_the_write_back_waits_for_a_reader_and_a_row_sees_its_last_update():
    table, glob = torch.zeros(4, 2), torch.nn.Parameter(torch.zeros(2))
    opt = _lazy(table, glob, lr=0.1, staging=True)
    _lazy_step(opt, table, glob, torch.tensor([2, 0]), 0)
    assert table.abs().sum() == 0  # queued, not applied
    rows = opt.gather(torch.tensor([0]))[id(table)]  # the next gather applies it first
    assert table[1].abs().sum() == 0 and table[0].abs().sum() > 0 and table[2].abs().sum() > 0
    torch.testing.assert_close(rows.detach(), table[:1])
    assert opt.state[table]["row_step"].tolist() == [1, 0, 1, 0]


def test_staging_needs_tables_on_the_host():
    meta = torch.zeros(3, 2, device="meta")
    with pytest.raises(ValueError, match=r"staging=True copies rows through host memory, but tables are on \['meta'\]"):
        LazyAdamW([{"params": [meta], "rows": True}], compute=torch.device("cpu"), lr=0.1, staging=True)
    assert LazyAdamW([{"params": [torch.zeros(3, 2)], "rows": True}], compute=torch.device("cpu"), lr=0.1).staging is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_staging_on_cuda_matches_device_storage():
    """Host tables with CUDA compute (pinned slots, non-blocking copies, events: the default)
    against tables on the device: the same values after 30 steps, to 1e-6 (the same kernels
    on the same device; the copies do not change a bit, so equality is expected)."""
    host = _staging_run(None, 30, compute="cuda", storage="cpu", state_at=14)
    device = _staging_run(None, 30, compute="cuda", storage="cuda", state_at=14)
    assert host[3].staging is True and device[3].staging is False
    assert all(b.is_pinned() for slots, _ in host[3]._slots.values() for s in slots for b in s.buffers.values())
    torch.testing.assert_close(host[0], device[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(host[1], device[1], atol=1e-6, rtol=0)
    for k, state in host[2]["state"].items():
        for name, t in state.items():
            torch.testing.assert_close(t, device[2]["state"][k][name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fit, tau", [("fit_map", 100.0), ("fit_map", "learn"), ("fit_svi", "learn")])
def test_fits_with_staging_forced_are_bit_identical(monkeypatch, fit, tau):
    """A sparse, host-storage fit with a validation every 4 steps, with the staged path forced
    on the CPU (its write-back applied by `run_steps` before a learned tau's update, before the
    validations and before the final snapshot) equals the direct one bit for bit."""
    corpus = build_corpus(synthetic_corpus_frame((6, 6, 6, 6), words_per_doc=(3, 5)), char_tokenizer(),
                          max_length=24, test_size=0.0, validation_size=0.25, seed=0)
    results = []
    for staging in (False, True):
        monkeypatch.setattr(loop, "LazyAdamW", functools.partial(LazyAdamW, staging=staging))
        torch.manual_seed(0)
        results.append(getattr(bora_pyro, fit)(
            corpus, model=tiny_causal_lm("llama", hidden_size=16, num_layers=1), tokenizer=char_tokenizer(),
            rank=2, alpha=4.0, target_modules=["q_proj"], tau=tau, tau_warmup=2, tau_update_every=3,
            max_steps=12, eval_every=4, batch_size=4, task_step="sparse", adapter_storage="host",
            device="cpu", progress=False, seed=0))
    direct, staged = results
    for name in ("task_adapters", "global_adapter", "task_scales"):
        a, b = getattr(direct, name), getattr(staged, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert direct.tau == staged.tau
    for key in ("loss", "val_nll", "tau"):  # NaN where not validated: compared as equal
        np.testing.assert_array_equal(np.array(direct.history[key]), np.array(staged.history[key]))
