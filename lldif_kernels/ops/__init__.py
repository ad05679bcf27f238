"""Differentiable custom ops: argument checks, backend choice, fake tensors and autograd, one file per op."""
