"""Tests of conversations as documents (bora_pyro.data.chat and build_corpus's messages column):
the assistant-only mask against hand-checked examples, truncation, tasks from metadata."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bora_pyro.data import IGNORE_INDEX, TaskCorpus, build_corpus
from bora_pyro.data.chat import chat_prompt_ids, encode_conversations, has_generation_markers
from tests.data.helpers import (
    SMOLLM2_TEMPLATE,
    assert_corpora_equal,
    chat_frame,
    make_chat_tokenizer,
    make_tokenizer,
)

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
TWO_ANSWERS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo."},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "Bye"},
]

#: SmolLM2's template with the assistant's text and <|im_end|> marked for transformers.
MARKED_TEMPLATE = SMOLLM2_TEMPLATE.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}",
)
#: A template of another family ([INST] ... [/INST] answer</s>), without generation markers.
INST_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
#: A template that writes the last answer differently from earlier ones: its prefixes disagree.
LAST_TURN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' }}{% if loop.last %}{{ '(last) ' }}{% endif %}"
    "{{ m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def encode(conversations, tokenizer, max_length=1000):
    return encode_conversations(
        conversations, tokenizer, start_id=tokenizer.bos_token_id, max_length=max_length,
        rows=list(range(len(conversations))), row_tasks=["t"] * len(conversations),
    )


def scored_and_rest(tokenizer, ids, mask):
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return [t for t, m in zip(tokens, mask) if m], "".join(t for t, m in zip(tokens, mask) if not m)


# ---------------------------------------------------------------------------------------------
# the assistant mask, checked by hand
# ---------------------------------------------------------------------------------------------


def test_smollm2_template_has_no_generation_markers_and_its_mask_is_hand_checked():
    tokenizer = make_chat_tokenizer()
    assert not has_generation_markers(SMOLLM2_TEMPLATE) and has_generation_markers(MARKED_TEMPLATE)
    (ids,), (mask,), method = encode([TWO_ANSWERS], tokenizer)
    assert method == "incremental"
    # The rendering opens with <|im_start|>, SmolLM2's start token: no second start token.
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    scored, rest = scored_and_rest(tokenizer, ids, mask)
    # By hand: the answers' characters and each answer's <|im_end|>; not the headers, not the
    # newline after <|im_end|>, not the system prompt SmolLM2's template adds, not the user.
    assert scored == ["Y", "o", ".", "<|im_end|>", "B", "y", "e", "<|im_end|>"]
    assert rest == (
        SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n\n"
    )
    # Positions, by hand: the first answer starts after the system prompt (1 + 85 + 1 + 1
    # tokens), "user\nHi" and its end (10 + 1), and "<|im_start|>assistant\n" (11).
    first = 1 + len("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face") + 2
    first += 1 + len("user\nHi") + 2 + 1 + len("assistant\n")
    assert np.flatnonzero(mask)[:4].tolist() == [first, first + 1, first + 2, first + 3]


def test_generation_markers_give_the_same_mask_as_incremental_rendering():
    plain = encode([TWO_ANSWERS, TWO_ANSWERS[:2]], make_chat_tokenizer())
    marked = encode([TWO_ANSWERS, TWO_ANSWERS[:2]], make_chat_tokenizer(MARKED_TEMPLATE))
    assert marked[2] == "generation_markers"
    assert plain[0] == marked[0]
    for a, b in zip(plain[1], marked[1]):
        np.testing.assert_array_equal(a, b)


def test_a_template_of_another_family_without_markers_is_hand_checked():
    tokenizer = make_tokenizer()  # <s> BOS, </s> EOS, one token per character
    tokenizer.chat_template = INST_TEMPLATE
    (ids,), (mask,), method = encode([TWO_ANSWERS], tokenizer)
    assert method == "incremental"
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "".join(tokens) == "<s>[INST] Hi [/INST] Yo.</s>[INST] Why? [/INST] Bye</s>"
    scored, rest = scored_and_rest(tokenizer, ids, mask)
    # By hand: after each " [/INST]" the answer with its leading space and </s>.
    assert scored == [" ", "Y", "o", ".", "</s>", " ", "B", "y", "e", "</s>"]
    assert rest == "<s>[INST] Hi [/INST][INST] Why? [/INST]"


def test_a_template_whose_prefixes_disagree_is_refused_with_the_fix():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = LAST_TURN_TEMPLATE
    with pytest.raises(ValueError, match=r"(?s)row 0.*turn 1.*renders the turns before.*\{% generation %\}"):
        encode([TWO_ANSWERS], tokenizer)


def test_missing_template_and_assistant_first_are_clear_errors():
    with pytest.raises(ValueError, match="has no chat template.*tokenizer.chat_template ="):
        encode([TWO_ANSWERS], make_tokenizer())
    opening = [{"role": "assistant", "content": "Who's there?"}, {"role": "user", "content": "Nay"}]
    with pytest.raises(ValueError, match="turn 0 is an assistant turn with nothing before it"):
        encode([opening], make_chat_tokenizer())


# ---------------------------------------------------------------------------------------------
# build_corpus with a messages column
# ---------------------------------------------------------------------------------------------


def test_messages_column_is_found_and_batches_score_only_the_answers():
    tokenizer = make_chat_tokenizer()
    frame = chat_frame()[["task", "messages"]]
    corpus = build_corpus(frame, tokenizer, test_size=0.2, validation_size=0.0, max_length=200)
    assert corpus.options["messages_column"] == "messages" and corpus.options["text_column"] is None
    assert corpus.options["assistant_mask"] == "incremental"
    split = corpus.train
    batch = split.batch(range(len(split)))
    for row, doc in enumerate(batch.doc_index.tolist()):
        messages = frame["messages"].iloc[split.source_index[doc]]
        labels = batch.labels[row]
        scored = tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())
        assert scored == [*messages[1]["content"], "<|im_end|>"]
        np.testing.assert_array_equal(labels[: split.lengths[doc]].numpy(), split.doc_labels(doc))
        assert split.label_start(doc) == int(np.flatnonzero(split.doc_labels(doc) != IGNORE_INDEX)[0])
    assert split.num_tokens == int((batch.labels != IGNORE_INDEX).sum())
    assert corpus.summary()["train_tokens"].sum() == split.num_tokens


def test_packed_batches_score_the_same_tokens_as_padded_ones():
    """Packing lays conversations end to end: each one's labels (only its answers) must survive."""
    corpus = build_corpus(chat_frame()[["task", "messages"]], make_chat_tokenizer(), test_size=0.2,
                          validation_size=0.0, max_length=200)
    split = corpus.train
    packed = split.batch(range(len(split)), pack=True)
    assert packed.segment_ids is not None and packed.input_ids.shape[0] < len(split)
    for b, doc in enumerate(packed.doc_index.tolist()):
        labels = packed.labels[packed.segment_ids == b].numpy()
        expected = split.doc_labels(doc)
        expected[0] = IGNORE_INDEX  # a document's first position is never scored in a packed row
        np.testing.assert_array_equal(labels, expected)
    assert int((packed.labels != IGNORE_INDEX).sum()) == split.num_tokens


