"""C++/CUDA ops registered through torch.library, compiled on first use and cached (see loader in this file)."""
