"""Hand-written Triton kernels, one module per op, and their PyTorch references.

`reference.py` holds every op's PyTorch reference (the ground truth and the CPU
path) and imports no Triton; each other module holds one op's Triton kernels and
its autograd wrapper `<op>_triton`, and re-exports that op's reference.
`fastgpt.ops` picks between the two; nothing else in the package imports Triton.
"""
