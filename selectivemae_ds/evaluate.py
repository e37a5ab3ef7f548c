"""Frozen-encoder evaluation: kNN and linear probe on an ImageFolder, plus the
bundled tree-crown set built from real annotations.

    smae-eval knn    --weights encoder.safetensors --data LABELED_DIR
    smae-eval linear --weights encoder.safetensors --data LABELED_DIR
    smae-eval make-treecrowns --out LABELED_DIR

The encoder is loaded as a plain timm ViT (the architecture and image size come
from the JSON written beside the weights by ``smae-export``, or from ``--model`` /
``--img-size``); ``--weights random`` evaluates a randomly initialised encoder, the
floor any pretraining must beat. Features are the final-norm cls token or the mean
of the patch tokens. The split is fixed: a seeded, per-class shuffle with
``--test-fraction`` of every class held out, so two runs print the same numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selectivemae_ds.data.pipeline import IMAGENET_MEAN, IMAGENET_STD

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
            raise ValueError(f"{xml_path}: object without bndbox")
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
    raise FileNotFoundError(f"{xml_path}: no image with the same name beside it")


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
    rng = np.random.default_rng(seed)
    counts = {"background": 0, "tree": 0}
    for cls in counts:
        (out / cls).mkdir(parents=True, exist_ok=True)
    for xml_path in sorted(assets.glob("*.xml")):
        boxes = _voc_boxes(xml_path)
        image = Image.open(_scene_image(xml_path)).convert("RGB")
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
# Features and probes.

def list_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """ImageFolder layout: one sub-folder per class. Returns paths, labels (n,), classes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [c] * len(files)
    if len(classes) < 2 or not paths:
        raise ValueError(f"--data {root}: need an ImageFolder with >= 2 class folders holding images, "
                         f"found classes {classes} and {len(paths)} images")
    return paths, np.asarray(labels, dtype=np.int64), classes


def fixed_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded split: indices (train, test); every class keeps >= 1 on each side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if idx.size < 2:
            raise ValueError(f"class {c} has {idx.size} image(s); a split needs at least 2")
        n_test = min(max(1, round(idx.size * test_fraction)), idx.size - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_images(paths: list[Path], img_size: int, center_crop: bool = False) -> torch.Tensor:
    """(n, 3, img_size, img_size) float32, ImageNet-normalised, bicubic resize (of the
    central square when ``center_crop``, else of the whole image)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(len(paths), 3, img_size, img_size)
    for i, p in enumerate(paths):
        im = Image.open(p).convert("RGB")
        if center_crop:
            w, h = im.size
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        im = im.resize((img_size, img_size), Image.Resampling.BICUBIC)
        out[i] = (torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0 - mean) / std
    return out


def load_encoder(weights: str, model_name: str | None, img_size: int | None) -> tuple[torch.nn.Module, int]:
    """A timm ViT with the given weights (strict), or random init for ``weights='random'``."""
    import timm

    meta: dict = {}
    if weights != "random":
        sidecar = Path(weights).with_suffix(".json")
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text())
    model_name = model_name or meta.get("timm_model")
    img_size = img_size or meta.get("img_size")
    if not model_name or not img_size:
        raise ValueError("the encoder architecture is unknown: pass --model (e.g. vit_base_patch16_224) and "
                         "--img-size, or keep the .json that smae-export writes beside the weights")
    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=int(img_size))
    if weights != "random":
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights), strict=True)
    return model.eval(), int(img_size)


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: torch.Tensor, pool: str, batch: int) -> torch.Tensor:
    """(n, D) features: the final-norm cls token, or the mean of the patch tokens."""
    feats = []
    for start in range(0, images.shape[0], batch):
        tokens = model.forward_features(images[start:start + batch])  # (b, prefix + N, D)
        prefix = getattr(model, "num_prefix_tokens", 1)
        feats.append(tokens[:, 0] if pool == "cls" else tokens[:, prefix:].mean(dim=1))
    return torch.cat(feats)


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


def run_probe(mode: str, args: argparse.Namespace) -> dict:
    paths, labels, classes = list_image_folder(args.data)
    train, test = fixed_split(labels, args.test_fraction, args.seed)
    torch.manual_seed(args.seed)
    model, img_size = load_encoder(args.weights, args.model, args.img_size)
    feats = extract_features(model, load_images(paths, img_size), args.pool, args.batch)
    y = torch.from_numpy(labels)
    if mode == "knn":
        acc = knn_accuracy(feats[train], y[train], feats[test], y[test], k=args.k, num_classes=len(classes))
    else:
        acc = linear_probe_accuracy(feats[train], y[train], feats[test], y[test])
    return {"mode": mode, "accuracy": round(acc, 4), "n_train": int(train.size), "n_test": int(test.size),
            "classes": classes, "weights": args.weights, "pool": args.pool, "img_size": img_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="smae-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for mode, text in (("knn", "cosine kNN on frozen features"), ("linear", "linear probe on frozen features")):
        p = sub.add_parser(mode, help=text, description=text)
        p.add_argument("--weights", required=True,
                       help="encoder .safetensors with timm key names (from smae-export), or 'random'")
        p.add_argument("--data", required=True, help="ImageFolder directory: one sub-folder of images per class")
        p.add_argument("--model", help="timm architecture (default: from the weights' .json sidecar)")
        p.add_argument("--img-size", type=int, help="input size (default: from the weights' .json sidecar)")
        p.add_argument("--pool", choices=("cls", "mean"), default="cls", help="feature pooling (default cls)")
        p.add_argument("--test-fraction", type=float, default=0.3, help="held-out share of each class (default 0.3)")
        p.add_argument("--seed", type=int, default=0, help="split seed, and init seed for --weights random")
        p.add_argument("--batch", type=int, default=64, help="feature extraction batch size (default 64)")
        if mode == "knn":
            p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    p = sub.add_parser("make-treecrowns", help="build the labeled tree-crown/background set from assets/neon",
                       description="Write an ImageFolder (tree/, background/) from the bundled crown annotations.")
    p.add_argument("--assets", default=str(Path(__file__).resolve().parents[1] / "assets" / "neon"),
                   help="folder with the NEON images and their VOC XML annotations (default: the bundled ones)")
    p.add_argument("--out", required=True, help="output ImageFolder directory")
    p.add_argument("--seed", type=int, default=0, help="seed for the background positions")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "make-treecrowns":
            result: dict = {"out": args.out, "counts": build_treecrown_set(args.assets, args.out, seed=args.seed)}
        else:
            result = run_probe(args.cmd, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"smae-eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