def test_a_text_column_wins_over_an_unnamed_messages_column(frame, tokenizer):
    both = frame.assign(messages=[[{"role": "assistant", "content": "x"}]] * len(frame))
    corpus = build_corpus(both, tokenizer)
    assert corpus.options["text_column"] == "text" and corpus.options["messages_column"] is None
    named = chat_frame().rename(columns={"messages": "chat"}).assign(text="unused")
    chat = build_corpus(named, make_chat_tokenizer(), messages_column="chat", max_length=200)
    assert chat.options["messages_column"] == "chat"


def test_truncation_keeps_tokens_and_mask_aligned():
    tokenizer = make_chat_tokenizer()
    (full_ids,), (full_mask,), _ = encode([TWO_ANSWERS], tokenizer)
    first = int(np.flatnonzero(full_mask)[0])
    for max_length in (first + 2, first + 6, len(full_ids) - 3, len(full_ids) + 5):
        (ids,), (mask,), _ = encode([TWO_ANSWERS], tokenizer, max_length=max_length)
        assert len(ids) == len(mask) == min(max_length, len(full_ids))
        assert ids == full_ids[: len(ids)]
        np.testing.assert_array_equal(mask, full_mask[: len(ids)])
    frame = pd.DataFrame({"task": ["a"] * 3, "messages": [TWO_ANSWERS] * 3})
    corpus = build_corpus(frame, tokenizer, max_length=first + 2, test_size=0.0, validation_size=0.0)
    labels = corpus.train.batch([0]).labels[0]
    assert tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist()) == ["Y", "o"]
    with pytest.raises(ValueError, match=r"no assistant token left within max_length=20 \(first: row 0, task 'a'\)"):
        build_corpus(frame, tokenizer, max_length=20, test_size=0.0, validation_size=0.0)


