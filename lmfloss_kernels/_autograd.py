"""Autograd plumbing shared by the fused backends: the double-backward rule and the eager op call.

The lowest layer of the package next to :mod:`lmfloss_kernels._config`: it imports nothing from
the package, so the registry, the reference's distributed helpers and every backend can use it
without an import cycle.
"""

from __future__ import annotations

import torch
from torch._C._functorch import peek_interpreter_stack as _functorch_interpreter
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


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


def call_op(op, *args):
    """Call ``op``, a :func:`torch.library.custom_op` with an autograd formula, on positional ``args``.

    Same result and gradient as ``op(*args)``. In plain eager execution the call skips
    torch.library's Python dispatch layers (schema binding, argument re-packing, the generated
    autograd wrapper: some 60 µs of host time per forward and more per backward, several times a
    small loss's kernels): the op's own implementation, ``setup_context`` and ``backward`` run
    under one :class:`torch.autograd.Function`, or the implementation alone when no gradient is
    wanted. Anything that needs the registered op goes through it: ``torch.compile`` / export
    tracing, a dispatch mode (fake tensors, ``FlopCounterMode``...), ``torch.func`` transforms and
    tensor subclasses.
    """
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or _functorch_interpreter() is not None:
        return op(*args)
    wants_grad = False
    for arg in args:  # a plain loop: this runs twice per training step
        if isinstance(arg, torch.Tensor):
            if type(arg) is not torch.Tensor:
                return op(*args)
            wants_grad = wants_grad or arg.requires_grad
    kernel = _eager_kernel(op)
    if kernel is not None:
        return kernel(*args)
    if wants_grad and torch.is_grad_enabled():
        return _EagerOp.apply(op, *args)
    return op._init_fn(*args)


def bind_op(op, tail: tuple):
    """``lambda first, second: call_op(op, first, second, *tail)``, for a ``tail`` fixed by a call plan.

    A criterion's call plan (:mod:`lmfloss_kernels._plans`) replays the same op with the same
    constants and scalar options on every training step: their checks are made once, here (plain
    tensors that need no gradient), and each call checks only its two tensors and the execution
    mode, with :func:`call_op`'s routing otherwise.
    """
    if any(isinstance(arg, torch.Tensor) and (type(arg) is not torch.Tensor or arg.requires_grad) for arg in tail):
        return lambda first, second: call_op(op, first, second, *tail)

    def bound(first, second):
        if (
            type(first) is not torch.Tensor
            or type(second) is not torch.Tensor
            or torch.compiler.is_compiling()
            or is_in_torch_dispatch_mode()
            or _functorch_interpreter() is not None
        ):
            return call_op(op, first, second, *tail)
        kernel = _eager_kernel(op)
        if kernel is not None:
            return kernel(first, second, *tail)
        if (first.requires_grad or second.requires_grad) and torch.is_grad_enabled():
            return _EagerOp.apply(op, first, second, *tail)
        return op._init_fn(first, second, *tail)

    return bound


# op -> (kernel, name of the dispatcher op that must carry an autograd kernel), until first used;
# then op -> kernel, or None where the loaded library has no autograd kernel for it (an older build).
_EAGER_KERNELS: dict = {}


def register_eager_kernel(op, kernel, dispatcher_op: str) -> None:
    """Have :func:`call_op` run ``kernel(*args)`` for ``op`` in plain eager execution.

    ``kernel`` must compute what ``op`` computes, with the same gradient, through the dispatcher op
    ``dispatcher_op`` whose autograd formula is registered in C++ (``csrc/autograd.cpp``): a training
    step then makes one C++ graph node and runs no Python in its backward. The kernel is used only
    once the loaded library is seen to have that autograd kernel.
    """
    _EAGER_KERNELS[op] = (kernel, dispatcher_op)


def _eager_kernel(op):
    entry = _EAGER_KERNELS.get(op)
    if type(entry) is tuple:
        kernel, name = entry
        has_autograd = torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
        entry = _EAGER_KERNELS[op] = kernel if has_autograd else None
    return entry


class _EagerOp(torch.autograd.Function):
    """A custom op's implementation and autograd formula, run as one autograd node (see :func:`call_op`)."""

    @staticmethod
    def forward(ctx, op, *args):
        output = op._init_fn(*args)
        op._setup_context_fn(ctx=ctx, inputs=args, output=output)
        ctx.op = op
        # The ops' second outputs (normalisers, statistics) never receive a gradient: no zeros are
        # materialised for them (the formulas ignore that argument).
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.op._backward_fn(ctx, *grads))
