"""The PyTorch backend: ``torch.func`` kernels (``vmap(grad)``, double-backward HVPs)."""
