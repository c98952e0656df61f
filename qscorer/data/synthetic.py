"""A small synthetic IQA dataset in the original meta format, built offline and deterministically (``qscorer synth``).

Content comes from natural photos bundled with scikit-image. Each photo yields square source crops (side
0.875..1.25 x ``image_size``, resized to ``image_size``); each crop yields several images, each with one distortion
at a continuous strength ``s`` in [0, 1]. The ground truth is a monotone function of ``s``::

    gt_score = clip(5 - 4 * s + N(0, gt_noise), 1, 5)      (a MOS on [1, 5]; gt_score_norm = gt_score)
    std      = 0.35 + 0.35 * (1 - ((gt_score - 3) / 2)^2) + U(-0.05, 0.05)   (raters agree more at the ends)
    level    = DeQA's five equal bins of gt_score on [1, 5]  ->  answer "<scoreN>" or the level word
    level_probs = DeQA's soft label of (gt_score, std), "pdf" mode (:func:`level_probs_from_mos`), excellent-first

Test crops never overlap any train crop (train crops may overlap each other), so no pixel of test content is seen in
training: the split is by source crop.

Output folder (the ``--image_folder`` / ``--root-dir`` of the metas)::

    images/{split}_{index}_{distortion}.png
    metas/train.json         records with conversations "The quality of the image is <scoreN>."
    metas/train_levels.json  the same records answering with level words (Q-Align style baseline)
    metas/test.json          records without conversations
    dataset.json             the parameters, counts and source photos
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.stats import norm
from tqdm import tqdm

from ..constants import DEFAULT_IMAGE_TOKEN, LEVEL_WORDS, SCORE_TOKENS
from ..errors import QScorerError
from .conversation import ANSWER_PREFIX, SCORING_QUESTION

logger = logging.getLogger(__name__)

GENERATOR = "qscorer synth"
"""Marker written to ``dataset.json``; a folder carrying it may be rebuilt in place."""

SOURCE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "camera",
    "coins",
    "grass",
    "gravel",
    "brick",
    "stereo_motorcycle",
)
"""``skimage.data`` photos that ship with scikit-image (no download). Flat ones (moon, cell, retina, clock) are left
out: blur and noise barely change them. ``stereo_motorcycle`` contributes its left view only."""

DISTORTIONS = ("blur", "jpeg", "noise", "contrast", "pixelate", "brightness")

DISTORTION_PARAMETERS = {
    "blur": "gaussian blur, sigma = 4 * s * image_size / 256 px",
    "jpeg": "JPEG round trip, quality = round(90 * (3 / 90) ** s)",
    "noise": "additive gaussian noise, sigma = 40 * s (0..255 scale)",
    "contrast": "contrast towards the mean grey, factor 1 - 0.8 * s",
    "pixelate": "box downscale by 1 + 11 * s * image_size / 256, nearest upscale",
    "brightness": "darkening, pixel values times 1 - 0.7 * s",
}

ANSWER_TEMPLATE = ANSWER_PREFIX + " {}."

MOS_MIN, MOS_MAX = 1.0, 5.0
LEVEL_VALUES = (5.0, 4.0, 3.0, 2.0, 1.0)
"""Level value of each ``level_probs`` entry (excellent-first)."""

CROP_SCALE = (0.875, 1.25)
MIN_CROP_DETAIL = 3.0
"""Least mean absolute grey-level step between neighbouring pixels of a source crop (rejects flat sky)."""
TEST_AREA_FRACTION = 0.3
"""Most of a photo's area that test crops may cover."""
PLACEMENT_TRIES = 200


# ---------------------------------------------------------------- DeQA soft labels (its gen_soft_label.py)


def mos_level(mos: float, min_mos: float = MOS_MIN, max_mos: float = MOS_MAX) -> int:
    """Level 1..5 of a MOS: the five equal bins of [min_mos, max_mos], right-closed with DeQA's 1e-8 slack."""
    eps = 1e-8
    for level in range(1, 6):
        left = min_mos + (level - 1) / 5 * (max_mos - min_mos) - eps
        right = min_mos + level / 5 * (max_mos - min_mos) + eps
        if left < mos <= right:
            return level
    raise ValueError(f"MOS {mos} is outside [{min_mos}, {max_mos}]")


