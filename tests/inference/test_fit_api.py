"""The fit API: config objects or flat keywords, the model builder, fit_svi from an init result,
the learning-rate schedule, divergence and early stopping."""

import copy
import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import bora_pyro
import bora_pyro.models
from bora_pyro.config import BoraConfig, DataConfig, TrainConfig
from bora_pyro.data import build_corpus
from bora_pyro.inference import checkpoint as ckpt
from bora_pyro.inference.loop import Stepper, lr_factor
from bora_pyro.inference.map import MAPStepper, optimise_map
from bora_pyro.models import build_bora
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm
from tests.gaussian import GaussianProblem

FRAME = synthetic_corpus_frame((8, 12, 16))
QUICK = dict(tau=10.0, rank=2, alpha=4.0, max_steps=6, batch_size=4, lr=1e-2, eval_every=3,
             device="cpu", progress=False)
#: A model path that does not exist: a test that passes with it never loaded a model.
NO_MODEL = "./no/such/model"


def _base():
    return tiny_causal_lm("llama", hidden_size=16, num_layers=1)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(FRAME, char_tokenizer(), max_length=32, seed=0)


@pytest.fixture(scope="module")
def map_result(corpus):
    return bora_pyro.fit_map(corpus, model=_base(), tokenizer=char_tokenizer(), **QUICK)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    _base().save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- settings


def test_flat_keywords_and_config_objects_give_the_same_fit():
    flat = bora_pyro.fit_map(FRAME, model=_base(), tokenizer=char_tokenizer(), max_length=32, **QUICK)
    objects = bora_pyro.fit_map(
        FRAME, model=_base(), tokenizer=char_tokenizer(), data_config=DataConfig(max_length=32),
        config=BoraConfig(tau=10.0, rank=2, alpha=4.0),
        train=TrainConfig(max_steps=6, batch_size=4, lr=1e-2, eval_every=3, device="cpu", progress=False),
    )
    assert torch.equal(flat.task_adapters, objects.task_adapters)
    assert torch.equal(flat.global_adapter, objects.global_adapter)
    assert flat.config == objects.config and flat.fit_args == objects.fit_args
    # fit_args: every data and training setting (the model's are the result's config) but the
    # run controls, and what the run derived.
    args = flat.fit_args
    assert set(DataConfig.field_names()) <= set(args)
    assert set(TrainConfig.field_names()) - set(args) == {
        "progress", "checkpoint_dir", "checkpoint_every", "resume", "report_to", "report_dir", "run_name",
        "distributed_timeout"}
    assert (args["method"], args["steps"], args["max_length"], args["lr"], args["batch_size"]) == ("map", 6, 32, 1e-2, 4)
    assert args["best_step"] in (2, 5) and args["stopped_early"] is False
    # A keyword overrides the field of a config object given beside it.
    over = bora_pyro.fit_map(FRAME, model=_base(), tokenizer=char_tokenizer(), max_length=32,
                             train=TrainConfig(lr=1.0, batch_size=2), **QUICK)
    assert over.fit_args == flat.fit_args


def test_unknown_keyword_is_an_error_before_the_model_loads():
    with pytest.raises(ValueError, match=r"Unknown setting\(s\) \['rnak'\]; did you mean 'rank'\?"):
        bora_pyro.fit_map(FRAME, model=NO_MODEL, rnak=2)
    with pytest.raises(ValueError, match="Unknown setting"):
        bora_pyro.fit_svi(FRAME, model=NO_MODEL, particles=2)


@pytest.mark.parametrize("kwargs, name", [
    (dict(patience=0), "patience"), (dict(eval_every=0), "eval_every"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(batch_size=0), "batch_size"),
])
def test_zero_or_negative_counts_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name} must be .* got {name}="):
        bora_pyro.fit_map(FRAME, model=NO_MODEL, **kwargs)


