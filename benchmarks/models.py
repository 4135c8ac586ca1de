"""One local training step of every registered model, im2col against XLA's convolutions.

    python benchmarks/models.py                      # every model, batch 10, ~12 min on 2 cores
    python benchmarks/models.py --models=resnet18 --batch=4
    python benchmarks/models.py --no-scan --out=/tmp/models.md  # a step alone, no lax.scan

For each model of `models.MODELS` on its usual input (its registered shape; otherwise
28 x 28 x 1 for the small nets, 32 x 32 x 3 for VGG and ResNet): the parameter count and
the time of one training step (forward, backward, SGD with momentum, BatchNorm statistics
updated; `--steps` of them in a `lax.scan`, as local training runs them) with
`model.<name>.conv_impl=im2col` and `=xla`, compiled with the run's options
(`setup.compiler_options`). The two are timed in alternating rounds in one
process, so that a slow spell of the machine hits both; each figure is the median over
rounds of a round's mean step time. Writes the table as markdown to
benchmarks/results/<backend>/models.md.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedjax_poison import models  # noqa: E402
from fedjax_poison.runner import setup  # noqa: E402

IMPLS = ("im2col", "xla")
USUAL_SHAPE = {"vgg11": (32, 32, 3), "resnet18": (32, 32, 3)}  # others: 28 x 28 x 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(models.MODELS), help="comma-separated names")
    p.add_argument("--batch", type=int, default=10, help="examples a step")
    p.add_argument("--steps", type=int, default=2, help="steps a call (a lax.scan)")
    p.add_argument("--no-scan", action="store_true", help="time a jitted step alone")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--min-seconds", type=float, default=1.0, help="of steps a round, at least")
    p.add_argument("--out", default=None, help="markdown file (default results/<backend>/)")
    return p.parse_args(argv)


def usual_shape(name: str) -> tuple[int, int, int]:
    return models.input_shape(name) or USUAL_SHAPE.get(name, (28, 28, 1))


def make_train(model, scan: bool = True):
    """train(params, batch_stats, opt_state, xs [S, B, H, W, C], ys [S, B]) -> the same
    three after S SGD steps, in a `lax.scan` as local training runs them (scan=False: S = 1,
    the step alone)."""
    tx = optax.sgd(1e-2, momentum=0.9)

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    def step(state, batch):
        params, batch_stats, opt_state = state
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), None

    def train(params, batch_stats, opt_state, xs, ys):
        if not scan:
            return step((params, batch_stats, opt_state), (xs[0], ys[0]))[0]
        return jax.lax.scan(step, (params, batch_stats, opt_state), (xs, ys))[0]

    options = setup.compiler_options()
    return tx, jax.jit(train, donate_argnums=(0, 1, 2), compiler_options=options)


def prepare(name: str, impl: str, shape, a) -> dict:
    """Model `name`'s compiled training of a.steps steps, its state and batches; the compile
    time."""
    model = models.make_model({**models.config_block(name), "conv_impl": impl}, 10)
    params, stats = models.init_variables(model, jax.random.key(0), shape)
    tx, train = make_train(model, scan=not a.no_scan)
    steps = 1 if a.no_scan else a.steps
    x = jax.random.normal(jax.random.key(1), (steps, a.batch, *shape), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (steps, a.batch), 0, 10)
    state = (params, stats, tx.init(params))
    start = time.perf_counter()
    compiled = train.lower(*state, x, y).compile()
    compile_s = time.perf_counter() - start
    state = jax.block_until_ready(compiled(*state, x, y))  # warm-up
    return dict(train=compiled, state=state, x=x, y=y, compile_s=compile_s, params=params)


def time_round(run: dict, min_seconds: float) -> float:
    """Mean seconds of a step over at least min_seconds (and one call)."""
    calls, start = 0, time.perf_counter()
    while calls < 1 or time.perf_counter() - start < min_seconds:
        run["state"] = jax.block_until_ready(run["train"](*run["state"], run["x"], run["y"]))
        calls += 1
    return (time.perf_counter() - start) / (calls * run["x"].shape[0])


def measure(name: str, a) -> dict:
    shape = usual_shape(name)
    runs = {impl: prepare(name, impl, shape, a) for impl in IMPLS}
    count = models.count_params(runs["im2col"].pop("params"))
    times = {impl: [] for impl in IMPLS}
    for _ in range(a.rounds):
        for impl in IMPLS:
            times[impl].append(time_round(runs[impl], a.min_seconds))
    row = dict(model=name, input="x".join(map(str, shape)), params=count, batch=a.batch)
    for impl in IMPLS:
        row[f"{impl}_ms"] = 1e3 * float(np.median(times[impl]))
        row[f"{impl}_compile_s"] = runs[impl]["compile_s"]
    row["ratio"] = row["xla_ms"] / row["im2col_ms"]
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | input | params | batch | im2col ms/step | xla ms/step | xla / im2col "
        "| compile s (im2col, xla) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['params']:,} | {r['batch']} "
            f"| {r['im2col_ms']:.1f} | {r['xla_ms']:.1f} | {r['ratio']:.2f}x "
            f"| {r['im2col_compile_s']:.1f}, {r['xla_compile_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    a = parse_args(argv)
    names = [n for n in a.models.split(",") if n]
    for name in names:
        models.MODELS.check_name(name)
    backend = jax.default_backend()
    rows = []
    for name in names:
        rows.append(measure(name, a))
        r = rows[-1]
        print(
            f"{name:18s} {r['input']:8s} {r['params']:>11,} params  im2col {r['im2col_ms']:8.1f} "
            f"ms  xla {r['xla_ms']:8.1f} ms  xla/im2col {r['ratio']:.2f}x",
            flush=True,
        )
    how = "a jitted step alone" if a.no_scan else f"{a.steps} steps a lax.scan"
    title = f"{jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}, {how}"
    table = f"{title}\n\n{markdown(rows)}"
    out = a.out or os.path.join(os.path.dirname(__file__), "results", backend, "models.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(table)
    print(table + f"written to {out}")


if __name__ == "__main__":
    main()
