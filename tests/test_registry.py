"""Every grid method, kvsvd's and the peers', through the same steps: named by its entry, built, run, counted."""

import importlib.util

import pytest
import torch

import kvsvd
from kvsvd import accounting, compat, grid
from kvsvd.config import CompressionConfig
from kvsvd.evaluate import prefill_context
from kvsvd.gridspec import Compressed, entry, family, label
from kvsvd.methods import METHODS
from kvsvd.peers import PEERS
from conftest import ByteTokenizer

pytestmark = pytest.mark.core

# one entry of each method's own keys; pca's calibration file is added by the test
EXAMPLES = {"none": {}, "dense16": {}, "press": {"press": "knorm", "ratio": 4},
            "quantized": {"nbits": 4, "residual_length": 8}, "turboquant": {"nbits": 3},
            "svd": {"ratio": 2, "residual_length": 8}, "xkv": {"layer_group_size": 2, "ratio": 2, "residual_length": 8},
            "minicache": {"start_layer": 0}, "pca": {"rank_k": 8, "rank_v": 8},
            "transform": {"ratio": 2, "layer_group_size": 2, "block_tokens": 16, "residual_length": 8}}


def test_the_examples_name_every_registered_method():
    assert set(EXAMPLES) == set(PEERS) | set(METHODS)
    assert not set(PEERS) & set(METHODS)


@pytest.mark.parametrize("name", list(EXAMPLES))
@torch.no_grad()
def test_every_grid_method_builds_runs_and_counts_its_bytes(tiny_llama, tmp_path, name):
    spec = {"method": name, **EXAMPLES[name]}
    if name == "pca":
        spec["calibration_path"] = str(kvsvd.calibrate(tiny_llama, ByteTokenizer(), ["Water boils at noon. " * 12],
                                                       8, 8, tmp_path / "pca.safetensors"))
    method = entry(spec)
    if method.package is not None and importlib.util.find_spec(method.package.split(".")[0]) is None:
        pytest.skip(f"{method.package} is in kvsvd's peers extra, not installed here")
    assert label(spec) and family(name) == method.family
    ids = torch.randint(3, 128, (1, 160), generator=torch.Generator().manual_seed(1))
    cache, press = grid.build(spec, tiny_llama, ids.shape[1])
    prefill_context(tiny_llama, ids, cache, press)
    step = ids[:, -1:]
    for t in range(3):
        positions = torch.tensor([[ids.shape[1] + t]])
        step = tiny_llama(step, position_ids=positions, **compat.with_cache(cache)).logits[:, -1].argmax(-1, keepdim=True)
    held = accounting.cache_report(cache, tiny_llama.config, ids.shape[1] + 3)
    assert held["total_bytes"] > 0
    paths = grid.paths(cache, spec, tiny_llama.config)
    assert paths and all(n > 0 for n in paths.values())
    if isinstance(method, Compressed):  # a kvsvd method holds compressed segments in every group
        assert all(group.segments for group in cache.groups)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_field_the_method_does_not_read_is_refused_by_name(name):
    """CompressionConfig takes each method's own fields and the common ones; nothing else passes silently."""
    method = METHODS[name]
    foreign = next(f for f in ("t", "rank_k", "n_iter") if f not in method.param_names())
    value = {"t": 0.3, "rank_k": 7, "n_iter": 5}[foreign]
    with pytest.raises(ValueError, match=f"{foreign}={value} does not apply to method='{name}'; it takes: "):
        CompressionConfig.of(method=name, layer_group_size=method.group_size, **{foreign: value})
    with pytest.raises(ValueError, match=rf"key\(s\) \['{foreign}'\] do not apply to method '{name}'"):
        entry({"method": name, foreign: value})


def test_grid_entries_that_read_the_calibration_name_its_default_file():
    """The grid makes (and passes) kvsvd calibrate's default file for a calibrated basis (named, or the default
    from 8×) or output weighting."""
    assert entry({"method": "transform", "ratio": 4}).calibration is None
    assert entry({"method": "transform", "ratio": 8, "basis": "prompt"}).calibration is None
    assert entry({"method": "transform", "ratio": 8}).calibration == (5, 0)  # the default basis from 8x
    assert entry({"method": "transform", "ratio": 8, "basis": "calibrated"}).calibration == (5, 0)
    assert entry({"method": "transform", "ratio": 8, "weighting": "output", "layer_group_size": 3}).calibration == (3, 0)
    assert entry({"method": "xkv", "ratio": 4}).calibration is None
    assert entry({"method": "press", "press": "tova", "ratio": 4}).calibration is None
