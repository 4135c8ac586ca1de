"""Attack timing: malicious participants always, only before, or only from round 75 on.

    python launch.py --config=configs/paper/attack_timing.py:dataset=fashion_mnist \
        --workdir=runs/timing

Tests claim 3 of the paper: poisoning that stops at round 75 ('early') is forgotten and
the source-class recall recovers, while poisoning from round 75 on ('late') is as harmful
at the end as poisoning in every round ('always'); see recall_over_rounds.png. Half of the
50 clients are malicious, as in the paper's code (25 poisoned workers, breakpoint 75).
9 experiments: 3 schedules x 3 seeds, run together.

Time on a 2-core CPU, Fashion-MNIST: 2.3 to 2.6 hours (1,800 experiment-rounds),
extrapolated from the reduced runs of docs/paper_experiments.md (4.6 to 5.2 s of wall time
per experiment-round on the real files). For `source_recall_loss` against clean twins, add
`--config.sweep.malicious_fraction='(0, 0.5)'` (twice the experiments).
"""

from configs import paper
from fedjax_poison.config import configuration


def get_config(arg=None):
    args = paper.parse_arg(arg, dataset=paper.DATASETS)
    c = configuration.paper_config(args["dataset"])
    c.attack.malicious_fraction = 0.5
    c.selection.breakpoint = 75
    c.sweep.schedule = ("always", "early", "late")
    c.sweep.seed = (0, 1, 2)
    c.eval_every = 5  # 40 points per recall curve
    return c
