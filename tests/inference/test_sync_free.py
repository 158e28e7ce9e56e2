"""A training step reads nothing back from the compute device (docs/many-tasks.md).

On a GPU every read of a device value by the host (``item``, ``tolist``, ``bool(tensor)``,
``nonzero``, ``unique``, a copy to the CPU...) waits for the device to finish all the work
queued before it. These tests count such calls on the CPU with a `torch.overrides.TorchFunctionMode`
that records each call and where it came from, during steps of MAP (dense and sparse) and SVI,
on padded and packed batches, and in the optimisation loop between two reads.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from bora_pyro.config import BoraConfig, TrainConfig
from bora_pyro.data import build_corpus
from bora_pyro.data.batches import task_groups
from bora_pyro.inference import loop
from bora_pyro.export import initial_adapter
from bora_pyro.inference.map import MAPStepper
from bora_pyro.inference.svi import SVIStepper
from bora_pyro.models.builder import build_bora
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

#: Tensor methods and torch functions whose result the host must wait for.
READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
    torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.__array__,
    torch.Tensor.cpu, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.unique, torch.unique,
    torch.unique_consecutive, torch.masked_select, torch.Tensor.masked_select, torch.argwhere,
}


class HostReads(TorchFunctionMode):
    """Records every call in `READS`, and ``.to`` / ``copy_`` from another device to the CPU,
    with the line of library code that made it."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        #: Per call: the names of the library functions on the stack, and `step` at the time.
        self.stacks: list[set[str]] = []
        self.steps: list[int] = []
        self.step = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS or self._to_host(func, args, kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/" not in f.filename]
            where = frames[-1] if frames else None
            self.calls.append(f"{getattr(func, '__name__', func)} at "
                              f"{where.filename}:{where.lineno} ({where.line})" if where else str(func))
            self.stacks.append({f.name for f in frames})
            self.steps.append(self.step)
        return func(*args, **kwargs)

    @staticmethod
    def _to_host(func, args, kwargs) -> bool:
        if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, torch.Tensor):
                target = target.device
            if isinstance(target, (str, torch.device)):
                return torch.device(target).type == "cpu" and args[0].device.type != "cpu"
        if func is torch.Tensor.copy_ and len(args) > 1:
            return args[0].device.type == "cpu" and args[1].device.type != "cpu"
        return False


def test_the_counter_catches_reads_of_device_values():
    def toy(x):
        y = (x * 2).sum()
        if y > 0:                        # bool(tensor)
            y = y + float(x[0]) + x.max().item()
        return y, x.nonzero(), x.tolist()

    with HostReads() as reads:
        toy(torch.arange(3.0))
    names = [c.split(" ")[0] for c in reads.calls]
    assert names == ["__bool__", "__float__", "item", "nonzero", "tolist"], reads.calls
    assert all("test_sync_free.py" in c for c in reads.calls)
    with HostReads() as reads:
        torch.arange(3.0).cumsum(0).to("cpu")
    assert reads.calls == []


FRAME = synthetic_corpus_frame((5, 4, 6, 3, 5, 4))


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(FRAME, char_tokenizer(), max_length=24, seed=0)


def _stepper(corpus, method, task_step, **overrides):
    train = TrainConfig(max_steps=10, batch_size=4, lr=1e-2, device="cpu", progress=False, task_step=task_step,
                        **overrides)
    lm, model = build_bora(tiny_causal_lm("llama", hidden_size=16, num_layers=1), corpus,
                           BoraConfig(tau=10.0, rank=2, alpha=4.0), seed=0)
    init_global = initial_adapter(None, lm.layout, seed=0)
    if method == "map":
        stepper = MAPStepper(model, train, init_global=init_global)
    else:
        stepper = SVIStepper(model, replace(train, init_scale=1e-3), init_global=init_global)
    return stepper


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method, task_step", [("map", "dense"), ("map", "sparse"), ("svi", "dense"),
                                               ("svi", "sparse")])
