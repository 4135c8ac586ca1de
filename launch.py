"""Runs one experiment or one sweep of fedjax-poison from a config file.

    python launch.py --config=configs/fashion_mnist.py --workdir=DIR

Any config field can be overridden: --config.num_rounds=30 --config.attack.flips='6:0'.
This is the only place flags are read.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_poison import checkpoint, configuration, data, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes its files.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    c = _CONFIG.value
    try:
        configuration.validate(c)
        sharding.use_cpu_devices(c.mesh.cpu_devices)
        d = c.distributed
        sharding.initialize_distributed(d.coordinator, d.num_processes, d.process_id)
        summary = train.train_and_evaluate(c, _WORKDIR.value)
    except (
        configuration.ConfigError,
        data.DataError,
        checkpoint.CheckpointError,
        train.DivergenceError,
    ) as e:
        sys.exit(f"error: {e}")
    if summary is None:  # not the primary process of a multi-host run
        return
    for row in summary["final"]:
        logging.info(
            "final: %s", {k: v for k, v in row.items() if k not in ("recall", "precision")}
        )


if __name__ == "__main__":
    app.run(main)
