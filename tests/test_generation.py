"""Logits and generation with many tasks in one batch; unseen tasks; the `bora generate` command."""

import json
import math

import pytest
import torch

import bora_pyro
from bora_pyro.cli import main
from bora_pyro.generation import draw_task_adapters, generate, task_logits
from bora_pyro.testing import char_tokenizer, tiny_causal_lm
from tests.data.helpers import SMOLLM2_TEMPLATE, chat_frame, make_chat_tokenizer
from tests.tiny_result import tiny_result

PROMPTS = ["to be", "or not to", "", "the rest is silence"]
TASKS = ["OPHELIA", "HAMLET (Hamlet)", "<global>", "OPHELIA"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def result(request):
    return tiny_result(request.param)


def test_mixed_task_greedy_generation_equals_each_row_alone(result):
    mixed = generate(result, PROMPTS, TASKS, max_new_tokens=12)
    assert len(mixed) == len(PROMPTS) and all(isinstance(t, str) for t in mixed)
    alone = [generate(result, p, t, max_new_tokens=12)[0] for p, t in zip(PROMPTS, TASKS)]
    assert mixed == alone
    # The adapters matter: the same prompt continues differently under different tasks.
    per_task = [result.generate("to be", t, max_new_tokens=12)[0] for t in ("OPHELIA", "HAMLET (Hamlet)", "<global>")]
    assert len(set(per_task)) == 3, per_task


def test_beam_search_and_several_returns_keep_each_prompts_task(result):
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2)
    mixed = generate(result, PROMPTS[:2], TASKS[:2], **kw)
    alone = [s for p, t in zip(PROMPTS[:2], TASKS[:2]) for s in generate(result, p, t, **kw)]
    assert len(mixed) == 4 and mixed == alone


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(result):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate(result, PROMPTS, TASKS, max_new_tokens=10, do_sample=True, seed=7)
    b = generate(result, PROMPTS, TASKS, max_new_tokens=10, do_sample=True, seed=7)
    assert a == b
    assert torch.rand(1) == before


