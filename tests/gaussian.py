"""A Gaussian hierarchical model with a closed-form posterior, run through BoRA's own prior and
inference code: "documents" are vectors y_n ~ Normal(theta_{task(n)}, sigma^2 I)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Normal


@dataclass
class GaussianBatch:
    y: torch.Tensor          # [B, P]
    task_ids: torch.Tensor   # [B]
    doc_index: torch.Tensor  # [B]

    def to(self, device):
        return GaussianBatch(self.y.to(device), self.task_ids.to(device), self.doc_index.to(device))

    def __len__(self):
        return len(self.task_ids)


@dataclass
class GaussianProblem:
    y: torch.Tensor         # [N, P]
    task_ids: torch.Tensor  # [N]
    sigma: float
    num_tasks: int

    @classmethod
    def make(cls, docs_per_task=(2, 5, 10, 20), P=3, tau=2.0, sigma=1.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        D = len(docs_per_task)
        Theta = torch.randn(P, generator=g)
        theta = Theta + torch.randn(D, P, generator=g) / tau**0.5
        task_ids = torch.repeat_interleave(torch.arange(D), torch.tensor(docs_per_task))
        y = theta[task_ids] + sigma * torch.randn(len(task_ids), P, generator=g)
        return cls(y, task_ids, sigma, D)

    @property
    def num_docs(self):
        return len(self.task_ids)

    @property
    def docs_per_task(self):
        return torch.bincount(self.task_ids, minlength=self.num_tasks)

    def log_likelihood(self, adapters, batch):
        mean = adapters[batch.task_ids] if adapters.dim() == 2 else adapters
        return Normal(mean, self.sigma).log_prob(batch.y).sum(-1)

    def full_batch(self):
        return GaussianBatch(self.y, self.task_ids, torch.arange(self.num_docs))

    def batches(self, batch_size, seed=0):
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(self.num_docs, generator=g)
            for i in range(0, self.num_docs - batch_size + 1, batch_size):
                idx = perm[i : i + batch_size]
                yield GaussianBatch(self.y[idx], self.task_ids[idx], idx)

    # ---- closed forms -------------------------------------------------------------------
    def stats(self):
        n = torch.bincount(self.task_ids, minlength=self.num_tasks).double()
        ybar = torch.zeros(self.num_tasks, self.y.shape[1], dtype=torch.float64)
        ybar.index_add_(0, self.task_ids, self.y.double())
        return n, ybar / n[:, None]

    def map_for_tau(self, tau: float):
        """Posterior mode (theta [D, P], Theta [P]) for a fixed tau (flat prior on Theta)."""
        n, ybar = self.stats()
        h = n / self.sigma**2
        lam = h / (h + tau)
        Theta = (lam[:, None] * ybar).sum(0) / lam.sum()
        theta = (h[:, None] * ybar + tau * Theta) / (h + tau)[:, None]
        return theta, Theta

    def pooled(self):
        return self.y.double().mean(0)

    def marginal_log_likelihood(self, tau: float) -> float:
        """log p(y | tau), theta and Theta integrated out (flat prior on Theta), up to a constant."""
        n, ybar = self.stats()
        v = self.sigma**2 / n + 1.0 / tau  # Var(ybar_d | Theta)
        w = 1.0 / v
        Theta_hat = (w[:, None] * ybar).sum(0) / w.sum()
        P = ybar.shape[1]
        quad = (w[:, None] * (ybar - Theta_hat) ** 2).sum()
        return float(-0.5 * P * torch.log(v).sum() - 0.5 * P * torch.log(w.sum()) - 0.5 * quad)
