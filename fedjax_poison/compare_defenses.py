"""The attack x defense matrix: attacks against defenses on one dataset, over seeds, one run.

    python -m fedjax_poison.compare_defenses --config=configs/fashion_mnist.py \
        --attacks=label_flip,sign_flip,alie --defenses=fedavg,median,krum --seeds=0,1 \
        --workdir=runs/matrix --config.attack.malicious_fraction=0.3 --config.num_rounds=30

Every cell is an experiment of ONE run of the simulator (`sweep.attack` x `sweep.defense`
x `sweep.seed`, mode product), in `workdir/run`. The run compiles one program and runs the
cells one after another, each cell's seeds as one group of experiments (at most
`sweep.max_parallel` at once): a group runs its own attack and defense only, so a cell costs
what the same attack and defense cost alone (benchmarks/matrix.py). The data is on the
device once for all of them, and an interrupted matrix resumes from its last checkpoint.
A row 'none' (no attack, the same malicious clients behaving honestly) is the reference of
each defense.
Without --attacks, the config's `attack.name` is the one attack row (the old one-attack
comparison). Writes into workdir:

    matrix.csv   one row per attack x defense: accuracy and the attack's success, mean,
                 std over seeds (n - 1) and 95% interval (Student t), n, diverged and
                 degenerate counts, source recall;
                 the attack's measure beside its clean twin's (`effect_*`: this, clean, the
                 difference paired by seed, its 95% CI and n, and `effect` in words);
                 `attackers_per_round` and `rounds_with_attacker`; detection
                 precision/recall where the rule flags clients; notes
    matrix.md    tables to paste: rows = attacks, columns = defenses, cells
                 "accuracy / success"; each attack against its clean twin, saying where the
                 difference is not distinguishable from no attack; how many attackers a
                 round held; detection by the rules that flag clients
    matrix.png   heatmaps, one per measure (also .pdf; see results/matrix_figures.py)

Every number is a stable measure of the run's tables (the mean of an experiment's last W
evaluations, `eval_window`), as in results.md; `DIR/run` holds the run's own tables and
figures too. An attack's success is its own measure (attacks.MEASURES): a flip's attack success rate
(source-class test images predicted as the target), a backdoor's (triggered test images
predicted as the target), and for untargeted attacks the accuracy drop against 'none'
(paired by seed). A defense that cannot run with the config (e.g. Bulyan with too few
clients per round) is a note, not a crash; a cell with a diverged seed says so, without
a number.
"""

from fedjax_poison import signals

# Run as the program: a signal from now on is a request to stop (see signals.py).
STOP = signals.catch() if __name__ == "__main__" else None

import copy  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedjax_poison import attacks, data, defenses, errors, files  # noqa: E402
from fedjax_poison.config import configuration, fields  # noqa: E402
from fedjax_poison.results import figures, report, stats, tables  # noqa: E402
from fedjax_poison.results import matrix_figures as figures_compare  # noqa: E402
from fedjax_poison.round import sharding  # noqa: E402
from fedjax_poison.runner import api, checkpoint, train  # noqa: E402
from fedjax_poison.runner import workdir as workdir_lib  # noqa: E402

STATS = ("accuracy", "success", "accuracy_drop", "source_recall", "source_recall_loss")
COLUMNS = ("attack", "defense", "measure", "n", "diverged", "degenerate_rounds")
COLUMNS += tuple(f"{s}_{m}" for s in STATS for m in ("mean", "std", "ci95"))
COLUMNS += ("effect_measure", "effect_attacked", "effect_clean", "effect_diff_mean")
COLUMNS += ("effect_diff_ci95", "effect_diff_n", "effect")
COLUMNS += ("attackers_per_round", "rounds_with_attacker")
COLUMNS += ("detection_precision", "detection_recall", "note")
# What stops with one line instead of a traceback (as launch.py).
USER_ERRORS = (
    errors.UserError,
    configuration.ConfigError,
    data.DataError,
    checkpoint.CheckpointError,
    train.DivergenceError,
)
# The marker's config in a matrix folder: the folder is this command's (see claim).
MATRIX_CONFIG = {"command": "fedjax_poison.compare_defenses"}
SUCCESS = {  # what the success column means, per measure
    "flip": "attack success rate (source -> target)",
    "backdoor": "backdoor success rate (triggered -> target)",
    "untargeted": "accuracy drop against 'none'",
    "none": "",
}


