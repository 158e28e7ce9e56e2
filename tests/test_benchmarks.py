"""The step-time benchmark runs end to end at tiny sizes and reports what it promises."""

import json
import math

import pytest

from tests.scripts import load_benchmark

pytest.importorskip("peft")

TINY = ["--device", "cpu", "--layers", "1", "--hidden", "32", "--vocab", "128", "--seq", "16",
        "--batch", "4", "--steps", "1", "--warmup", "1", "--json"]


@pytest.fixture(scope="module")
def step_time():
    return load_benchmark("step_time")


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_step_time_json(step_time, capsys):
    result = step_time.main(TINY + ["--tasks", "3", "5"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))

    assert printed["config"]["tasks"] == [3, 5]
    machine = printed["machine"]
    assert machine["device"] == "cpu" and machine["torch"] and _positive(machine["threads"])
    assert machine["device_name"]
    assert "optimised parameters" in printed["memory_kind"]
    for key in ("floor", "loop", "map", "svi", "eval_base", "eval_bora"):
        assert _positive(printed["median_s"][key]), key
    for key in ("loop_ratio", "map_ratio", "svi_ratio", "eval_ratio"):
        assert _positive(printed[key]), key
    for key in ("floor", "loop", "map", "svi"):
        assert _positive(printed["peak_mem_bytes"][key]), key
    # SVI optimises a location and a scale per entry: more state than MAP, which has more than
    # the floor's single adapter.
    mem = printed["peak_mem_bytes"]
    assert mem["svi"] > mem["map"] > mem["floor"]
    # Every task count has its own loop / MAP / SVI / eval numbers; the floor is timed once.
    assert set(printed["by_tasks"]) == {"3", "5"}
    for entry in printed["by_tasks"].values():
        for key in ("loop_ratio", "map_ratio", "svi_ratio", "eval_ratio"):
            assert _positive(entry[key]), key
        assert _positive(entry["eval_tokens_per_s"]["bora"])
    assert len(printed["times_s"]["floor"]) == 1 and len(printed["times_s"]["map@5"]) == 1
    assert printed["config"]["schedule"] == "interleaved"  # auto, on the CPU
    assert printed["by_tasks"]["5"]["peak_mem_bytes"]["map"] > printed["by_tasks"]["3"]["peak_mem_bytes"]["map"]


def test_methods_subset(step_time, capsys):
    result = step_time.main(TINY + ["--tasks", "2", "--methods", "floor", "map", "--schedule", "sequential"])
    capsys.readouterr()
    assert result["config"]["schedule"] == "sequential"
    assert set(result["median_s"]) == {"floor", "map"}
    assert _positive(result["map_ratio"])
    assert result["loop_ratio"] is None and result["svi_ratio"] is None and result["eval_ratio"] is None


def test_padded_and_packed_side_by_side_on_shakespeare_lengths(step_time, capsys):
    result = step_time.main([*TINY, "--seq", "64", "--batch", "8", "--tasks", "3", "--lengths", "shakespeare",
                             "--methods", "floor", "map"])
    capsys.readouterr()
    assert result["config"]["layouts"] == ["padded", "packed"]
    for key in ("floor", "map", "floor_packed", "map_packed"):
        assert _positive(result["tokens_per_s"][key]), key
    assert set(result["packing_speedup"]) == {"floor", "map"}
    assert all(_positive(v) for v in result["packing_speedup"].values())
    assert _positive(result["map_ratio_packed"])
    # packed rows hold the same documents without the padding
    assert result["real_fraction"]["packed"] > 0.9 > result["real_fraction"]["padded"]


def test_sampled_lengths_follow_the_shakespeare_histogram(step_time):
    import torch

    lengths = step_time.sample_lengths(20_000, 128, torch.Generator().manual_seed(0))
    assert min(lengths) >= 2 and max(lengths) == 128
    q50, q90 = sorted(lengths)[10_000], sorted(lengths)[18_000]
    assert 18 <= q50 <= 22 and 100 <= q90 <= 116  # the demo's data: median 20, p90 108


def test_task_sweep_counts_device_and_host_bytes(step_time, capsys):
    """--targets, --adapter-storage host: the [D, P] tables (value, two moments, a float32 step
    count per row) in host memory, only the global adapter (value, gradient, two moments, its
    step count) on the device, whatever the number of tasks; the floor: PEFT's four LoRA matrices
    with AdamW's state (a scalar step count each)."""
    result = step_time.main(TINY + ["--tasks", "3", "50", "--targets", "q_proj", "v_proj",
                                    "--methods", "floor", "map", "svi", "--adapter-storage", "host"])
    capsys.readouterr()
    adapter = result["config"]["adapter_bytes"]
    assert result["config"]["targets"] == ["q_proj", "v_proj"] and adapter == 4 * 8 * (32 + 32) * 2  # r (in + out), q and v
    P = adapter // 4
    for D in (3, 50):
        entry = result["by_tasks"][str(D)]
        assert entry["host_bytes"]["map"] == 3 * D * adapter + 4 * D
        assert entry["host_bytes"]["svi"] == 2 * (3 * D * adapter + 4 * D)
        assert entry["device_bytes"]["map"] == entry["device_bytes"]["svi"] == 4 * adapter + 4
        assert entry["device_bytes"]["floor"] == 4 * adapter + 4 * 4 and entry["host_bytes"]["floor"] == 0
    assert P == 1024
