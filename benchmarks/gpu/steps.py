"""The Python parts of benchmarks/gpu/run.sh: environment, benchmark wrappers, the goals.

    python benchmarks/gpu/steps.py env --out ENV.json
    python benchmarks/gpu/steps.py imports                  # exit 1 if a dependency is missing
    python benchmarks/gpu/steps.py throughput --data-dir DIR -- [throughput.py options]
    python benchmarks/gpu/steps.py curve-e --data-dir DIR -- [throughput.py options]
    python benchmarks/gpu/steps.py report --work WORK --steps STEPS.tsv

`throughput` is benchmarks/throughput.py with the Fashion-MNIST files read from --data-dir
(throughput.py itself reads them from the Debian package's folder only). `curve-e` is its
sweep curve alone (experiment-rounds/s against E), without the table in front of it.
`report` reads what the run wrote and says, goal by goal, what was measured.
"""

import argparse
import csv
import glob
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: throughput, memory
sys.path.insert(0, REPO)

# Datasheet rates of an H200 SXM (dense, no sparsity), TFLOP/s: the ceilings a measured
# GFLOP/s is set against, beside the matrix products timed by `env` on the machine itself.
DATASHEET_TFLOPS = {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "numpy")
PACKAGES += ("scipy", "absl-py", "scikit-learn", "matplotlib", "pytest", "hypothesis")
IMPORTS = ("jax", "flax.linen", "optax", "orbax.checkpoint", "ml_collections", "absl.app")
IMPORTS += ("sklearn.decomposition", "matplotlib.pyplot", "hypothesis", "pytest")


def imports() -> int:
    """Imports every module the project needs; prints and counts the failures."""
    failed = 0
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure: the fallback wheels are needed
            print(f"import {name}: {type(e).__name__}: {e}")
            failed += 1
    return 1 if failed else 0


