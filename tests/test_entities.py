"""Entity layouts: the order, masks and positions of every kind, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xar_jax import entities as ent

ALL_KINDS = [
    ent.make_layout("token", 8),
    ent.make_layout("cell", 8, cell_size=4),
    ent.make_layout("cell", 16, cell_size=8),
    ent.make_layout("subsample", 8, subsample_factor=2),
    ent.make_layout("scale", 8, scale_sizes=(1, 2, 4, 8)),
    ent.make_layout("image", 8),
]


def _grid(layout, batch=2, channels=3, seed=0):
    h, w = layout.grid_size
    return jax.random.normal(jax.random.key(seed), (batch, h, w, channels))


@pytest.mark.parametrize("layout", ALL_KINDS, ids=lambda lay: f"{lay.kind}-{lay.grid_size[0]}")
def test_grid_sequence_round_trip_is_exact(layout):
    grid = _grid(layout)
    seq = jax.jit(layout.to_sequence)(grid)
    assert seq.shape == (2, layout.num_tokens, 3)
    np.testing.assert_array_equal(jax.jit(layout.from_sequence)(seq), grid)


@pytest.mark.parametrize("layout", ALL_KINDS, ids=lambda lay: f"{lay.kind}-{lay.grid_size[0]}")
def test_mask_is_block_causal_over_entities(layout):
    mask = layout.attention_mask
    e = layout.entity_of_token
    assert mask.shape == (layout.num_tokens,) * 2
    for i in range(layout.num_tokens):
        np.testing.assert_array_equal(mask[i], e <= e[i])
    # Tokens of one entity see each other in both directions; no token sees a later entity.
    assert mask.diagonal().all()
    assert np.array_equal(np.bincount(e), layout.entity_sizes)


def test_published_cell_layout_matches_reference_cells(xar_golden):
    layout = ent.make_layout("cell", 16, cell_size=8)
    grid = xar_golden["fwd/x0_nchw"].transpose(0, 2, 3, 1)
    seq = np.asarray(layout.to_sequence(grid))
    cells = xar_golden["fwd/cells"]  # (4 cells, B, 64, 16)
    np.testing.assert_array_equal(seq.reshape(3, 4, 64, 16).transpose(1, 0, 2, 3), cells)
    np.testing.assert_array_equal(layout.additive_mask(), xar_golden["fwd/mask_additive"])


def test_cell_order_is_cells_row_major_then_tokens_row_major():
    layout = ent.make_layout("cell", 4, cell_size=2)
    expected = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    np.testing.assert_array_equal(layout.order, expected)
    np.testing.assert_array_equal(layout.positions[:4], [[0, 0], [0, 1], [1, 0], [1, 1]])


def test_token_kind_is_raster_order_with_one_token_per_entity():
    layout = ent.make_layout("token", 4)
    np.testing.assert_array_equal(layout.order, np.arange(16))
    assert layout.entity_sizes == (1,) * 16


def test_subsample_entity_holds_tokens_with_the_same_offset():
    layout = ent.make_layout("subsample", 6, subsample_factor=3)
    rows, cols = layout.positions[:, 0].astype(int), layout.positions[:, 1].astype(int)
    offsets = [(a, b) for a in range(3) for b in range(3)]
    for j, (a, b) in enumerate(offsets):
        sel = layout.entity_of_token == j
        assert sel.sum() == 4
        assert (rows[sel] % 3 == a).all() and (cols[sel] % 3 == b).all()


def test_scale_entities_are_area_downsampled_grids():
    layout = ent.make_layout("scale", 4, scale_sizes=(1, 2, 4))
    grid = _grid(layout, batch=1, channels=1)
    seq = np.asarray(layout.to_sequence(grid))[0, :, 0]
    g = np.asarray(grid)[0, :, :, 0]
    np.testing.assert_allclose(seq[0], g.mean(), rtol=1e-6)
    np.testing.assert_allclose(seq[1:5], g.reshape(2, 2, 2, 2).mean((1, 3)).reshape(-1), rtol=1e-6)
    np.testing.assert_array_equal(seq[5:], g.reshape(-1))
    assert layout.entity_sizes == (1, 4, 16) and not layout.uniform
    # Coarse tokens sit at the centre of the area they average, in grid units.
    np.testing.assert_allclose(layout.positions[0], [1.5, 1.5])


def test_image_kind_is_one_entity_with_full_attention():
    layout = ent.make_layout("image", 4)
    assert layout.num_entities == 1 and layout.attention_mask.all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="cell", grid_size=16, cell_size=5), "cell_size=5"),
        (dict(kind="subsample", grid_size=16, subsample_factor=3), "subsample_factor=3"),
        (dict(kind="scale", grid_size=16, scale_sizes=()), "scale_sizes is empty"),
        (dict(kind="scale", grid_size=16, scale_sizes=(1, 4, 2, 16)), "strictly increasing"),
        (dict(kind="scale", grid_size=16, scale_sizes=(1, 2, 4, 8)), "must end at the grid size"),
        (dict(kind="scale", grid_size=12, scale_sizes=(1, 5, 12)), "do not divide"),
        (dict(kind="scale", grid_size=(8, 4), scale_sizes=(8,)), "square grid"),
        (dict(kind="row", grid_size=16), "is not one of"),
    ],
)
def test_impossible_geometry_raises_a_clear_error(kwargs, message):
    kind = kwargs.pop("kind")
    grid = kwargs.pop("grid_size")
    with pytest.raises(ValueError, match=message):
        ent.make_layout(kind, grid, **kwargs)


def test_wrong_grid_shape_is_rejected():
    layout = ent.make_layout("cell", 8, cell_size=4)
    with pytest.raises(ValueError, match="does not match"):
        layout.to_sequence(jnp.zeros((1, 4, 4, 1)))
