"""Cross-device federation: Fashion-MNIST over 3,000 clients of unequal, label-skewed data
(Dirichlet alpha 0.3: 1 to a few hundred examples, mostly of two or three classes), 50 a
round, as in the production-like settings of Shejwalkar et al. (IEEE S&P 2022).

    python launch.py --config=configs/cross_device.py --workdir=runs/cross_device \
        --config.attack.malicious_fraction=0.01 --config.defense.name=median

Every attack and defense of the paper's config applies (`attack.name`, `defense.name`,
`sweep.*`); a 1% malicious fraction is 30 attackers, so a round of 50 holds one or none
most of the time. Local work: one epoch over the client's own examples (clients stop after
their own steps; `--config.local_steps=S` trains every client exactly S batches instead).
`:smoke`: synthetic data, seconds.
"""

from fedjax_poison.config import configuration


def get_config(arg=None):
    c = configuration.paper_config("fashion_mnist")
    c.num_clients = 3000
    c.clients_per_round = 50
    c.data.partition = "dirichlet"
    c.data.dirichlet.alpha = 0.3
    c.local_epochs = 1
    c.batch_size = 8
    c.lr = 0.01
    c.lr_decay_every = 10_000  # no decay within the run
    c.num_rounds = 300
    c.eval_every = 10
    c.attack.malicious_fraction = 0.0
    if arg == "smoke":
        c = configuration.smoke(c)
        c.num_clients, c.clients_per_round = 200, 20
        c.data.synthetic_train = 4000
        return c
    return configuration.variant(c, arg, "configs/cross_device.py")
