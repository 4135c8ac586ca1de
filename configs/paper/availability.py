"""Malicious participant availability: each of the 5 slots of a round is malicious w.p. alpha.

    python launch.py --config=configs/paper/availability.py:dataset=fashion_mnist \
        --workdir=runs/availability

Tests claim 4 of the paper: the more available the malicious participants (alpha from
0 to 1), the lower the source-class recall; and availability interacts with timing:
alpha 0 before round 75 and 0.6 from it on ('0/0.6') ends worse than the reverse
('0.6/0'), from which the model recovers (recall_over_rounds.png). Half of the 50 clients
are malicious so that alpha = 1 can fill all 5 slots of a round from them (alpha * 5
malicious and (1 - alpha) * 5 honest clients must exist). 24 experiments: 8 alphas x 3 seeds.

Time on a 2-core CPU, Fashion-MNIST: 6 to 7 hours (4,800 experiment-rounds), extrapolated
from the reduced runs of docs/paper_experiments.md (4.6 to 5.2 s of wall time per
experiment-round on the real files).
"""

from configs import paper
from fedjax_poison.config import configuration


def get_config(arg=None):
    args = paper.parse_arg(arg, dataset=paper.DATASETS)
    c = configuration.paper_config(args["dataset"])
    c.attack.malicious_fraction = 0.5
    c.selection.schedule = "availability"
    c.selection.breakpoint = 75
    # A pair is (alpha before the breakpoint, alpha from it on), as in the paper's code.
    c.sweep.alpha = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, (0.0, 0.6), (0.6, 0.0))
    c.sweep.seed = (0, 1, 2)
    c.sweep.max_parallel = 8
    c.eval_every = 5
    return c
