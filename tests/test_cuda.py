"""On CUDA the fits give what they give on the CPU: fp32 to rounding, bf16 autocast of the base
model within its precision, with the adapters kept in fp32.

Marked ``cuda`` and skipped without a CUDA device; `benchmarks/gpu_check.sh` runs them on the
lent GPU machine (``pytest -m cuda tests/test_cuda.py``). Tolerances:

* fp32 on CUDA against the CPU: test perplexities within 1e-3 relative. The two differ only in
  the order of floating-point sums (about 1e-6 relative per product), which a few AdamW steps
  do not amplify to 1e-3.
* bf16 autocast against fp32 on the CPU: per-document NLL within 2e-2 relative and the adapters'
  gradient at cosine >= 0.99 (bf16 keeps 8 significant bits, a relative rounding of 2^-9 = 2e-3
  per operation; the NLL is computed from fp32 logits). After a fit the trajectories have drifted
  apart: test perplexities within 5e-2 (MAP) and 1e-1 (SVI, whose draws come from the CUDA
  generator, not the CPU's). With bf16 autocast on the CPU these fits differed from fp32 by 1.2e-2
  (MAP) and 2.1e-2 (SVI).
"""

import math

import pytest
import torch

import bora_pyro
from bora_pyro.data import IGNORE_INDEX, build_corpus
from bora_pyro.models.lora import MultiTaskLM
from bora_pyro.runtime import autocast
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

GPU = "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _relative(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs()).max().item()


def test_multitask_nll_and_its_gradient_under_bf16_autocast_match_fp32_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    lm = MultiTaskLM(tiny_causal_lm("llama", hidden_size=64), rank=4, alpha=8)
    num_tasks = 3
    adapters = lm.layout.init_global(generator=g) + 0.05 * torch.randn(num_tasks, lm.num_params, generator=g)
    input_ids = torch.randint(3, 104, (6, 24), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 16:] = 0  # one padded row
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    task_ids = torch.tensor([0, 1, 2, 0, 1, 2])

    def nll_and_grad(device, dtype):
        lm.to(device)
        theta = adapters.to(device).requires_grad_(True)
        with autocast(device, dtype):
            nll = lm.sequence_nll(input_ids.to(device), attention_mask.to(device), labels.to(device),
                                  adapters=theta, task_ids=task_ids.to(device))
        nll.sum().backward()
        return nll.detach().cpu(), theta.grad.cpu(), nll.dtype, theta.grad.dtype

    nll_cpu, grad_cpu, _, _ = nll_and_grad("cpu", None)
    nll_gpu, grad_gpu, nll_dtype, grad_dtype = nll_and_grad(GPU, torch.bfloat16)
    assert nll_dtype == torch.float32 and grad_dtype == torch.float32
    assert torch.isfinite(nll_gpu).all() and torch.isfinite(grad_gpu).all()
    assert _relative(nll_gpu, nll_cpu) < 2e-2
    cosine = torch.nn.functional.cosine_similarity(grad_gpu.flatten().double(), grad_cpu.flatten().double(), dim=0)
    assert cosine > 0.99, float(cosine)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(synthetic_corpus_frame((12, 24, 48)), char_tokenizer(), max_length=48, seed=0)


def _fit_map(corpus, device, autocast_name=None):
    return bora_pyro.fit_map(corpus, model=tiny_causal_lm("llama", hidden_size=48), tokenizer=char_tokenizer(),
                             tau=100.0, rank=4, alpha=8, max_steps=30, batch_size=8, lr=1e-2, seed=0,
                             device=device, autocast=autocast_name, progress=False)


@pytest.fixture(scope="module")
def map_fits(corpus):
    return {"cpu": _fit_map(corpus, "cpu"), "fp32": _fit_map(corpus, GPU), "bf16": _fit_map(corpus, GPU, "bf16")}


def _perplexities(result, **kwargs):
    table = result.evaluate("test", **kwargs)
    return table["perplexity"].to_numpy(), table.attrs["overall_perplexity"]


def test_fit_map_on_cuda_matches_the_cpu_in_fp32_and_in_bf16(map_fits):
    cpu, _ = _perplexities(map_fits["cpu"])
    for name, tolerance in (("fp32", 1e-3), ("bf16", 5e-2)):
        result = map_fits[name]
        assert result.task_adapters.dtype == torch.float32, name
        assert all(math.isfinite(x) for x in result.history["loss"]), name
        gpu, _ = _perplexities(result)
        assert _relative(gpu, cpu) < tolerance, (name, gpu, cpu)


def test_fit_map_under_bf16_learns_as_on_the_cpu(map_fits):
    """The fit lowers the test perplexity below the base model's, on both devices."""
    for name in ("cpu", "bf16"):
        _, fitted = _perplexities(map_fits[name])
        _, base = _perplexities(map_fits[name], adapters="base")
        assert fitted < base, (name, fitted, base)


def test_fit_svi_on_cuda_under_bf16_matches_the_cpu(map_fits):
    common = dict(max_steps=20, lr=5e-3, init_scale=1e-2, seed=0, progress=False)
    cpu = bora_pyro.fit_svi(None, init=map_fits["cpu"], device="cpu", **common)
    gpu = bora_pyro.fit_svi(None, init=map_fits["bf16"], device=GPU, autocast="bf16", **common)
    assert all(math.isfinite(x) for x in gpu.history["loss"])
    table = gpu.evaluate("test", num_samples=2)
    assert (table["perplexity_low"] <= table["perplexity_high"]).all()
    at_mean_gpu, _ = _perplexities(gpu, num_samples=0)
    at_mean_cpu, _ = _perplexities(cpu, num_samples=0)
    assert _relative(at_mean_gpu, at_mean_cpu) < 1e-1, (at_mean_gpu, at_mean_cpu)


def test_fit_svi_on_cuda_starts_from_laplace_scales(map_fits):
    """The default start (Laplace sds from a Monte-Carlo Fisher) computed on the GPU under bf16."""
    gpu = bora_pyro.fit_svi(None, init=map_fits["bf16"], device=GPU, autocast="bf16", max_steps=5,
                            seed=0, progress=False)
    scales = gpu.task_scales
    assert scales.dtype == torch.float32 and torch.isfinite(scales).all() and (scales > 0).all()
    assert all(math.isfinite(x) for x in gpu.history["loss"])
