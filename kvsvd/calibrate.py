"""Calibrated bases, made once per model: for ``method="pca"`` (one layer per group) and for the transform
coder's ``basis="calibrated"`` (its layer groups), written with safetensors and validated on load.

The file holds, per group of layers whose first layer is g, ``{g}.k_mean`` (G·F,), ``{g}.k_basis``
(G·F, r_k), ``{g}.v_mean``, ``{g}.v_basis`` (G·F, r_v), float32, F = kv_heads · head_dim, the
principal directions of the group's K (or V) of every layer side by side, ordered by explained
variance, and ``{g}.k_weight`` / ``{g}.v_weight`` (G·F,): what an error of one unit in each feature
costs downstream (:func:`sensitivity`), each kind at mean 1 over the model. Its metadata names the
model (its folder's name), its shape, the layer grouping, the ranks,
the calibration tokens and the kvsvd version; a file made for another model, shape or grouping is
refused. Keys are calibrated pre-RoPE (the k_proj output, after k_norm on a QK-norm model such as
Gemma 3: ``kvsvd.models.capture_projections``), as LowRankCache compresses them with ``key_space="pre_rope"``.

``python -m kvsvd calibrate MODEL`` fits them on :func:`calibration_text` (prose from NumPy's
docstrings, shipped in ``kvsvd/data/calibration.txt``; no RULER prompt contains any of it) and
writes them where :func:`default_path` says, which is where evaluation grids look for them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .accounting import ModelShape
from .models import capture_projections, model_cache

CALIBRATION_TOKENS = 8192  # default calibration tokens: 4 texts of 2048
CALIBRATION_CONTEXT = 2048


def _fingerprint(model_config) -> dict:
    text = model_config.get_text_config(decoder=True)
    shape = ModelShape.of(model_config)
    return {"model": Path(getattr(model_config, "name_or_path", "") or "").name, "model_type": text.model_type,
            "num_hidden_layers": shape.layers, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
            "hidden_size": text.hidden_size}


def calibration_prose() -> str:
    """The shipped calibration text (``kvsvd/data/calibration.txt``, its source line left out)."""
    return (resources.files("kvsvd") / "data" / "calibration.txt").read_text().split("\n\n", 1)[1]


def calibration_text(tokenizer, tokens: int = CALIBRATION_TOKENS, context: int = CALIBRATION_CONTEXT) -> list[str]:
    """Consecutive texts of ``context`` tokens (the last one shorter) from the shipped calibration prose,
    ``tokens`` in all."""
    if tokens < 1 or context < 1:
        raise ValueError(f"tokens={tokens}, context={context} are out of range; accepted: ints >= 1")
    ids = tokenizer(calibration_prose(), add_special_tokens=False).input_ids
    if len(ids) < tokens:
        raise ValueError(f"tokens={tokens} is out of range; accepted: <= {len(ids)} (the shipped calibration text)")
    return [tokenizer.decode(ids[i:min(i + context, tokens)]) for i in range(0, tokens, context)]


def principal_directions(sum_x: torch.Tensor, sum_xx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and principal directions (F, F), by decreasing variance, float32, of n rows whose sum
    (F,) and sum of outer products (F, F), float64, are given."""
    mean = sum_x / n
    basis = torch.linalg.eigh(sum_xx / n - torch.outer(mean, mean))[1].flip(-1)
    return mean.float(), basis.float()


