"""Evaluation of a pretrained encoder on a labeled ImageFolder: end-to-end fine-tuning
(``selectivemae_ds.finetune``), kNN and linear probes on frozen features, the floors
every report carries, and the bundled tree-crown set built from real annotations.

    smae-eval finetune --weights W --data LABELED_DIR --out DIR [--split-by REGEX] [--seeds 0,1,2]
    smae-eval knn      --weights W --data LABELED_DIR [--split-by REGEX]
    smae-eval linear   --weights W --data LABELED_DIR [--split-by REGEX]
    smae-eval make-treecrowns --out LABELED_DIR

W is an exported encoder (``smae-export``: safetensors with timm key names and a
JSON beside it), a run directory or checkpoint tag (exported on the fly), or
``init``: our own initialization for the model config given with ``--config``, the
weights step 0 of that run would export, and the floor any pretraining must beat.
Every report also carries the raw-pixel and mean-color floors on the same split.

The split: with ``--split-by REGEX`` every image gets a group (the regex's first
capture group, or its whole match, searched in the path below ``--data``) and whole
groups go to the test side, so no scene is on both sides; without it a seeded
per-class shuffle holds out ``--test-fraction`` of every class. Both are fixed by
``--split-seed``: two runs print the same numbers.

Exit codes are the project's (``selectivemae_ds.errors``): 2 usage, 3 data, 4 weights.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selectivemae_ds.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from selectivemae_ds.errors import CheckpointError, ConfigError, DataError, run_cli

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


# ---------------------------------------------------------------------------
# The bundled labeled set: tree crowns vs background, from real box annotations.

@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int
    y1: int

    def overlaps(self, other: "Box") -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1


def _voc_boxes(xml_path: Path) -> list[Box]:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{xml_path}: object without bndbox")
        x0, y0, x1, y1 = (int(float(bb.findtext(k, "nan"))) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(Box(x0, y0, x1, y1))
    return boxes


def _scene_image(xml_path: Path) -> Path:
    """The bundled image an annotation file belongs to (same stem; the XML may name a PNG
    that is bundled as JPEG or TIFF with the same pixel grid)."""
    for suffix in (".png", ".tif", ".jpg"):
        candidate = xml_path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise DataError(f"{xml_path}: no image with the same name beside it")


def build_treecrown_set(assets_dir: str | Path, out_dir: str | Path, *, min_side: int = 16,
                        seed: int = 0) -> dict[str, int]:
    """Write an ImageFolder of ``tree/`` crops (every annotated crown box of the bundled
    NEON tiles, as a square around the box) and ``background/`` crops (squares of the
    same sizes, drawn at random where they touch no annotated box), one background per
    tree where the scene has room. Returns the count per class.

    The annotations are the DeepForest crown boxes shipped with the images
    (``assets/neon/*.xml``, Pascal VOC); see assets/neon/ATTRIBUTION.md.
    """
    assets, out = Path(assets_dir), Path(out_dir)
    if not any(assets.glob("*.xml")):
        raise DataError(f"--assets {assets}: no VOC .xml annotations there")
    rng = np.random.default_rng(seed)
    counts = {"background": 0, "tree": 0}
    for cls in counts:
        (out / cls).mkdir(parents=True, exist_ok=True)
    for xml_path in sorted(assets.glob("*.xml")):
        boxes = _voc_boxes(xml_path)
        image = open_rgb(_scene_image(xml_path))
        w, h = image.size
        for k, b in enumerate(boxes):
            side = max(b.x1 - b.x0, b.y1 - b.y0, min_side)
            cx, cy = (b.x0 + b.x1) // 2, (b.y0 + b.y1) // 2
            x0 = int(np.clip(cx - side // 2, 0, max(w - side, 0)))
            y0 = int(np.clip(cy - side // 2, 0, max(h - side, 0)))
            if side > min(w, h):
                continue
            image.crop((x0, y0, x0 + side, y0 + side)).save(out / "tree" / f"{xml_path.stem}_{k:04d}.png")
            counts["tree"] += 1
            # A background square of the same side touching no crown: a few tries.
            for _ in range(50):
                bx, by = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                cand = Box(bx, by, bx + side, by + side)
                if not any(cand.overlaps(o) for o in boxes):
                    image.crop((bx, by, bx + side, by + side)).save(
                        out / "background" / f"{xml_path.stem}_{k:04d}.png")
                    counts["background"] += 1
                    break
    return counts


# ---------------------------------------------------------------------------
# Labeled images: listing, checking, reading.

def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """The decoded RGB image, or a DataError naming the file that is not one."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def check_image_header(path: Path) -> None:
    """Refuse a file whose header is not an image (reads the header only, no pixels)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if w < 1 or h < 1:
        raise DataError(f"{path}: image has no pixels ({w}x{h})")


def list_image_folder(root: str | os.PathLike[str]) -> tuple[list[Path], np.ndarray, list[str]]:
    """ImageFolder layout: one sub-folder per class. Returns paths, labels (n,), classes.

    Refused with a DataError naming the problem: fewer than two classes, a class
    folder without images (its class could never be predicted or scored), a file
    with an image suffix whose header is not an image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DataError(f"--data {root}: need an ImageFolder with >= 2 class folders holding images, "
                        f"found classes {classes}")
    paths: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"--data {root}: class folder '{name}' holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "remove it or add its images")
        paths += files
        labels += [c] * len(files)
    for p in paths:
        check_image_header(p)
    return paths, np.asarray(labels, dtype=np.int64), classes


def load_images(paths: list[Path], img_size: int, center_crop: bool = False) -> torch.Tensor:
    """(n, 3, img_size, img_size) float32, ImageNet-normalised, bicubic resize (of the
    central square when ``center_crop``, else of the whole image). For a handful of
    images (pictures, tests); datasets stream through :class:`ImageDataset`."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(len(paths), 3, img_size, img_size)
    for i, p in enumerate(paths):
        im = open_rgb(p)
        if center_crop:
            w, h = im.size
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        im = im.resize((img_size, img_size), Image.Resampling.BICUBIC)
        out[i] = (torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0 - mean) / std
    return out


class ImageDataset(torch.utils.data.Dataset):
    """(transform(image), label) for each path; images are read when asked for, so a
    DataLoader streams the set and never holds it whole."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform: Callable[[Image.Image], torch.Tensor]):
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_rgb(self.paths[i])), int(self.labels[i])


def eval_transform(img_size: int, crop_pct: float = 0.875, normalize: bool = True) -> Callable:
    """MAE's test transform: bicubic resize of the shorter side to img_size / crop_pct,
    center crop, ImageNet normalisation."""
    from torchvision import transforms as T

    steps = [T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
             T.CenterCrop(img_size), T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


def make_loader(dataset: torch.utils.data.Dataset, batch: int, workers: int, *, shuffle: bool = False,
                sampler: Any = None, drop_last: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader with a seeded shuffle (the same order for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=workers, drop_last=drop_last,
                                       generator=gen, persistent_workers=False)


# ---------------------------------------------------------------------------
# Splits that cannot leak.

@dataclass(frozen=True)
class Split:
    """Indices into the ImageFolder's paths; with ``by`` set, the groups on each side."""

    train: np.ndarray
    test: np.ndarray
    by: str | None = None
    train_groups: tuple[str, ...] = ()
    test_groups: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_train": int(self.train.size), "n_test": int(self.test.size)}
        if self.by is not None:
            out.update(split_by=self.by, train_groups=list(self.train_groups), test_groups=list(self.test_groups))
        return out


def fixed_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded split: indices (train, test); every class keeps >= 1 on each side."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if idx.size < 2:
            raise DataError(f"class {c} has {idx.size} image(s); a split needs at least 2")
        n_test = min(max(1, round(idx.size * test_fraction)), idx.size - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def groups_from_paths(paths: list[Path], root: Path, pattern: str) -> list[str]:
    """Each image's group: the first capture group of ``pattern`` (else its whole match),
    searched in the path relative to ``root`` (with '/' separators)."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--split-by {pattern!r}: not a valid regular expression ({e})") from e
    groups = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        m = regex.search(rel)
        if m is None:
            raise DataError(f"{p}: --split-by {pattern!r} does not match its path {rel!r}; every image needs a group")
        groups.append(m.group(1) if regex.groups else m.group(0))
    return groups


def group_split(groups: list[str], labels: np.ndarray, classes: list[str], test_fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Whole groups to the test side: in a seeded order, a group joins the test side
    when it fits within ``test_fraction`` of the images (the smallest group when none
    fits); the rest is the training side. Returns (train, test, train_groups, test_groups).
    DataError when fewer than two groups exist or a class has no training image."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    names, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if names.size < 2:
        raise DataError(f"--split-by found {names.size} group(s) {names.tolist()}; a group split needs at least 2")
    target = test_fraction * len(groups)
    order = np.random.default_rng(seed).permutation(names.size)
    chosen: list[int] = []
    total = 0
    for g in order:
        if total + sizes[g] <= target and len(chosen) < names.size - 1:
            chosen.append(int(g))
            total += int(sizes[g])
    if not chosen:
        chosen = [int(np.argmin(sizes))]
    is_test = np.isin(inverse, chosen)
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    for c, name in enumerate(classes):
        if not np.any(labels[train] == c):
            raise DataError(f"class '{name}' has no training image after --split-by: all of it is in the test "
                            f"groups {sorted(names[chosen].tolist())}")
    train_groups = sorted(set(names.tolist()) - set(names[chosen].tolist()))
    return train, test, train_groups, sorted(names[chosen].tolist())


def make_split(paths: list[Path], labels: np.ndarray, classes: list[str], root: str | os.PathLike[str], *,
               split_by: str | None, test_fraction: float, seed: int) -> Split:
    """The group split when ``split_by`` is given, else the per-class split."""
    if split_by is None:
        train, test = fixed_split(labels, test_fraction, seed)
        return Split(train, test)
    groups = groups_from_paths(paths, Path(root), split_by)
    train, test, train_groups, test_groups = group_split(groups, labels, classes, test_fraction, seed)
    return Split(train, test, split_by, tuple(train_groups), tuple(test_groups))


# ---------------------------------------------------------------------------
# Encoders: exported weights, a run, or our own initialization.

@dataclass(frozen=True)
class Encoder:
    """Encoder weights with timm key names (those ``smae-export`` writes) and their architecture."""

    state: dict[str, torch.Tensor]
    timm_model: str
    img_size: int
    source: str


# What a timm classifier may lack from / hold beyond an exported encoder: a new head and,
# with mean pooling, a new fc_norm in place of the final norm (MAE's fine-tuning setup).
NEW_IN_CLASSIFIER = frozenset({"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"})
DROPPED_FROM_ENCODER = frozenset({"norm.weight", "norm.bias"})


INIT_PRECISIONS = ("bf16", "fp32")


def init_encoder(config_src: str | os.PathLike[str], overrides: list[str] | None = None,
                 precision: str = "bf16") -> Encoder:
    """Our own initialization for a pretraining config (a TOML, or a run directory's
    resolved ``config.toml``): seeded with ``train.seed`` and built exactly as the
    trainer builds its model, so these are the encoder weights a step-0 checkpoint holds.

    ``precision`` is the run's DeepSpeed precision: with ``bf16`` (every shipped
    ds_configs/*.json) DeepSpeed casts the module to bf16 before it makes the fp32 master
    copy of the trainable parameters, so step 0 holds those rounded to bf16 (frozen ones,
    such as the fixed sin-cos position embedding, keep their fp32 values); ``fp32`` keeps
    everything as built."""
    if precision not in INIT_PRECISIONS:
        raise ConfigError(f"--init-precision {precision!r}: expected one of {', '.join(INIT_PRECISIONS)}")
    from selectivemae_ds.config import load_config
    from selectivemae_ds.models import build_model, timm_model_name

    path = Path(config_src)
    if path.is_dir():
        path = path / "config.toml"
    if not path.is_file():
        raise ConfigError(f"--config {config_src}: no such config TOML (or run directory with a config.toml); "
                          "--weights init needs the pretraining config whose initialization it builds")
    # The data section does not shape the initialization, but the config's validation wants
    # data.path to exist: point it at the config's own folder so a config whose dataset is not
    # on this machine still builds (a user's --set comes later and wins).
    cfg = load_config(path, [f"data.path={path.parent.resolve()}", *(overrides or [])])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, cfg.method_cfg)
    trainable = {name for name, param in model.encoder.named_parameters() if param.requires_grad}
    state = {}
    for k, v in model.encoder.state_dict().items():
        v = v.detach()
        if precision == "bf16" and k in trainable:
            v = v.to(torch.bfloat16)
        state[k] = v.float().contiguous()
    return Encoder(state, timm_model_name(cfg.model), cfg.model.img_size,
                   f"init({path}, seed {cfg.train.seed}, {precision})")


def read_encoder(path: str | os.PathLike[str], model_name: str | None = None, img_size: int | None = None) -> Encoder:
    """Exported weights (.safetensors; architecture from the JSON beside them or the arguments)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights {path}: no such file or run directory")
    meta: dict = {}
    sidecar = path.with_suffix(".json")
    if sidecar.is_file() and sidecar != path:
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{sidecar}: not valid JSON ({e})") from e
    # The JSON's image size is the one the weights were trained at (their position embedding);
    # the argument only stands in for a file without one.
    model_name = model_name or meta.get("timm_model")
    img_size = meta.get("img_size") or img_size
    if not model_name or not img_size:
        raise ConfigError(f"--weights {path}: the encoder architecture is unknown: pass --model (e.g. "
                          "vit_base_patch16_224) and --img-size, or keep the .json that smae-export writes beside it")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"--weights {path}: not a safetensors file ({e})") from e
    return Encoder(state, str(model_name), int(img_size), str(path))


def resolve_encoder(weights: str, *, config: str | None = None, overrides: list[str] | None = None,
                    model_name: str | None = None, img_size: int | None = None,
                    init_precision: str = "bf16") -> Encoder:
    """``init`` (needs ``config``), a run or checkpoint directory (exported through
    ``selectivemae_ds.export`` into a temporary file), or exported weights."""
    if weights == "init":
        if config is None:
            raise ConfigError("--weights init needs --config: the pretraining TOML or run directory whose "
                              "initialization to build")
        return init_encoder(config, overrides, init_precision)
    if Path(weights).is_dir():
        import tempfile

        from selectivemae_ds.export import export

        with tempfile.TemporaryDirectory(prefix="smae-eval-") as tmp:
            out = Path(tmp) / "encoder.safetensors"
            export(weights, out)
            enc = read_encoder(out)
        return Encoder(enc.state, enc.timm_model, enc.img_size, str(weights))
    return read_encoder(weights, model_name, img_size)


def build_timm(encoder: Encoder, *, num_classes: int = 0, global_pool: str = "token", drop_path: float = 0.0,
               img_size: int | None = None) -> torch.nn.Module:
    """The timm ViT holding the encoder's weights (a new head / fc_norm where the pooling
    asks for them). At another ``img_size`` the position embedding is resampled. Weights of
    another architecture stop with a CheckpointError listing what does not fit."""
    import timm
    from timm.layers import resample_abs_pos_embed

    size = int(img_size or encoder.img_size)
    model = timm.create_model(encoder.timm_model, pretrained=False, num_classes=num_classes, img_size=size,
                              global_pool=global_pool, drop_path_rate=drop_path)
    state = dict(encoder.state)
    target = model.state_dict()
    if size != encoder.img_size and "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid),
                                                    num_prefix_tokens=model.num_prefix_tokens)
    missing = sorted(set(target) - set(state) - NEW_IN_CLASSIFIER)
    unexpected = sorted(set(state) - set(target) - DROPPED_FROM_ENCODER)
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                   for k in set(target) & set(state) if state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"--weights {encoder.source}: not an encoder of timm's {encoder.timm_model} at "
                              f"{size} px: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                              f"wrong shapes {wrong[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    return model


# ---------------------------------------------------------------------------
# Features, probes and floors.

@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: torch.utils.data.DataLoader,
                     pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) features and (n,) labels: the final-norm cls token, or the mean of the patch tokens."""
    model.eval()
    feats, labels = [], []
    prefix = getattr(model, "num_prefix_tokens", 1)
    for x, y in loader:
        tokens = model.forward_features(x)  # (b, prefix + N, D)
        feats.append(tokens[:, 0] if pool == "cls" else tokens[:, prefix:].mean(dim=1))
        labels.append(y)
    return torch.cat(feats).float(), torch.cat(labels)


def feature_spread(feats: torch.Tensor) -> dict[str, float]:
    """How much the features differ between images (label-free): the mean cosine similarity
    of two different images' features after a fresh LayerNorm (what a new fc_norm + head see
    at the start of fine-tuning), and the share of the features' energy that is not their
    common mean. A collapsed encoder has cosine near 1 and share near 0: every image looks
    the same to a new head, whatever a probe on standardised features finds."""
    x = F.layer_norm(feats.float(), feats.shape[1:])
    n = x.shape[0]
    unit = F.normalize(x, dim=1)
    cos = (unit.sum(0).square().sum() - n) / max(n * (n - 1), 1)  # mean over pairs i != j
    between = (x - x.mean(0)).square().sum(1).mean() / x.square().sum(1).mean().clamp_min(1e-12)
    return {"feature_cosine": round(float(cos), 4), "between_share": round(float(between), 4)}


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, num_classes: int | None = None) -> float:
    """Cosine kNN: each test point votes with its k most similar training points,
    each vote weighted by the similarity; the class with the largest sum wins."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    sims = F.normalize(test_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T  # (n_test, n_train)
    top, idx = sims.topk(min(k, train_x.shape[0]), dim=1)
    votes = torch.zeros(test_x.shape[0], num_classes).scatter_add_(1, train_y[idx], top)
    return float((votes.argmax(dim=1) == test_y).float().mean())


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, weight_decay: float = 1e-4, iters: int = 200) -> float:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS
    (deterministic: no sampling)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    lin = torch.nn.Linear(xtr.shape[1], num_classes)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), train_y) + weight_decay * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(dim=1) == test_y).float().mean())


def floors(paths: list[Path], labels: np.ndarray, split: Split, *, size: int = 32, batch: int = 64,
           workers: int = 0) -> dict[str, float]:
    """Accuracies that need no encoder, on the same split: the training majority class,
    kNN and a linear probe on raw pixels (center crop at ``size`` px, flattened), and a
    linear probe / kNN on the mean color (3 numbers per image)."""
    loader = make_loader(ImageDataset(paths, labels, eval_transform(size, normalize=False)), batch, workers)
    pixels = torch.cat([x.flatten(1) for x, _ in loader])
    y = torch.from_numpy(labels)
    tr, te = torch.from_numpy(split.train), torch.from_numpy(split.test)
    color = pixels.view(len(paths), 3, -1).mean(dim=2)
    majority = int(np.bincount(labels[split.train]).argmax())
    centered = pixels - pixels[tr].mean(0)  # cosine kNN on centered pixels: brightness offsets do not dominate
    return {
        "majority": round(float(np.mean(labels[split.test] == majority)), 4),
        "raw_pixels_knn": round(knn_accuracy(centered[tr], y[tr], centered[te], y[te]), 4),
        "raw_pixels_linear": round(linear_probe_accuracy(pixels[tr], y[tr], pixels[te], y[te]), 4),
        "mean_color_knn": round(knn_accuracy(color[tr] - color[tr].mean(0), y[tr], color[te] - color[tr].mean(0),
                                             y[te]), 4),
        "mean_color_linear": round(linear_probe_accuracy(color[tr], y[tr], color[te], y[te]), 4),
    }


@dataclass(frozen=True)
class LabeledSet:
    root: Path
    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    split: Split


def load_labeled(args: argparse.Namespace) -> LabeledSet:
    """The ImageFolder of ``--data`` and its split (``--split-by``, ``--test-fraction``, ``--split-seed``)."""
    paths, labels, classes = list_image_folder(args.data)
    split = make_split(paths, labels, classes, args.data, split_by=args.split_by,
                       test_fraction=args.test_fraction, seed=args.split_seed)
    return LabeledSet(Path(args.data), paths, labels, classes, split)


def probe(args: argparse.Namespace, data: LabeledSet, modes: tuple[str, ...] = ("knn", "linear")) -> dict[str, Any]:
    """Frozen-feature accuracies (one feature pass for all ``modes``) of the encoder of ``args``."""
    encoder = resolve_encoder(args.weights, config=args.config, overrides=args.set, model_name=args.model,
                              img_size=args.img_size, init_precision=args.init_precision)
    model = build_timm(encoder, img_size=args.img_size)
    size = int(args.img_size or encoder.img_size)
    loader = make_loader(ImageDataset(data.paths, data.labels, eval_transform(size)), args.batch, args.workers)
    feats, y = extract_features(model, loader, args.pool)
    tr, te = torch.from_numpy(data.split.train), torch.from_numpy(data.split.test)
    out: dict[str, Any] = {"encoder": encoder.source, "img_size": size}
    if "knn" in modes:
        out["knn"] = round(knn_accuracy(feats[tr], y[tr], feats[te], y[te], k=getattr(args, "k", 20),
                                        num_classes=len(data.classes)), 4)
    if "linear" in modes:
        out["linear"] = round(linear_probe_accuracy(feats[tr], y[tr], feats[te], y[te]), 4)
    out.update(feature_spread(feats))
    return out


def run_probe(mode: str, args: argparse.Namespace) -> dict:
    """``smae-eval knn|linear``: the accuracy and the floors on the same split."""
    data = load_labeled(args)
    r = probe(args, data, (mode,))
    return {"mode": mode, "accuracy": r[mode], **data.split.describe(), "classes": data.classes,
            "weights": args.weights, "encoder": r["encoder"], "pool": args.pool, "img_size": r["img_size"],
            "feature_cosine": r["feature_cosine"], "between_share": r["between_share"],
            "floors": floors(data.paths, data.labels, data.split, batch=args.batch, workers=args.workers)}


# ---------------------------------------------------------------------------
# Command line.

def bundled_assets() -> Path | None:
    """assets/neon of a source checkout (a wheel does not carry it), or None."""
    candidate = Path(__file__).resolve().parents[1] / "assets" / "neon"
    return candidate if candidate.is_dir() else None


def add_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="encoder .safetensors from smae-export, a run directory or checkpoint tag (exported on the "
                        "fly), or 'init': our own initialization for the model of --config")
    p.add_argument("--config", help="with --weights init: the pretraining TOML or run directory whose "
                                    "initialization (model config and train.seed) to build")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --weights init: override a key of --config, as smae-pretrain's --set (repeatable)")
    p.add_argument("--init-precision", choices=INIT_PRECISIONS, default="bf16",
                   help="with --weights init: the run's DeepSpeed precision; bf16 (every shipped ds_configs JSON) "
                        "rounds the initialization as step 0 holds it (default bf16)")
    p.add_argument("--model", help="timm architecture of a .safetensors without its .json (e.g. vit_tiny_patch16_224)")
    p.add_argument("--img-size", type=int,
                   help="input size (default: the encoder's; another size resamples the position embedding)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="ImageFolder directory: one sub-folder of images per class")
    p.add_argument("--split-by", metavar="REGEX",
                   help="group images by this regex (first capture group, else the match) searched in the path "
                        r"below --data, and keep groups whole on one side, e.g. '([^/]+)_\d+\.png$' for the scene "
                        "of make-treecrowns files (default: a per-class random split)")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="held-out share: of every class, or at most this share of images in whole groups (default 0.3)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2; 0 = inline)")


def parser() -> argparse.ArgumentParser:
    from selectivemae_ds import finetune

    ap = argparse.ArgumentParser(prog="smae-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("finetune", help="end-to-end fine-tuning (MAE's recipe) over seeds, with floors",
                       description=finetune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_weights_args(p)
    add_data_args(p)
    finetune.add_arguments(p)
    for mode, text in (("knn", "cosine kNN on frozen features"), ("linear", "linear probe on frozen features")):
        p = sub.add_parser(mode, help=text, description=text)
        add_weights_args(p)
        add_data_args(p)
        p.add_argument("--pool", choices=("cls", "mean"), default="cls", help="feature pooling (default cls)")
        if mode == "knn":
            p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    p = sub.add_parser("make-treecrowns", help="build the labeled tree-crown/background set from assets/neon",
                       description="Write an ImageFolder (tree/, background/) from the bundled crown annotations; "
                                   r"file names are SCENE_NNNN.png, so --split-by '([^/]+)_\d+\.png$' splits by scene.")
    p.add_argument("--assets", default=None,
                   help="folder with the NEON images and their VOC XML annotations (default: assets/neon of the "
                        "source checkout; required when installed from a wheel)")
    p.add_argument("--out", required=True, help="output ImageFolder directory")
    p.add_argument("--seed", type=int, default=0, help="seed for the background positions")
    return ap


def _main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "make-treecrowns":
        assets = Path(args.assets) if args.assets else bundled_assets()
        if assets is None:
            raise ConfigError("--assets is required here: this installation has no source checkout with "
                              "assets/neon; pass the folder with the NEON images and their VOC .xml files")
        if not assets.is_dir():
            raise ConfigError(f"--assets {assets}: not a directory")
        result: dict = {"out": args.out, "counts": build_treecrown_set(assets, args.out, seed=args.seed)}
    elif args.cmd == "finetune":
        from selectivemae_ds import finetune

        result = finetune.run(args)
    else:
        result = run_probe(args.cmd, args)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank holds the report; one prints it
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
