"""arcface_torch (InsightFace) backbone weights <-> ours: the name table, import and export of state_dicts.

arcface_torch saves a backbone as a plain state_dict (``backbone.pth``). Our models hold the same tensors in
the same order with the same shapes (a contract of every model named in ``ARCFACE_NAMES``; only the module
names differ), so the mapping is positional: entry i of their state_dict is entry i of ours, checked by
shape and by the last name component (weight, bias, running_mean, ...). Their names, needed only to write
their file, are generated here from each architecture's block counts, so nothing of arcface_torch is needed
at run time.

    from dsoft_dist.models import build_model
    from dsoft_dist.models.insightface import export_state_dict, import_state_dict, read_arcface_file
    cfg, state = import_state_dict(read_arcface_file("backbone.pth"), "r100")   # cfg: build_model's arguments
    model = build_model(**cfg); model.load_state_dict(state)
    theirs = export_state_dict(cfg, model.state_dict())                          # torch.save(theirs, ...)

The commands built on it: ``dsoft ckpt import --from insightface`` and ``dsoft ckpt export --to insightface``.
"""
from __future__ import annotations

import os
import pickle
import re

import torch

from dsoft_dist.models.registry import build_model, model_config_dict

# arcface_torch's get_model names -> ours (vit_l is their "vit_l_dp005_mask_005", the WebFace42M model)
ARCFACE_NAMES = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100",
                 "r200": "iresnet200", "mbf": "mbf", "mbf_large": "mbf_large",
                 "vit_t": "vit_t", "vit_s": "vit_s", "vit_b": "vit_b", "vit_l": "vit_l"}
INPUT_SIZE = 112  # every arcface_torch backbone is built for 112 x 112 faces (their FC/feature sizes depend on it)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------- their names, generated

def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in _BN]


def _iresnet_names(layers: tuple[int, ...]) -> list[str]:
    """iresnet.py: conv1/bn1/prelu stem, layerN.i blocks (the first of each stage has a downsample), bn2, fc,
    features."""
    names = ["conv1.weight", *_bn("bn1"), "prelu.weight"]
    for stage, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            b = f"layer{stage}.{i}"
            names += [*_bn(f"{b}.bn1"), f"{b}.conv1.weight", *_bn(f"{b}.bn2"), f"{b}.prelu.weight",
                      f"{b}.conv2.weight", *_bn(f"{b}.bn3")]
            if i == 0:  # stride 2: arcface_torch's downsample = 1x1 conv + BN
                names += [f"{b}.downsample.0.weight", *_bn(f"{b}.downsample.1")]
    return names + [*_bn("bn2"), "fc.weight", "fc.bias", *_bn("features")]


def _conv_block(p: str) -> list[str]:  # conv, BN, PReLU
    return [f"{p}.layers.0.weight", *_bn(f"{p}.layers.1"), f"{p}.layers.2.weight"]


def _linear_block(p: str) -> list[str]:  # conv, BN
    return [f"{p}.layers.0.weight", *_bn(f"{p}.layers.1")]


def _depthwise(p: str) -> list[str]:  # 1x1 expand, depthwise 3x3, 1x1 project
    return [*_conv_block(f"{p}.layers.0"), *_conv_block(f"{p}.layers.1"), *_linear_block(f"{p}.layers.2")]


def _residual(p: str, blocks: int) -> list[str]:
    return [name for i in range(blocks) for name in _depthwise(f"{p}.layers.{i}")]


def _mbf_names(blocks: tuple[int, int, int, int]) -> list[str]:
    """mobilefacenet.py: layers.0 conv block; layers.1 a conv block (blocks[0] == 1) or a residual stage; then
    (downsampling depthwise, residual stage) x 3; conv_sep; the GDC head (features.layers.0/2/3)."""
    names = _conv_block("layers.0")
    names += _conv_block("layers.1") if blocks[0] == 1 else _residual("layers.1", blocks[0])
    for k, n in enumerate(blocks[1:]):
        names += _depthwise(f"layers.{2 + 2 * k}") + _residual(f"layers.{3 + 2 * k}", n)
    return names + _conv_block("conv_sep") + _linear_block("features.layers.0") + [
        "features.layers.2.weight", *_bn("features.layers.3")]


