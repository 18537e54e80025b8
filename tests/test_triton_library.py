"""The Triton kernels as a torch.library.triton_op: opcheck, torch.compile and the registration.

Under TRITON_INTERPRET=1 (CPU tensors) the operator is opaque (see ops/triton_library.py): opcheck
and torch.compile(fullgraph=True) run here with the interpreted kernels. The CUDA form, where
torch.compile decomposes the operator into its kernel launches, needs a GPU; its registration
(the kernels found by triton_op's source scan, no opaque override) is checked in a subprocess
without the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("the kernels are tested on CPU tensors: needs TRITON_INTERPRET=1",
                allow_module_level=True)
if not hasattr(torch.library, "triton_op"):
    pytest.skip("torch.library.triton_op needs torch >= 2.6", allow_module_level=True)

from encouraging_loss import encouraging_loss  # noqa: E402
from encouraging_loss.ops import triton_el, triton_library  # noqa: E402
from encouraging_loss.ops.triton_el import triton_encouraging_loss  # noqa: E402
from encouraging_loss.options import LossOptions  # noqa: E402

NUM_CLASSES = 21  # two blocks of 16, the last partial
OPERATOR = torch.ops.encouraging_loss.triton_loss_and_grad


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(triton_el, "MAX_BLOCK", 16)


@pytest.fixture
def _fresh_dynamo(monkeypatch, tmp_path):
    # A fresh compile cache: a stale one could serve a graph of older code.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def case(num_rows=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(num_rows, NUM_CLASSES, generator=generator)
    target = torch.randint(0, NUM_CLASSES, (num_rows,), generator=generator)
    target[1] = -100
    return logits, target


def operator_arguments(logits, target, weight=None, bonus_weight=None, token_weight=None,
                       **options):  # fmt: skip
    options = LossOptions(**options)
    values = [getattr(options, name) for name in triton_library.OPTION_NAMES]
    return (logits, target, weight, bonus_weight, token_weight, *values)


def test_schema():
    schema = str(OPERATOR.default._schema)
    assert schema.startswith("encouraging_loss::triton_loss_and_grad(Tensor logits, Tensor target, "
                             "Tensor? weight, Tensor? bonus_weight, Tensor? token_weight, ")
    assert schema.endswith("float z_loss, float? softcap) -> (Tensor, Tensor, Tensor)")


@pytest.mark.parametrize("options", [
    dict(),
    dict(reduction="none", z_loss=0.01, softcap=3.0),
    dict(label_smoothing=0.1, reduction="sum", softcap=2.0, weighted=True),
    dict(bonus="power", bonus_gamma=2.0, z_loss=0.02, weighted=True),
])  # fmt: skip
def test_opcheck(options):
    """Schema, autograd registration, fake tensors and AOT dispatch (dynamic shapes)."""
    logits, target = case()
    tensors = {}
    if options.pop("weighted", False):
        generator = torch.Generator().manual_seed(1)
        tensors = dict(weight=torch.rand(NUM_CLASSES, generator=generator) + 0.5,
                       bonus_weight=torch.rand(NUM_CLASSES, generator=generator),
                       token_weight=torch.rand(5, generator=generator, dtype=torch.float64))
    arguments = operator_arguments(logits.requires_grad_(), target, **tensors, **options)
    torch.library.opcheck(OPERATOR, arguments)


def test_operator_matches_the_eager_kernels():
    """The operator's loss, lse and gradient (out of place, a second backward too) are those of
    the eager Function (which scales its gradient in place)."""
    logits, target = case(seed=2)
    options = dict(z_loss=0.01, softcap=3.0, label_smoothing=0.1, reduction="none")
    x = logits.clone().requires_grad_()
    loss, lse = triton_library.triton_loss_and_grad(x, target, None, None, None,
                                                    LossOptions(**options))  # fmt: skip
    assert loss.dtype == torch.float64 and lse.dtype == torch.float32 and not lse.requires_grad
    (grad,) = torch.autograd.grad(loss, x, torch.arange(5.0, dtype=torch.float64),
                                  retain_graph=True)  # fmt: skip
    (again,) = torch.autograd.grad(loss.sum(), x)
    y = logits.clone().requires_grad_()
    expected, expected_lse = triton_encouraging_loss(y, target, return_lse=True, **options)
    (expected_grad,) = torch.autograd.grad(expected, y, torch.arange(5.0))
    torch.testing.assert_close(loss.float(), expected)
    torch.testing.assert_close(lse, expected_lse)
    torch.testing.assert_close(grad, expected_grad)
    z = logits.clone().requires_grad_()
    (expected_again,) = torch.autograd.grad(triton_encouraging_loss(z, target, **options).sum(), z)
    torch.testing.assert_close(again, expected_again)  # the retained graph serves twice


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_backend_triton(backend):
    """torch.compile(fullgraph=True) of a step calling encouraging_loss(backend="triton"):
    the operator, no graph break, the eager results (z-loss, softcap, smoothing, weights)."""
    logits, target = case(seed=3)
    token_weight = torch.rand(5, generator=torch.Generator().manual_seed(4))
    options = dict(z_loss=0.01, softcap=3.0, label_smoothing=0.1, backend="triton")

    def step(x, target, token_weight):
        loss, lse = encouraging_loss(2.0 * x, target, token_weight=token_weight,
                                     return_lse=True, **options)  # fmt: skip
        return loss, lse

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x = logits.clone().requires_grad_()
    value, lse = compiled(x, target, token_weight)
    value.backward()
    y = logits.clone().requires_grad_()
    expected, expected_lse = step(y, target, token_weight)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(lse, expected_lse)
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.usefixtures("_fresh_dynamo")
def test_in_place_is_refused_under_compile():
    logits, target = case()
    compiled = torch.compile(lambda x, t: triton_encouraging_loss(x, t, in_place=True),
                             fullgraph=True, backend="eager")  # fmt: skip
    with pytest.raises(Exception, match="in_place=True is not supported under torch.compile"):
        compiled(logits, target)


def test_without_triton_op(monkeypatch):
    monkeypatch.setattr(triton_library, "TRITON_OP", None)
    logits, target = case()
    with pytest.raises(RuntimeError, match=r"no torch.library.triton_op \(torch >= 2.6 has\)"):
        triton_library.triton_loss_and_grad(logits, target, None, None, None, LossOptions())


CUDA_FORM = """
import torch
from torch._library.triton import get_triton_kernels_for_op
from torch._subclasses.functional_tensor import FunctionalTensorMode
from encouraging_loss.ops import triton_library

kernels = get_triton_kernels_for_op(triton_library.OPERATOR)
print(sorted(kernel.fn.__name__ for kernel in kernels))
# torch's private table of the operator's mode overrides: triton_op's own decomposition.
print(triton_library.TRITON_OP._torch_dispatch_fns[FunctionalTensorMode].__name__)
"""


def test_cuda_form_registration():
    """Without the interpreter the operator is triton_op's: both kernels found by its source
    scan (their sources key the compile cache) and its own decomposition under
    functionalization (what lets Inductor see the launches; running it needs a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CUDA_FORM], env=env, capture_output=True,
                            text=True, timeout=300, check=True)  # fmt: skip
    kernels, decomposition = result.stdout.split("\n")[-3:-1]
    assert kernels == "['hard_target_kernel', 'smoothed_kernel']"
    assert decomposition == "functional_decomp"
