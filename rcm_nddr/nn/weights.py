"""Weights files: reading a state dict safely, and networks pretrained in RC form.

A network pretrained in **RC form** (the RCM paper's ``RC`` variant) computes every reparameterized conv
as ``Wt (Ws * x + bs)`` with both factors trained together. Its state dict names them as the official RCM
code does: ``<conv>.Ws.weight`` (the bank, Co x Ci x k x k; ``<conv>.Ws.bias`` for a conv with a bias)
and ``<conv>.Wt.weight`` (the 1x1 modulator, Co x Co x 1 x 1); every other tensor keeps its plain name.
``read_rc_form`` splits such a file into the bank, the modulators and the plain network it computes;
``factorize`` turns a plain backbone into one that trains in RC form and saves in that format.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from rcm_nddr.errors import UserError
from rcm_nddr.nn.filter_bank import reparameterized_convs

_BANK, _MODULATOR, _BANK_BIAS = ".Ws.weight", ".Wt.weight", ".Ws.bias"


class WeightsError(UserError, RuntimeError):
    """Pretrained weights that are missing, unreadable or do not fit the architecture."""


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``, no pickle code); a
    checkpoint holding it under ``state_dict`` (as the official RCM models do) is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"weights file {path} could not be read as a state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a flat state dict of tensors")
    return state


@dataclass
class RCForm:
    """A network pretrained in RC form, split: ``bank`` holds each conv's ``Ws`` by conv name (a bias under
    ``<conv>.bias``, as ``RCBackbone.filter_bank()`` names it), ``modulators`` its ``Wt`` as a Co x Co
    matrix, and ``plain`` the state dict of the plain network it computes (each conv ``Wt Ws``, its bias
    ``Wt bs``, in float64 then the file's dtype; every other tensor as stored)."""

    bank: dict[str, Tensor]
    modulators: dict[str, Tensor]
    plain: dict[str, Tensor]


def read_rc_form(state: dict[str, Tensor], origin: str) -> RCForm | None:
    """Split a state dict in RC form (None when it holds no ``.Ws.``/``.Wt.`` tensor: a plain network). A
    ``module.`` prefix on every key (``DataParallel``) is dropped. A conv with one factor but not the other,
    a modulator that is not Co x Co (x 1 x 1) or a factor tensor of another kind is refused, naming it."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    factors = {k for k in state if ".Ws." in k or ".Wt." in k}
    if not factors:
        return None
    unknown = sorted(k for k in factors if not k.endswith((_BANK, _MODULATOR, _BANK_BIAS)))
    if unknown:
        raise WeightsError(
            f"weights {origin}: RC-form tensors {unknown[:3]} are not a bank ({_BANK}, {_BANK_BIAS}) or a "
            f"modulator ({_MODULATOR}); an RC-form network's modulators are bias-free 1x1 convs"
        )
    convs = sorted({k.rsplit(".", 2)[0] for k in factors})
    bank, modulators = {}, {}
    plain = {k: v for k, v in state.items() if k not in factors}
    for conv in convs:
        ws, wt = state.get(conv + _BANK), state.get(conv + _MODULATOR)
        if ws is None or wt is None:
            has, lacks = (_BANK, _MODULATOR) if wt is None else (_MODULATOR, _BANK)
            raise WeightsError(f"weights {origin}: conv {conv!r} has {conv}{has} but no {conv}{lacks}")
        co = ws.shape[0]
        if ws.dim() != 4 or wt.numel() != co * co or wt.shape[:2] != (co, co):
            raise WeightsError(
                f"weights {origin}: conv {conv!r}: {conv}{_MODULATOR} has shape {tuple(wt.shape)}, expected "
                f"({co}, {co}, 1, 1) for a bank {conv}{_BANK} of shape {tuple(ws.shape)}"
            )
        m = wt.reshape(co, co)
        bank[conv], modulators[conv] = ws, m
        plain[f"{conv}.weight"] = (m.double() @ ws.double().flatten(1)).view(ws.shape).to(ws.dtype)
        bias = state.get(conv + _BANK_BIAS)
        if bias is not None:
            bank[f"{conv}.bias"] = bias
            plain[f"{conv}.bias"] = (m.double() @ bias.double()).to(bias.dtype)
    return RCForm(bank, modulators, plain)


class FactorizedConv(nn.Module):
    """A conv in RC form with both factors trainable, ``Wt (Ws * x + bs)``: pretraining in RC form. It
    starts as the conv it factorizes: ``Ws`` is that conv (weight, bias, stride, dilation), ``Wt`` the
    identity."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.Ws = copy.deepcopy(conv)
        channels = conv.out_channels
        self.Wt = nn.Conv2d(channels, channels, 1, bias=False).to(conv.weight.device)
        with torch.no_grad():
            self.Wt.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.Wt(self.Ws(x))


def factorize(plain: nn.Module, form: RCForm | None = None) -> nn.Module:
    """A copy of a plain backbone (ResNet, VGG) whose reparameterized convs are ``FactorizedConv``s: it
    computes what ``plain`` computes and its state dict is an RC-form file (``read_rc_form``). With
    ``form`` (the RC-form network ``plain`` was read from), each conv's factors are that network's."""
    net = copy.deepcopy(plain)
    for name in reparameterized_convs(plain):
        parent, _, child = name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        factored = FactorizedConv(getattr(owner, child))
        if form is not None:
            with torch.no_grad():
                factored.Ws.weight.copy_(form.bank[name])
                factored.Wt.weight.copy_(form.modulators[name].view_as(factored.Wt.weight))
                if factored.Ws.bias is not None:
                    factored.Ws.bias.copy_(form.bank[f"{name}.bias"])
        setattr(owner, child, factored)
    return net
