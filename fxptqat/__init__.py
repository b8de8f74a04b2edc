"""fxptqat: hybrid PTQ + QAT for PyTorch as torch.fx graph passes."""
