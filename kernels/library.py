"""Registering the kernels' Python launchers as torch operators in the `hgrn2` namespace."""

from typing import Callable

import torch

_LIBRARY = torch.library.Library("hgrn2", "FRAGMENT")


def define_op(launcher: Callable, mutates_args: tuple[str, ...] = ()) -> torch._ops.OpOverload:
    """`launcher` as the operator hgrn2::<its name>, its schema read from its annotations; returns the operator.
    Register its fake (shapes only) with `torch.library.register_fake` and any autograd with
    `torch.library.register_autograd`, as for `torch.library.custom_op`.

    The dispatcher calls `launcher` itself. `torch.library.custom_op` wraps it in Python (an aliasing check and a
    dynamo guard: 45-50 us a call on an H200's host, torch 2.11; with its autograd glue about 300 us on an H100's,
    benchmarks/scan_host.py): more than the kernels of a small scan, and a ViT step makes 48 scan calls
    (kernels/HISTORY.md, twelfth session). `launcher` must not return its inputs or views of them, which custom_op
    checked at every call and `torch.library.opcheck` checks in the tests."""
    name = launcher.__name__
    _LIBRARY.define(name + torch.library.infer_schema(launcher, mutates_args=mutates_args))
    _LIBRARY.impl(name, launcher, "CompositeExplicitAutograd")
    return getattr(torch.ops.hgrn2, name).default
