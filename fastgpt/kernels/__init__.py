"""Hand-written Triton kernels, one module per op.

Every module holds three things side by side: the PyTorch reference
(`<op>_reference`, the ground truth and the CPU path), the Triton kernels, and
the autograd wrapper exposed as `<op>_triton`. `fastgpt.ops` picks between the
two; nothing else in the package imports Triton.
"""
