"""The config objects: one source of every setting, validated, round-tripped, flat keywords mapped."""

import math

import pytest

from bora_pyro.config import BoraConfig, DataConfig, Settings, TrainConfig, resolve_settings


def test_field_names_are_unique_across_the_three_configs():
    names = DataConfig.field_names() + BoraConfig.field_names() + TrainConfig.field_names()
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_flat_keywords_and_objects_give_the_same_settings():
    flat = resolve_settings(rank=4, lr=2e-3, max_length=64, tau=1e3)
    objects = resolve_settings(
        data=DataConfig(max_length=64), config=BoraConfig(rank=4, tau=1e3), train=TrainConfig(lr=2e-3)
    )
    assert flat == objects
    assert isinstance(flat, Settings)


def test_overrides_replace_fields_of_given_objects():
    s = resolve_settings(train=TrainConfig(lr=5e-4, batch_size=4), batch_size=2)
    assert (s.train.lr, s.train.batch_size) == (5e-4, 2)


def test_unknown_keyword_names_it_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown setting\(s\) \['rnak'\]; did you mean 'rank'\?.*batch_size"):
        resolve_settings(rnak=4)


def test_wrong_object_type_is_a_type_error():
    with pytest.raises(TypeError, match="train must be a TrainConfig"):
        resolve_settings(train=BoraConfig())


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": True}, "batch_size must be a positive integer"),
    ({"patience": 0}, "patience must be a positive integer or None"),
    ({"eval_every": 0}, "eval_every must be a positive integer or None"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ({"lr": math.inf}, "lr must be a finite positive number"),
    ({"lr": 0}, "lr must be a finite positive number"),
    ({"lr_schedule": "cosin"}, "did you mean 'cosine'"),
    ({"parameterization": "centred"}, "did you mean 'centered'"),
    ({"autocast": "fp8"}, "autocast='fp8' is not valid"),
    ({"num_particles": 0}, "num_particles must be a positive integer"),
    ({"tau_gate": -1.0}, "tau_gate must be a finite number >= 0"),
])
def test_train_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_length": 1}, "max_length=1 leaves no token"),
    ({"test_size": 1.0}, "test_size must be a fraction"),
    ({"test_size": 0.6, "validation_size": 0.4}, "leaves no training documents"),
    ({"prompt_column": "p"}, "prompt_column and completion_column go together"),
    ({"tasks": "HAMLET"}, "wrap it in a list"),
    ({"tasks": []}, "selects no task"),
])
def test_data_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"alpha": math.inf}, "alpha must be a finite positive number"),
    ({"tau": -1}, "must be >= 0"),
    ({"precision_groups": "abc"}, "did you mean 'ab'"),
    ({"tau_prior": (0, 1)}, "concentration > 0"),
    ({"target_modules": []}, "non-empty list of module names"),
])
def test_bora_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BoraConfig(**kwargs)


@pytest.mark.parametrize("cls, kwargs", [
    (BoraConfig, {"tau": math.inf, "target_modules": ["q_proj"], "tau_prior": (2.0, 0.5)}),
    (BoraConfig, {"tau": {"A": 10.0, "B": 20.0}}),
    (DataConfig, {"tasks": ["a", "b"], "max_length": 32}),
    (TrainConfig, {"max_steps": 7, "autocast": "bf16", "checkpoint_dir": "x"}),
])
def test_to_dict_from_dict_round_trip(cls, kwargs):
    import json

    obj = cls(**kwargs)
    text = json.dumps(obj.to_dict(), allow_nan=False)
    assert cls.from_dict(json.loads(text)) == obj


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"Unknown model setting\(s\) \['foo'\] for BoraConfig; valid: .*'rank'"):
        BoraConfig.from_dict({"rank": 2, "foo": 1})


def test_total_steps():
    assert TrainConfig(max_steps=5).total_steps(100) == 5
    assert TrainConfig(batch_size=8).total_steps(100) == 3 * 12
    assert TrainConfig(batch_size=8, epochs=0.5).total_steps(100) == 6
