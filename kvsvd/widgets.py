"""Notebook controls that also run headless.

``controls(draw, values, ranges, live=...)`` builds one ipywidgets control per parameter
(an IntSlider for ``(min, max, step)``, a Dropdown for a list of options) and calls
``draw(**values)`` once. With ``live=True`` (JupyterLab) the controls are displayed and every
change re-runs ``draw`` into an output area; with ``live=False`` (papermill, CI) nothing is
displayed and the single call renders the figure for the parameter values. The callbacks
are plain traitlets observers, so they run without a frontend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import ipywidgets as W
from IPython.display import clear_output, display


@dataclass
class Controls:
    widgets: dict[str, W.ValueWidget]
    output: W.Output
    draw: Callable[..., object]
    live: bool
    calls: int = field(default=0)

    def values(self) -> dict:
        return {name: w.value for name, w in self.widgets.items()}

    def refresh(self, change=None) -> None:
        """Re-run ``draw`` with the current control values (into the output area when live)."""
        self.calls += 1
        if not self.live:
            self.draw(**self.values())
            return
        with self.output:
            clear_output(wait=True)
            self.draw(**self.values())

    @property
    def box(self) -> W.VBox:
        return W.VBox([W.HBox(list(self.widgets.values())), self.output])


LABEL = {"description_width": "initial"}  # a label as wide as its name: "layer_group_size" in full


def _widget(name: str, value, spec) -> W.ValueWidget:
    if isinstance(spec, tuple) and len(spec) == 3:
        lo, hi, step = spec
        if not (isinstance(value, int) and lo <= value <= hi):
            raise ValueError(f"{name}={value!r} is out of range; accepted: integers in [{lo}, {hi}]")
        return W.IntSlider(value=value, min=lo, max=hi, step=step, description=name, continuous_update=False,
                           style=LABEL)
    if isinstance(spec, list):
        if value not in spec:
            raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(map(str, spec))}")
        return W.Dropdown(value=value, options=spec, description=name, style=LABEL)
    raise TypeError(f"ranges[{name!r}] must be (min, max, step) or a list of options, got {spec!r}")


def controls(draw: Callable[..., object], values: dict, ranges: dict, *, live: bool) -> Controls:
    """Build the controls for ``values`` (the notebook's parameters) over ``ranges``; draw once."""
    missing = set(ranges) - set(values)
    if missing:
        raise ValueError(f"ranges names {sorted(missing)} without a value; accepted: {sorted(values)}")
    ctl = Controls({name: _widget(name, values[name], spec) for name, spec in ranges.items()}, W.Output(), draw, live)
    for w in ctl.widgets.values():
        w.observe(ctl.refresh, names="value")
    if live:
        display(ctl.box)
    ctl.refresh()
    return ctl