def _vit_names(depth: int) -> list[str]:
    """vit.py: pos_embed, mask_token, patch_embed.proj, ``depth`` pre-norm blocks (qkv without bias), norm, and
    the feature head Linear (no bias) -> BN1d -> Linear (no bias) -> BN1d."""
    names = ["pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        b = f"blocks.{i}"
        names += [f"{b}.norm1.weight", f"{b}.norm1.bias", f"{b}.norm2.weight", f"{b}.norm2.bias",
                  f"{b}.attn.qkv.weight", f"{b}.attn.proj.weight", f"{b}.attn.proj.bias",
                  f"{b}.mlp.fc1.weight", f"{b}.mlp.fc1.bias", f"{b}.mlp.fc2.weight", f"{b}.mlp.fc2.bias"]
    return names + ["norm.weight", "norm.bias", "feature.0.weight", *_bn("feature.1"), "feature.2.weight",
                    *_bn("feature.3")]


_LAYOUTS = {"r18": lambda: _iresnet_names((2, 2, 2, 2)), "r34": lambda: _iresnet_names((3, 4, 6, 3)),
            "r50": lambda: _iresnet_names((3, 4, 14, 3)), "r100": lambda: _iresnet_names((3, 13, 30, 3)),
            "r200": lambda: _iresnet_names((6, 26, 60, 6)), "mbf": lambda: _mbf_names((1, 4, 6, 2)),
            "mbf_large": lambda: _mbf_names((2, 8, 12, 4)), "vit_t": lambda: _vit_names(12),
            "vit_s": lambda: _vit_names(12), "vit_b": lambda: _vit_names(24), "vit_l": lambda: _vit_names(24)}


def arcface_state_names(name: str) -> list[str]:
    """arcface_torch's state_dict keys, in order, for its backbone ``name`` (theirs or ours, see
    ``resolve_name``): e.g. r18 -> ['conv1.weight', 'bn1.weight', ..., 'features.num_batches_tracked'] (187)."""
    return _LAYOUTS[resolve_name(name)[0]]()


def resolve_name(name: str) -> tuple[str, str]:
    """(arcface_torch's name, ours) for either spelling: 'r100' or 'iresnet100' -> ('r100', 'iresnet100')."""
    if name in ARCFACE_NAMES:
        return name, ARCFACE_NAMES[name]
    theirs = {ours: their for their, ours in ARCFACE_NAMES.items()}
    if name in theirs:
        return theirs[name], name
    raise ValueError(f"model {name!r} has no arcface_torch counterpart: use one of {_choices()}")


def _choices() -> str:
    """'r18 = iresnet18, ..., mbf, ...': arcface_torch's names, with ours where they differ."""
    return ", ".join(t if t == o else f"{t} = {o}" for t, o in ARCFACE_NAMES.items())


# ----------------------------------------------------------------------------- reading their file

def arcface_state_dict(obj, source: str) -> dict[str, torch.Tensor]:
    """The backbone state_dict in what ``torch.load`` returned for ``source`` (named in errors): a plain
    state_dict (backbone.pth), or the ``state_dict_backbone`` of arcface_torch's checkpoint_gpu_N.pt. A
    "module." prefix on every key (a DDP save) is removed; floating tensors become float32 (fp16/bf16 saves
    load into our float32 models). Raises ValueError for anything that is not a state_dict."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict_backbone"), dict):
        obj = obj["state_dict_backbone"]
    if isinstance(obj, dict) and obj.get("format") == "dsoft_backbone":
        raise ValueError(f"{source} is a dsoft backbone file already (dsoft train or dsoft ckpt import wrote it): "
                         "use it as it is, or pass the backbone.pth arcface_torch wrote")
    if not isinstance(obj, dict) or not obj:
        what = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"{source} holds {what}, not a state_dict: pass the backbone.pth arcface_torch wrote "
                         "(torch.save(backbone.module.state_dict(), ...))")
    bad = next(((k, v) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{source} is not a state_dict: its entry {bad[0]!r} is a {type(bad[1]).__name__}, not a "
                         "tensor; pass the backbone.pth arcface_torch wrote")
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}


def read_arcface_file(path: str) -> dict[str, torch.Tensor]:
    """``arcface_state_dict`` of the file at ``path``, loaded with ``torch.load(weights_only=True)``: the file is
    untrusted, so one that needs code to unpickle is refused (ValueError); a missing one is FileNotFoundError."""
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"{path} {what}: pass the backbone.pth file arcface_torch wrote")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))  # weights_only met a class or function
        if isinstance(err, pickle.UnpicklingError) and found:
            raise ValueError(f"{path} holds pickled objects ({found.group(1)}), not only tensors: it is refused, "
                             "since unpickling them could run code; save the backbone's state_dict "
                             "(torch.save(model.state_dict(), path)) and import that") from err
        detail = type(err).__name__ + (f": {err}" if str(err) and "\n" not in str(err) else "")  # torch's are long
        raise ValueError(f"{path} is not a file of tensors torch.save wrote ({detail}): pass the backbone.pth file "
                         "arcface_torch wrote") from err
    return arcface_state_dict(obj, path)


# ----------------------------------------------------------------------------- import, export

def _layout(our_name: str, embedding_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Our model's (name, shape) list at input 112, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(our_name, embedding_size=embedding_size, input_size=INPUT_SIZE)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _embedding_size(state: dict[str, torch.Tensor], source: str) -> int:
    """The length of the file's last 1-D tensor: every arcface_torch backbone ends with a BatchNorm1d over the
    embedding."""
    sizes = [v.shape[0] for v in state.values() if v.dim() == 1]
    if not sizes:
        raise ValueError(f"{source} holds no 1-D tensor (no BatchNorm over the embedding): it is not an "
                         "arcface_torch backbone")
    return int(sizes[-1])


def _first_mismatch(found: list[tuple[str, tuple]], expected: list[tuple[str, tuple]],
                    their_names: list[str]) -> str | None:
    """Where a (name, shape) list first departs from a model's (same shape and last name component at each
    position, same length), as text naming the entry, the expected and found shapes and the counts when they
    differ; None when it fits."""
    counts = "" if len(found) == len(expected) else f" ({len(found)} entries found, {len(expected)} expected)"
    for i, ((name, shape), (ours, want)) in enumerate(zip(found, expected)):
        if shape != want or name.rsplit(".", 1)[-1] != ours.rsplit(".", 1)[-1]:
            theirs = their_names[i] if i < len(their_names) else ours
            return f"entry {i} {name!r}: expected {theirs!r} of shape {list(want)}, found shape {list(shape)}{counts}"
    if counts:
        return (f"the first {min(len(found), len(expected))} entries fit, but {len(found)} entries were found and "
                f"{len(expected)} expected")
    return None


def matching_models(state: dict[str, torch.Tensor]) -> list[str]:
    """arcface_torch's names of the backbones whose layout (shapes, order, kinds) the state_dict has."""
    found = [(k, tuple(v.shape)) for k, v in state.items()]
    size = _embedding_size(state, "the state_dict")
    return [their for their, ours in ARCFACE_NAMES.items()
            if len(_LAYOUTS[their]()) == len(found)
            and _first_mismatch(found, _layout(ours, size), _LAYOUTS[their]()) is None]