def sensitivity(model, q_energy: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, what a squared error of one unit in each K (or V) feature (kv_heads · head_dim,) costs,
    float32, from the layer's mean squared pre-RoPE queries ``q_energy`` (heads · head_dim,) and its o_proj:

    - a key error e changes the scores of the query heads that share its KV head by q·R e, R the RoPE
      rotation between their positions; over relative positions a rotated pair keeps half its energy, so
      E[(q·R e)²] = Σ over the pair's dims of e² · (E q_i² + E q_j²)/2, summed over those query heads;
    - a value error e moves each of those heads' attention output by p·e and the layer's output by
      W_o (p·e): its cost per feature is the squared norm of W_o's columns of those heads.

    GQA: query head h reads KV head h // (heads / kv_heads), as transformers' repeat_kv lays them out."""
    shape = ModelShape.of(model.config)
    H, d = q_energy[0].numel() // shape.head_dim, shape.head_dim
    rep = H // shape.kv_heads
    k_out, v_out = [], []
    for layer, q2 in zip(model.model.layers, q_energy):
        q2 = q2.reshape(H, d)
        paired = (q2 + q2.roll(d // 2, -1)) / 2  # rotate_half pairs dim i with i + d/2
        k_out.append(paired.reshape(shape.kv_heads, rep, d).sum(1).flatten().float())
        w = layer.self_attn.o_proj.weight.detach().float().square().sum(0)          # (H·d,)
        v_out.append(w.reshape(shape.kv_heads, rep, d).sum(1).flatten())
    return k_out, v_out


@torch.no_grad()
def calibrate(model, tokenizer, texts: list[str], rank_k: int | None, rank_v: int | None, path: str | Path,
              max_tokens: int = CALIBRATION_CONTEXT, *, layer_group_size: int = 1, start_layer: int = 0) -> Path:
    """Per group of ``layer_group_size`` layers from ``start_layer`` on (``ModelShape.layer_groups``: the
    full-attention layers' groups, then a hybrid model's sliding-window layers'; the last of each smaller when the
    count does not divide), the mean and the top ``rank_k`` / ``rank_v`` principal directions (None:
    all G·F of the group) of pre-RoPE K and of V over ``texts`` (each cut at ``max_tokens`` tokens), and each
    feature's :func:`sensitivity` (from the same texts' queries)."""
    fp = _fingerprint(model.config)
    L, F = fp["num_hidden_layers"], fp["num_key_value_heads"] * fp["head_dim"]
    if isinstance(layer_group_size, bool) or not isinstance(layer_group_size, int) or not 1 <= layer_group_size <= L:
        raise ValueError(f"layer_group_size={layer_group_size!r} is out of range; accepted: an int in [1, {L}]")
    if not 0 <= start_layer < L:
        raise ValueError(f"start_layer={start_layer} is out of range; accepted: [0, {L - 1}]")
    groups = ModelShape.of(model.config).layer_groups(layer_group_size, start_layer, sliding=True)
    smallest = min(len(g) for g in groups) * F
    ranks = {"k": rank_k, "v": rank_v}
    for name, r in (("rank_k", rank_k), ("rank_v", rank_v)):
        if r is not None and not 1 <= r <= smallest:
            raise ValueError(f"{name}={r} is out of range; accepted: [1, {smallest}] (the smallest group's "
                             "features), or None for every direction")
    if not texts:
        raise ValueError("texts is empty; accepted: at least one calibration text")
    sums: dict[str, list[torch.Tensor]] = {}
    q_energy = [0.0] * L
    n = 0
    for text in tqdm(texts, desc="calibration texts", leave=False):
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(model.device)
        captured = capture_projections(model, ids)
        q_energy = [e + q.square().sum((0, 1)).double().cpu() for e, q in zip(q_energy, captured["q_proj"])]
        for kind, xs in (("k", captured["k_proj"]), ("v", captured["v_proj"])):
            for group in groups:
                x = torch.cat([xs[l].reshape(-1, F) for l in group], -1).double()  # (T, G·F)
                s1, s2 = sums.setdefault(f"{group[0]}.{kind}", [torch.zeros(x.shape[1], dtype=torch.float64),
                                                                torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)])
                s1 += x.sum(0).cpu()
                s2 += (x.mT @ x).cpu()
        n += ids.shape[1]
    tensors = {}
    for key, (s1, s2) in sums.items():
        mean, basis = principal_directions(s1, s2, n)
        tensors[f"{key}_mean"] = mean.contiguous()
        tensors[f"{key}_basis"] = basis[:, :ranks[key[-1]] or len(mean)].contiguous()
    for kind, per_layer in zip("kv", sensitivity(model, [e / n for e in q_energy])):
        scale = torch.cat([per_layer[l] for g in groups for l in g]).mean()
        for g in groups:
            tensors[f"{g[0]}.{kind}_weight"] = (torch.cat([per_layer[l] for l in g]) / scale).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from . import __version__
    meta = {**fp, "groups": groups, "rank_k": ranks["k"], "rank_v": ranks["v"], "tokens": n, "key_space": "pre_rope",
            "weights": True, "kvsvd_version": __version__}
    tmp = path.with_name(path.name + ".tmp")  # a reader of the old file never sees a partial one
    save_file(tensors, str(tmp), metadata={"kvsvd": json.dumps(meta)})
    tmp.replace(path)
    return path


def default_path(model_config, layer_group_size: int, start_layer: int = 0) -> Path:
    """Where ``kvsvd calibrate`` writes (and grids read) a model's full-rank calibration for one grouping:
    ``$KVSVD_MODEL_CACHE/calibration/{model}-L{layers}-G{G}-s{start}.safetensors``."""
    fp = _fingerprint(model_config)
    name = fp["model"] or fp["model_type"]
    file = f"{name}-L{fp['num_hidden_layers']}-G{layer_group_size}-s{start_layer}.safetensors"
    return model_cache() / "calibration" / file


def ensure(model, tokenizer, layer_group_size: int, start_layer: int = 0, tokens: int = CALIBRATION_TOKENS) -> Path:
    """:func:`default_path`, written by :func:`calibrate` on :func:`calibration_text` if it is not there yet
    (or was made before files held sensitivity weights)."""
    path = default_path(model.config, layer_group_size, start_layer)
    if not path.is_file() or not Calibration.metadata(path).get("weights"):
        calibrate(model, tokenizer, calibration_text(tokenizer, tokens), None, None, path,
                  layer_group_size=layer_group_size, start_layer=start_layer)
    return path


class Calibration:
    """Loaded bases; ``basis(first_layer, "k"|"v") -> (mean (G·F,), basis (G·F, r))``; ``nbytes`` what the
    file's tensors hold."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        self.tensors, self.meta = tensors, meta

    @classmethod
    def load(cls, path: str | Path, model_config, rank_k: int, rank_v: int,
             groups: list[list[int]] | None = None, weights: bool = False) -> "Calibration":
        """Refuses a missing file, one made for another model or shape, ranks above the calibrated ones,
        and (given ``groups``, the cache's layer groups) a file whose grouping does not hold them. The
        sensitivity weights are read only when asked for (``weights``), and refused if the file has none."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration_path={str(path)!r} does not exist; write it with "
                                    "`python -m kvsvd calibrate MODEL` or kvsvd.calibrate")
        tensors, meta = cls.read(path)
        if not weights:
            tensors = {k: v for k, v in tensors.items() if not k.endswith("_weight")}
        elif not meta.get("weights"):
            raise ValueError(f"calibration_path={str(path)!r} holds no sensitivity weights (made by an earlier kvsvd); "
                             "write it anew with `python -m kvsvd calibrate MODEL`")
        fp = _fingerprint(model_config)
        wrong = {k: (meta.get(k), v) for k, v in fp.items() if meta.get(k) != v}
        if wrong:
            raise ValueError(f"calibration_path={str(path)!r} was made for another model: "
                             + ", ".join(f"{k}={a!r} (model: {b!r})" for k, (a, b) in wrong.items()))
        made = meta.get("groups") or [[l] for l in range(fp["num_hidden_layers"])]
        missing = [g for g in groups or [] if g not in made]
        if missing:
            raise ValueError(f"calibration_path={str(path)!r} was made for layer groups {made}, not {missing}; "
                             "accepted: a calibration made with this layer_group_size and start_layer")
        for name, r in (("rank_k", rank_k), ("rank_v", rank_v)):
            if meta[name] is not None and r > meta[name]:
                raise ValueError(f"{name}={r} exceeds the calibrated rank {meta[name]} in {path.name}; "
                                 f"accepted: [1, {meta[name]}]")
        return cls(tensors, meta)

    @staticmethod
    def metadata(path: Path) -> dict:
        """The file's kvsvd metadata, without reading its tensors."""
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("kvsvd", "{}"))

    @classmethod
    def read(cls, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
        """The file's tensors and its kvsvd metadata."""
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, cls.metadata(path)

    def basis(self, first_layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[f"{first_layer}.{kind}_mean"], self.tensors[f"{first_layer}.{kind}_basis"]

    def weight(self, first_layer: int, kind: str) -> torch.Tensor:
        """The group's feature :func:`sensitivity` (G·F,), at mean 1 over the model's layers of ``kind`` (a
        calibration loaded with ``weights=True``)."""
        return self.tensors[f"{first_layer}.{kind}_weight"]
