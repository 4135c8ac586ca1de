"""One line of meaning for every config field that is not a member's block (those are the
factories' own arguments: `python -m fedjax_poison.list attacks|defenses|models|partitions`).

A test checks that every such field of `paper_config` is here, so a new field cannot go
unexplained.
"""

FIELD_HELP = {
    "dataset": "the dataset: a name of data.SPECS (built in or registered)",
    "model.name": "the model: a registered name; its fields are model.<name>.*",
    "data.source": "where the data comes from: auto | tfds | files | synthetic",
    "data.dir": "the folder to read from; '' = the source's default",
    "data.partition": "how the training set is split over clients: iid | dirichlet | shards "
    "| a registered one (its fields: data.<name>.*)",
    "data.partition_seed": "seed of the split, shared by every experiment of a sweep",
    "data.synthetic_train": "training examples of data.source=synthetic",
    "data.synthetic_test": "test examples of data.source=synthetic",
    "num_clients": "N: clients in the federation",
    "clients_per_round": "k: clients selected each round",
    "num_rounds": "rounds to run, numbered 1..num_rounds",
    "local_epochs": "epochs of local training over a client's examples each round",
    "local_steps": "> 0: batches every selected client trains a round, its examples cycled "
    "(cross-device convention; replaces local_epochs); 0: local_epochs",
    "clients_at_once": "clients a device trains at once; 0: automatic (CPU: what fits the "
    "cache; accelerators: the whole round)",
    "batch_size": "local training batch size",
    "lr": "learning rate of local SGD",
    "momentum": "SGD momentum, reset every round",
    "lr_decay_factor": "the step schedule: lr x factor ** (round // lr_decay_every)",
    "lr_decay_every": "rounds between learning-rate decays",
    "augment": "random crop and horizontal flip of training images",
    "min_lr": "the learning rate never decays below this",
    "lr_per_participation": "True: a client's schedule counts its own rounds (the original code)",
    "seed": "seed of the experiment: malicious clients, selections, batches, initial model",
    "eval_every": "rounds between evaluations on the test set",
    "eval_batch_size": "test images per evaluation batch",
    "eval_window": "evaluations averaged into the stable measures; 0 = the last 10% of rounds",
    "save_features": "write features/*.npz: per (round, client) rows for pca_analysis",
    "checkpoint_every": "rounds between checkpoints (a multiple of eval_every); 0 = every 10 "
    "minutes",
    "overwrite": "True: replace a workdir's run of another config (only the run's own files)",
    "tensorboard": "write TensorBoard event files in workdir/tensorboard",
    "attack.name": "the attack: a registered name, or several joined by '+'; its fields are "
    "attack.<name>.*",
    "attack.malicious_fraction": "share of the N clients that are malicious",
    "attack.flips": (
        "source:target label pairs flipped by label_flip, adaptive_flip, edge_case and "
        "alt_min, '6:0,1:3'"
    ),
    "attack.start_round": "the first round in which malicious clients poison (from 1)",
    "attack.end_round": "the last round in which they poison; -1 = the last round",
    "attack.every": "poison every n-th round of the window",
    "selection.schedule": "when malicious clients may be selected: always | early | late | "
    "availability",
    "selection.breakpoint": "the round at which 'early' ends and 'late' begins",
    "selection.alpha": "availability: each slot of a round is malicious with this probability",
    "selection.alpha_after": "availability from the breakpoint on; -1 = selection.alpha",
    "defense.name": "the defense: a registered rule, after any pre-aggregators joined by '+'; "
    "its fields are defense.<name>.*",
    "defense.mode": "detect (flag, aggregate by FedAvg) | filter (the rule's aggregate) | block "
    "(pca: exclude clients flagged block_after times)",
    "sweep.mode": "product (every combination of the swept axes) | zip (the i-th values together)",
    "sweep.max_parallel": "experiments held at once (of one attack and defense); 0 = all",
    "mesh.clients": "devices the clients of a round are split over; 0 = automatic",
    "mesh.experiments": "devices the experiments of a sweep are split over",
    "mesh.cpu_devices": "jax devices on a CPU; 0 = one per core",
    "distributed.coordinator": "several hosts: 'host:port' of process 0, 'auto', or '' (one host)",
    "distributed.num_processes": "several hosts: how many processes join",
    "distributed.process_id": "several hosts: this process's index",
    "distributed.timeout_s": "several hosts: seconds to wait for the coordinator and the others",
}
SWEEP_HELP = "values of this setting, one experiment each (one compiled program)"


def help_for(field: str) -> str | None:
    """The line of meaning of a field ('sweep.<axis>' included), or None."""
    if field.startswith("sweep.") and field not in FIELD_HELP:
        return SWEEP_HELP
    return FIELD_HELP.get(field)
