r"""Pyro's ELBOs with a differentiable loss that reads nothing back from the device.

`pyro.infer.Trace_ELBO.differentiable_loss` returns ``loss + (surrogate - surrogate.item())``
with ``loss`` the sum of every site's ``log_prob_sum().item()``, and calls ``warn_if_nan`` on
the surrogate (one more read, plus a backward hook that reads the gradient);
`~pyro.infer.TraceMeanField_ELBO` reads its ELBO with ``item()`` too. On a GPU each read waits
for the device. For reparameterised guides (every site has ``rsample``: the point guide of MAP,
the mean-field Normal of SVI) the surrogate is the ELBO itself, so the loss here is the
surrogate, a 0-dim tensor left on the device: the same gradient, and the same value up to the
float32 rounding of a sum taken in another order. A NaN is not warned about here: the
optimisation loop reads the loss every few steps and stops with a `FloatingPointError` that
names the first non-finite step (`bora_pyro.inference.loop.run_steps`).
"""

from __future__ import annotations

import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled

__all__ = ["SyncFreeTraceELBO", "SyncFreeMeanFieldELBO"]


class SyncFreeTraceELBO(Trace_ELBO):
    """`~pyro.infer.Trace_ELBO` whose `differentiable_loss` stays on the device (see the module
    docstring); guide sites must be reparameterised (``has_rsample``)."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-ELBO``, the mean over ``num_particles`` traces, a 0-dim tensor that requires grad."""
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss - _trace_elbo(model_trace, guide_trace) / self.num_particles
        return loss


class SyncFreeMeanFieldELBO(TraceMeanField_ELBO):
    """`~pyro.infer.TraceMeanField_ELBO` (analytic KL where registered) whose
    `differentiable_loss` stays on the device (see the module docstring)."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-ELBO``, the mean over ``num_particles`` traces, a 0-dim tensor that requires grad."""
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss - _mean_field_elbo(model_trace, guide_trace) / self.num_particles
        return loss


def _trace_elbo(model_trace, guide_trace) -> torch.Tensor:
    """``sum log p - sum log q`` over the sample sites, for reparameterised guide sites."""
    elbo = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            elbo = elbo + site["log_prob_sum"]
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        _, score_function, entropy = site["score_parts"]
        if not is_identically_zero(score_function):
            raise ValueError(
                f"The guide's site {name!r} is not reparameterised ({type(site['fn']).__name__} has no "
                "rsample); SyncFreeTraceELBO needs reparameterised guide sites: use pyro.infer.Trace_ELBO."
            )
        if not is_identically_zero(entropy):
            elbo = elbo - entropy.sum()
    return elbo


def _mean_field_elbo(model_trace, guide_trace) -> torch.Tensor:
    """The ELBO of `~pyro.infer.TraceMeanField_ELBO`: the analytic KL of each latent site where
    one is registered, else its sampled ``log p - log q``."""
    elbo = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            elbo = elbo + site["log_prob_sum"]
            continue
        guide_site = guide_trace.nodes[name]
        if is_validation_enabled():
            check_fully_reparametrized(guide_site)
        try:
            kl = kl_divergence(guide_site["fn"], site["fn"])
        except NotImplementedError:
            elbo = elbo + site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
            continue
        kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
        elbo = elbo - (kl.sum() if torch.is_tensor(kl) else kl * guide_site["fn"].batch_shape.numel())
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] == "sample" and name not in model_trace.nodes:  # auxiliary sites
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            elbo = elbo - guide_site["score_parts"].entropy_term.sum()
    return elbo
