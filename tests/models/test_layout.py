import pytest
import torch

from bora_pyro.models.layout import AdapterLayout


def _layout():
    return AdapterLayout([("l.0.q_proj", 6, 4), ("l.0.up_proj", 6, 10)], rank=2, alpha=4)


def test_offsets_sizes_and_views_cover_the_vector_once():
    layout = _layout()
    assert layout.size == 2 * 6 + 4 * 2 + 2 * 6 + 10 * 2
    theta = torch.arange(layout.size, dtype=torch.float32).expand(3, -1)
    seen = torch.cat([layout.view(theta, s.module, s.kind).flatten(1) for s in layout.slots], 1)
    torch.testing.assert_close(seen, theta)
    assert layout.view(theta, "l.0.up_proj", "B").shape == (3, 10, 2)
    assert layout.scaling == 2.0


def test_group_index():
    layout = _layout()
    names, idx = layout.group_index("ab")
    assert names == ["A", "B"]
    assert idx.shape == (layout.size,) and (idx[:12] == 0).all() and (idx[12:20] == 1).all()
    names, idx = layout.group_index("module")
    assert names == ["q_proj.A", "q_proj.B", "up_proj.A", "up_proj.B"]
    assert torch.bincount(idx).tolist() == [12, 8, 12, 20]
    with pytest.raises(ValueError, match="precision_groups='per_layer'.*shared"):
        layout.group_index("per_layer")


def test_init_global_is_standard_lora_and_round_trip():
    layout = _layout()
    theta = layout.init_global(generator=torch.Generator().manual_seed(0))
    A = layout.view(theta, "l.0.q_proj", "A")
    assert A.abs().max() <= 6 ** -0.5 and A.abs().max() > 0
    assert (layout.view(theta, "l.0.up_proj", "B") == 0).all()
    assert AdapterLayout.from_dict(layout.to_dict()) == layout