def binary_level_probs(mos_norm: float) -> list[float]:
    """DeQA's fallback label: linear interpolation between the two integer levels around ``mos_norm`` in [1, 5].

    Excellent-first. Both weights sit on the bin ``(k, k + 1]`` holding ``mos_norm`` (so 3.0 gives all its weight to
    level 3, from the bin (2, 3]); the 1e-8 bin slack of the original is left out (it moves values by < 1e-8).
    """
    if not MOS_MIN <= mos_norm <= MOS_MAX:
        raise ValueError(f"normalised MOS {mos_norm} is outside [1, 5]")
    lower = min(max(math.ceil(mos_norm) - 1, 1), 4)
    probs = [0.0] * 5  # bad-first here, reversed below
    probs[lower - 1] = lower + 1 - mos_norm
    probs[lower] = mos_norm - lower
    return probs[::-1]


def level_probs_from_mos(
    mos_norm: float,
    std_norm: float,
    *,
    density: str = "pdf",
    thre_std: float = 0.2,
    thre_diff: float = 0.1,
    renormalize: bool = True,
) -> tuple[list[float], bool]:
    """DeQA's soft label over the five levels (excellent-first) and whether the binary fallback was used.

    ``density="pdf"``: ``p_x = N(x; mos_norm, std_norm)``; ``"cdf"``: ``Phi(x + 0.5) - Phi(x - 0.5)``, for x = 5..1.
    Affine fix: ``A = sum(p)``, ``B = sum(p * x)``, ``alpha = (mos_norm - 3) / (B - 3A + 1e-9)``,
    ``beta = (1 - alpha * A) / 5``, ``p' = max(alpha * p + beta, 0)``. If ``std_norm < thre_std`` or
    ``|sum(p' * x) - mos_norm| > thre_diff`` the label is :func:`binary_level_probs`.

    ``renormalize=True`` (our addition) divides ``p'`` by its sum before the expectation check, so every label sums
    to 1 and is within ``thre_diff`` of ``mos_norm`` in expectation (the binary one exactly); DeQA's clipping at 0
    otherwise keeps labels that sum to more than 1 (about 1.05 at mos 4.8, std 0.7, which then falls back to binary
    here). ``renormalize=False`` reproduces gen_soft_label.py exactly. Inherited quirk, kept: at ``mos_norm == 3.0``
    exactly, ``alpha`` is 0 and the label is uniform. Inputs are on the normalised [1, 5] scale.
    """
    if density == "pdf":
        probs = [float(norm.pdf(x, loc=mos_norm, scale=std_norm)) for x in LEVEL_VALUES]
    elif density == "cdf":
        probs = [
            float(norm.cdf(x + 0.5, mos_norm, std_norm) - norm.cdf(x - 0.5, mos_norm, std_norm)) for x in LEVEL_VALUES
        ]
    else:
        raise ValueError(f"unknown density {density!r}; expected 'pdf' or 'cdf'")
    total = sum(probs)
    moment = sum(p * x for p, x in zip(probs, LEVEL_VALUES))
    alpha = (mos_norm - 3.0) / (moment - 3.0 * total + 1e-9)
    beta = (1.0 - alpha * total) / 5.0
    fixed = [max(alpha * p + beta, 0.0) for p in probs]
    if renormalize:
        fixed_total = sum(fixed)
        fixed = [p / fixed_total for p in fixed]
    expectation = sum(p * x for p, x in zip(fixed, LEVEL_VALUES))
    if std_norm < thre_std or abs(expectation - mos_norm) > thre_diff:
        return binary_level_probs(mos_norm), True
    return fixed, False


