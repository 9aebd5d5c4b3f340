"""Writes params.json beside this file: the parameter and buffer names and shapes of every arcface_torch
backbone, in its state_dict order, read from arcface_torch's own code. Run once by hand, with a checkout
of InsightFace (the tests never reach the network and never need it):

    python tests/data/insightface/generate_reference.py --arcface-torch ~/insightface/recognition/arcface_torch
    python tests/data/insightface/generate_reference.py --arcface-torch ... --parity   # embeddings, see below

``--parity`` also builds each of arcface_torch's models with random weights and random BatchNorm
statistics, saves its state_dict as a backbone.pth, imports it with ``dsoft ckpt import --from insightface``
and prints the largest relative difference of the two models' embeddings (eval mode, 112 px, float64;
float32 for the ViTs, whose attention casts to float32 itself) into parity.txt. arcface_torch's ViT
imports ``timm`` for three small helpers; when timm is absent a stand-in module provides them (DropPath
is the identity in eval mode, which is all the parity needs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# arcface_torch's names -> the get_model name that builds it (vit_l exists only in its WebFace42M form)
MODELS = {"r18": "r18", "r34": "r34", "r50": "r50", "r100": "r100", "r200": "r200", "mbf": "mbf",
          "mbf_large": "mbf_large", "vit_t": "vit_t", "vit_s": "vit_s", "vit_b": "vit_b",
          "vit_l": "vit_l_dp005_mask_005"}


def _timm_stand_in() -> None:
    """Registers ``timm.models.layers`` with DropPath, to_2tuple and trunc_normal_ when timm is absent."""
    try:
        import timm.models.layers  # noqa: F401
        return
    except ImportError:
        pass

    class DropPath(torch.nn.Module):
        def __init__(self, p=0.0):
            super().__init__()
            self.p = p

        def forward(self, x):
            if not self.training or self.p == 0.0:
                return x
            keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
            return x * keep / (1 - self.p)

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    layers.trunc_normal_ = lambda t, std=1.0: torch.nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


def their_model(root: str, name: str) -> torch.nn.Module:
    """arcface_torch's backbone ``name`` built by its own get_model, 512-d embeddings."""
    _timm_stand_in()
    if root not in sys.path:
        sys.path.insert(0, root)
    from backbones import get_model  # arcface_torch/backbones
    return get_model(MODELS[name], num_features=512)


def params(root: str) -> dict:
    out = {}
    for name in MODELS:
        model = their_model(root, name)
        out[name] = {"entries": [[k, list(v.shape)] for k, v in model.state_dict().items()],
                     "parameters": sum(p.numel() for p in model.parameters())}
        print(f"{name}: {len(out[name]['entries'])} entries, {out[name]['parameters'] / 1e6:.2f}M parameters")
    return out


def write_params(table: dict, path: str) -> None:
    """JSON with one state_dict entry a line, so a diff of the file reads like a diff of the models."""
    models = []
    for name, t in table.items():
        entries = ",\n".join(f"    {json.dumps(e)}" for e in t["entries"])
        models.append(f'  {json.dumps(name)}: {{"parameters": {t["parameters"]}, "entries": [\n{entries}\n  ]}}')
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("{\n" + ",\n".join(models) + "\n}\n")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights and BatchNorm running statistics (so eval-mode BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.2)
                        + (1.0 if key.endswith(".weight") and t.dim() == 1 else 0.0))


def parity(root: str, names) -> list[str]:
    """One line per model: the largest |ours - theirs| / max|theirs| over a batch of random 112 px images.

    float64 on both sides, except the ViTs: arcface_torch's attention casts q, k and v to float32 itself
    (``qkv[0].float()``), so its ViT cannot run in float64; they are compared in float32."""
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            dtype = torch.float32 if name.startswith("vit") else torch.float64
            model = their_model(root, name).eval().to(dtype)
            randomize(model, seed=len(lines))
            src, out = os.path.join(tmp, f"{name}.pth"), os.path.join(tmp, f"{name}.pt")
            torch.save({k: v.float() for k, v in model.state_dict().items()}, src)
            subprocess.run([sys.executable, "-m", "dsoft_dist.cli", "ckpt", "import", "--from", "insightface", src,
                            "--model", name, out], check=True)
            from dsoft_dist.models import load_backbone
            ours, cfg = load_backbone(out)
            ours = ours.to(dtype).eval()
            model.load_state_dict(torch.load(src))  # the float32 weights both sides hold
            model.to(dtype)
            x = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(7), dtype=dtype) * 2 - 1
            with torch.no_grad():
                theirs, mine = model(x), ours(x)
            rel = ((mine - theirs).abs().max() / theirs.abs().max()).item()
            line = (f"{name} -> {cfg['name']}: max relative difference {rel:.2e} (batch 4, 112 px, "
                    f"{str(dtype).removeprefix('torch.')}, eval)")
            print(line)
            lines.append(line)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arcface-torch", required=True, help="the recognition/arcface_torch folder of InsightFace")
    p.add_argument("--parity", action="store_true", help="also measure embedding equality (writes parity.txt)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="models for --parity (default: all)")
    args = p.parse_args()
    root = os.path.abspath(args.arcface_torch)
    write_params(params(root), os.path.join(HERE, "params.json"))
    if args.parity:
        lines = parity(root, args.models)
        with open(os.path.join(HERE, "parity.txt"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
