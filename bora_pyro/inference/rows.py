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
autograd graph), on the storage device: the compute device, or the CPU (pinned when the
compute device is CUDA). `LazyAdamW.gather` copies the rows of a step to the compute device as
leaves that require grad; `LazyAdamW.step` updates those rows and writes them back. Its state
(``exp_avg``, ``exp_avg_sq`` ``[D, P]`` and ``row_step`` ``[D]``, float32) lives with the table.
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
    """``values`` as a table on ``storage`` (a contiguous copy; pinned when it is the CPU and the
    compute device is CUDA, so that row copies can overlap with compute)."""
    table = values.detach().to(storage, torch.float32).contiguous().clone()
    if storage.type == "cpu" and compute.type == "cuda":
        table = table.pin_memory()
    return table


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
    """

    def __init__(self, groups: list[dict], *, compute: torch.device, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rows=False)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["rows"] and (len(group["params"]) != 1 or group["params"][0].dim() != 2):
                raise ValueError("A rows group holds exactly one [D, P] table.")
        self.compute = torch.device(compute)
        self._gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _state(self, p: torch.Tensor, rows: int) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["row_step"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
            if p.is_pinned():
                for key in ("exp_avg", "exp_avg_sq", "row_step"):
                    state[key] = state[key].pin_memory()
        return state

    def gather(self, index: torch.Tensor) -> dict[int, torch.Tensor]:
        """The rows ``index`` (``LongTensor [K]`` on the CPU, distinct) of every table, as leaves
        ``[K, P]`` on the compute device that require grad, by ``id(table)``; `step` updates
        exactly these rows."""
        out = {}
        self._gathered.clear()
        for group in self.param_groups:
            if not group["rows"]:
                continue
            table = group["params"][0]
            idx = index.to(table.device, non_blocking=True)
            leaf = table.index_select(0, idx).to(self.compute, non_blocking=True).requires_grad_(True)
            self._gathered[id(table)] = (idx, leaf)
            out[id(table)] = leaf
        return out

    def gathered_grads(self) -> list[torch.Tensor]:
        """Gradients of the rows of the last `gather` (after the backward pass)."""
        return [leaf.grad for _, leaf in self._gathered.values() if leaf.grad is not None]

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
                    idx, leaf = gathered
                    state = self._state(p, p.shape[0])
                    value, grad = leaf.detach(), leaf.grad
                    m = state["exp_avg"].index_select(0, idx).to(self.compute, non_blocking=True)
                    v = state["exp_avg_sq"].index_select(0, idx).to(self.compute, non_blocking=True)
                    t = state["row_step"].index_select(0, idx).to(self.compute, non_blocking=True) + 1
                    _adamw_rows(value, grad, m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps, wd=wd)
                    p.index_copy_(0, idx, value.to(p.device))
                    state["exp_avg"].index_copy_(0, idx, m.to(p.device))
                    state["exp_avg_sq"].index_copy_(0, idx, v.to(p.device))
                    state["row_step"].index_copy_(0, idx, t.to(p.device))
                else:
                    if p.grad is None:
                        continue
                    state = self._state(p, 1)
                    state["row_step"].add_(1)
                    _adamw_rows(p.view(1, -1), p.grad.view(1, -1), state["exp_avg"].view(1, -1),
                                state["exp_avg_sq"].view(1, -1), state["row_step"],
                                lr=lr, beta1=beta1, beta2=beta2, eps=eps, wd=wd)
        self._gathered.clear()

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the parameters and their optimiser state, by device type (``"cpu"``,
        ``"cuda"``, ...), gathered rows not included."""
        out: dict[str, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                tensors = [p] + [v for v in self.state.get(p, {}).values() if torch.is_tensor(v)]
                for t in tensors:
                    out[t.device.type] = out.get(t.device.type, 0) + t.numel() * t.element_size()
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
