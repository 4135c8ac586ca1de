"""The jitted round: client selection, local training, the server's guard and aggregation,
the sweep's advance over experiments, evaluation on the device, and sharding over devices."""
