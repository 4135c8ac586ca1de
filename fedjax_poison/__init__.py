"""fedjax-poison: a vectorized simulator of data poisoning in federated learning."""
