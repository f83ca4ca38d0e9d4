"""The PyTorch original of Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019), written out fresh.

This is the published algorithm, step for step (github.com/mit-han-lab/dlg, `main.py`):

    net = LeNet(); torch.manual_seed(1234); net.apply(weights_init)     # every weight and bias ~ U(-0.5, 0.5)
    shared = grad(cross_entropy_for_onehot(net(x), onehot(y)), net.parameters())
    dummy_data = torch.randn(x.size()); dummy_label = torch.randn(onehot(y).size())
    optimizer = torch.optim.LBFGS([dummy_data, dummy_label])         # lr 1, max_iter 20, no line search
    for iters in range(300):
        optimizer.step(closure)     # closure: D = sum ((grad(dummy) - shared) ** 2).sum(), create_graph=True

plus what a comparison needs: the network parameterised by input shape and classes, float64 (`net.double()`),
weight transfer to and from the Flax `dlg_jax.models.LeNet` and NHWC <-> NCHW image transfer.

Random numbers are always drawn in float32, as the reference draws them, and cast afterwards: a float64 run
starts from exactly the float32 run's weights and dummy, so the two precisions differ only in arithmetic.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlg_jax.models import KERNEL, hidden_size


class TorchLeNet(nn.Module):
    """The reference LeNet: three 5x5 convs (strides 2, 2, 1, padding 2), sigmoid after each, NCHW flatten, linear.

    Module names (`body.0`, `body.2`, `body.4`, `fc.0`) are the original's, so its state dicts load as they are.
    `image_shape` is (H, W, C) like the Flax model's; inputs are NCHW tensors.
    """

    def __init__(self, image_shape: Sequence[int] = (32, 32, 3), num_classes: int = 100, channels: int = 12,
                 strides: Sequence[int] = (2, 2, 1)):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = image_shape[2]
        for stride in strides:
            layers += [nn.Conv2d(in_channels, channels, kernel_size=KERNEL, padding=KERNEL // 2, stride=stride),
                       nn.Sigmoid()]
            in_channels = channels
        self.body = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(hidden_size(image_shape, channels, strides), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        out = out.reshape(out.size(0), -1)  # the original's view(); reshape also takes channels-last tensors
        return self.fc(out)


def weights_init(m: nn.Module) -> None:
    """The reference's initialisation: U(-0.5, 0.5) for every weight and bias."""
    if hasattr(m, "weight"):
        m.weight.data.uniform_(-0.5, 0.5)
    if hasattr(m, "bias"):
        m.bias.data.uniform_(-0.5, 0.5)


def init_reference_weights(net: nn.Module, seed: int = 1234) -> nn.Module:
    """`torch.manual_seed(seed); net.apply(weights_init)`, drawn in float32 whatever the net's dtype.

    Leaves torch's global generator where the reference's is when it draws the dummy (`reference_dummy`).
    """
    dtype = next(net.parameters()).dtype
    net.float()
    torch.manual_seed(seed)
    net.apply(weights_init)
    return net.to(dtype)


def reference_dummy(image_size: Sequence[int], num_classes: int, dtype: torch.dtype = torch.float32):
    """The reference's dummy: `torch.randn(gt_data.size())`, then `torch.randn(gt_onehot_label.size())`.

    Continues torch's global generator (call right after `init_reference_weights`). `image_size` is NCHW.
    """
    dummy_data = torch.randn(tuple(image_size))
    dummy_label = torch.randn((image_size[0], num_classes))
    return dummy_data.to(dtype), dummy_label.to(dtype)


def reference_setup(image_shape: Sequence[int], num_classes: int, seed: int = 1234, dtype: torch.dtype = torch.float32,
                    batch: int = 1):
    """Network and initial dummy exactly as the reference makes them: (net, dummy_image NCHW, dummy_label)."""
    net = TorchLeNet(image_shape, num_classes)
    init_reference_weights(net, seed)
    net.to(dtype)
    h, w, c = image_shape
    dummy_image, dummy_label = reference_dummy((batch, c, h, w), num_classes, dtype)
    return net, dummy_image, dummy_label


