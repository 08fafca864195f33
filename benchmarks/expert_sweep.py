"""Expert-configuration sweep at fixed active FLOPs, as DVC experiments of the project's own pipeline.

Three axes around a base MoE (E experts, top-K, expert width F; active MLP width A = K x F):

* experts count: E' in ``--experts``, K and F kept (total parameters grow with E', FLOPs do not);
* top-k: K' in ``--top-k``, F' = A / K' (E kept): the same active width split over more experts per token
  (top-1 points route with ``norm_topk_prob: false``, as Switch does: renormalised over one expert the
  weight is always 1 and the router would learn nothing from the LM loss);
* granularity: g in ``--granularity``, E' = g E, K' = g K, F' = F / g (fine-grained experts, DeepSeekMoE's
  "segmentation"): active and total parameters both kept.

Every point has the same active width A, so one FLOP-matched dense baseline (``pretrain_dense``, set to
the base shape; ``dense_baseline: active`` gives it width A) serves them all. Each point is one
``dvc exp run --queue -S ++pretrain.model.<key>=... evaluate`` in a temporary copy of the repository
(its own git repo, as DVC experiments need), run by ``dvc queue start --jobs 1``; DVC's run cache
restores the unchanged stages (data, the dense baseline) after the first experiment. The results come
from ``dvc exp show --json`` (``outputs/evaluate/metrics.json``, ``outputs/pretrain/metrics.json``).

    python benchmarks/expert_sweep.py --pipeline-from /work/main --out benchmarks/results/expert_sweep_cpu.json
    python benchmarks/expert_sweep.py --smoke              # two points, a few steps: checks the machinery

``--set KEY=VALUE`` passes more overrides to every experiment (``data.tokenizer.vocab_size=1024``,
``pretrain.lr=...``); ``--steps N`` sets both ``pretrain.steps`` and ``pretrain_dense.steps`` (equal
steps are what makes the dense baseline FLOP-matched). Writes ``OUT`` (JSON) and ``OUT.png``
(validation and out-of-domain loss against each axis, the dense baseline as a line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# transformers config keys of (expert count, expert width) per architecture; top-k is num_experts_per_tok
SHAPE_KEYS = {"mixtral": ("num_local_experts", "intermediate_size"), "olmoe": ("num_experts", "intermediate_size"),
              "qwen2_moe": ("num_experts", "moe_intermediate_size"), "deepseek_v3": ("n_routed_experts", "moe_intermediate_size")}
TARGET = "evaluate"  # the stage whose dependencies are data, pretrain and pretrain_dense
SMOKE_SETS = ["data.tokenizer.vocab_size=512", "data.shards.seq_len=32", "pretrain.micro_batch_size=4",
              "pretrain_dense.micro_batch_size=4", "pretrain.warmup_steps=1", "pretrain_dense.warmup_steps=1",
              "evaluate.max_sequences=32"]


def points(base: tuple[int, int, int], experts, top_k, granularity) -> list[dict]:
    """The sweep's configurations (E, K, F), each tagged with the axes it lies on (and, on the granularity
    axis, its g); every one has the base's active width K x F."""
    E, K, F = base
    active = K * F
    found: dict[tuple, dict] = {}

    def add(shape, axis, g=None):
        entry = found.setdefault(shape, {"axes": set(), "granularity": None})
        entry["axes"].add(axis)
        entry["granularity"] = g if g is not None else entry["granularity"]

    for e in experts:
        add((e, K, F), "experts")
    for k in top_k:
        if active % k or k > E:
            raise SystemExit(f"--top-k {k}: needs {k} <= {E} experts and to divide the active width {active}")
        add((E, k, active // k), "top_k")
    for g in granularity:
        if F % g:
            raise SystemExit(f"--granularity {g} must divide the expert width {F}")
        add((g * E, g * K, F // g), "granularity", g)
    if (E, K, F) in found:  # the base lies on every axis
        found[(E, K, F)]["granularity"] = 1
    return [{"experts": e, "top_k": k, "width": f, "granularity": v["granularity"], "axes": sorted(v["axes"]),
             "name": f"E{e}-k{k}-F{f}"} for (e, k, f), v in sorted(found.items())]


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def workspace(base: Path, source: Path, pipeline_from: Path | None, env: dict) -> Path:
    """A copy of ``source``'s tracked and untracked-not-ignored files, dvc.yaml and params.yaml from
    ``pipeline_from`` when given, committed in a git repo of its own with DVC initialised."""
    repo = base / "repo"
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], source, env).stdout.split("\0")
    for name in filter(None, files):
        if (source / name).is_file() and not name.startswith("outputs/"):  # no results of the source's own runs
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, repo / name)
    if pipeline_from is not None:
        for name in ("dvc.yaml", "params.yaml"):
            shutil.copy2(pipeline_from / name, repo / name)
    (repo / "dvc.lock").unlink(missing_ok=True)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "sweep@example.com"],
                ["git", "config", "user.name", "expert-sweep"]):
        run(cmd, repo, env)
    if not (repo / ".dvc").is_dir():
        run([str(BIN / "dvc"), "init", "-q"], repo, env)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "expert sweep workspace"], repo, env)
    return repo


