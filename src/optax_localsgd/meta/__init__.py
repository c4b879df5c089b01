"""Meta-training of the learned server optimizers (PES, paper Algorithm 2)."""
