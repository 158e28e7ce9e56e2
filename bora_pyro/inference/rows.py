r"""Row-wise lazy AdamW for ``[D, P]`` tables of per-task parameters, stored on the compute device
or in host memory.

A step of BoRA touches only the tasks of its minibatch (docs/many-tasks.md). `LazyAdamW` keeps
AdamW's two moments per entry and a step count *per row* and, at each step, updates only the
rows that the step gathered (`LazyAdamW.gather`), as ``torch.optim.SparseAdam`` and TensorFlow's
LazyAdam do. For a row ``d`` updated for the ``t_d``-th time, with gradient ``g``::

    theta_d <- theta_d (1 - lr wd)
    m_d <- beta1 m_d + (1 - beta1) g            v_d <- beta2 v_d + (1 - beta2) g^2
    theta_d <- theta_d - lr / (1 - beta1^t_d) * m_d / (sqrt(v_d / (1 - beta2^t_d)) + eps)

which is `torch.optim.AdamW`'s update with the bias corrections counted in the row's own
steps (SparseAdam counts all steps, so a row first touched at step 1000 would move
``sqrt(1 - beta2^1000) / (1 - beta2) ~ 30x`` too far relative to its first gradient, and
SparseAdam has no weight decay and no host storage). Rows absent from a step keep their
values and moments. When every row is present at every step this is exactly AdamW.

Ordinary parameters (the global adapter ``[P]``) sit in the same optimiser as groups without
``rows``: they are updated every step from ``p.grad`` with the same formula (one row), so one
`torch.optim.lr_scheduler` schedule and one ``state_dict`` cover everything.

A row group's parameter is the ``[D, P]`` table itself (a plain tensor, not a leaf of the
autograd graph), on the storage device: the compute device or the CPU. `LazyAdamW.gather`
copies the rows of a step to the compute device as leaves that require grad; `LazyAdamW.step`
updates those rows and writes them back. Its state (``exp_avg``, ``exp_avg_sq`` ``[D, P]`` and
``row_step`` ``[D]``, float32) lives with the table.

**Staging (host tables, CUDA compute).** Neither the tables nor their state are pinned (page-
locking many GiB is slow and can fail); what is pinned is a staging area per table: two slots,
used alternately by successive steps, each holding ``value``, ``exp_avg``, ``exp_avg_sq``
``[K_max, P]`` and ``row_step`` ``[K_max]``, where ``K_max`` is the largest number of rows a
step has gathered (a slot grows when a step gathers more). A step then runs as follows:

1. `gather`: apply the previous step's write-back (`flush`), then ``index_select`` the K rows
   of the table into the slot (a host memcpy, synchronous) and copy them to the device with
   ``non_blocking=True`` (from pinned memory: queued on the current CUDA stream, the host goes
   on at once);
2. `step`: the same for the rows' moments and step counts, AdamW on the device, then the
   updated rows, moments and step counts are copied device -> slot with ``non_blocking=True``
   and a CUDA event is recorded after them. The host does not wait: the table is not yet
   updated;
3. `flush` (called by the next `gather`, by `state_dict`, `load_state_dict`, `state_bytes`,
   and by whoever else reads the tables: `run_steps` calls it before the tau update of a
   learned tau and before validation, snapshots and checkpoints) waits for that event and
   ``index_copy_``-s the slot into the table and its state (host memcpy, synchronous).

So the host waits for the device once per step, at the next `gather` (a row updated at step t
and gathered at step t+1 sees its new value), instead of at each of the four blocking
device -> pageable copies of the unstaged path; what overlaps with the device's step is the
host's work between two steps (the loop's bookkeeping, collating and moving the next batch;
with a learned tau `run_steps` flushes before the tau update, so the wait comes earlier). The
host-side ``index_select`` into a slot and ``index_copy_`` out of it stay synchronous. Each
slot's event is waited on before the host writes into the slot again; with two slots that is
the event of the step before last, normally long done, so a gather never overwrites rows whose
copy to the device may still be queued (also when a step was abandoned after its gather). The
results are bit-identical to the unstaged path (the same rows, the same arithmetic;
tests/inference/test_rows.py). None of this has been timed on a GPU in this project (no GPU
was at hand): the overlap is by construction, not measured. ``staging=True`` forces the staged
path with CPU compute (no events, and the slots are then the gathered rows themselves), which
is how the CPU tests exercise the slots, their growth and the deferred write-back; the
``cuda``-marked test compares the pinned path with device storage.
"""

