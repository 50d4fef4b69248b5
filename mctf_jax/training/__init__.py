"""Training: the train step, the loop around it, its losses, optimizer and evaluation.

    plan.py        the teacher plan: which r' a step draws, the switch's branches
    train_step.py  the jitted step: student and teacher paths, losses, update, EMA
    losses.py      label-smoothed CE, the confidence-masked consistency, the MCTF loss
    optim.py       AdamW and the epoch-wise cosine schedule of the recipe
    evaluation.py  top-1 / top-5 over every example of a split, on any mesh
    trainer.py     train_and_evaluate: data, mesh, checkpoints, resumption, logs
"""
