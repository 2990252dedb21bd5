"""One module per op: argument checks, torch.library registration, autograd, backend choice."""