def plan(config, attack_names, defense_names, seeds):
    """(the run's config, {defense: why it cannot run}) for the matrix.

    Attack errors stop (ConfigError naming the field); a defense that cannot run is left
    out with its reason.
    """
    c = copy.deepcopy(config)
    swept = [a for a in configuration.SWEEP_AXES if len(c.sweep[a])]
    if swept:
        raise configuration.ConfigError(
            f"sweep.{swept[0]} is set: the matrix sweeps attack, defense and seed itself; "
            "run one setting of the other axes at a time"
        )
    spec = data.SPECS[c.dataset]
    notes = {}
    for name in dict.fromkeys(defense_names):
        try:
            defenses.split_name(name)  # an unknown name stops, with the closest one
        except ValueError as e:
            raise configuration.ConfigError(f"--defenses: {e}") from None
        try:
            fields.validate_defense_name(c, name, "defense.name", spec.num_classes)
        except configuration.ConfigError as e:
            notes[name] = f"not run: {e}"
    runnable = [d for d in dict.fromkeys(defense_names) if d not in notes]
    if not runnable:
        raise configuration.ConfigError(f"no defense can run with this config: {notes}")
    c.sweep.attack = tuple(dict.fromkeys(["none", *attack_names]))
    c.sweep.defense = tuple(runnable)
    c.sweep.seed = tuple(int(s) for s in dict.fromkeys(seeds))
    c.sweep.mode = "product"
    configuration.validate(c)
    return c, notes


SUCCESS_METRIC = {"flip": "attack_success_rate", "backdoor": "attack_success_rate"}
SUCCESS_METRIC["untargeted"] = "accuracy_drop"
CELL_METRICS = {  # a cell's statistic: the run's table column it is read from
    "accuracy": "accuracy",
    "accuracy_drop": "accuracy_drop",
    "source_recall": "source_recall",
    "source_recall_loss": "source_recall_loss",
}


def cells(c, table: list[dict], by_seed: list[dict], summary: dict, notes: dict) -> list[dict]:
    """One dict per attack x defense (COLUMNS) from the run's tables (tables.experiment_table
    and by_seed_table): stable measures, mean and sample std over the seeds; differences to
    'none' of the same defense are paired by seed (the clean twin)."""
    groups = {(g["attack"], g["defense"]): g for g in by_seed}
    flagging = {(r["attack"], r["defense"]) for r in summary["final"] if "detection" in r}
    degenerate: dict[tuple, int] = {}
    for r in summary["final"]:
        key = (r["attack"], r["defense"])
        degenerate[key] = degenerate.get(key, 0) + r.get("degenerate_rounds", 0)
    out = []
    for attack in c.sweep.attack:
        measure = next(g["measure"] for (a, _), g in groups.items() if a == attack)
        for defense in c.sweep.defense:
            group = groups[attack, defense]
            cell = {"attack": attack, "defense": defense, "measure": measure}
            cell.update(n=group["seeds"], diverged=group["diverged"])
            cell["degenerate_rounds"] = degenerate.get((attack, defense), 0)
            cell["flags_clients"] = (attack, defense) in flagging
            metrics = dict(CELL_METRICS, success=SUCCESS_METRIC.get(measure))
            for stat, metric in metrics.items():
                for part in ("mean", "std", "ci95"):
                    cell[f"{stat}_{part}"] = group[f"{metric}_{part}"] if metric else math.nan
            cell.update(effect(measure, group))
            for key in tables.ATTACKERS:
                cell[key] = group[f"{key}_mean"]
            for key in ("detection_precision", "detection_recall"):
                found = [table[e].get(key, math.nan) for e in group["experiments"]]
                found = [v for v in found if math.isfinite(v)]
                cell[key] = float(np.mean(found)) if found else None
            cell["note"] = ""
            out.append(cell)
        for defense, note in notes.items():
            out.append({"attack": attack, "defense": defense, "measure": measure, "note": note})
    return out


