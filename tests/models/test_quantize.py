"""A frozen base quantised by bitsandbytes (TrainConfig.quantize), the adapters fp32 on top.

bitsandbytes 0.50 runs 4-bit (NF4) and 8-bit linear layers on the CPU, so this runs here. A tiny
random model scores near its vocabulary size (~100 perplexity) whatever it learns; the 5% bound
checks that the quantised base computes the same model, not that 4 bits keep a trained one's
quality (that is the GPU check's job with the real model).
"""

import math

import pytest
import torch

import bora_pyro
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-64")
    tiny_causal_lm("llama", hidden_size=64, num_layers=1).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def _fit(model_dir, **kwargs):
    return bora_pyro.fit_map(synthetic_corpus_frame((8, 12)), model=str(model_dir), rank=2, alpha=4, tau=100.0,
                             max_steps=4, batch_size=4, lr=1e-2, device="cpu", progress=False, seed=0,
                             max_length=32, **kwargs)


@pytest.mark.parametrize("quantize, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantised_base_gives_finite_perplexities_within_5_percent_of_fp32(model_dir, quantize, layer):
    full = _fit(model_dir)
    quant = _fit(model_dir, quantize=quantize)
    wrapped = [type(m.base).__name__ for m in quant.lm.modules() if hasattr(m, "base") and hasattr(m.base, "weight")]
    assert wrapped and set(wrapped) == {layer}
    assert quant.task_adapters.dtype == torch.float32 and quant.fit_args["quantize"] == quantize
    assert not torch.equal(quant.task_adapters, quant.global_adapter.expand_as(quant.task_adapters))  # it trained
    ppl_full = full.evaluate("test").set_index("task")["perplexity"]
    ppl_quant = quant.evaluate("test").set_index("task")["perplexity"]
    assert all(math.isfinite(v) for v in ppl_quant)
    ratio = (ppl_quant / ppl_full - 1).abs()
    assert (ratio < 0.05).all(), ratio


def test_quantize_is_refused_for_a_gguf_model():
    with pytest.raises(ValueError, match="quantize / device_map load a model directory"):
        bora_pyro.models.base.load_base_model("smollm2-135m", quantize="4bit")


def test_a_saved_quantised_fit_loads_quantised_as_fitted(model_dir, tmp_path):
    """load_result rebuilds the base as the fit did (4-bit here), so the loaded result scores the
    documents exactly as the fitted one; quantize=None loads the full-precision base on request."""
    fitted = _fit(model_dir, quantize="4bit")
    path = fitted.save(tmp_path / "run")
    loaded = bora_pyro.load_result(path, device="cpu")
    assert _wrapped_layers(loaded) == {"Linear4bit"}
    expected = fitted.evaluate("test").set_index("task")["perplexity"]
    got = loaded.evaluate("test").set_index("task")["perplexity"]
    torch.testing.assert_close(torch.tensor(got.values), torch.tensor(expected.values), rtol=1e-6, atol=0)
    full = bora_pyro.load_result(path, device="cpu", quantize=None)
    assert _wrapped_layers(full) == {"Linear"}
    with pytest.raises(ValueError, match="quantize"):
        bora_pyro.load_result(path, device="cpu", quantize="3bit")


def _wrapped_layers(result) -> set[str]:
    return {type(m.base).__name__ for m in result.lm.modules() if hasattr(m, "base") and hasattr(m.base, "weight")}