def test_data_settings_with_a_built_corpus_are_an_error(corpus, map_result):
    with pytest.raises(ValueError, match=r"already built TaskCorpus .*\['max_length', 'tasks'\]"):
        bora_pyro.fit_map(corpus, model=NO_MODEL, max_length=64, tasks=["task0"], rank=2)
    with pytest.raises(ValueError, match=r"already built TaskCorpus .*\['data_config'\]"):
        bora_pyro.fit_map(corpus, model=NO_MODEL, data_config=DataConfig(max_length=64))
    with pytest.raises(ValueError, match=r"already built TaskCorpus .*\['test_size'\]"):
        bora_pyro.fit_svi(None, init=map_result, test_size=0.5)


# ----------------------------------------------------------------------------- the builder


def test_build_bora_builds_what_the_fit_trains(corpus, map_result):
    lm, bora = build_bora(_base(), corpus, map_result.config, seed=0)
    assert lm.layout == map_result.lm.layout
    assert (bora.num_tasks, bora.num_params, bora.num_docs) == (3, lm.num_params, len(corpus.split("train")))
    assert bora.group_names == list(map_result.tau) and bora.mode == "fixed"
    _, sized = build_bora(_base(), (5, 40), BoraConfig(rank=2, tau="learn"), seed=0)
    assert (sized.num_tasks, sized.num_docs, sized.mode) == (5, 40, "learn")
    with pytest.raises(ValueError, match=r"\(num_tasks, num_train_docs\)"):
        build_bora(_base(), (5, 0), BoraConfig(), seed=0)
    with pytest.raises(ValueError, match="config must be a BoraConfig"):
        build_bora(_base(), corpus, {"rank": 2}, seed=0)


def test_the_step_time_benchmark_builds_its_models_with_build_bora(monkeypatch, capsys):
    pytest.importorskip("peft")
    from tests.scripts import load_benchmark
    from tests.test_benchmarks import TINY

    step_time = load_benchmark("step_time")
    calls = []

    def counting(base, corpus, config, *, seed, docs_per_task=None):
        calls.append(corpus)
        return build_bora(base, corpus, config, seed=seed, docs_per_task=docs_per_task)

    monkeypatch.setattr(bora_pyro.models, "build_bora", counting)
    result = step_time.main(TINY + ["--tasks", "2", "--methods", "floor", "map", "svi", "--schedule", "sequential"])
    capsys.readouterr()
    assert calls == [(2, step_time._num_docs(step_time.parse_args(TINY), 2))] * 2
    assert result["map_ratio"] > 0 and result["svi_ratio"] > 0


# ----------------------------------------------------------------------------- fit_svi


def test_fit_svi_takes_weight_decay(corpus):
    common = dict(model=_base(), tokenizer=char_tokenizer(), **QUICK)
    plain = bora_pyro.fit_svi(corpus, **common)
    decayed = bora_pyro.fit_svi(corpus, weight_decay=0.5, **common)
    assert decayed.method == "svi" and decayed.fit_args["weight_decay"] == 0.5
    assert not torch.equal(plain.task_adapters, decayed.task_adapters)


def test_fit_svi_from_init_reuses_its_base_model_and_spec(corpus, saved_model):
    init = bora_pyro.fit_map(corpus, model=str(saved_model), tokenizer=char_tokenizer(), **QUICK)
    assert init.model_spec == str(saved_model.resolve())
    quick = dict(max_steps=2, batch_size=4, device="cpu", progress=False)
    svi = bora_pyro.fit_svi(None, init=init, **quick)
    assert svi.lm.base_model is init.lm.base_model and svi.tokenizer is init.tokenizer
    assert svi.model_spec == init.model_spec and svi.config.rank == 2 and svi.config.alpha == 4.0
    named = bora_pyro.fit_svi(None, init=init, model=saved_model, **quick)  # its own spec: fine
    assert named.lm.base_model is init.lm.base_model
    with pytest.raises(ValueError, match=r"model='smollm2-135m' differs from the init result's model"):
        bora_pyro.fit_svi(None, init=init, model="smollm2-135m", **quick)
    with pytest.raises(ValueError, match="other than the init result's base model"):
        bora_pyro.fit_svi(None, init=init, model=_base(), tokenizer=char_tokenizer(), **quick)