from __future__ import annotations

import torch

from .. import checks

__all__ = ["LazyAdamW", "resolve_storage", "HOST_SHARE"]

#: ``adapter_storage="auto"`` keeps the tables on the accelerator while their bytes (values and
#: AdamW state) stay under this share of its free memory.
HOST_SHARE = 0.5


def resolve_storage(storage: str, device: torch.device, nbytes: int) -> torch.device:
    """Where the ``[D, P]`` tables live: ``device`` or the CPU.

    Parameters
    ----------
    storage
        ``"device"``, ``"host"`` or ``"auto"`` (host when ``nbytes`` exceed `HOST_SHARE` of the
        accelerator's free memory; on a CPU device both are the same memory).
    device
        The compute device.
    nbytes
        Bytes of the tables and their optimiser state.
    """
    checks.choice("adapter_storage", storage, ("auto", "device", "host"))
    if storage == "host" or device.type == "cpu":
        return torch.device("cpu")
    if storage == "device":
        return device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return torch.device("cpu") if nbytes > HOST_SHARE * free else device
    return device


def host_table(values: torch.Tensor, storage: torch.device, compute: torch.device) -> torch.Tensor:
    """``values`` as a float32 table on ``storage`` (a contiguous copy). It is not pinned: with
    CUDA compute, `LazyAdamW` copies rows through its pinned staging slots (module docstring).
    ``compute`` (the device the rows are computed on) does not change the table."""
    return values.detach().to(storage, torch.float32).contiguous().clone()