def test_a_training_step_reads_nothing_from_the_device(corpus, method, task_step, pack):
    stepper = _stepper(corpus, method, task_step)
    assert stepper.sparse == (task_step == "sparse")
    split = corpus.split("train")
    batches = [split.batch(idx, pack=pack) for idx in ([0, 7, 3, 10], [5, 5, 9, 1], [2, 11, 6, 7])]
    first = stepper.prepare(batches[0])
    stepper.setup(first)
    stepper.step(first)  # the first step runs with Pyro's validation, which reads values
    for batch in batches[1:]:
        prepared = stepper.prepare(batch)  # on the host: collation-side bookkeeping
        with HostReads() as reads:
            loss = stepper.step(prepared)
            stepper.after_step(1)
        assert reads.calls == [], "\n".join(reads.calls)
        assert torch.is_tensor(loss) and loss.dim() == 0 and torch.isfinite(loss)


def test_the_loop_reads_the_device_only_at_its_read_points(corpus, monkeypatch):
    """10 steps, reads at steps 0, 3, 7 and 9 (`READ_EVERY` = 4, and the last step): after the
    first (validated) step, the only reads are the loop's one transfer per read point."""
    monkeypatch.setattr(loop, "READ_EVERY", 4)
    stepper = _stepper(corpus, "svi", "sparse")
    split, generator = corpus.split("train"), torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield from split.batches(4, shuffle=True, generator=generator, drop_last=True)

    reads = HostReads()
    step = stepper.step

    def counted(batch):
        reads.step += 1
        return step(batch)

    stepper.step = counted
    seen = []
    with reads:
        state = loop.run_steps(stepper, batches(), on_step=lambda metrics, k: seen.append(k))
    # host-side work: the collation of the next batch (on a GPU, of host tensors), the stepper's
    # bookkeeping before the batch moves, and the final copy of the result
    host_side = {"batches", "batch", "collate", "collate_packed", "prepare", "setup", "snapshot"}
    later = [c for c, stack, k in zip(reads.calls, reads.stacks, reads.steps) if k > 1 and not stack & host_side]
    assert len(later) == 3, "\n".join(later)
    assert all(c.startswith("tolist at ") and "inference/loop.py" in c for c in later), "\n".join(later)
    assert state.history["step"] == seen == list(range(10))
    assert all(np.isfinite(state.history["loss"])) and len(state.history["tau"]) == 10


def test_a_divergence_is_reported_at_its_step_at_the_next_read(corpus, monkeypatch):
    monkeypatch.setattr(loop, "READ_EVERY", 5)
    stepper = _stepper(corpus, "map", "dense")
    split = corpus.split("train")
    step, calls = stepper.step, [0]

    def overflow(batch):  # step 6 overflows; the read at step 9 finds it
        calls[0] += 1
        loss = step(batch)
        return loss * math.inf if calls[0] == 7 else loss

    stepper.step = overflow
    with pytest.raises(FloatingPointError, match=r"^Training diverged at step 6 \(0-based\) of 10: the loss is inf"):
        loop.run_steps(stepper, iter(lambda: split.batch([0, 3, 6, 9]), None))
    assert calls[0] == 10


def test_collated_tasks_match_the_sparse_steps_subsample(corpus):
    stepper = _stepper(corpus, "map", "sparse")
    for pack in (False, True):
        batch = corpus.split("train").batch([7, 0, 7, 3, 11, 0], pack=pack)
        tasks = stepper.model.subsample_tasks(batch.task_ids)
        assert torch.equal(batch.groups.tasks, tasks.index)
        assert torch.equal(batch.groups.local, tasks.local)
        assert torch.equal(batch.groups.tasks[batch.groups.local], batch.task_ids)
        expected = task_groups(batch.task_ids.numpy(), batch.segment_ids)
        assert expected.counts == batch.groups.counts
