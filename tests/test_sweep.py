"""The precision sweep: one split, a grid of tau, tables and figures, resuming a stopped sweep."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from bora_pyro import load_result
from bora_pyro.config import BoraConfig, DataConfig, TrainConfig
from bora_pyro.sweep import SWEEP_CONFIGS, SweepConfig, SweepResult, load_sweep, run_sweep, tau_label
from bora_pyro.testing import char_tokenizer, synthetic_corpus_frame, tiny_causal_lm

from tests.conftest import assert_close

TINY = SweepConfig(
    name="tiny", taus=(0.0, 10.0, math.inf, "learn"), data=DataConfig(max_length=48),
    model=BoraConfig(rank=2, alpha=4.0),
    train=TrainConfig(batch_size=4, lr=5e-3, max_steps=6, eval_every=3, patience=None),
)


def _run(out, **overrides):
    return run_sweep(
        synthetic_corpus_frame((8, 16, 32)), config=TINY, out=out, model=tiny_causal_lm(),
        tokenizer=char_tokenizer(), device="cpu", progress=False, **overrides,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("sweep"))


def test_tables_hold_one_column_per_tau_and_match_the_saved_fits(sweep):
    assert sweep.fitted == ["0", "10", "inf", "learn"]
    assert list(sweep.per_task.columns) == ["n_train", "base", "0", "10", "inf", "learn"]
    assert list(sweep.per_task["n_train"]) == sorted(sweep.per_task["n_train"], reverse=True)
    ov = sweep.overall.set_index("tau")
    assert list(ov.index) == ["base", "0", "10", "inf", "learn"]
    assert ov.loc["learn", "learned_tau"].startswith("A=")
    # the saved tau=10 fit, evaluated again, gives the table's numbers
    fit = load_result(sweep.out / "fits" / "10", model=tiny_causal_lm(), tokenizer=char_tokenizer(), device="cpu")
    df = fit.evaluate("test").set_index("task")
    assert_close(df.loc[list(sweep.per_task.index), "perplexity"].to_numpy(), sweep.per_task["10"].to_numpy(), rtol=1e-5)
    assert_close(df.loc["overall", "perplexity"], ov.loc["10", "test_perplexity"], rtol=1e-5)
    assert fit.tau == {"A": 10.0, "B": 10.0}
    # the pooled fit has every task at the global adapter; the independent one does not
    assert np.allclose(sweep.distances["inf"], 0.0)
    assert (sweep.distances["0"] > 0).all()


def test_compare_ranks_the_fits_by_held_out_log_likelihood_as_the_perplexity_table_does(sweep):
    """az.compare over the MAP fits: elpd = -(total test NLL), so exp(-elpd / tokens) is each
    fit's overall test perplexity; the best has elpd_diff 0, the weights sum to 1."""
    from bora_pyro.reports import heldout_log_likelihood

    model = dict(model=tiny_causal_lm(), tokenizer=char_tokenizer(), device="cpu")
    table = sweep.compare(**model)
    assert sorted(table.index) == sorted(f"tau={t}" for t in sweep.fitted)
    tokens = pd.read_csv(sweep.out / "base_test.csv").set_index("task").loc["overall", "n_tokens"]
    ov = sweep.overall.set_index("tau")
    for label in sweep.fitted:
        assert_close(math.exp(-table.loc[f"tau={label}", "elpd_loo"] / tokens), ov.loc[label, "test_perplexity"],
                     rtol=1e-6, msg=label)
    assert list(table["elpd_loo"]) == sorted(table["elpd_loo"], reverse=True)
    assert table["elpd_diff"].iloc[0] == 0 and (table["elpd_diff"].iloc[1:] > 0).all()
    assert table["weight"].sum() == pytest.approx(1.0, abs=1e-6) and (table["p_loo"] == 0).all()
    # a subset of the grid, and an extra fit scored on the same documents
    fit = load_result(sweep.out / "fits" / "10", **model)
    extra = heldout_log_likelihood(fit, max_docs_per_task=TINY.eval_docs_per_task, seed=TINY.train.seed)
    two = sweep.compare(taus=[0.0, "inf"], extra={"again tau=10": extra}, **model)
    assert sorted(two.index) == ["again tau=10", "tau=0", "tau=inf"]
    with pytest.raises(ValueError, match="does not have"):
        sweep.compare(taus=["1e+06", 0.0], **model)
    with pytest.raises(ValueError, match="model object"):
        sweep.compare(device="cpu")