def matmul_tflops(jax, jnp, n: int, dtype, precision=None) -> float:
    """TFLOP/s of an n x n x n product on the default device (median of 10, after warm-up)."""
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (n, n), dtype) for k in keys)
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision))
    f(a, b).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def copy_tb_per_s(jax, jnp, mib: int) -> float:
    """Device-to-device copy bandwidth, bytes read + written, TB/s."""
    x = jnp.ones((mib * 2**18,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        y = f(x)
    y.block_until_ready()
    return 10 * 2 * x.nbytes / (time.perf_counter() - t) / 1e12


def env(out: str, small: bool) -> None:
    """Versions, devices and the measured ceilings, printed and written to `out` (JSON)."""
    info = {"python": platform.python_version(), "executable": sys.executable}
    info["nvidia_smi"] = _run(["nvidia-smi"])
    info["nvidia_smi_query"] = _run(
        [
            "nvidia-smi",
            "--query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit,driver_version",
            "--format=csv",
        ]
    )
    for name in PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    import jax
    import jax.numpy as jnp

    info["backend"] = jax.default_backend()
    info["devices"] = [str(d) for d in jax.devices()]
    info["device_kind"] = jax.devices()[0].device_kind
    info["cpu_count"] = os.cpu_count()
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    info["bytes_limit"] = (stats or {}).get("bytes_limit")
    n, mib = (512, 64) if small else (8192, 2048)
    info["matmul_n"] = n
    info["f32_default_tflops"] = matmul_tflops(jax, jnp, n, jnp.float32)
    info["f32_highest_tflops"] = matmul_tflops(jax, jnp, n, jnp.float32, "highest")
    info["bf16_tflops"] = matmul_tflops(jax, jnp, n, jnp.bfloat16)
    info["copy_tb_per_s"] = copy_tb_per_s(jax, jnp, mib)
    for key, value in info.items():
        print(f"{key}: {value}")
    with open(out, "w") as f:
        json.dump(info, f, indent=1)


def _run(cmd) -> str:
    if not shutil.which(cmd[0]):
        return f"{cmd[0]}: not found"
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def with_data_dir(make_config, data_dir: str):
    """throughput.make_config, with data.dir set (where --data=files finds the files)."""

    def make(a, *args, **kwargs):
        c = make_config(a, *args, **kwargs)
        c.data.dir = data_dir
        return c

    return make


def throughput_module(data_dir: str):
    import throughput

    if data_dir:
        throughput.make_config = with_data_dir(throughput.make_config, data_dir)
    return throughput


def curve_e(data_dir: str, argv: list) -> None:
    """throughput.py's E curve alone: sweep_e.csv and sweep_e.png in --out."""
    throughput = throughput_module(data_dir)
    from fedjax_poison.round import sharding

    a = throughput.parse_args(argv)
    sharding.use_cpu_devices(0)  # as throughput.main
    os.makedirs(a.out, exist_ok=True)
    import jax

    print(
        f"{a.dataset} ({a.data}), k={a.clients_per_round}, conv {a.conv_impl}, E={a.curve_e}, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
    )
    rows = throughput.curve_e(a)
    throughput.write_csv(os.path.join(a.out, "sweep_e.csv"), rows)
    x = [r["experiments"] for r in rows]
    series = {"training + FedAvg": [r["experiment_rounds_per_s"] for r in rows]}
    series["with evaluation"] = [r["with_eval_per_s"] for r in rows]
    throughput.plot(
        os.path.join(a.out, "sweep_e.png"),
        x,
        series,
        "experiments E",
        "experiment-rounds per second",
        f"{a.dataset}: one program for E experiments",
    )


# ---- report -------------------------------------------------------------------------------

E_LINE = re.compile(r"E=(\d+): ([\d.]+) s a round, ([\d.]+)/s, with evaluation ([\d.]+)/s")
PROGRESS = re.compile(r"round\s+(\d+)/(\d+) .*?([\d.]+) rounds/s")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _csv(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def steps_table(steps_tsv: str) -> tuple[list[str], dict]:
    lines = ["| step | status | seconds | limit s |", "|---|---|---|---|"]
    steps = {}
    for row in _read(steps_tsv).splitlines():
        name, status, seconds, limit = row.split("\t")
        steps[name] = {"status": status, "seconds": float(seconds)}
        lines.append(f"| {name} | {status} | {seconds} | {limit} |")
    return lines, steps


def goal_sweep(work: str, steps: dict) -> list[str]:
    """Goal 1: the 72-experiment label-flipping suite (66 distinct) in <= 5 minutes."""
    out = ["", "## Goal 1: label-flipping suite (72 experiments, 66 distinct) in <= 5 minutes"]
    for suite in ("label_flipping", "attack_timing", "availability"):
        name = f"paper_{suite}"
        if name not in steps:
            out.append(f"- {suite}: not run")
            continue
        summary = os.path.join(work, "results", "paper", suite, "summary.json")
        wall = steps[name]["seconds"]
        if os.path.exists(summary):
            s = json.load(open(summary))
            out.append(
                f"- {suite}: {s['num_experiments']} experiments x {s['num_rounds']} rounds: "
                f"{wall:.0f} s wall for the whole command (compile {s['compile_s']:.1f} s, "
                f"training and evaluation {s['train_and_eval_s']:.1f} s, "
                f"{s['experiment_rounds_per_s']:.1f} experiment-rounds/s)"
            )
            continue
        found = PROGRESS.findall(_read(os.path.join(work, "logs", f"{name}.log")))
        if found:
            done, total, rate = int(found[-1][0]), int(found[-1][1]), float(found[-1][2])
            out.append(
                f"- {suite}: {steps[name]['status']} after {wall:.0f} s at round {done}/{total}; "
                f"{rate:.2f} rounds/s -> about {total / rate:.0f} s of training for all rounds "
                "(extrapolated)"
            )
        else:
            out.append(f"- {suite}: {steps[name]['status']}, no progress line (see its log)")
    return out


def goal_curve(work: str) -> list[str]:
    """Goal 2: experiment-rounds/s at E=64 >= 30x that at E=1."""
    out = ["", "## Goal 2: experiment-rounds/s at E=64 >= 30x E=1"]
    for folder in sorted(glob.glob(os.path.join(work, "results", "throughput", "curve_e*"))):
        rows = {int(r["experiments"]): r for r in _csv(os.path.join(folder, "sweep_e.csv"))}
        if not rows:  # cut short: the lines printed so far
            log = _read(os.path.join(work, "logs", os.path.basename(folder) + ".log"))
            rows = {
                int(e): {"experiment_rounds_per_s": r, "with_eval_per_s": w}
                for e, _, r, w in E_LINE.findall(log)
            }
        name = os.path.basename(folder)
        if not rows:
            out.append(f"- {name}: no measurement")
            continue
        for e in sorted(rows):
            r = rows[e]
            out.append(
                f"- {name} E={e}: {float(r['experiment_rounds_per_s']):.2f} experiment-rounds/s "
                f"(training + FedAvg), {float(r['with_eval_per_s']):.2f} with evaluation"
            )
        if 1 in rows and 64 in rows:
            for key, what in (
                ("experiment_rounds_per_s", "training"),
                ("with_eval_per_s", "with evaluation"),
            ):
                ratio = float(rows[64][key]) / float(rows[1][key])
                verdict = "met" if ratio >= 30 else "not met"
                out.append(f"- {name}: E=64 / E=1 = {ratio:.1f}x ({what}): {verdict}")
    return out


def goal_throughput(work: str, environment: dict) -> list[str]:
    """Goal 3: >= 0.5x centralized training at the same total batch; FLOP/s against peak."""
    out = ["", "## Goal 3: training throughput >= 0.5x centralized (same total batch)"]
    ceilings = {k: environment.get(k) for k in ("f32_default_tflops", "bf16_tflops")}
    out.append(
        f"- ceilings: measured f32 matmul (default precision) {_tf(ceilings['f32_default_tflops'])}"
        f", bf16 {_tf(ceilings['bf16_tflops'])} TFLOP/s; datasheet fp32 "
        f"{DATASHEET_TFLOPS['fp32']}, tf32 {DATASHEET_TFLOPS['tf32']} TFLOP/s"
    )
    out.append("")
    out.append(
        "| run | ours ex/s | centralized ex/s | ours / centralized | ours GFLOP/s | "
        "% of measured f32 | % of datasheet fp32 | loop / ours |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for folder in sorted(glob.glob(os.path.join(work, "results", "throughput", "*"))):
        rows = _csv(os.path.join(folder, "table.csv"))
        if not rows:
            continue
        ours = rows[0]
        central = next((r for r in rows if r["method"].startswith("centralized")), None)
        loop = next((r for r in rows if r["method"].startswith("per-client loop")), None)
        ex, gflops = float(ours["examples_per_s"]), float(ours["gflop_per_s"])
        ratio = ex / float(central["examples_per_s"]) if central else float("nan")
        measured = ceilings["f32_default_tflops"] or float("nan")
        out.append(
            f"| {os.path.basename(folder)} | {ex:,.0f} | "
            f"{float(central['examples_per_s']) if central else float('nan'):,.0f} | "
            f"{ratio:.2f}x ({'met' if ratio >= 0.5 else 'not met'}) | {gflops:,.0f} | "
            f"{100 * gflops / 1e3 / measured:.2f} | "
            f"{100 * gflops / 1e3 / DATASHEET_TFLOPS['fp32']:.2f} | "
            f"{_ratio(loop, ours)} |"
        )
    return out


def _ratio(loop, ours) -> str:
    """The loop's round time over ours ('-' without a loop row)."""
    if loop is None:
        return "-"
    return f"{float(loop['round_s_median']) / float(ours['round_s_median']):.2f}x"


def _tf(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(work: str, steps_tsv: str) -> str:
    lines, steps = steps_table(steps_tsv)
    environment = {}
    if os.path.exists(os.path.join(work, "results", "env.json")):
        environment = json.load(open(os.path.join(work, "results", "env.json")))
    head = [
        "# Accelerator run",
        "",
        f"{environment.get('device_kind', '?')} ({environment.get('backend', '?')}), "
        f"python {environment.get('python', '?')}, jax {environment.get('jax', '?')}, "
        f"flax {environment.get('flax', '?')}, optax {environment.get('optax', '?')}, "
        f"orbax-checkpoint {environment.get('orbax-checkpoint', '?')}",
        "",
    ]
    tests = _read(os.path.join(work, "logs", "tests.log"))
    counts = re.findall(r"=+ (.*(?:passed|failed|error).*) in [\d.]+s", tests)
    if counts:
        closing = counts[-1]
    elif "tests" not in steps:  # a call with fewer STEPS
        closing = "not run"
    else:  # cut short: count the verdicts printed so far (-v)
        verdicts = re.findall(r" (PASSED|FAILED|ERROR|SKIPPED) ", tests)
        closing = "cut short; so far " + ", ".join(
            f"{verdicts.count(v)} {v.lower()}" for v in ("PASSED", "FAILED", "ERROR", "SKIPPED")
        )
    tail = ["", "## Tests on the device", f"- {closing}"]
    tail += [f"- {line}" for line in re.findall(r"^(?:FAILED|ERROR) .*$", tests, re.M)[:30]]
    memory = _read(os.path.join(work, "logs", "memory.log"))
    mem = ["", "## Memory (benchmarks/memory.py)", ""]
    mem += [
        line
        for line in memory.splitlines()
        if line.startswith(("|", "per extra", "fashion", "cifar10"))
    ]
    text = "\n".join(
        head
        + lines
        + tail
        + goal_sweep(work, steps)
        + goal_curve(work)
        + goal_throughput(work, environment)
        + mem
    )
    return text + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env")
    e.add_argument("--out", required=True)
    e.add_argument("--small", action="store_true", help="small matrices (CPU dry run)")
    sub.add_parser("imports")
    for name in ("throughput", "curve-e"):
        t = sub.add_parser(name)
        t.add_argument("--data-dir", default="", help="the Fashion-MNIST files' folder")
        t.add_argument("rest", nargs=argparse.REMAINDER, help="-- then throughput.py options")
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--steps", required=True)
    r.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.command == "env":
        env(a.out, a.small)
    elif a.command == "imports":
        return imports()
    elif a.command in ("throughput", "curve-e"):
        rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
        if a.command == "throughput":
            throughput_module(a.data_dir).main(rest)
        else:
            curve_e(a.data_dir, rest)
    else:
        text = report(a.work, a.steps)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
