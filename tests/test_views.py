"""Views: sizes as mmdet's keep-ratio resize, exact box round trips, one pixel path."""

import numpy as np
import pytest
import torch

from mtpd.data import ViewSpec, ViewSpecError, boxes_from_view, boxes_to_view, grid_size, prepare_view, view_meta


def test_resize_keeps_ratio_and_bounds():
    spec = ViewSpec(short=800, long=1333)
    assert spec.resized_size(480, 640) == (800, 1067)
    # The long side bounds the scale for elongated images.
    assert spec.resized_size(400, 1600) == (333, 1333)
    assert spec.padded_size(480, 640) == (800, 1088)


@pytest.mark.parametrize("view", ["orig", "hflip"])
@pytest.mark.parametrize("size", [(37, 91), (128, 128), (300, 97)])
def test_box_round_trip(view, size):
    spec = ViewSpec(short=64, long=100)
    meta = view_meta(spec, size, view)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (20, 2)) * [size[1], size[0]]
    wh = rng.uniform(1, 20, (20, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    v = boxes_to_view(boxes, meta)
    assert np.all(v[:, 2] >= v[:, 0]) and np.all(v[:, 3] >= v[:, 1])
    np.testing.assert_allclose(boxes_from_view(v, meta), boxes, rtol=0, atol=1e-9)


def test_flip_mirrors_boxes_and_pixels():
    spec = ViewSpec(short=64, long=64, views=("orig", "hflip"))
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:20, 5:15] = 255  # a bright square near the left edge
    x0, m0 = prepare_view(img, spec, "orig")
    x1, m1 = prepare_view(img, spec, "hflip")
    torch.testing.assert_close(x1, x0.flip(-1))
    box = np.array([[5, 10, 15, 20]], float)
    np.testing.assert_allclose(boxes_to_view(box, m1), [[49, 10, 59, 20]])
    assert m1.flip and not m0.flip


def test_prepare_view_normalises_and_pads_each_view_alone():
    spec = ViewSpec(short=50, long=80)
    img = np.full((50, 70, 3), 128, np.uint8)
    x, meta = prepare_view(img, spec)
    assert meta.size == (50, 70) and meta.padded == (64, 96) and x.shape == (3, 64, 96)
    expected = (128 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(x[:, 0, 0], expected)
    assert torch.all(x[:, 50:, :] == 0) and torch.all(x[:, :, 70:] == 0)


def test_grid_size_covers_valid_region():
    assert grid_size((800, 1067), 8) == (100, 134)
    assert grid_size((800, 1067), 128) == (7, 9)


@pytest.mark.parametrize(
    "kw,named",
    [
        (dict(short=0), "short side 0"),
        (dict(short=800, long=700), "long side 700"),
        (dict(views=("orig", "rot90")), "'rot90'"),
        (dict(short=100000, long=100000), "short side 100000"),
        (dict(views=()), "non-empty"),
    ],
)
def test_bad_view_spec_names_the_value(kw, named):
    with pytest.raises(ViewSpecError, match=named):
        ViewSpec(**kw)


def test_spec_dict_round_trip():
    spec = ViewSpec(short=96, long=128, views=("orig", "hflip"))
    assert ViewSpec.from_dict(spec.to_dict()) == spec
