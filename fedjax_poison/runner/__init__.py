"""Running: the loop over rounds, its workdir, checkpoints, files and progress lines, and the
public Python API."""