def test_improvement_and_best_follow_the_definitions():
    per_task = pd.DataFrame(
        {"n_train": [30, 10], "base": [50.0, 60.0], "0": [20.0, 40.0], "100": [18.0, 30.0], "inf": [24.0, 32.0]},
        index=pd.Index(["rich", "thin"], name="task"),
    )
    overall = pd.DataFrame({
        "tau": ["base", "0", "100", "inf"], "test_perplexity": [55.0, 28.0, 23.0, 27.0],
        "validation_perplexity": [56.0, 29.0, 25.0, 24.0], "learned_tau": [None] * 4,
        "steps": [0, 5, 5, 5], "best_step": [-1, 4, 4, 4], "seconds": [0.0, 1.0, 1.0, 1.0],
    })
    sweep = SweepResult(config=TINY, per_task=per_task, overall=overall, distances=per_task[[]])
    assert sweep.best("test") == "100" and sweep.best("validation") == "inf"
    assert sweep.best("validation", finite=True) == sweep.best_finite() == "100"
    imp = sweep.improvement("100")
    assert_close(imp["vs_tau=0"].to_numpy(), [10.0, 25.0])
    assert_close(imp["vs_tau=inf"].to_numpy(), [25.0, 6.25])
    assert sweep.wins("100") == {"vs_tau=0": 2, "vs_tau=inf": 2}
    assert "**18.00**" in sweep.per_task_markdown() and "**30.00**" in sweep.per_task_markdown()


def test_outputs_are_written_and_read_back(sweep):
    out = sweep.out
    for name in ("overall.csv", "overall.md", "per_task.csv", "per_task.md", "distances.csv", "summary.md",
                 "figures/precision_vs_perplexity.png", "figures/improvement_vs_size.png",
                 "figures/distance_vs_size.png"):
        assert (out / name).stat().st_size > 0, name
    again = load_sweep(out)
    pd.testing.assert_frame_equal(again.per_task, sweep.per_task, check_exact=False, rtol=1e-9)
    assert list(again.overall["tau"]) == list(sweep.overall["tau"])
    assert again.best() == sweep.best()
    assert again.config.taus == TINY.taus
    summary = (out / "summary.md").read_text()
    assert f"Best fixed tau on validation: **{sweep.best()}**" in summary


def test_figures_draw_every_task_and_the_limits(sweep):
    fig = sweep.plot_precision()
    ax = fig.axes[0]
    thin = [line for line in ax.lines if line.get_linewidth() < 1 and len(line.get_xdata()) == 3]
    assert len(thin) == len(sweep.per_task)  # one curve per task over tau = 0, 10, inf
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0].startswith("0") and labels[-1].startswith("∞")
    fig = sweep.plot_improvement()
    assert len(fig.axes[0].collections) == 2  # vs tau=0 and vs tau=inf
    fig = sweep.plot_distance()
    assert len(fig.axes[0].lines) == 2  # tau=10 and the learned tau
    with pytest.raises(ValueError, match="not fitted"):
        sweep.plot_distance(taus=["1e+06"])


def test_a_stopped_sweep_continues_and_ends_as_one_uninterrupted_run(tmp_path, sweep):
    first = _run(tmp_path, taus=(0.0, 10.0))
    stamp = (tmp_path / "fits" / "0" / "adapters.safetensors").stat().st_mtime_ns
    full = _run(tmp_path)  # the grid of the module's sweep: tau=0 and 10 are read back
    assert (tmp_path / "fits" / "0" / "adapters.safetensors").stat().st_mtime_ns == stamp
    assert first.fitted == ["0", "10"]
    pd.testing.assert_frame_equal(full.per_task, sweep.per_task, check_exact=False, rtol=1e-6)
    assert not (tmp_path / "checkpoints" / "inf").exists()


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    _run(tmp_path, taus=(math.inf,))
    with pytest.raises(ValueError, match="other settings"):
        _run(tmp_path, taus=(math.inf,), rank=3)


def test_bad_grids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="without repeats"):
        _run(tmp_path, taus=(1.0, 1.0))
    with pytest.raises(ValueError, match="not valid"):
        _run(tmp_path, taus=(-1.0,))
    with pytest.raises(ValueError, match="Unknown sweep settings"):
        _run(tmp_path, steps=3)
    with pytest.raises(ValueError, match="not a built-in"):
        run_sweep(config="gpu", out=tmp_path)


#: The built-in configurations as the sweep code before the config objects defined them
#: (SweepConfig.to_dict() of that version, without the characters): they must not change, except
#: the cpu run's length, which became early stopping (max 600 steps, patience 3) for issue 12.
_EARLIER = {
    "cpu": {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"], "max_length": 96,
            "test_size": 0.33, "validation_size": 0.1, "batch_size": 8, "lr": 0.002, "max_steps": 600,
            "epochs": None, "eval_every": 25, "patience": 3, "max_eval_docs_per_task": 4,
            "eval_docs_per_task": 12, "precision_groups": "ab", "parameterization": "offset", "seed": 0},
    "paper": {"rank": 16, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"], "max_length": 256,
              "test_size": 0.33, "validation_size": 0.1, "batch_size": 8, "lr": 0.001, "max_steps": None,
              "epochs": 5.0, "eval_every": None, "patience": 3, "max_eval_docs_per_task": None,
              "eval_docs_per_task": None, "precision_groups": "ab", "parameterization": "offset", "seed": 0},
}
_EARLIER_TAUS = {"cpu": ["0", "100", "1000", "10000", "100000", "inf", "learn"],
                 "paper": ["0", "100", "1000", "10000", "100000", "1e+06", "inf", "learn"]}


