"""What the training script and the demo need besides the ARIA core: the parser, ARIA assembled for a run, the
KD step, the student, EMA, inputs and outputs, checkpoints, preflight checks, data, validation and evaluation."""