@pytest.mark.parametrize("change, message", [
    (dict(rank=4), "rank=4 differs from the init result's rank=2"),
    (dict(alpha=8.0), "alpha=8.0 differs from the init result's alpha=4.0"),
    (dict(precision_groups="module"), "precision_groups='module' differs from the init result's precision_groups='ab'"),
    (dict(target_modules=["q_proj"]), r"target_modules=\['q_proj'\] differs from the init result's target_modules=None"),
    (dict(config=BoraConfig(rank=2, alpha=4.0, precision_groups="shared")), "precision_groups='shared' differs"),
])
def test_fit_svi_refuses_another_layout_than_its_init(map_result, change, message):
    with pytest.raises(ValueError, match=message):
        bora_pyro.fit_svi(None, init=map_result, model=NO_MODEL, **change)


# ----------------------------------------------------------------------------- schedule


def _gaussian_model(problem, tau):
    from bora_pyro.models.bora import BoraModel

    return BoraModel(problem.log_likelihood, num_tasks=problem.num_tasks, num_params=problem.y.shape[1],
                     num_docs=problem.num_docs, config=BoraConfig(tau=tau), docs_per_task=problem.docs_per_task)


def test_schedule_is_a_lambda_lr_with_the_warm_up_and_decay_and_resumes():
    problem = GaussianProblem.make()
    train = TrainConfig(max_steps=10, warmup_steps=3, lr_schedule="linear", lr=0.1, device="cpu", progress=False)
    stepper = MAPStepper(_gaussian_model(problem, 2.0), train, init_global=torch.zeros(3))
    stepper.setup(problem.full_batch())
    assert isinstance(stepper.scheduler, LambdaLR)
    used = []
    for _ in range(6):
        stepper.step(problem.full_batch())
        used.append(stepper.last_lr)
    assert used == pytest.approx([0.1 * lr_factor("linear", k, 10, 3) for k in range(6)], rel=1e-12)
    state = copy.deepcopy(stepper.state_dict())  # the live tensors, as a checkpoint stores them
    assert state["scheduler"]["last_epoch"] == 6
    resumed = MAPStepper(_gaussian_model(problem, 2.0), train, init_global=torch.zeros(3))
    resumed.setup(problem.full_batch())
    resumed.load_state_dict(state)
    for s in (stepper, resumed):
        s.step(problem.full_batch())
    assert resumed.last_lr == stepper.last_lr == pytest.approx(0.1 * lr_factor("linear", 6, 10, 3), rel=1e-12)
    assert torch.equal(resumed.guide.task_parameter, stepper.guide.task_parameter)


# ----------------------------------------------------------------------------- early stopping


@pytest.mark.parametrize("values, patience, last_step, best_step", [
    ([3, 2, 2.5, 1, 1.5, 1.7, 0.5], 1, 2, 1),       # stops at the first evaluation that does not improve
    ([3, 2, 2.5, 1, 1.5, 1.7, 0.5], 2, 5, 3),       # the count restarts after an improvement
    ([3, 2, 1, 0.5, 0.4, 0.3, 0.2], 1, 6, 6),       # never after one that improves
    ([1, 2, 3, 4, 5, 6, 7], None, 6, 0),            # None: never early
])
def test_patience_counts_evaluations_without_improvement(values, patience, last_step, best_step):
    problem = GaussianProblem.make()
    scripted = iter(values)
    state = optimise_map(
        _gaussian_model(problem, 2.0), iter(lambda: problem.full_batch(), None),
        TrainConfig(max_steps=7, eval_every=1, patience=patience, lr=0.01, device="cpu", progress=False),
        init_global=torch.zeros(3), validate=lambda theta: next(scripted),
    )
    assert state.history["step"][-1] == last_step
    assert state.stopped_early == (last_step < 6)
    assert state.best_step == best_step