EFFECT = {"flip": "attack_success_rate", "backdoor": "attack_success_rate"}
EFFECT["untargeted"] = "accuracy"


def effect(measure: str, group: dict) -> dict:
    """The attack's measure (its success rate, or accuracy for an untargeted attack) beside
    the clean twin's, their difference paired by seed with its 95% interval, in words."""
    metric = EFFECT.get(measure)
    if metric is None:
        return {"effect_measure": "", "effect": ""}
    return {
        "effect_measure": metric,
        "effect_attacked": group[f"{metric}_mean"],
        "effect_clean": group[f"{metric}_clean_mean"],
        "effect_diff_mean": group[f"{metric}_vs_clean_mean"],
        "effect_diff_ci95": group[f"{metric}_vs_clean_ci95"],
        "effect_diff_n": group[f"{metric}_vs_clean_n"],
        "effect": group[f"{metric}_vs_clean_effect"] or "no clean baseline of this measure",
    }


def _pm(cell: dict, stat: str) -> str:
    """'0.812 ± 0.004': the mean ± its 95% interval (from two seeds on, as in the figure and
    the LaTeX tables), '' when undefined."""
    mean, ci = cell.get(f"{stat}_mean", math.nan), cell.get(f"{stat}_ci95", math.nan)
    if not math.isfinite(mean):
        return ""
    return f"{mean:.3f}" + (f" ± {ci:.3f}" if math.isfinite(ci) else "")


def _diverged(cell: dict) -> str:
    if not cell["diverged"]:
        return ""
    n = cell["n"]
    return "diverged" if cell["diverged"] == n else f"diverged ({cell['diverged']} of {n})"


def window_text(c) -> str:
    """'2 evaluations (rounds 20 to 30)': what a stable measure averages."""
    w = stats.window_size(c.to_dict(), [])
    rounds = stats.evaluation_rounds(c.num_rounds, c.eval_every)[-w:]
    if w == 1:
        return f"1 evaluation (round {rounds[-1]})"
    return f"{w} evaluations (rounds {rounds[0]} to {rounds[-1]})"


def title(c) -> str:
    seeds = ", ".join(str(s) for s in c.sweep.seed)
    partition = tables.partition_words(c.to_dict())
    return (
        f"{data.SPECS[c.dataset].name}: {c.attack.malicious_fraction:.0%} malicious, "
        + (f"{partition}, " if partition else "")
        + f"{c.num_clients} clients, {c.clients_per_round} per round, {c.num_rounds} rounds, "
        f"seeds {seeds}"
    )