class _Slot:
    """One staging slot of a table: ``value``, ``exp_avg``, ``exp_avg_sq`` ``[K_max, P]`` and
    ``row_step`` ``[K_max]`` on the CPU (pinned with CUDA compute), and the CUDA event recorded
    after the last copy queued from or into them (``None`` with CPU compute)."""

    KEYS = ("value", "exp_avg", "exp_avg_sq", "row_step")

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.event = None

    def wait(self) -> None:
        """Block the host until the copies queued from or into this slot are done."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def rows(self, table: torch.Tensor, k: int, pin: bool) -> dict[str, torch.Tensor]:
        """The first ``k`` rows of every buffer (``[k, P]``, ``row_step`` ``[k]``), after waiting
        for the slot's copies; the buffers grow to ``k`` rows when they are smaller."""
        self.wait()
        if not self.buffers or self.buffers["value"].shape[0] < k:
            shapes = {"value": (k, table.shape[1]), "exp_avg": (k, table.shape[1]),
                      "exp_avg_sq": (k, table.shape[1]), "row_step": (k,)}
            self.buffers = {key: torch.empty(shape, dtype=torch.float32, pin_memory=pin)
                            for key, shape in shapes.items()}
        return {key: buf[:k] for key, buf in self.buffers.items()}

    def record(self, compute: torch.device) -> None:
        """Mark the copies queued so far on ``compute``'s current stream (CUDA only)."""
        if compute.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(compute))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class LazyAdamW(torch.optim.Optimizer):
    """AdamW over ordinary parameters and row-wise lazy AdamW over ``[D, P]`` tables.

    Parameters
    ----------
    groups
        Parameter groups as for `torch.optim.AdamW`; a group with ``"rows": True`` holds one
        ``[D, P]`` table (see the module docstring).
    compute
        The device the gathered rows are computed on.
    lr, betas, eps, weight_decay
        As in `torch.optim.AdamW` (defaults of each group).
    staging
        Copy rows through pinned, double-buffered staging slots and write them back lazily (see
        the module docstring); every table must then be on the CPU. ``None``: on when the
        tables are on the CPU and ``compute`` is CUDA. The results are the same either way.
    """

    def __init__(self, groups: list[dict], *, compute: torch.device, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, staging: bool | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rows=False)
        super().__init__(groups, defaults)
        tables = [group["params"][0] for group in self.param_groups if group["rows"]]
        for group in self.param_groups:
            if group["rows"] and (len(group["params"]) != 1 or group["params"][0].dim() != 2):
                raise ValueError("A rows group holds exactly one [D, P] table.")
        self.compute = torch.device(compute)
        on_host = all(t.device.type == "cpu" for t in tables)
        if staging and not on_host:
            devices = sorted({str(t.device) for t in tables})
            raise ValueError(
                f"staging=True copies rows through host memory, but tables are on {devices}; "
                "keep the tables on the CPU (adapter_storage='host') or pass staging=None."
            )
        #: Whether rows go through the staging slots (module docstring).
        self.staging = bool(tables) and (on_host and self.compute.type == "cuda" if staging is None else staging)
        self._gathered: dict[int, tuple[torch.Tensor, torch.Tensor, _Slot | None]] = {}
        #: Two staging slots per table (by ``id(table)``), and how many gathers used them.
        self._slots: dict[int, tuple[list[_Slot], list[int]]] = {}
        #: Write-backs queued by `step`, not yet applied: ``(table, idx [K], slot, K)``.
        self._pending: list[tuple[torch.Tensor, torch.Tensor, _Slot, int]] = []

    def _state(self, p: torch.Tensor, rows: int) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["row_step"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
        return state

    def _next_slot(self, table: torch.Tensor) -> _Slot:
        """The slot of ``table`` that the gather before last used (the two alternate)."""
        slots, used = self._slots.setdefault(id(table), ([_Slot(), _Slot()], [0]))
        used[0] += 1
        return slots[used[0] % 2]

    def flush(self) -> None:
        """Apply the write-backs that `step` queued (waiting for their copies from the device):
        afterwards the tables and their state hold every step's update. Called by `gather`,
        `state_dict`, `load_state_dict` and `state_bytes`; call it before reading the tables
        otherwise. A no-op without staging or when nothing is queued."""
        for table, idx, slot, k in self._pending:
            slot.wait()
            rows = {key: buf[:k] for key, buf in slot.buffers.items()}
            state = self.state[table]
            table.index_copy_(0, idx, rows["value"])
            for key in ("exp_avg", "exp_avg_sq", "row_step"):
                state[key].index_copy_(0, idx, rows[key])
        self._pending.clear()

    def gather(self, index: torch.Tensor) -> dict[int, torch.Tensor]:
        """The rows ``index`` (``LongTensor [K]`` on the CPU, distinct) of every table, as leaves
        ``[K, P]`` on the compute device that require grad, by ``id(table)``; `step` updates
        exactly these rows."""
        self.flush()
        out = {}
        self._gathered.clear()
        for group in self.param_groups:
            if not group["rows"]:
                continue
            table = group["params"][0]
            idx = index.to(table.device, non_blocking=True)
            slot = None
            if self.staging:
                slot = self._next_slot(table)
                staged = slot.rows(table, idx.shape[0], self.compute.type == "cuda")["value"]
                torch.index_select(table, 0, idx, out=staged)
                leaf = staged.to(self.compute, non_blocking=True)
                slot.record(self.compute)
            else:
                leaf = table.index_select(0, idx).to(self.compute, non_blocking=True)
            leaf.requires_grad_(True)
            self._gathered[id(table)] = (idx, leaf, slot)
            out[id(table)] = leaf
        return out

    def gathered_grads(self) -> list[torch.Tensor]:
        """Gradients of the rows of the last `gather` (after the backward pass)."""
        return [leaf.grad for _, leaf, _ in self._gathered.values() if leaf.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("LazyAdamW.step takes no closure.")
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if group["rows"]:
                    gathered = self._gathered.get(id(p))
                    if gathered is None or gathered[1].grad is None:
                        continue
                    idx, leaf, slot = gathered
                    state = self._state(p, p.shape[0])
                    value, grad = leaf.detach(), leaf.grad
                    if slot is None:
                        m = state["exp_avg"].index_select(0, idx).to(self.compute, non_blocking=True)
                        v = state["exp_avg_sq"].index_select(0, idx).to(self.compute, non_blocking=True)
                        t = state["row_step"].index_select(0, idx).to(self.compute, non_blocking=True) + 1
                        _adamw_rows(value, grad, m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps, wd=wd)
                        p.index_copy_(0, idx, value.to(p.device))
                        state["exp_avg"].index_copy_(0, idx, m.to(p.device))
                        state["exp_avg_sq"].index_copy_(0, idx, v.to(p.device))
                        state["row_step"].index_copy_(0, idx, t.to(p.device))
                        continue
                    # the slot of this gather: its copies from the host are queued before these
                    staged = {key: buf[:idx.shape[0]] for key, buf in slot.buffers.items()}
                    for key in ("exp_avg", "exp_avg_sq", "row_step"):
                        torch.index_select(state[key], 0, idx, out=staged[key])
                    m = staged["exp_avg"].to(self.compute, non_blocking=True)
                    v = staged["exp_avg_sq"].to(self.compute, non_blocking=True)
                    t = staged["row_step"].to(self.compute, non_blocking=True) + 1
                    _adamw_rows(value, grad, m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps, wd=wd)
                    for key, rows in zip(_Slot.KEYS, (value, m, v, t)):
                        staged[key].copy_(rows, non_blocking=True)
                    slot.record(self.compute)
                    self._pending.append((p, idx, slot, idx.shape[0]))
                else:
                    if p.grad is None:
                        continue
                    state = self._state(p, 1)
                    state["row_step"].add_(1)
                    _adamw_rows(p.view(1, -1), p.grad.view(1, -1), state["exp_avg"].view(1, -1),
                                state["exp_avg_sq"].view(1, -1), state["row_step"],
                                lr=lr, beta1=beta1, beta2=beta2, eps=eps, wd=wd)
        self._gathered.clear()

    def state_dict(self) -> dict:
        """`torch.optim.Optimizer.state_dict`, after `flush` (its tensors are the live ones)."""
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """`torch.optim.Optimizer.load_state_dict`, after `flush` (so that no queued write-back
        lands on the loaded state)."""
        self.flush()
        super().load_state_dict(state_dict)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the parameters and their optimiser state, by device type (``"cpu"``,
        ``"cuda"``, ...), gathered rows not included; the staging slots (``2 x 3 x K_max x P +
        2 x K_max`` floats per table, pinned) under ``"staging"``."""
        self.flush()
        out: dict[str, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                tensors = [p] + [v for v in self.state.get(p, {}).values() if torch.is_tensor(v)]
                for t in tensors:
                    out[t.device.type] = out.get(t.device.type, 0) + t.numel() * t.element_size()
        staging = sum(slot.nbytes() for slots, _ in self._slots.values() for slot in slots)
        if staging:
            out["staging"] = staging
        return out


def _adamw_rows(value, grad, m, v, t, *, lr, beta1, beta2, eps, wd) -> None:
    """AdamW on rows, in place: ``value``, ``grad``, ``m``, ``v`` ``[K, P]``, ``t`` ``[K]`` the
    rows' step counts (this step included)."""
    if wd:
        value.mul_(1 - lr * wd)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = t.unsqueeze(-1)
    step_size = lr / (1 - torch.pow(beta1, t))           # [K, 1]
    bias2_sqrt = (1 - torch.pow(beta2, t)).sqrt_()       # [K, 1]
    denom = (v.sqrt() / bias2_sqrt).add_(eps)
    value.sub_(m / denom * step_size)