# ---------------------------------------------------------------- distortions


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    sigma = 4.0 * strength * image.shape[0] / 256
    if sigma < 1e-3:
        return image.copy()
    return _to_uint8(ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect"))


def _jpeg(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=round(90 * (3 / 90) ** strength))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


def _noise(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(image.astype(np.float32) + rng.normal(0.0, 40.0 * strength, image.shape).astype(np.float32))


def _contrast(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    values = image.astype(np.float32)
    mean = values.mean()
    return _to_uint8(mean + (1.0 - 0.8 * strength) * (values - mean))


def _pixelate(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    small = max(1, round(size / (1.0 + 11.0 * strength * size / 256)))
    if small >= size:
        return image.copy()
    pil = Image.fromarray(image).resize((small, small), Image.Resampling.BOX)
    return np.asarray(pil.resize((size, size), Image.Resampling.NEAREST)).copy()


def _brightness(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(image.astype(np.float32) * (1.0 - 0.7 * strength))


_DISTORTION_FUNCTIONS = {
    "blur": _blur,
    "jpeg": _jpeg,
    "noise": _noise,
    "contrast": _contrast,
    "pixelate": _pixelate,
    "brightness": _brightness,
}


def apply_distortion(image: np.ndarray, distortion: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` (H x W x 3 uint8, square) distorted by ``distortion`` at ``strength`` in [0, 1] (0 = untouched).

    See :data:`DISTORTION_PARAMETERS`; ``rng`` drives the random ones (noise).
    """
    if distortion not in _DISTORTION_FUNCTIONS:
        raise QScorerError(f"unknown distortion {distortion!r}; expected some of {', '.join(DISTORTIONS)}")
    return _DISTORTION_FUNCTIONS[distortion](image, float(strength), rng)


# ---------------------------------------------------------------- ground truth


def ground_truth(strength: float, rng: np.random.Generator, gt_noise: float) -> tuple[float, float]:
    """(gt_score, std) for a distortion strength, both rounded to 4 decimals (see the module docstring)."""
    gt = round(float(np.clip(5.0 - 4.0 * strength + rng.normal(0.0, gt_noise), MOS_MIN, MOS_MAX)), 4)
    spread = 1.0 - ((gt - 3.0) / 2.0) ** 2
    std = round(0.35 + 0.35 * spread + float(rng.uniform(-0.05, 0.05)), 4)
    return gt, std


# ---------------------------------------------------------------- source crops


@dataclass(frozen=True)
class SourceCrop:
    """A square region ``box = (left, top, right, bottom)`` of a source photo."""

    source: str
    box: tuple[int, int, int, int]


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def _detail(region: np.ndarray) -> float:
    grey = region.astype(np.float32).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def _sample_side(photo: np.ndarray, image_size: int, rng: np.random.Generator) -> int:
    low, high = (round(scale * image_size) for scale in CROP_SCALE)
    return min(int(rng.integers(low, high + 1)), *photo.shape[:2])


def _is_detailed(photo: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    return _detail(photo[box[1] : box[3], box[0] : box[2]]) >= MIN_CROP_DETAIL


def _place_crops(photos: dict[str, np.ndarray], count: int, rng: np.random.Generator, try_box) -> list[SourceCrop]:
    """Up to ``count`` crops, round-robin over the photos in a random order; ``try_box(name, crops)`` makes one try
    at a box in photo ``name`` (None: rejected), and a photo with no box in :data:`PLACEMENT_TRIES` tries is dropped."""
    crops: list[SourceCrop] = []
    active = [str(name) for name in rng.permutation(sorted(photos))]
    while len(crops) < count and active:
        for name in list(active):
            if len(crops) == count:
                break
            for _ in range(PLACEMENT_TRIES):
                box = try_box(name, crops)
                if box is not None:
                    crops.append(SourceCrop(name, box))
                    break
            else:
                active.remove(name)
    return crops


def _place_test_crops(
    photos: dict[str, np.ndarray], count: int, image_size: int, rng: np.random.Generator
) -> list[SourceCrop]:
    """Up to ``count`` disjoint test crops, each in a free corner of its photo (:func:`_place_crops`).

    Corners, and a cap of :data:`TEST_AREA_FRACTION` of each photo's area, leave room for train crops.
    """

    def try_box(name: str, crops: list[SourceCrop]):
        photo = photos[name]
        height, width = photo.shape[:2]
        taken = [crop.box for crop in crops if crop.source == name]
        budget = TEST_AREA_FRACTION * height * width - sum((b[2] - b[0]) * (b[3] - b[1]) for b in taken)
        side = _sample_side(photo, image_size, rng)
        left = 0 if rng.random() < 0.5 else width - side
        top = 0 if rng.random() < 0.5 else height - side
        box = (left, top, left + side, top + side)
        return box if side * side <= budget and not _overlaps(box, taken) and _is_detailed(photo, box) else None

    return _place_crops(photos, count, rng, try_box)


def _place_train_crops(
    photos: dict[str, np.ndarray],
    count: int,
    image_size: int,
    rng: np.random.Generator,
    blocked: list[SourceCrop],
) -> list[SourceCrop]:
    """``count`` train crops (or fewer if no photo has room), anywhere outside the ``blocked`` regions (the test
    crops, :func:`_place_crops`); they may overlap each other."""

    def try_box(name: str, crops: list[SourceCrop]):
        photo = photos[name]
        side = _sample_side(photo, image_size, rng)
        free = np.ones((photo.shape[0] - side + 1, photo.shape[1] - side + 1), dtype=bool)  # allowed (top, left)
        for left, top, right, bottom in (crop.box for crop in blocked if crop.source == name):
            free[max(top - side + 1, 0) : bottom, max(left - side + 1, 0) : right] = False
        candidates = np.flatnonzero(free)
        if candidates.size == 0:
            return None
        top, left = divmod(int(candidates[rng.integers(candidates.size)]), free.shape[1])
        box = (left, top, left + side, top + side)
        return box if _is_detailed(photo, box) else None

    return _place_crops(photos, count, rng, try_box)


def held_out_corners(photos: dict[str, np.ndarray], image_size: int) -> list[SourceCrop]:
    """The four corner squares of each photo that hold every test crop any build of ``image_size`` can place (side:
    the largest crop, ``CROP_SCALE[1] * image_size``)."""
    corners = []
    for name, photo in photos.items():
        height, width = photo.shape[:2]
        side = min(round(CROP_SCALE[1] * image_size), height, width)
        for left in (0, width - side):
            for top in (0, height - side):
                corners.append(SourceCrop(name, (left, top, left + side, top + side)))
    return corners


def load_source_photos(names: tuple[str, ...] = SOURCE_PHOTOS) -> dict[str, np.ndarray]:
    """The bundled scikit-image photos as H x W x 3 uint8 arrays (grey ones stacked to RGB)."""
    try:
        import skimage.data
    except ImportError as error:
        raise QScorerError("the synthetic dataset needs scikit-image (pip install scikit-image)") from error
    photos = {}
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            logger.warning("skimage.data has no photo %r in this version; skipped", name)
            continue
        try:
            photo = loader()
        except (ImportError, OSError, ValueError) as error:  # photos that need pooch or a download
            logger.warning("skimage.data.%s is not available offline (%s); skipped", name, error)
            continue
        if isinstance(photo, tuple):  # stereo pairs: the left view
            photo = photo[0]
        photo = np.asarray(photo)
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        photos[name] = np.ascontiguousarray(photo[..., :3].astype(np.uint8))
    if not photos:
        raise QScorerError(f"none of the skimage.data photos {', '.join(names)} could be loaded")
    return photos


# ---------------------------------------------------------------- the builder


def _check_out_dir(out_dir: Path) -> None:
    """Refuse a non-empty folder unless it holds only a previous synth output, which is then removed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise QScorerError(f"--out {out_dir} exists and is not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    marker = out_dir / "dataset.json"
    entries = {entry.name for entry in out_dir.iterdir()}
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        previous = {}
    ours = {"images", "metas", "dataset.json"}
    if not isinstance(previous, dict) or previous.get("generator") != GENERATOR or not entries <= ours:
        raise QScorerError(f"--out {out_dir} is not empty and is not a previous `qscorer synth` output")
    logger.info("replacing the previous synthetic dataset in %s", out_dir)
    for name in ("images", "metas"):
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
    marker.unlink()


def _check_names(option: str, names: tuple[str, ...], known: tuple[str, ...]) -> None:
    """Refuse an empty, unknown or repeated name in a list option such as ``--distortions``."""
    if not names:
        raise QScorerError(f"{option} is empty")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise QScorerError(f"unknown name(s) {', '.join(unknown)} in {option}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise QScorerError(f"{option} lists a name twice: {', '.join(names)}")


def _validate(num_train: int, num_test: int, image_size: int, seed: int, distortions, photos, variants_per_crop,
              gt_noise):
    if num_train < 1:
        raise QScorerError(f"--num-train must be at least 1, got {num_train}")
    if num_test < 0:
        raise QScorerError(f"--num-test must be at least 0, got {num_test}")
    if not 32 <= image_size <= 2048:
        raise QScorerError(f"--image-size must be in [32, 2048], got {image_size}")
    if seed < 0:
        raise QScorerError(f"--seed must be non-negative, got {seed}")
    if variants_per_crop < 1:
        raise QScorerError(f"variants_per_crop must be at least 1, got {variants_per_crop}")
    if gt_noise < 0:
        raise QScorerError(f"gt_noise must be non-negative, got {gt_noise}")
    _check_names("--distortions", distortions, DISTORTIONS)
    _check_names("--photos", photos, SOURCE_PHOTOS)


def _plan_split(count: int, distortions: tuple[str, ...], rng: np.random.Generator) -> list[tuple[str, float]]:
    """(distortion, strength) per image: distortions balanced, strengths stratified over [0, 1] per distortion."""
    plan = []
    for offset, distortion in enumerate(distortions):
        share = len(range(offset, count, len(distortions)))
        strata = (rng.permutation(share) + rng.random(share)) / max(share, 1)
        plan.extend((distortion, round(float(s), 4)) for s in strata)
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")


def build_synthetic_iqa(
    out_dir: str | Path,
    *,
    num_train: int = 400,
    num_test: int = 100,
    image_size: int = 256,
    seed: int = 0,
    distortions: tuple[str, ...] | list[str] = DISTORTIONS,
    photos: tuple[str, ...] | list[str] = SOURCE_PHOTOS,
    variants_per_crop: int = 4,
    gt_noise: float = 0.1,
    train_outside_corners: bool = False,
    progress: bool = True,
) -> dict:
    """Build the synthetic IQA dataset into ``out_dir`` and return its paths and counts.

    Deterministic for a seed: the metas are byte-identical and the images pixel-identical across runs. Crops come
    from ``photos`` (names of :data:`SOURCE_PHOTOS`; two builds with disjoint ``photos`` share no content). Each
    source crop serves about ``variants_per_crop`` images; ``gt_noise`` is the std of the noise added to the MOS.
    ``train_outside_corners`` keeps the train crops out of :func:`held_out_corners` as well, so that a model trained
    on this build has seen no held-out crop of any other build of the same ``image_size`` (whatever its seed).
    ``out_dir`` must be absent, empty, or a previous output of this builder (which is replaced).
    """
    distortions, photo_names = tuple(distortions), tuple(photos)
    _validate(num_train, num_test, image_size, seed, distortions, photo_names, variants_per_crop, gt_noise)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    photos = load_source_photos(photo_names)

    planner = np.random.default_rng([seed, 0])
    test_crops = _place_test_crops(photos, math.ceil(num_test / variants_per_crop), image_size, planner)
    if num_test and not test_crops:
        raise QScorerError(f"no test crop of {image_size} px fits in the source photos")
    blocked = test_crops + (held_out_corners(photos, image_size) if train_outside_corners else [])
    train_crops = _place_train_crops(photos, math.ceil(num_train / variants_per_crop), image_size, planner, blocked)
    if not train_crops:
        beside = "the test crops and the corners" if train_outside_corners else "the test crops"
        raise QScorerError(f"no train crop of {image_size} px fits in the source photos beside {beside}")
    splits = {"train": (num_train, train_crops), "test": (num_test, test_crops)}
    for split, (count, crops) in splits.items():
        if count > len(crops) * variants_per_crop:
            logger.info("only %d %s crops fit; each serves up to %d images", len(crops), split, -(-count // len(crops)))

    images_dir = out_dir / "images"
    metas_dir = out_dir / "metas"
    images_dir.mkdir(parents=True, exist_ok=True)
    metas_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict]] = {"train": [], "test": []}
    num_binary = 0
    width = max(4, len(str(max(num_train, num_test))))
    with tqdm(total=num_train + num_test, desc="synth", unit="img", disable=not progress) as bar:
        for split_index, (split, (count, crops)) in enumerate(splits.items()):
            plan = _plan_split(count, distortions, planner)
            resized: dict[int, np.ndarray] = {}
            for index, (distortion, strength) in enumerate(plan):
                crop_index = index % len(crops)
                crop = crops[crop_index]
                if crop_index not in resized:
                    left, top, right, bottom = crop.box
                    region = Image.fromarray(photos[crop.source][top:bottom, left:right])
                    resized[crop_index] = np.asarray(
                        region.resize((image_size, image_size), Image.Resampling.LANCZOS)
                    ).copy()
                rng = np.random.default_rng([seed, 1 + split_index, index])
                pixels = apply_distortion(resized[crop_index], distortion, strength, rng)
                gt, std = ground_truth(strength, rng, gt_noise)
                probs, binary = level_probs_from_mos(gt, std)
                num_binary += binary
                file_name = f"{split}_{index:0{width}d}_{distortion}.png"
                Image.fromarray(pixels).save(images_dir / file_name, format="PNG")
                records[split].append(
                    _record(file_name, gt, std, probs, distortion, strength, crop, with_answer=split == "train")
                )
                bar.update(1)

    paths = {
        "train_meta": metas_dir / "train.json",
        "train_levels_meta": metas_dir / "train_levels.json",
        "test_meta": metas_dir / "test.json",
        "dataset_json": out_dir / "dataset.json",
    }
    _write_json(paths["train_meta"], records["train"])
    _write_json(paths["train_levels_meta"], [_with_level_words(record) for record in records["train"]])
    _write_json(paths["test_meta"], records["test"])
    description = {
        "generator": GENERATOR,
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_test": num_test,
        "variants_per_crop": variants_per_crop,
        "train_outside_corners": train_outside_corners,
        "num_crops": {"train": len(train_crops), "test": len(test_crops)},
        "distortions": {name: DISTORTION_PARAMETERS[name] for name in distortions},
        "ground_truth": {
            "gt_score": f"clip(5 - 4 * strength + N(0, {gt_noise}), 1, 5), rounded to 4 decimals",
            "std": "0.35 + 0.35 * (1 - ((gt_score - 3) / 2)^2) + U(-0.05, 0.05)",
            "level": "five equal bins of gt_score on [1, 5]",
            "level_probs": "DeQA pdf mode with the affine fix (renormalised), binary fallback "
            "(thre_std 0.2, thre_diff 0.1); excellent-first",
            "num_binary_level_probs": num_binary,
        },
        "source_photos": {name: list(photo.shape[:2]) for name, photo in photos.items()},
        "metas": {key: str(path.relative_to(out_dir)) for key, path in paths.items() if key != "dataset_json"},
    }
    _write_json(paths["dataset_json"], description)
    logger.info(
        "wrote %d train and %d test images (%d + %d source crops) to %s",
        num_train,
        num_test,
        len(train_crops),
        len(test_crops),
        out_dir,
    )
    result = {key: str(path) for key, path in paths.items()}
    result.update(
        out_dir=str(out_dir),
        images_dir=str(images_dir),
        num_train=num_train,
        num_test=num_test,
        num_train_crops=len(train_crops),
        num_test_crops=len(test_crops),
        num_binary_level_probs=num_binary,
    )
    return result


def _record(file_name, gt, std, probs, distortion, strength, crop: SourceCrop, *, with_answer: bool) -> dict:
    level = mos_level(gt)
    record = {
        "id": f"{file_name}->{gt}",
        "image": f"images/{file_name}",
        "gt_score": gt,
        "gt_score_norm": gt,
        "std": std,
        "level": level,
        "level_probs": probs,
        "distortion": distortion,
        "strength": strength,
        "source": crop.source,
        "crop": list(crop.box),
    }
    if with_answer:
        record["conversations"] = [
            {"from": "human", "value": f"{SCORING_QUESTION}\n{DEFAULT_IMAGE_TOKEN}"},
            {"from": "gpt", "value": ANSWER_TEMPLATE.format(SCORE_TOKENS[level - 1])},
        ]
    record["task_type"] = "score"
    return record


def _with_level_words(record: dict) -> dict:
    """A train record answering with the level word instead of the score token (Q-Align style)."""
    copy = dict(record)
    copy["conversations"] = [
        record["conversations"][0],
        {"from": "gpt", "value": ANSWER_TEMPLATE.format(LEVEL_WORDS[record["level"] - 1])},
    ]
    return copy


__all__ = [
    "DISTORTIONS",
    "LEVEL_WORDS",
    "SOURCE_PHOTOS",
    "apply_distortion",
    "binary_level_probs",
    "build_synthetic_iqa",
    "held_out_corners",
    "level_probs_from_mos",
    "load_source_photos",
    "mos_level",
]
