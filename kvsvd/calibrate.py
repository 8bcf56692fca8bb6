"""Calibrated PCA bases for ``method="pca"``: written with safetensors, validated on load.

The file holds, per layer l, ``{l}.k_mean`` (F,), ``{l}.k_basis`` (F, r_k), ``{l}.v_mean``,
``{l}.v_basis`` (F, r_v), float32, F = kv_heads · head_dim, bases ordered by explained
variance; its metadata records the model's shape so that a file made for another model is
refused. Keys are calibrated pre-RoPE (the k_proj output), as LowRankCache compresses them
with key_space="pre_rope".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .models import capture_kv


def _fingerprint(model_config) -> dict:
    text = model_config.get_text_config(decoder=True)
    return {"model_type": text.model_type, "num_hidden_layers": text.num_hidden_layers,
            "num_key_value_heads": text.num_key_value_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            "hidden_size": text.hidden_size}


@torch.no_grad()
def calibrate(model, tokenizer, texts: list[str], rank_k: int, rank_v: int, path: str | Path,
              max_tokens: int = 2048) -> Path:
    """Per-layer means and top principal directions of pre-RoPE K and of V over ``texts``."""
    fp = _fingerprint(model.config)
    F = fp["num_key_value_heads"] * fp["head_dim"]
    for name, r in (("rank_k", rank_k), ("rank_v", rank_v)):
        if not 1 <= r <= F:
            raise ValueError(f"{name}={r} is out of range; accepted: [1, {F}]")
    if not texts:
        raise ValueError("texts is empty; accepted: at least one calibration text")
    sums: dict[str, list[torch.Tensor]] = {}
    n = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(model.device)
        keys, values = capture_kv(model, ids)
        for kind, xs in (("k", keys), ("v", values)):
            for l, x in enumerate(xs):
                x = x.reshape(-1, F).double()
                s1, s2 = sums.setdefault(f"{l}.{kind}", [torch.zeros(F, dtype=torch.float64),
                                                         torch.zeros(F, F, dtype=torch.float64)])
                s1 += x.sum(0).cpu()
                s2 += (x.mT @ x).cpu()
        n += ids.shape[1]
    tensors = {}
    for key, (s1, s2) in sums.items():
        mean = s1 / n
        cov = s2 / n - torch.outer(mean, mean)
        r = rank_k if key.endswith(".k") else rank_v
        basis = torch.linalg.eigh(cov)[1].flip(-1)[:, :r]
        tensors[f"{key}_mean"] = mean.float().contiguous()
        tensors[f"{key}_basis"] = basis.float().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"kvsvd": json.dumps({**fp, "rank_k": rank_k, "rank_v": rank_v,
                                                                  "tokens": n, "key_space": "pre_rope"})})
    return path


class Calibration:
    """Loaded bases; ``basis(layer, "k"|"v") -> (mean (F,), basis (F, r))``."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        self.tensors, self.meta = tensors, meta

    @classmethod
    def load(cls, path: str | Path, model_config, rank_k: int, rank_v: int) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration_path={str(path)!r} does not exist; write it with kvsvd.calibrate")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kvsvd", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        fp = _fingerprint(model_config)
        wrong = {k: (meta.get(k), v) for k, v in fp.items() if meta.get(k) != v}
        if wrong:
            raise ValueError(f"calibration_path={str(path)!r} was made for another model: "
                             + ", ".join(f"{k}={a} (model: {b})" for k, (a, b) in wrong.items()))
        for name, r in (("rank_k", rank_k), ("rank_v", rank_v)):
            if r > meta[name]:
                raise ValueError(f"{name}={r} exceeds the calibrated rank {meta[name]} in {path.name}; "
                                 f"accepted: [1, {meta[name]}]")
        return cls(tensors, meta)

    def basis(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[f"{layer}.{kind}_mean"], self.tensors[f"{layer}.{kind}_basis"]
