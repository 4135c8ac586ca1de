"""Attack strength: malicious fraction x the paper's three flips x 3 seeds (66 experiments:
the 9 combinations at fraction 0 are 3 distinct clean runs).

    python launch.py --config=configs/paper/label_flipping.py:dataset=fashion_mnist \
        --workdir=runs/lf

Tests claims 1 and 2 of the paper: source-class recall and accuracy fall as the share of
label-flipping participants grows from 2% to 50% (results.md, source_recall_vs_fraction.png),
while the other classes stay close to the clean run (`other_accuracy`); every attacked
experiment is compared with its clean twin (malicious_fraction 0, same flip and seed) in
`source_recall_loss`.

Time on a 2-core CPU, Fashion-MNIST: 17 to 19 hours (13,200 experiment-rounds), extrapolated
from the reduced runs of docs/paper_experiments.md (4.6 to 5.2 s of wall time per
experiment-round on the real files).
CIFAR-10's model is 19 times larger: use an accelerator, or reduce the sweep, e.g.
`--config.sweep.seed='(0,)' --config.sweep.flips="('5:3',)" --config.num_rounds=50`.
"""

from configs import paper
from fedjax_poison.config import configuration


def get_config(arg=None):
    args = paper.parse_arg(arg, dataset=paper.DATASETS)
    c = configuration.paper_config(args["dataset"])
    c.sweep.malicious_fraction = (0.0, 0.02, 0.04, 0.1, 0.2, 0.3, 0.4, 0.5)
    c.sweep.flips = paper.FLIPS[args["dataset"]]
    c.sweep.seed = (0, 1, 2)
    # 66 experiments: groups of 8 keep memory small and still batch the clients of
    # 8 experiments (40 models) into each step; on an accelerator raise it (0 = all).
    c.sweep.max_parallel = 8
    # The final metrics and the recall curves need no evaluation every round.
    c.eval_every = 5
    return c
