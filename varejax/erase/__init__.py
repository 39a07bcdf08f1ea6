"""S-VARE concept erasure: the filtered CE / preservation losses, baselines, optimiser and step functions.

`losses` holds pure functions on logits, `optim` the trainable-parameter selection and the torch-exact
AdamW + clipping, `step` the jitted erase / preserve / iteration steps on an Infinity parameter state.
"""