def test_built_in_configs_mirror_the_paper_and_fit_a_cpu():
    from bora_pyro.data import REPRO_CHARACTERS, paper_selection

    paper = SWEEP_CONFIGS["paper"]()
    assert list(paper.characters) == paper_selection(25, 100) == list(REPRO_CHARACTERS)
    cpu = SWEEP_CONFIGS["cpu"]()
    assert len(cpu.characters) == 12
    for name, config in (("cpu", cpu), ("paper", paper)):
        settings = config.settings()
        assert {k: settings[k] for k in _EARLIER[name]} == _EARLIER[name], name
        assert [tau_label(t) for t in config.taus] == _EARLIER_TAUS[name]
        # the settings added since are the config classes' defaults, as fit_map used them then
        defaults = SweepConfig(name="").settings()
        assert {k: v for k, v in settings.items() if k not in _EARLIER[name] and k != "characters"} == {
            k: v for k, v in defaults.items() if k not in _EARLIER[name] and k != "characters"}


def test_a_sweep_folder_written_before_the_config_objects_is_continued(tmp_path):
    _run(tmp_path, taus=(math.inf,))
    state_path = tmp_path / "sweep.json"
    state = json.loads(state_path.read_text())
    # the earlier format: flat settings (no data/model/train objects) and a flat config
    state["settings"] = {k: state["settings"][k] for k in [*_EARLIER["cpu"], "characters", "model"]}
    state["config"] = {"name": "tiny", "characters": None, "taus": ["inf"], **{
        k: state["settings"][k] for k in _EARLIER["cpu"]}}
    state_path.write_text(json.dumps(state))
    stamp = (tmp_path / "fits" / "inf" / "adapters.safetensors").stat().st_mtime_ns
    again = _run(tmp_path, taus=(math.inf,))
    assert (tmp_path / "fits" / "inf" / "adapters.safetensors").stat().st_mtime_ns == stamp  # read back
    assert again.config.model.rank == TINY.model.rank
    state["info"] = {}
    state_path.write_text(json.dumps(state))
    assert load_sweep(tmp_path).config.with_overrides(name="tiny").settings() == TINY.settings()


def test_config_overrides_name_fields_of_every_part_and_round_trip():
    config = TINY.with_overrides(rank=3, max_length=32, lr=1e-2, taus=(0, "learn"), eval_docs_per_task=2)
    assert (config.model.rank, config.data.max_length, config.train.lr) == (3, 32, 1e-2)
    assert config.taus == (0.0, "learn") and config.eval_docs_per_task == 2
    assert (TINY.model.rank, TINY.data.max_length) == (2, 48)  # the original is unchanged
    assert SweepConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"Unknown sweep settings \['rnak'\]; did you mean 'rank'"):
        TINY.with_overrides(rnak=3)
    with pytest.raises(ValueError, match="fits every value of taus"):
        TINY.with_overrides(tau=5.0)
    with pytest.raises(ValueError, match="checkpoints each fit"):
        SweepConfig(name="x", train=TrainConfig(checkpoint_dir="ckpt"))
    with pytest.raises(ValueError, match="eval_docs_per_task must be a positive integer or None"):
        TINY.with_overrides(eval_docs_per_task=0)


def test_fit_keywords_are_the_changed_model_and_training_settings():
    cpu = SWEEP_CONFIGS["cpu"]()
    # what the cpu config changes (alpha 16, batch 8 and patience 3 are the defaults), and nothing
    # the sweep sets per fit or that shapes the corpus
    assert cpu.fit_keywords() == {"target_modules": ["q_proj", "v_proj"], "max_steps": 600, "lr": 2e-3,
                                  "eval_every": 25, "max_eval_docs_per_task": 4}
    changed = cpu.with_overrides(rank=4, tau_val_batches=4, max_length=32, split_seed=3).fit_keywords()
    assert changed["rank"] == 4 and changed["tau_val_batches"] == 4
    assert not {"max_length", "split_seed", "tau", "checkpoint_dir", "resume", "version"} & set(changed)
    assert set(changed) <= set(BoraConfig.field_names()) | set(TrainConfig.field_names())
    assert SweepConfig(name="plain").fit_keywords() == {}