def _grid(attack_names, columns, at, text) -> list[str]:
    """A markdown table: one row per attack, one column per defense, cells text(cell)."""
    lines = ["| attack \\ defense | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for attack in attack_names:
        row = [_diverged(at[attack, d]) or text(at[attack, d]) or "–" for d in columns]
        lines.append(f"| {attack} | " + " | ".join(row) + " |")
    return lines


def _both(cell: dict) -> str:
    """'accuracy / success' (accuracy alone where the attack has no success measure)."""
    success = _pm(cell, "success")
    return _pm(cell, "accuracy") + (f" / {success}" if success else "")


def _effect(cell: dict) -> str:
    """'ASR 0.210 vs 0.180 clean: +0.030 ± 0.050, not distinguishable from no attack'."""
    metric = cell.get("effect_measure")
    if not metric or cell["attack"] == "none":
        return ""
    diff, ci = cell["effect_diff_mean"], cell["effect_diff_ci95"]
    if not math.isfinite(diff):
        return cell["effect"]
    text = f"{EFFECT_NAMES[metric]} {cell['effect_attacked']:.3f} vs {cell['effect_clean']:.3f}"
    text += f" clean: {diff:+.3f}" + (f" ± {ci:.3f}" if math.isfinite(ci) else "")
    return f"{text}, {cell['effect']}"


def _attackers(cell: dict) -> str:
    """'1.20 a round, ≥ 1 in 70% of rounds'."""
    mean, share = cell.get("attackers_per_round", math.nan), cell.get("rounds_with_attacker")
    if cell["attack"] == "none" or not math.isfinite(mean):
        return ""
    return f"{mean:.2f} a round, ≥ 1 in {share:.0%} of rounds"


EFFECT_NAMES = {"attack_success_rate": "success", "accuracy": "accuracy"}


def _detection(cell: dict) -> str:
    """'precision / recall', '-' where undefined (nobody flagged; no attacker)."""
    show = lambda v: "-" if v is None or not math.isfinite(v) else f"{v:.2f}"
    return f"{show(cell['detection_precision'])} / {show(cell['detection_recall'])}"


def markdown(c, table: list[dict], notes: dict) -> str:
    """matrix.md: accuracy / success, the accuracy drop, detection; then the notes."""
    ran, names = list(c.sweep.defense), list(c.sweep.attack)
    at = {(t["attack"], t["defense"]): t for t in table}
    lines = [f"# Attacks x defenses: {title(c)}", ""]
    lines += [
        "Cells: test accuracy / the attack's success, each the mean of the last "
        f"{window_text(c)}; mean over the seeds ± its 95% interval (Student t; std and "
        "interval in matrix.csv).",
        "",
    ]
    lines += _grid(names, ran, at, _both) + ["", "Success per attack:", ""]
    for attack in names:
        measure = at[attack, ran[0]]["measure"]
        lines.append(f"- {attack}: {SUCCESS[measure] or 'no attack (the reference row)'}")
    lines += [
        "",
        "Each attack against its clean twin ('none' of the same defense and seeds): the "
        "attack's measure (success rate; accuracy for untargeted attacks) beside the clean "
        "run's, their difference paired by seed ± its 95% interval. A difference whose "
        "interval holds 0 is not distinguishable from no attack: the attack did not "
        "measurably work.",
        "",
    ]
    lines += _grid(names, ran, at, _effect) + [""]
    lines += [
        "Malicious clients among the selected ones: mean a round, and the share of rounds "
        f"with at least one ({c.clients_per_round} clients a round, "
        f"{c.attack.malicious_fraction:.0%} of {c.num_clients} malicious):",
        "",
    ]
    lines += _grid(names, ran, at, _attackers) + [""]
    flagging = [d for d in ran if at[names[0], d]["flags_clients"]]
    if flagging:
        lines += ["Detection by the rules that flag clients (precision / recall):", ""]
        lines += _grid(names, flagging, at, _detection) + [""]
    lines += [f"- {d}: {note}" for d, note in notes.items()]
    return "\n".join(lines).rstrip() + "\n"


def write(c, table: list[dict], notes: dict, writer: workdir_lib.Workdir) -> None:
    """matrix.csv and matrix.md, through the matrix folder's writer."""
    writer.write_text("matrix.csv", tables.format_csv(table, COLUMNS))  # as results.csv
    writer.write_text("matrix.md", markdown(c, table, notes))


def claim(workdir: str) -> workdir_lib.Workdir:
    """The matrix folder, locked: new, empty, or one this command wrote (its marker holds
    MATRIX_CONFIG). A folder holding anything else, a run's workdir included, is refused in
    one line and left as it is: a user's matrix.csv is never overwritten."""
    path = os.path.abspath(os.path.expanduser(workdir))
    marker = None
    if os.path.isdir(path):
        try:
            marker = workdir_lib._read_marker(path)
        except files.WorkdirError:
            pass  # the claim names it
    if marker is not None and marker["config"] != MATRIX_CONFIG:
        raise files.WorkdirError(
            f"--workdir {files.show(path)} is a run's workdir, not a matrix folder: name a new "
            "or empty folder (the matrix's own run goes into its run/)"
        )
    return workdir_lib.Workdir.claim(path, MATRIX_CONFIG, overwrite=False)


def compare(config, workdir: str, attack_names, defense_names, seeds, stop=None) -> list[dict]:
    """Runs the matrix in workdir/run, writes its tables into workdir, returns the cells.

    workdir: a new or empty folder, or one this command wrote before (see claim). stop: a
    request to stop (signals.catch()), passed to the run.
    """
    c, notes = plan(config, attack_names, defense_names, seeds)
    with claim(workdir) as folder:
        run_dir = folder.join("run")
        try:
            summary = train.train_and_evaluate(c, run_dir, stop=stop)
        except errors.UserError:  # the run left nothing: neither does the matrix folder
            folder.discard()
            raise
        run = report.read_run(run_dir, name=os.path.basename(folder.path))
        per_experiment = tables.experiment_table(run)
        by_seed = tables.by_seed_table(per_experiment)
        table = cells(c, per_experiment, by_seed, summary, notes)
        write(c, table, notes, folder)
        fig = figures_compare.matrix_figure(run, per_experiment, by_seed)  # matrix.png, .pdf
        figures.save(fig, "matrix", folder)
    return table


EVERY_ATTACK = [name for name in attacks.ATTACKS if name != "none"]  # 'none' is always a row
EVERY_RULE = list(defenses.DEFENSES)


def choose(
    given: list[str] | None, default: list[str], flag: str, every: list[str] | None = None
) -> list[str]:
    """The names of --{flag}: `default` when not given, `every` for 'all'; empty or repeated
    names are refused."""
    if given is None:
        return default
    names = [n.strip() for n in given]
    if every is not None and names == ["all"]:
        return list(every)
    if not names or not all(names):
        ways = "names separated by commas" + (", 'all'" if every is not None else "")
        raise configuration.ConfigError(
            f"--{flag}={','.join(given)} names an empty value: give {ways}, or leave --{flag} out"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise configuration.ConfigError(
            f"--{flag} names {', '.join(repeated)} more than once: name each once"
        )
    return names


def seed_values(given: list[str] | None, default: int) -> list[int]:
    """--seeds as whole numbers (default: the config's seed)."""
    names = choose(given, [str(default)], "seeds")
    try:
        return [int(n) for n in names]
    except ValueError:
        raise configuration.ConfigError(
            f"--seeds={','.join(given or [])} holds a value that is not a whole number: "
            "e.g. --seeds=0,1,2"
        ) from None


def _cli() -> None:
    """Command line (flags are defined only when this module is the program)."""
    config = config_flags.DEFINE_config_file("config", None, "Config file (a get_config).")
    workdir = flags.DEFINE_string("workdir", None, "Where the run and the tables go.")
    names = flags.DEFINE_list(
        "defenses", EVERY_RULE, "Defenses (columns); 'all': every rule (the default)."
    )
    attack_names = flags.DEFINE_list(
        "attacks", None, "Attacks (rows); 'all': every registered one; default attack.name."
    )
    seeds = flags.DEFINE_list("seeds", None, "Seeds; default the config's seed.")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        if STOP is not None and STOP.is_set():  # while loading
            print("error: interrupted before the run started: nothing was written", file=sys.stderr)
            sys.exit(signals.STATUS)
        api.configure_cli_logging()
        c = config.value
        path = os.path.expanduser(workdir.value)
        if STOP is not None:
            STOP.resume = shlex.join([sys.executable, "-m", __spec__.name, *sys.argv[1:]])
        try:
            chosen = choose(attack_names.value, [c.attack.name], "attacks", EVERY_ATTACK)
            columns = choose(names.value, EVERY_RULE, "defenses", EVERY_RULE)
            chosen_seeds = seed_values(seeds.value, c.seed)
            sharding.use_cpu_devices(c.mesh.cpu_devices)  # as launch.py: one per core
            compare(c, path, chosen, columns, chosen_seeds, stop=STOP)
        except train.Interrupted as e:  # one line, and the command that resumes it
            again = shlex.join([sys.executable, "-m", __spec__.name, *sys.argv[1:]])
            resume = f"; resume with:\n  {again}" if e.workdir else ""
            print(f"error: {e}{resume}", file=sys.stderr)
            sys.exit(signals.STATUS)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)  # as launch.py: one line, status 2
            sys.exit(2)
        print(open(os.path.join(path, "matrix.md")).read())

    app.run(main)


if __name__ == "__main__":
    _cli()