def test_logits_for_a_list_of_tasks_equal_per_row_logits(result):
    ids = torch.randint(4, 100, (4, 7), generator=torch.Generator().manual_seed(3))
    mixed = task_logits(result, ids, TASKS)
    for n, task in enumerate(TASKS):
        torch.testing.assert_close(mixed[n : n + 1], result.logits(ids[n : n + 1], task), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expected = result.lm(ids, adapters=result.global_adapter)
    torch.testing.assert_close(result.logits(ids, "<global>"), expected, rtol=0, atol=0)
    torch.testing.assert_close(result.logits(ids, "newcomer", unseen="global"), expected, rtol=0, atol=0)


def test_unknown_task_is_a_clear_error(result):
    with pytest.raises(ValueError, match=r"(?s)OPHELA.*OPHELIA.*<global>"):
        result.generate(["to be"], "OPHELA")
    with pytest.raises(ValueError, match=r"(?s)task9.*<global>"):
        result.logits(torch.ones(1, 3, dtype=torch.long), ["OPHELIA", "task9"][1:])
    with pytest.raises(ValueError, match="unseen='maybe' is not valid"):
        result.generate(["to be"], "OPHELIA", unseen="maybe")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": ["OPHELIA"] * 2}, "2 names for 1 rows"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"num_beam_groups": 2, "num_beams": 4}, "num_beam_groups=2"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive"),
        ({"attention_mask": torch.ones(1, 2)}, "attention_mask"),
        ({"prompts": []}, "non-empty list of strings"),
    ],
)
def test_bad_generation_arguments_are_clear_errors(result, kwargs, match):
    args = {"prompts": ["to be"], "task": "OPHELIA", **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(result, args.pop("prompts"), args.pop("task"), **args)


def test_unseen_tasks_drawn_from_the_prior():
    tau = {"A": 100.0, "B": 1e4}
    result = tiny_result("llama", tau=tau)
    draws = draw_task_adapters(result, 50, seed=3)
    assert draws.shape == (50, result.lm.num_params)
    torch.testing.assert_close(draws, draw_task_adapters(result, 50, seed=3), rtol=0, atol=0)
    names, index = result.lm.layout.group_index("ab")
    noise = draws - result.global_adapter
    for g, name in enumerate(names):
        std = noise[:, index == g].std().item()
        assert abs(std - tau[name] ** -0.5) < 0.03 * tau[name] ** -0.5, (name, std)
    # In generation each distinct unseen name gets one draw, reproducible by seed.
    a = result.generate(["to be", "to be", "to be"], ["new1", "new2", "new1"], unseen="sample", seed=5, max_new_tokens=8)
    b = result.generate(["to be", "to be", "to be"], ["new1", "new2", "new1"], unseen="sample", seed=5, max_new_tokens=8)
    assert a == b and a[0] == a[2]


def test_prior_draws_in_the_limits():
    pooled = tiny_result("llama", tau=float("inf"), pooled=True)
    torch.testing.assert_close(draw_task_adapters(pooled, 2), pooled.global_adapter.expand(2, -1), rtol=0, atol=0)
    independent = tiny_result("llama", tau=0.0)
    with pytest.raises(ValueError, match=r"tau = 0.*<global>"):
        independent.generate("to be", "new", unseen="sample")
    with pytest.raises(ValueError, match="groups"):
        draw_task_adapters(pooled, tau={"all": 1.0})


def test_cli_generate_matches_the_python_api(tmp_path, capsys):
    result = tiny_result("llama")
    model_dir = tmp_path / "model"
    tiny_causal_lm("llama").save_pretrained(model_dir)  # the same weights, unwrapped
    char_tokenizer().save_pretrained(model_dir)
    run = result.save(tmp_path / "run")
    code = main(["generate", str(run), "--model", str(model_dir), "--device", "cpu", "--task", "OPHELIA",
                 "--task", "<global>", "--prompt", "to be", "--prompt", "or not", "--max-new-tokens", "6"])
    assert code == 0
    expected = result.generate(["to be", "or not"], ["OPHELIA", "<global>"], max_new_tokens=6)
    out = capsys.readouterr().out
    assert out == f"[OPHELIA] to be{expected[0]}\n[<global>] or not{expected[1]}\n"
    assert main(["generate", str(run), "--model", str(model_dir), "--task", "nobody", "--prompt", "x"]) == 2
    assert "unknown task 'nobody'" in capsys.readouterr().err
    loaded = bora_pyro.load_result(run, model=str(model_dir))
    assert loaded.generate("to be", "OPHELIA", max_new_tokens=6) == expected[:1]


# ---------------------------------------------------------------------------------------------
# conversations
# ---------------------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "Who's there?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Nay, answer me"},
     {"role": "assistant", "content": "Long live"}, {"role": "user", "content": "Bernardo?"}],
]


@pytest.fixture(scope="module")
def chat_result():
    result = tiny_result("llama")
    result.tokenizer.chat_template = SMOLLM2_TEMPLATE
    return result