# ----------------------------------------------------------------------------- divergence


def test_divergence_is_a_floating_point_error_that_says_what_to_try(corpus):
    with pytest.raises(FloatingPointError) as info:
        bora_pyro.fit_map(corpus, model=_base(), tokenizer=char_tokenizer(), **{**QUICK, "alpha": 1e30})
    message = str(info.value)
    assert message.startswith("Training diverged at step 0 (0-based) of 6: the gradient norm is ")
    assert "at learning rate 0.01" in message and "lr=0.001" in message
    assert "warmup_steps=" in message and "fp32" in message
    assert info.value.__context__ is None and info.value.__cause__ is None


@pytest.mark.parametrize("method", ["map", "svi"])
def test_a_non_finite_forward_pass_is_a_divergence_not_a_pyro_dump(corpus, method):
    base = _base()
    P = bora_pyro.models.MultiTaskLM(base, rank=2, alpha=4.0).num_params
    fit = bora_pyro.fit_map if method == "map" else bora_pyro.fit_svi
    with pytest.raises(FloatingPointError, match=r"^Training diverged at step 0 .*: the loss is nan") as info:
        fit(corpus, model=base, tokenizer=char_tokenizer(), init_adapter=torch.ones(P), **{**QUICK, "alpha": 1e38})
    assert "Expected parameter" not in str(info.value) and "Trace Shapes" not in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None


def _checkpoint_helpers():
    from tests.inference import test_checkpoint

    return test_checkpoint


def test_divergence_keeps_the_last_finite_checkpoint_and_resume_continues(monkeypatch, tmp_path):
    helpers = _checkpoint_helpers()
    reference = helpers._reference("map")
    folder = tmp_path / "checkpoints"
    original, calls = Stepper.step, [0]

    def overflow_once(self, batch):  # step 13 reports a non-finite loss, as an overflow would
        calls[0] += 1
        loss = original(self, batch)
        return math.inf if calls[0] == 14 else loss

    monkeypatch.setattr(Stepper, "step", overflow_once)
    with pytest.raises(FloatingPointError, match="at step 13 .*the loss is inf.*resume=") as info:
        helpers._fit("map", checkpoint_dir=folder, checkpoint_every=5)
    assert str(folder) in str(info.value)
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["step-00000009"]
    saved = ckpt.load_checkpoint(folder).state["stepper"]
    assert all(torch.isfinite(t).all() for t in saved["guide"].values())
    helpers._assert_same_fit(helpers._fit("map", resume=folder), reference)


def test_no_checkpoint_is_written_with_non_finite_adapters(monkeypatch, tmp_path):
    helpers = _checkpoint_helpers()
    folder = tmp_path / "checkpoints"
    original, calls = Stepper.step, [0]

    def poison(self, batch):  # at step 9, due for a checkpoint, the adapters go non-finite
        calls[0] += 1           # while the loss and gradient of the step were finite
        loss = original(self, batch)
        if calls[0] == 10:
            with torch.no_grad():
                next(self.guide.parameters())[0] = math.nan
        return loss

    monkeypatch.setattr(Stepper, "step", poison)
    with pytest.raises(FloatingPointError, match="adapters are no longer finite"):
        helpers._fit("map", checkpoint_dir=folder, checkpoint_every=5)
    assert [p.name for p in folder.iterdir()] == ["step-00000004"]


def test_max_length_beyond_the_models_positions_is_refused_before_training():
    """GPT-2 has learned absolute positions: max_length above n_positions must be a clear error."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=104, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    with pytest.raises(ValueError, match="max_length=32"):
        bora_pyro.fit_map(synthetic_corpus_frame((6, 6)), model=base, tokenizer=char_tokenizer(), max_length=32,
                          max_steps=1, batch_size=2, device="cpu", progress=False)
