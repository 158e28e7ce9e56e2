"""The brute-force references of `bora_pyro.testing` against the package's own exact diagonals."""

import pytest

import bora_pyro
from bora_pyro.data import build_corpus
from bora_pyro.inference.curvature import exact_fisher_diagonal, hessian_diagonal, lm_logits
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, task_hessians, tiny_causal_lm
from tests.conftest import assert_close


def test_task_hessians_diagonals_match_the_exact_diagonals():
    """The diagonal of the P x P Hessian (GGN) equals `hessian_diagonal` (`exact_fisher_diagonal`),
    and both matrices are symmetric; rtol and atol 1e-5 for the symmetry, 1e-4 and 1e-5 for
    the diagonals (the logits are float32)."""
    tok = char_tokenizer()
    corpus = build_corpus(synthetic_corpus_frame((3, 5), words_per_doc=(2, 4)), tok, max_length=32,
                          test_size=0.25, validation_size=0.0)
    base = tiny_causal_lm("llama", hidden_size=16, num_layers=1)
    base.set_attn_implementation("eager")
    fit = bora_pyro.fit_map(corpus, model=base, tokenizer=tok, tau=10.0, rank=1, alpha=2,
                            target_modules=["v_proj", "lm_head"], max_steps=5, lr=0.1, batch_size=4, device="cpu",
                            progress=False)
    train = corpus.split("train")
    full = [train.batch(list(range(len(train))))]
    H = task_hessians(fit.lm, fit.task_adapters, train)
    G = task_hessians(fit.lm, fit.task_adapters, train, kind="ggn")
    for M in (H, G):
        assert_close(M, M.transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert_close(H.diagonal(dim1=1, dim2=2), hessian_diagonal(lm_logits(fit.lm), fit.task_adapters, full),
                 rtol=1e-4, atol=1e-5)
    assert_close(G.diagonal(dim1=1, dim2=2), exact_fisher_diagonal(lm_logits(fit.lm), fit.task_adapters, full),
                 rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="kind='fisher'.*'ggn'"):
        task_hessians(fit.lm, fit.task_adapters, train, kind="fisher")