def import_state_dict(state: dict[str, torch.Tensor], name: str,
                      source: str = "the state_dict") -> tuple[dict, dict[str, torch.Tensor]]:
    """arcface_torch backbone ``name`` (theirs or ours) -> (our model config dict, our state_dict).

    state: what ``arcface_state_dict`` returns. The config is ``model_config_dict(ours, embedding_size read from
    the weights, input_size=112)``; the state_dict holds the same tensors under our names. Raises ValueError
    naming the first entry that does not fit (its name, expected and found shapes; the entry counts when they
    differ) and, when another backbone fits the file, "it looks like r100: pass --model r100"."""
    their, ours = resolve_name(name)
    size = _embedding_size(state, source)
    found, expected = [(k, tuple(v.shape)) for k, v in state.items()], _layout(ours, size)
    problem = _first_mismatch(found, expected, _LAYOUTS[their]())
    if problem is not None:
        fits = [m for m in matching_models(state) if m != their]
        hint = (f"it looks like {fits[0]}: pass --model {fits[0]}" if fits else "it fits none of arcface_torch's "
                f"backbones ({', '.join(ARCFACE_NAMES)}) at 112 px: pass a backbone.pth that arcface_torch wrote")
        raise ValueError(f"{source} is not arcface_torch's {their} ({ours}, {size}-d embedding): {problem}; {hint}")
    cfg = model_config_dict(ours, embedding_size=size, input_size=INPUT_SIZE)
    return cfg, {k: v for (k, _), v in zip(expected, state.values())}


def export_state_dict(cfg: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our backbone (``model_config_dict`` fields, its state_dict) -> arcface_torch's state_dict (their names, same
    tensors), the file their ``model.load_state_dict(torch.load(...))`` reads. Raises ValueError for a model
    with no arcface_torch counterpart, an input size other than 112, or weights that do not fit ``cfg``."""
    name = cfg["name"]
    if name not in ARCFACE_NAMES.values():
        raise ValueError(f"model {name!r} has no arcface_torch counterpart, so it cannot be exported to "
                         f"insightface: export takes (arcface_torch's name = ours) {_choices()}, at input_size="
                         f"{INPUT_SIZE}")
    their, _ = resolve_name(name)
    if cfg["input_size"] != INPUT_SIZE:
        raise ValueError(f"model {name} is built for input_size={cfg['input_size']}; arcface_torch's {their} takes "
                         f"{INPUT_SIZE} x {INPUT_SIZE} faces only: export a model trained at input_size={INPUT_SIZE}")
    found, expected = [(k, tuple(v.shape)) for k, v in state.items()], _layout(name, cfg["embedding_size"])
    problem = _first_mismatch(found, expected, [k for k, _ in expected])
    if problem is not None:
        raise ValueError(f"the weights do not fit model {name} with embedding_size={cfg['embedding_size']}: "
                         f"{problem}")
    names = _LAYOUTS[their]()
    if [n.rsplit(".", 1)[-1] for n in names] != [k.rsplit(".", 1)[-1] for k, _ in expected]:  # a code bug
        raise RuntimeError(f"model {name}'s state_dict does not follow arcface_torch's {their} entry for entry: "
                           "the model and ARCFACE_NAMES' layouts disagree")
    return dict(zip(names, state.values()))