def cross_entropy_for_onehot(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's loss: mean over the batch of sum_c -t_c log softmax(pred)_c."""
    return torch.mean(torch.sum(-target * F.log_softmax(pred, dim=-1), 1))


def shared_gradient(net: nn.Module, image_nchw: torch.Tensor, onehot: torch.Tensor) -> list[torch.Tensor]:
    """What the client shares: dL/dw for every parameter of `net` (in `net.parameters()` order), detached."""
    loss = cross_entropy_for_onehot(net(image_nchw), onehot)
    return [g.detach().clone() for g in torch.autograd.grad(loss, list(net.parameters()))]


def gradient_distance(net: nn.Module, dummy_data: torch.Tensor, dummy_label: torch.Tensor,
                      shared: Sequence[torch.Tensor]) -> torch.Tensor:
    """D = sum over parameters of ((grad(dummy) - shared) ** 2).sum(), differentiable in the dummy."""
    dummy_loss = cross_entropy_for_onehot(net(dummy_data), F.softmax(dummy_label, dim=-1))
    dummy_dy_dx = torch.autograd.grad(dummy_loss, list(net.parameters()), create_graph=True)
    grad_diff = 0
    for gx, gy in zip(dummy_dy_dx, shared):
        grad_diff += ((gx - gy) ** 2).sum()
    return grad_diff


def torch_dlg(net: nn.Module, image_nchw: torch.Tensor, onehot: torch.Tensor, dummy_image: torch.Tensor,
              dummy_label: torch.Tensor, steps: int = 300, snapshot_every: int = 10, **lbfgs_options) -> dict:
    """The reference attack: `steps` calls of `torch.optim.LBFGS([dummy_data, dummy_label]).step(closure)`.

    The optimiser has torch's defaults (lr 1, max_iter 20, max_eval 25, history 100, no line search) unless
    `lbfgs_options` overrides them. The dummy tensors are copied, not modified. Returns a dict:

    - reconstruction (NHWC numpy), label_pred, grad_distance: the best iterate, i.e. the dummy with the lowest
      finite D among the starts of the steps and the final dummy (each step returns D at its start). For a
      run that converges this is the final dummy; for one that blows up it is the last sane one.
    - final_reconstruction, final_label_pred, final_grad_distance: the dummy after the last step, as the
      published script leaves it (its D is one extra closure call, not counted below).
    - evaluations: closure calls made by LBFGS (`optimizer.state[...]['func_evals']`);
      evaluations_per_step: that count after each step (cumulative).
    - values: D at the start of each step (the value `optimizer.step` returns).
    - snapshots: [(step, dummy image NHWC)] after the steps with step % snapshot_every == 0, as the
      reference's `history` (step 0 is after the first `optimizer.step`).
    - label_logits: the best iterate's dummy label logits (numpy); seconds: wall time of the steps.
    """
    shared = shared_gradient(net, image_nchw, onehot)
    dummy_data = dummy_image.detach().clone().requires_grad_(True)
    dummy_lab = dummy_label.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([dummy_data, dummy_lab], **lbfgs_options)

    def closure():
        optimizer.zero_grad()
        grad_diff = gradient_distance(net, dummy_data, dummy_lab, shared)
        grad_diff.backward()
        return grad_diff

    values, evaluations, snapshots = [], [], []
    best_value, best = math.inf, (dummy_data.detach().clone(), dummy_lab.detach().clone())
    start = time.perf_counter()
    for step in range(steps):
        before = (dummy_data.detach().clone(), dummy_lab.detach().clone())
        value = float(optimizer.step(closure).detach())
        values.append(value)
        evaluations.append(int(optimizer.state[dummy_data]["func_evals"]))
        if math.isfinite(value) and value < best_value:
            best_value, best = value, before
        if step % snapshot_every == 0:
            snapshots.append((step, nchw_to_nhwc(dummy_data)))
    seconds = time.perf_counter() - start
    final_value = float(closure().detach())  # not counted: the reference evaluates it only to print
    if math.isfinite(final_value) and final_value < best_value:
        best_value, best = final_value, (dummy_data.detach().clone(), dummy_lab.detach().clone())
    return dict(
        reconstruction=nchw_to_nhwc(best[0]),
        label_pred=best[1].argmax(-1).numpy(),
        label_logits=best[1].numpy(),
        grad_distance=best_value,
        final_reconstruction=nchw_to_nhwc(dummy_data),
        final_label_pred=dummy_lab.detach().argmax(-1).numpy(),
        final_grad_distance=final_value,
        evaluations=evaluations[-1] if evaluations else 0,
        evaluations_per_step=evaluations,
        values=values,
        snapshots=snapshots,
        seconds=seconds,
    )


# ----------------------------------------------------------------------------------------------------------
# Transfer between the Flax model (NHWC, HWIO kernels, Dense (in, out)) and the torch one (NCHW, OIHW, (out, in)).


def _layers(net: nn.Module) -> tuple[list[nn.Conv2d], nn.Linear]:
    convs = [m for m in net.body if isinstance(m, nn.Conv2d)]
    (linear,) = [m for m in net.fc if isinstance(m, nn.Linear)]
    return convs, linear


def torch_to_flax(net: nn.Module) -> dict:
    """The torch net's weights as Flax `LeNet` params: {'Conv_i': {kernel HWIO, bias}, 'Dense_0': {kernel (in, out), bias}}.

    Leaves are numpy arrays in the net's dtype (use them inside `jax.enable_x64(True)` for float64). The
    flatten order needs no permutation: the Flax model transposes to NCHW before flattening, as torch's view.
    """
    convs, linear = _layers(net)
    params = {}
    for i, conv in enumerate(convs):
        params[f"Conv_{i}"] = {"kernel": conv.weight.detach().permute(2, 3, 1, 0).numpy().copy(),
                               "bias": conv.bias.detach().numpy().copy()}
    params["Dense_0"] = {"kernel": linear.weight.detach().t().numpy().copy(), "bias": linear.bias.detach().numpy().copy()}
    return params


def flax_to_torch(params, net: nn.Module) -> nn.Module:
    """Copy Flax `LeNet` params into the torch net (in place, cast to the net's dtype); returns the net."""
    convs, linear = _layers(net)
    pairs = [(conv.weight, np.transpose(np.asarray(params[f"Conv_{i}"]["kernel"]), (3, 2, 0, 1)))
             for i, conv in enumerate(convs)]
    pairs += [(conv.bias, np.asarray(params[f"Conv_{i}"]["bias"])) for i, conv in enumerate(convs)]
    pairs += [(linear.weight, np.asarray(params["Dense_0"]["kernel"]).T), (linear.bias, np.asarray(params["Dense_0"]["bias"]))]
    with torch.no_grad():
        for target, value in pairs:
            if tuple(target.shape) != value.shape:
                raise ValueError(f"shape mismatch: torch parameter {tuple(target.shape)} vs Flax {value.shape}")
            target.copy_(torch.tensor(np.asarray(value), dtype=target.dtype))
    return net


def nhwc_to_nchw(images, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NHWC array (numpy or jax) -> NCHW torch tensor of `dtype` (values unchanged; scale uint8 yourself)."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(images), (0, 3, 1, 2)))).to(dtype)


def nchw_to_nhwc(images: torch.Tensor) -> np.ndarray:
    """NCHW torch tensor -> NHWC numpy array (same dtype)."""
    return np.ascontiguousarray(images.detach().cpu().numpy().transpose(0, 2, 3, 1))


def labels_to_torch(labels, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer labels -> one-hot (N, classes), the reference's `label_to_onehot`."""
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long).view(-1, 1)
    return torch.zeros(target.size(0), num_classes, dtype=dtype).scatter_(1, target, 1)
