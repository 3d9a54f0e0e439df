"""What runs on a worker: the PnG core, model families, data, training and evaluation of one stage."""
