"""Command line.

    python -m kvsvd bench kernels [--profile cpu|gpu|smoke] [--device ...] [--out ...]
    python -m kvsvd bench cache [--contexts 1024 2048 4096] | attention [--context 8160 ...] [--model M --device D]
                                [--method lowrank|transform] | operator [--contexts 8192 32768 65536] | niah
    python -m kvsvd bench decode [--contexts 1024 2048 4096] [--decode 8 --rounds 3]
    python -m kvsvd figures [--results results]
    python -m kvsvd eval CONFIG.yaml [--minutes N] [--dry-run]
                                            (torchrun --nproc_per_node N -m kvsvd eval CONFIG.yaml)
    python -m kvsvd seal CONFIG.yaml LENGTH (move a finished context length into RESULTS.LENGTH.jsonl.gz)
    python -m kvsvd report RESULTS.jsonl    (score tables, the headline and its goal checks, markdown)
    python -m kvsvd calibrate MODEL [--layer-group-size G] [--tokens N] [--out FILE]
                                            (the transform coder's calibrated basis, once per model)
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (every subcommand and option)."""
    parser = argparse.ArgumentParser(prog="kvsvd")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark")
    bench_sub = bench.add_subparsers(dest="which", required=True)
    kern = bench_sub.add_parser("kernels", help="SVD kernels side by side on KV-shaped matrices")
    kern.add_argument("--profile", default=None, help="smoke, cpu or gpu (default: gpu on CUDA, else cpu)")
    kern.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    kern.add_argument("--out", default=None, help="output folder (default: results/kernels or results/gpu/kernels)")
    kern.add_argument("--repeats", type=int, default=None, help="timed calls per method (after one warm-up)")
    kern.add_argument("--force", action="store_true", help="recompute configurations already on disk")
    cache = bench_sub.add_parser("cache", help="latency harness on SmolLM2: decode speed vs context length, "
                                               "compression time per group by stage, bytes held")
    cache.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096], help="context lengths (tokens)")
    cache.add_argument("--decode", type=int, default=32, help="decode tokens timed")
    cache.add_argument("--out", default="results/cache")
    cache.add_argument("--force", action="store_true", help="remeasure context lengths already on disk")
    att = bench_sub.add_parser("attention", help="decode speed: dense vs reconstruct-on-read vs attention from factors")
    att.add_argument("--context", type=int, nargs="+", default=[8160], help="context tokens (one run each)")
    att.add_argument("--model", default="smollm2-135m",
                     help="smollm2-135m, or a random-weight shape: llama-3.1-8b-shaped, tiny-llama-shaped")
    att.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    att.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    att.add_argument("--decode", type=int, default=16, help="decode tokens per round")
    att.add_argument("--rounds", type=int, default=2, help="rounds (path order rotated each round)")
    att.add_argument("--ratio", type=float, default=4.0, help="× fewer KV bytes")
    att.add_argument("--group", type=int, default=2, help="layer_group_size (1: per-layer svd)")
    att.add_argument("--key-space", default="post_rope", choices=["post_rope", "pre_rope"])
    att.add_argument("--method", default="lowrank", choices=["lowrank", "transform"],
                     help="lowrank: svd (--group 1) or xkv; transform: config_for_ratio's transform defaults")
    att.add_argument("--out", default="results/attention")
    att.add_argument("--force", action="store_true", help="remeasure even if the result file exists")
    dec = bench_sub.add_parser("decode", help="decode speed of every method (kvsvd's and the peers') against dense, "
                                              "by context length and ratio")
    dec.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096], help="context lengths (tokens)")
    dec.add_argument("--decode", type=int, default=8, help="decode tokens per round")
    dec.add_argument("--rounds", type=int, default=3, help="rounds (method order rotated each round)")
    dec.add_argument("--out", default="results/decode")
    dec.add_argument("--force", action="store_true", help="remeasure context lengths already on disk")
    op = bench_sub.add_parser("operator", help="one decode step of Llama-3.1-8B-shaped attention: dense 16-bit "
                                               "against attention from transform codes, with the roofline")
    op.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    op.add_argument("--ratios", type=float, nargs="+", default=[4.0, 8.0, 16.0])
    op.add_argument("--repeats", type=int, default=10, help="timed steps per path (the median is reported)")
    op.add_argument("--out", default="results/operator")
    op.add_argument("--force", action="store_true", help="remeasure even if the result file exists")
    niah = bench_sub.add_parser("niah", help="needle retrieval on SmolLM2 under compression levers")
    niah.add_argument("--task", default="niah_single_2")
    niah.add_argument("--samples", type=int, default=20)
    niah.add_argument("--context", type=int, default=2048)
    niah.add_argument("--out", default="results/niah")
    figs = sub.add_parser("figures", help="redraw every figure from saved results (no model, no computation)")
    figs.add_argument("--results", default="results", help="results folder (figures go to RESULTS/figures)")
    ev = sub.add_parser("eval", help="run (or resume) an evaluation grid from a YAML config")
    ev.add_argument("config", help="grid YAML (see kvsvd.gridspec)")
    ev.add_argument("--minutes", type=float, default=None,
                    help="stop at the first cell boundary after N minutes (every finished row written); "
                         "the same command resumes")
    ev.add_argument("--dry-run", action="store_true",
                    help="print the cells left by length and method and their estimated time; run nothing")
    seal = sub.add_parser("seal", help="move a finished context length's rows into a read-only gzip part")
    seal.add_argument("config", help="grid YAML (see kvsvd.gridspec)")
    seal.add_argument("context_length", type=int, help="one of the grid's context_lengths, every cell finished")
    rep = sub.add_parser("report", help="score tables and goal checks of a grid's results (markdown)")
    rep.add_argument("results_file", help="a grid's JSONL results")
    cal = sub.add_parser("calibrate", help="fit a model's calibrated bases (transform basis=calibrated, pca) "
                                           "on the shipped calibration text")
    cal.add_argument("model", help="a model alias of kvsvd.load_model (smollm2-135m, gemma3-270m) or a local folder")
    cal.add_argument("--layer-group-size", type=int, default=None,
                     help="layers per group (default: the transform coder's default group size)")
    cal.add_argument("--start-layer", type=int, default=0, help="first grouped layer")
    cal.add_argument("--tokens", type=int, default=None, help="calibration tokens (default 8192, in texts of 2048)")
    cal.add_argument("--out", default=None, help="output file (default: where grids look, kvsvd.calibrate.default_path)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "figures":
        from .figures import redraw_all
        for name in redraw_all(args.results):
            print(f"{args.results}/figures/{name}.png (.svg)")
        return 0
    if args.command == "report":
        from .report import markdown
        print(markdown(args.results_file))
        return 0
    if args.command == "eval":
        from .grid import PeersMissing, plan, run as run_grid
        if args.dry_run:
            print(plan(args.config))
            return 0
        try:
            print(run_grid(args.config, minutes=args.minutes))
        except PeersMissing as e:  # said in one line, before any model loads
            print(f"kvsvd eval: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "calibrate":
        from .calibrate import CALIBRATION_TOKENS, calibrate, calibration_text, default_path
        from .methods import TRANSFORM
        from .models import load_model
        model, tok = load_model(args.model)
        G = args.layer_group_size or TRANSFORM.group_size
        out = args.out or default_path(model.config, G, args.start_layer)
        texts = calibration_text(tok, args.tokens or CALIBRATION_TOKENS)
        path = calibrate(model, tok, texts, None, None, out, layer_group_size=G, start_layer=args.start_layer)
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB, {len(texts)} texts)")
        return 0
    if args.command == "seal":
        from .results import seal
        print(seal(args.config, args.context_length))
        return 0

    import torch
    from .bench import kernels

    if args.which == "niah":
        from .bench import niah as niah_bench
        print(niah_bench.table(niah_bench.run(args.task, args.samples, args.context, args.out)))
        return 0
    if args.which == "attention":
        from .bench import attention as attention_bench
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
        for context in args.context:
            print(attention_bench.table(attention_bench.run(
                context, args.decode, args.ratio, args.group, args.key_space, args.rounds, args.out,
                model_name=args.model, force=args.force, device=device, dtype=dtype, method=args.method)))
        return 0
    if args.which == "operator":
        from .bench import operator as operator_bench
        print(operator_bench.table(operator_bench.run(tuple(args.contexts), tuple(args.ratios), args.repeats,
                                                      out=args.out, force=args.force)))
        return 0
    if args.which == "decode":
        from .bench import decode as decode_bench
        for payload in decode_bench.run(args.contexts, args.decode, args.rounds, out=args.out, force=args.force):
            print(decode_bench.table(payload))
        return 0
    if args.which == "cache":
        from .bench import cache as cache_bench
        for payload in cache_bench.run(args.contexts, args.decode, out=args.out, force=args.force):
            print(cache_bench.table(payload))
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = args.profile or ("gpu" if device.startswith("cuda") else "cpu")
    out = args.out or ("results/gpu/kernels" if device.startswith("cuda") else "results/kernels")
    results = kernels.run(profile, device, out, force=args.force, repeats=args.repeats)
    print(kernels.ratio_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