def test_tasks_from_a_metadata_field_in_a_frame_and_in_files(tmp_path):
    tokenizer = make_chat_tokenizer()
    frame = chat_frame()
    by_column = build_corpus(frame.drop(columns="metadata"), tokenizer, max_length=200)
    by_field = build_corpus(frame.drop(columns="task"), tokenizer, task_column="metadata.speaker", max_length=200)
    assert by_field.tasks == ["speaker0", "speaker1"]
    for name in ("train", "validation", "test"):
        a, b = by_column.split(name), by_field.split(name)
        np.testing.assert_array_equal(a.source_index, b.source_index)
        assert torch.equal(a.batch(range(len(a))).labels, b.batch(range(len(b))).labels)
    jsonl = tmp_path / "chat.jsonl"
    frame.drop(columns="task").to_json(jsonl, orient="records", lines=True)
    csv = tmp_path / "chat.csv"
    frame.drop(columns="task").assign(
        messages=frame["messages"].map(json.dumps), metadata=frame["metadata"].map(json.dumps)
    ).to_csv(csv, index=False)
    for path in (jsonl, csv):
        from_file = build_corpus(path, tokenizer, task_column="metadata.speaker", max_length=200)
        assert from_file.tasks == by_field.tasks
        assert from_file.train.num_tokens == by_field.train.num_tokens
        np.testing.assert_array_equal(from_file.test.source_index, by_field.test.source_index)
    with pytest.raises(ValueError, match="'metadata.speakr' \\(task_column\\) has 14 missing"):
        build_corpus(frame, tokenizer, task_column="metadata.speakr")
    odd = frame.assign(metadata=[*frame["metadata"][:3], 7, *frame["metadata"][4:]])
    with pytest.raises(ValueError, match="row 3 of data holds the int '7' there, not a mapping"):
        build_corpus(odd, tokenizer, task_column="metadata.speaker")
    with pytest.raises(ValueError, match=r"column 'meta.speaker' \(task_column\) not found.*'<column>.<key>'"):
        build_corpus(frame, tokenizer, task_column="meta.speaker")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "hi"}], r"row 1 \(task 'a'\) has no 'assistant' turn"),
        ([{"role": "assistant", "content": None}], r"row 1 \(task 'a'\), turn 0 \(role 'assistant'\) has content 'None'"),
        ([{"content": "x"}], 'turn 0 has role None; every turn needs a "role"'),
        ([], "is an empty list, not a list of turns"),
        ("not json", "holds text that is not a JSON list of turns"),
        (["hi"], "turn 0 is a str"),
    ],
)
def test_bad_conversations_are_clear_errors(messages, match):
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    frame = pd.DataFrame({"task": ["a"] * 4, "messages": [good, messages, good, good]})
    with pytest.raises(ValueError, match=match):
        build_corpus(frame, make_chat_tokenizer(), test_size=0.25, validation_size=0.0)


def test_messages_and_prompt_columns_exclude_each_other():
    with pytest.raises(ValueError, match="messages_column='m' and prompt_column='p' exclude each other"):
        build_corpus(chat_frame(), make_chat_tokenizer(), messages_column="m", prompt_column="p",
                     completion_column="c")


def test_state_round_trip_keeps_the_assistant_mask(tmp_path):
    from safetensors.torch import load_file, save_file

    corpus = build_corpus(chat_frame(), make_chat_tokenizer(), max_length=200)
    tensors, meta = corpus.state_dict()
    assert meta["version"] == 2 and tensors["train.scored"].dtype == torch.bool
    save_file(tensors, tmp_path / "c.safetensors")
    restored = TaskCorpus.from_state_dict(load_file(tmp_path / "c.safetensors"), json.loads(json.dumps(meta)))
    assert_corpora_equal(corpus, restored)
    assert torch.equal(restored.train.batch([0, 1]).labels, corpus.train.batch([0, 1]).labels)


def test_chat_prompt_ids_end_with_the_generation_prompt():
    tokenizer = make_chat_tokenizer()
    (ids,) = chat_prompt_ids([TWO_ANSWERS[:3]], tokenizer, start_id=tokenizer.bos_token_id)
    text = "".join(tokenizer.convert_ids_to_tokens(ids))
    assert text == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo.<|im_end|>\n" \
        "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    # The same tokens as the training rendering up to the second answer, which starts right after.
    (train_ids,), (mask,), _ = encode([TWO_ANSWERS], tokenizer)
    assert train_ids[: len(ids)] == ids
    assert mask[: len(ids)].sum() == len("Yo.") + 1 and mask[len(ids)] and not mask[len(ids) - 1]


@pytest.mark.default_model
def test_the_fixture_is_the_template_in_smollm2s_gguf_file():
    """The template the tests use is the one SmolLM2's GGUF file carries (metadata only: ~2 s)."""
    gguf = pytest.importorskip("gguf")
    from bora_pyro.models.base import default_gguf_path

    field = gguf.GGUFReader(default_gguf_path()).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode("utf-8") == SMOLLM2_TEMPLATE
