"""Configuration: the ConfigDict's defaults and its one validation, sweeps and experiments,
and the Plan, the plain values every layer below reads instead of the ConfigDict."""
