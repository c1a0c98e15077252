"""One module per DVC stage, each with one entry function: `run(params)`."""
