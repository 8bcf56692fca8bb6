"""The widget helper builds without a frontend and its callbacks redraw with the new values."""

import pytest

pytest.importorskip("ipywidgets", reason="the widgets need kvsvd's workbook extra")
from kvsvd.widgets import controls  # noqa: E402


def test_headless_controls_draw_once_then_redraw_on_change():
    calls = []
    ctl = controls(lambda **kw: calls.append(kw), {"rank": 32, "n_iter": 2, "method": "rsvd", "other": 1},
                   {"rank": (8, 128, 8), "n_iter": (0, 8, 1), "method": ["rsvd", "lowrank_svd"]}, live=False)
    assert calls == [{"rank": 32, "n_iter": 2, "method": "rsvd"}]
    ctl.widgets["rank"].value = 64
    ctl.widgets["method"].value = "lowrank_svd"
    assert calls[-1] == {"rank": 64, "n_iter": 2, "method": "lowrank_svd"} and ctl.calls == 3
    assert len(ctl.box.children) == 2


def test_live_controls_draw_into_their_output_area():
    calls = []
    ctl = controls(lambda **kw: calls.append(kw), {"rank": 16}, {"rank": (8, 64, 8)}, live=True)
    ctl.widgets["rank"].value = 24
    assert [c["rank"] for c in calls] == [16, 24]


def test_bad_parameter_values_are_named():
    with pytest.raises(ValueError, match=r"rank=500 is out of range; accepted: integers in \[8, 128\]"):
        controls(print, {"rank": 500}, {"rank": (8, 128, 8)}, live=False)
    with pytest.raises(ValueError, match="method='svd3' is unknown"):
        controls(print, {"method": "svd3"}, {"method": ["rsvd"]}, live=False)
    with pytest.raises(ValueError, match="without a value"):
        controls(print, {}, {"rank": (8, 128, 8)}, live=False)
