"""The reference's PyTorch import path: ``from dopt.dopt_torch.opt_main import ...``."""