def base_shape(repo: Path, sets: list[str]) -> tuple[str, tuple[int, int, int]]:
    """(arch, (E, K, F)) of the MoE the params file's ``pretrain`` section builds, ``--set``s applied."""
    sys.path.insert(0, str(repo))
    from moe_engine.config import parse_sets, read_params
    from moe_engine.models.build import model_config

    section = read_params(repo / "params.yaml")["pretrain"]
    for key, value in parse_sets(sets).items():
        if key.startswith("pretrain.model."):
            section.setdefault("model", {})[key.split(".", 2)[2]] = value
    arch = section.get("arch", "mixtral")
    if arch not in SHAPE_KEYS:
        raise SystemExit(f"pretrain.arch = {arch}: the sweep knows the expert keys of {sorted(SHAPE_KEYS)}")
    cfg = model_config(arch, section.get("preset", "tiny"), **section.get("model", {}))
    e_key, f_key = SHAPE_KEYS[arch]
    return arch, (getattr(cfg, e_key), cfg.num_experts_per_tok, getattr(cfg, f_key))


def queue(repo: Path, env: dict, arch: str, sweep: list[dict], base: tuple, args) -> None:
    e_key, f_key = SHAPE_KEYS[arch]
    shape_keys = {f"pretrain.model.{k}" for k in (e_key, f_key, "num_experts_per_tok")}
    common = [f"++{s}" for s in args.set if s.split("=", 1)[0] not in shape_keys]  # each point sets its own shape
    if args.steps:
        common += [f"++pretrain.steps={args.steps}", f"++pretrain_dense.steps={args.steps}"]
    # the dense baseline is built from the base shape, so that its width is the sweep's active width
    dense = [f"++pretrain_dense.model.{e_key}={base[0]}", f"++pretrain_dense.model.num_experts_per_tok={base[1]}",
             f"++pretrain_dense.model.{f_key}={base[2]}"]
    for p in sweep:
        shape = [f"++pretrain.model.{e_key}={p['experts']}", f"++pretrain.model.num_experts_per_tok={p['top_k']}",
                 f"++pretrain.model.{f_key}={p['width']}"]
        if p["top_k"] == 1:  # renormalised over one expert the weight is always 1: the router would get no LM gradient
            shape.append("++pretrain.router.norm_topk_prob=false")
        cmd = [str(BIN / "dvc"), "exp", "run", "--queue", "-n", p["name"], TARGET]
        for item in common + dense + shape:
            cmd += ["-S", item]
        run(cmd, repo, env)


def wait_for_queue(repo: Path, env: dict, timeout_s: float) -> str:
    run([str(BIN / "dvc"), "queue", "start", "--jobs", "1"], repo, env)
    deadline, status = time.time() + timeout_s, ""
    while time.time() < deadline:
        time.sleep(5)
        status = run([str(BIN / "dvc"), "queue", "status"], repo, env, check=False).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
    run([str(BIN / "dvc"), "queue", "kill", "--all"], repo, env, check=False)  # noqa: the sweep's own workers only
    raise SystemExit(f"the DVC queue did not finish within {timeout_s:.0f} s:\n{status}")