def test_conversations_are_answered_after_the_templates_generation_prompt(chat_result):
    tasks = ["OPHELIA", "HAMLET (Hamlet)"]
    answers = chat_result.generate(CHATS, task=tasks, max_new_tokens=10)
    # The same as continuing the rendered text by hand: SmolLM2's system prompt, the turns, and
    # "<|im_start|>assistant\n" (the char tokenizer spells the markers out; its <bos> comes first).
    rendered = [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nNay, answer me<|im_end|>\n"
        "<|im_start|>assistant\nLong live<|im_end|>\n<|im_start|>user\nBernardo?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ]
    assert answers == generate(chat_result, rendered, tasks, max_new_tokens=10)
    # One conversation (a list of turns) is one prompt; each row alone gives the same answer.
    assert generate(chat_result, CHATS[1], "HAMLET (Hamlet)", max_new_tokens=10) == answers[1:]
    assert generate(chat_result, CHATS[:1], "OPHELIA", max_new_tokens=10) == answers[:1]


def test_bad_chat_prompts_are_clear_errors(chat_result):
    with pytest.raises(ValueError, match="a string, a non-empty list of strings, a conversation"):
        generate(chat_result, ["to be", CHATS[0]], "OPHELIA")
    with pytest.raises(ValueError, match='conversation 0, turn 0 .*string "role" and a string "content"'):
        generate(chat_result, [[{"role": "user", "content": None}]], "OPHELIA")
    plain = tiny_result("llama")
    with pytest.raises(ValueError, match="has no chat template"):
        plain.generate(CHATS, ["OPHELIA", "OPHELIA"])


def test_cli_generate_answers_messages_and_chats(chat_result, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_causal_lm("llama").save_pretrained(model_dir)
    chat_result.tokenizer.save_pretrained(model_dir)  # with its chat template
    run = chat_result.save(tmp_path / "run")
    base = ["generate", str(run), "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "6"]
    expected = chat_result.generate([CHATS[0], CHATS[0]], ["OPHELIA", "<global>"], max_new_tokens=6)
    assert main([*base, "--task", "OPHELIA", "--task", "<global>", "--message", "user:Who's there?"]) == 0
    assert capsys.readouterr().out == (
        f"[OPHELIA] \"Who's there?\" -> {expected[0]}\n[<global>] \"Who's there?\" -> {expected[1]}\n"
    )
    both = chat_result.generate(CHATS, ["OPHELIA", "OPHELIA"], max_new_tokens=6)
    assert main([*base, "--task", "OPHELIA", *[a for c in CHATS for a in ("--chat", json.dumps(c))]]) == 0
    assert capsys.readouterr().out == f"[OPHELIA] \"Who's there?\" -> {both[0]}\n[OPHELIA] 'Bernardo?' -> {both[1]}\n"
    assert main([*base, "--task", "OPHELIA", "--prompt", "x", "--message", "user:y"]) == 2
    assert "exactly one kind" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--task", "OPHELIA", "--chat", '{"role": "user"}'])
    assert "must be a JSON list of turns" in capsys.readouterr().err


def test_a_messages_corpus_fits_evaluates_and_generates(tmp_path):
    tokenizer = make_chat_tokenizer()  # SmolLM2's template, <|im_start|> / <|im_end|> single tokens
    frame = chat_frame((6, 8))[["task", "messages"]]
    result = bora_pyro.fit_map(
        frame, model=tiny_causal_lm("llama", hidden_size=16, num_layers=1),
        tokenizer=tokenizer, max_length=128, tau=10.0, rank=2, alpha=4.0, max_steps=4, batch_size=4,
        device="cpu", progress=False,
    )
    assert result.corpus.options["messages_column"] == "messages"
    table = result.evaluate("test")
    test = result.corpus.test
    answers = frame["messages"].iloc[test.source_index].map(lambda m: len(m[1]["content"]) + 1)  # + <|im_end|>
    scored = answers.groupby(test.task_ids.numpy()).sum()
    per_task = table.set_index("task").loc[result.tasks]
    assert per_task["n_tokens"].tolist() == scored.tolist()
    assert per_task["perplexity"].map(math.isfinite).all()
    answers = result.generate([[{"role": "user", "content": "q1"}]] * 2, task=result.tasks, max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    loaded = bora_pyro.load_result(result.save(tmp_path / "run"), model=tiny_causal_lm("llama", hidden_size=16, num_layers=1),
                                   tokenizer=tokenizer)
    assert torch.equal(loaded.corpus.test.batch([0, 1]).labels, result.corpus.test.batch([0, 1]).labels)
