"""Autograd rules shared by the fused backends' formulas.

The lowest layer of the package next to :mod:`lmfloss_kernels._config`: it imports nothing from
the package, so the registry, the reference's distributed helpers and every backend can use it
without an import cycle.
"""

from __future__ import annotations

import torch


def refuse_double_backward(name: str) -> None:
    """Raise when backend ``name``'s backward is asked to build a graph of the gradient.

    Fused backends compute the gradient in kernels that have no derivative of their own: a
    ``create_graph=True`` backward would either fail deep inside torch or, worse, treat the
    gradient as a constant and give wrong second derivatives. The autograd engine runs backward
    with grad mode on exactly when ``create_graph=True``; AOTAutograd (torch.compile, and
    opcheck's ``test_aot_dispatch_dynamic``) traces the backward of a first-order gradient with
    grad mode off (checked with torch 2.14 by tests/test_triton_ops.py, tests/test_ext_ops.py and
    tests/test_compile_fresh.py), so the grad mode alone tells the two apart. (grad_output's
    ``requires_grad`` would not: ``autograd.grad(loss, x, create_graph=True)`` seeds with a
    constant 1.)
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"double backward is not supported by backend '{name}' (create_graph=True builds a graph of a "
            "gradient that its fused kernels compute without one); use backend='reference' for "
            "higher-order gradients"
        )