def collect(show: list[dict]) -> list[dict]:
    """Experiments of ``dvc exp show --json``: name, the pretrain shape, evaluate and pretrain metrics."""
    rows = []
    for commit in show:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = {path: m.get("data", {}) for path, m in data.get("metrics", {}).items()}
                evaluate = metrics.get("outputs/evaluate/metrics.json", {})
                rows.append({"name": rev.get("name") or exp.get("name"), "rev": rev.get("rev"),
                             "state": (exp.get("executor") or {}).get("state"), "error": rev.get("error"),
                             "pretrain_model": params.get("pretrain", {}).get("model", {}),
                             "pretrain_dense_model": params.get("pretrain_dense", {}).get("model", {}),
                             "steps": params.get("pretrain", {}).get("steps"),
                             "moe": evaluate.get("moe", {}), "dense": evaluate.get("dense", {}),
                             "moe_minus_dense": evaluate.get("moe_minus_dense", {}),  # {val, ood}
                             "pretrain": metrics.get("outputs/pretrain/metrics.json", {}),
                             "pretrain_dense": metrics.get("outputs/pretrain_dense/metrics.json", {})})
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_engine.io import atomic_output

    by_name = {r["name"]: r for r in result["experiments"]}
    axes_spec = (("experts", "experts (K, F fixed)"), ("top_k", "top-k (F = A / k)"), ("granularity", "granularity g (gE, gK, F/g)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    dense = next((r["dense"] for r in result["experiments"] if r["dense"]), {})
    for ax, (axis, label) in zip(axes, axes_spec):
        pts = sorted((p[axis], by_name[p["name"]]) for p in result["points"] if axis in p["axes"] and p["name"] in by_name)
        if not pts:  # an axis this sweep did not vary
            ax.text(0.5, 0.5, f"{label}: not swept", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for metric, colour, name in (("val_loss", "tab:red", "validation"), ("ood_loss", "tab:purple", "out of domain")):
            xs = [x for x, r in pts if r["moe"].get(metric) is not None]
            ys = [r["moe"][metric] for x, r in pts if r["moe"].get(metric) is not None]
            ax.plot(xs, ys, marker="o", color=colour, label=f"MoE {name}")
            if dense.get(metric) is not None:
                ax.axhline(dense[metric], color=colour, ls="--", lw=1, label=f"dense-active {name}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([x for x, _ in pts], [str(x) for x, _ in pts])
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"expert sweep at fixed active width {result['active_width']} ({result['arch']}, base "
                 f"E{result['base'][0]} k{result['base'][1]} F{result['base'][2]}, {result['steps']} steps, "
                 f"{result['environment']['device']})", fontsize=10)
    fig.tight_layout()
    with atomic_output(path, directory=False) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=REPO, help="repository to copy (its tracked and untracked files)")
    ap.add_argument("--pipeline-from", type=Path, help="take dvc.yaml and params.yaml from this checkout instead")
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16], help="expert counts (K, F of the base)")
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4], help="top-k values (F = active width / k)")
    ap.add_argument("--granularity", type=int, nargs="+", default=[1, 2, 4], help="g: gE experts, gK active, F/g wide")
    ap.add_argument("--steps", type=int, default=0, help="pretrain.steps and pretrain_dense.steps (0: the params file's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more params overrides for every experiment, e.g. data.tokenizer.vocab_size=1024")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the experiments' stages")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the queue")
    ap.add_argument("--keep", type=Path, help="build the workspace here and keep it (default: a temporary folder)")
    ap.add_argument("--out", type=Path, help="result JSON (the .png goes beside it)")
    ap.add_argument("--smoke", action="store_true", help="two points, a few steps, small data: checks the machinery")
    args = ap.parse_args(argv)
    if args.smoke:
        args.set = SMOKE_SETS + args.set
        args.steps = args.steps or 4
        args.experts, args.top_k, args.granularity = [2, 4], [], []

    sys.path.insert(0, str(REPO))
    from benchmarks.quality_per_flop import environment
    from moe_engine.io import write_json

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)  # experiments are recorded by DVC here, not in the project's MLflow store
    base_dir = args.keep or Path(tempfile.mkdtemp(prefix="expert_sweep."))
    base_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        repo = workspace(base_dir, args.source.resolve(), args.pipeline_from, env)
        env["PYTHONPATH"] = str(repo)  # the stages import the copy's moe_engine
        arch, base = base_shape(repo, args.set)
        if args.smoke:
            base = (2, 1, 32)
        sweep = points(base, args.experts, args.top_k, args.granularity)
        print(f"[sweep] {len(sweep)} experiments around E{base[0]} k{base[1]} F{base[2]} in {repo}", flush=True)
        queue(repo, env, arch, sweep, base, args)
        status = wait_for_queue(repo, env, args.timeout)
        show = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], repo, env).stdout)
        experiments = collect(show)
    finally:
        if args.keep is None:
            shutil.rmtree(base_dir, ignore_errors=True)
    failed = [p["name"] for p in sweep if not any(r["name"] == p["name"] and r["moe"] for r in experiments)]
    result = {"benchmark": "expert_sweep", "environment": environment("cpu"), "smoke": args.smoke,
              "command": " ".join(sys.argv), "arch": arch, "base": list(base), "active_width": base[1] * base[2],
              "steps": args.steps or next((r["steps"] for r in experiments if r["steps"]), None), "sets": args.set, "threads": args.threads, "wall_seconds": time.time() - t0,
              "points": sweep, "experiments": experiments, "failed": failed, "queue_status": status}
    out = args.out or Path(tempfile.gettempdir()) / "expert_sweep_smoke.json"
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    for p in sweep:
        r = next((r for r in experiments if r["name"] == p["name"]), {})
        moe, dense = r.get("moe", {}), r.get("dense", {})
        print(f"{p['name']:14s} axes {','.join(p['axes']):24s} val {moe.get('val_loss', float('nan')):.4f} "
              f"ood {moe.get('ood_loss', float('nan')):.4f}  dense val {dense.get('val_loss', float('nan')):.4f}")
    print(f"result: {out} (+ {out.with_suffix('.png').name}); failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
