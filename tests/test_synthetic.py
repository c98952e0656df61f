"""Synthetic IQA builder: determinism, meta format, DeQA soft labels, split, learnable signal."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.stats import spearmanr

pytest.importorskip("skimage")

from qscorer.cli import main as cli_main  # noqa: E402
from qscorer.constants import SCORE_TOKENS  # noqa: E402
from qscorer.data.synthetic import (  # noqa: E402
    DISTORTIONS,
    LEVEL_WORDS,
    apply_distortion,
    binary_level_probs,
    build_synthetic_iqa,
    level_probs_from_mos,
    load_source_photos,
    mos_level,
)
from qscorer.errors import QScorerError  # noqa: E402

QUESTION = "How would you rate the quality of this image?\n<|image|>"
META_FILES = ("metas/train.json", "metas/test.json", "metas/train_levels.json", "dataset.json")


def build(out, **kwargs):
    options = dict(num_train=48, num_test=12, image_size=64, seed=0, progress=False)
    options.update(kwargs)
    return build_synthetic_iqa(out, **options)


def load_meta(root: Path, name: str) -> list[dict]:
    return json.loads((root / "metas" / name).read_text())


def pixels(root: Path, record: dict) -> np.ndarray:
    with Image.open(root / record["image"]) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    build(root)
    return root


# ---------------------------------------------------------------- DeQA soft labels by hand


def hand_pdf_label(mos, std):
    """DeQA's "pdf" soft label with the affine fix, written out with math only."""
    xs = [5, 4, 3, 2, 1]
    p = [math.exp(-((x - mos) ** 2) / (2 * std * std)) / (std * math.sqrt(2 * math.pi)) for x in xs]
    a = sum(p)
    b = sum(pi * x for pi, x in zip(p, xs))
    alpha = (mos - 3) / (b - 3 * a + 1e-9)
    beta = (1 - alpha * a) / 5
    return [max(alpha * pi + beta, 0.0) for pi in p]


def test_level_bins_follow_deqa():
    # bins (1, 1.8], (1.8, 2.6], (2.6, 3.4], (3.4, 4.2], (4.2, 5] with the first one closed at 1
    cases = {1.0: 1, 1.8: 1, 1.8001: 2, 2.6: 2, 3.0: 3, 3.4: 3, 3.41: 4, 4.2: 4, 4.2001: 5, 5.0: 5}
    assert {mos: mos_level(mos) for mos in cases} == cases
    assert mos_level(60.0, 20.0, 70.0) == 4  # raw-MOS bins of width 10 from 20
    with pytest.raises(ValueError):
        mos_level(5.5)


def test_pdf_soft_label_matches_hand_computation():
    # symmetric case: mos 3.5, std 0.5 -> mass on good/fair, nothing clipped, sum and expectation exact
    probs, binary = level_probs_from_mos(3.5, 0.5)
    expected = hand_pdf_label(3.5, 0.5)
    assert not binary
    assert min(expected) > 0 and sum(expected) == pytest.approx(1.0, abs=1e-9)
    assert probs == pytest.approx(expected, abs=1e-9)
    assert probs[1] == pytest.approx(probs[2], abs=1e-12) and probs[1] > 0.45
    assert sum(p * x for p, x in zip(probs, [5, 4, 3, 2, 1])) == pytest.approx(3.5, abs=1e-8)  # 1e-9 in alpha


def test_pdf_soft_label_clipping_and_renormalisation():
    # mos 4.5, std 0.7: alpha * p + beta goes negative on bad; the clipped DeQA label sums to ~1.0256
    raw = hand_pdf_label(4.5, 0.7)
    assert raw[-1] == 0.0
    deqa, binary = level_probs_from_mos(4.5, 0.7, renormalize=False)
    assert not binary and deqa == pytest.approx(raw, abs=1e-9)
    assert sum(deqa) == pytest.approx(1.0256, abs=1e-4)
    ours, binary = level_probs_from_mos(4.5, 0.7)
    assert not binary
    assert ours == pytest.approx([p / sum(raw) for p in raw], abs=1e-9)
    assert sum(ours) == pytest.approx(1.0, abs=1e-12)
    assert abs(sum(p * x for p, x in zip(ours, [5, 4, 3, 2, 1])) - 4.5) <= 0.1
    # mos 4.8, std 0.7: DeQA keeps a label summing to ~1.0475; renormalised, its expectation is 0.15 off -> binary
    deqa, binary = level_probs_from_mos(4.8, 0.7, renormalize=False)
    assert not binary and sum(deqa) == pytest.approx(1.0475, abs=1e-4)
    ours, binary = level_probs_from_mos(4.8, 0.7)
    assert binary and ours == pytest.approx([0.8, 0.2, 0.0, 0.0, 0.0], abs=1e-12)


def test_binary_fallback():
    # std below 0.2 -> linear interpolation between the neighbouring levels, excellent-first
    probs, binary = level_probs_from_mos(3.3, 0.1)
    assert binary and probs == pytest.approx([0.0, 0.3, 0.7, 0.0, 0.0], abs=1e-12)
    # expectation too far off after the fix (mos 5, std 0.9: 0.16 away) -> binary as well
    probs, binary = level_probs_from_mos(5.0, 0.9, renormalize=False)
    assert binary and probs == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0])
    assert binary_level_probs(1.0) == pytest.approx([0.0, 0.0, 0.0, 0.0, 1.0])
    assert binary_level_probs(3.0) == pytest.approx([0.0, 0.0, 1.0, 0.0, 0.0])
    assert binary_level_probs(1.25) == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.75])


def test_cdf_soft_label():
    std = 0.6
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    p = [phi((x + 0.5 - 2.2) / std) - phi((x - 0.5 - 2.2) / std) for x in (5, 4, 3, 2, 1)]
    a, b = sum(p), sum(pi * x for pi, x in zip(p, (5, 4, 3, 2, 1)))
    alpha = (2.2 - 3) / (b - 3 * a + 1e-9)
    beta = (1 - alpha * a) / 5
    fixed = [max(alpha * pi + beta, 0.0) for pi in p]
    probs, binary = level_probs_from_mos(2.2, std, density="cdf")
    assert not binary
    assert probs == pytest.approx([f / sum(fixed) for f in fixed], abs=1e-9)


# ---------------------------------------------------------------- meta format


def test_meta_format(dataset):
    train, test, levels = (load_meta(dataset, name) for name in ("train.json", "test.json", "train_levels.json"))
    assert (len(train), len(test), len(levels)) == (48, 12, 48)
    for record in train + test:
        gt = record["gt_score"]
        assert isinstance(gt, float) and 1.0 <= gt <= 5.0
        assert record["gt_score_norm"] == gt
        assert record["id"] == f"{Path(record['image']).name}->{gt}"
        assert record["image"].startswith("images/") and (dataset / record["image"]).is_file()
        assert record["task_type"] == "score"
        assert record["distortion"] in DISTORTIONS and 0.0 <= record["strength"] <= 1.0
        assert 0.2 < record["std"] < 0.8
        level = min(max(math.ceil((gt - 1) / 0.8 - 1e-8), 1), 5)
        assert record["level"] == level
        probs = record["level_probs"]
        assert len(probs) == 5 and min(probs) >= 0 and sum(probs) == pytest.approx(1.0, abs=1e-9)
        assert abs(sum(p * x for p, x in zip(probs, (5, 4, 3, 2, 1))) - gt) <= 0.1 + 1e-9
        assert pixels(dataset, record).shape == (64, 64, 3)
    for record in train:
        assert record["conversations"] == [
            {"from": "human", "value": QUESTION},
            {"from": "gpt", "value": f"The quality of the image is {SCORE_TOKENS[record['level'] - 1]}."},
        ]
    assert all("conversations" not in record for record in test)
    for record, level_record in zip(train, levels):
        assert {k: v for k, v in level_record.items() if k != "conversations"} == {
            k: v for k, v in record.items() if k != "conversations"
        }
        word = LEVEL_WORDS[record["level"] - 1]
        assert level_record["conversations"][1]["value"] == f"The quality of the image is {word}."
    description = json.loads((dataset / "dataset.json").read_text())
    assert description["seed"] == 0 and description["num_train"] == 48 and description["num_test"] == 12
    assert list(description["distortions"]) == list(DISTORTIONS)
    assert description["source_photos"]


def test_levels_and_distortions_are_balanced(dataset):
    train = load_meta(dataset, "train.json")
    counts = {name: sum(r["distortion"] == name for r in train) for name in DISTORTIONS}
    assert set(counts.values()) == {8}
    assert {r["level"] for r in train} == {1, 2, 3, 4, 5}


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_pixels(dataset, tmp_path):
    again = tmp_path / "again"
    build(again)
    for name in META_FILES:
        assert (again / name).read_bytes() == (dataset / name).read_bytes(), name
    for record in load_meta(dataset, "train.json") + load_meta(dataset, "test.json"):
        assert np.array_equal(pixels(again, record), pixels(dataset, record)), record["image"]


def test_other_seed_differs(dataset, tmp_path):
    other = tmp_path / "other"
    build(other, seed=1)
    assert (other / "metas/train.json").read_bytes() != (dataset / "metas/train.json").read_bytes()
    first, other_first = load_meta(dataset, "train.json")[0], load_meta(other, "train.json")[0]
    assert not np.array_equal(pixels(other, other_first), pixels(dataset, first))


# ---------------------------------------------------------------- split


def overlapping(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_no_content_leaks_between_train_and_test(dataset):
    train, test = load_meta(dataset, "train.json"), load_meta(dataset, "test.json")
    photos = load_source_photos()
    test_boxes = {(r["source"], tuple(r["crop"])) for r in test}
    train_boxes = {(r["source"], tuple(r["crop"])) for r in train}
    assert test_boxes and not test_boxes & train_boxes
    for source, (left, top, right, bottom) in test_boxes | train_boxes:
        height, width = photos[source].shape[:2]
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert right - left == bottom - top
    for test_source, t in test_boxes:
        for train_source, b in train_boxes:
            if test_source == train_source:
                assert not overlapping(t, b), (test_source, t, b)
    # test crops are disjoint from each other too
    boxes = sorted(test_boxes)
    for i, (source_i, t) in enumerate(boxes):
        for source_j, u in boxes[i + 1 :]:
            if source_i == source_j:
                assert not overlapping(t, u)


def test_train_outside_corners_shares_no_pixel_with_any_builds_test_crops(tmp_path):
    """Test crops of builds with other seeds and counts all lie in the corners that such a build's train crops avoid."""
    pretraining = build(tmp_path / "pre", num_train=160, num_test=0, seed=7, train_outside_corners=True)
    train = load_meta(Path(pretraining["out_dir"]), "train.json")
    assert len(train) == 160 and json.loads(Path(pretraining["dataset_json"]).read_text())["train_outside_corners"]
    photos = load_source_photos()
    side = round(1.25 * 64)
    for seed, num_test in ((0, 12), (1, 40), (5, 100)):
        test = load_meta(Path(build(tmp_path / f"held{seed}", num_train=4, num_test=num_test, seed=seed)["out_dir"]),
                         "test.json")
        for held in test:
            height, width = photos[held["source"]].shape[:2]
            left, top, right, bottom = held["crop"]
            assert (left == 0 or right == width) and (top == 0 or bottom == height) and right - left <= side
            assert not any(r["source"] == held["source"] and overlapping(r["crop"], held["crop"]) for r in train)


# ---------------------------------------------------------------- quality signal


def test_gt_decreases_with_strength_per_distortion(dataset):
    records = load_meta(dataset, "train.json") + load_meta(dataset, "test.json")
    for name in DISTORTIONS:
        subset = [r for r in records if r["distortion"] == name]
        strengths = [r["strength"] for r in subset]
        gts = [r["gt_score"] for r in subset]
        assert spearmanr(strengths, gts)[0] < -0.9, name
        median = float(np.median(strengths))
        weak = np.mean([g for s, g in zip(strengths, gts) if s <= median])
        strong = np.mean([g for s, g in zip(strengths, gts) if s > median])
        assert weak > strong + 1.0, name


def test_distortion_grows_with_strength():
    photo = load_source_photos(("astronaut",))["astronaut"]
    crop = np.asarray(Image.fromarray(photo[100:356, 100:356]).resize((128, 128), Image.Resampling.LANCZOS))
    for name in DISTORTIONS:
        errors = []
        for strength in (0.0, 0.3, 0.8):
            out = apply_distortion(crop, name, strength, np.random.default_rng(0))
            assert out.shape == crop.shape and out.dtype == np.uint8
            errors.append(float(((out.astype(float) - crop) ** 2).mean()))
        assert errors[0] < errors[1] < errors[2], (name, errors)
        if name != "jpeg":  # JPEG at quality 90 is not lossless
            assert errors[0] == 0.0, name


def sharpness(image: np.ndarray) -> float:
    """Laplacian energy over gradient energy: a content-normalised sharpness statistic."""
    grey = image.astype(float).mean(axis=2)
    gy, gx = np.gradient(grey)
    return float(np.log(ndimage.laplace(grey).var() / (gx.var() + gy.var())))


def noise_level(image: np.ndarray) -> float:
    """Immerkaer's fast noise estimate (mean absolute response of a Laplacian-difference mask)."""
    grey = image.astype(float).mean(axis=2)
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=float)
    return float(np.abs(ndimage.convolve(grey, mask)[1:-1, 1:-1]).mean())


@pytest.mark.parametrize(
    ("distortion", "statistic", "size", "sign"), [("blur", sharpness, 96, 1), ("noise", noise_level, 64, -1)]
)
def test_quality_is_learnable_from_pixels(tmp_path, distortion, statistic, size, sign):
    root = tmp_path / distortion
    build(root, num_train=24, num_test=0, image_size=size, distortions=[distortion])
    records = load_meta(root, "train.json")
    values = [statistic(pixels(root, r)) for r in records]
    assert sign * spearmanr(values, [r["gt_score"] for r in records])[0] > 0.7


# ---------------------------------------------------------------- input checks, rebuild, CLI


def test_bad_input_raises_qscorer_error(tmp_path):
    with pytest.raises(QScorerError, match="sharpen"):
        build(tmp_path / "a", distortions=["blur", "sharpen"])
    with pytest.raises(QScorerError, match="--num-train"):
        build(tmp_path / "b", num_train=0)
    with pytest.raises(QScorerError, match="--image-size"):
        build(tmp_path / "c", image_size=8)
    with pytest.raises(QScorerError, match="lena"):
        build(tmp_path / "d", photos=["camera", "lena"])
    with pytest.raises(QScorerError, match="twice"):
        build(tmp_path / "e", photos=["camera", "camera"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(QScorerError, match="not a previous"):
        build(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(QScorerError, match="not a folder"):
        build(not_a_folder)


def test_rebuild_replaces_previous_output(tmp_path):
    root = tmp_path / "data"
    build(root, num_train=12, num_test=6)
    build(root, num_train=6, num_test=0, seed=3)
    assert len(load_meta(root, "train.json")) == 6 and load_meta(root, "test.json") == []
    assert len(list((root / "images").iterdir())) == 6
    assert json.loads((root / "dataset.json").read_text())["seed"] == 3


def test_cli(tmp_path, capsys):
    root = tmp_path / "cli"
    args = ["synth", "--out", str(root), "--num-train", "6", "--num-test", "3", "--image-size", "48"]
    assert cli_main(args + ["--seed", "2", "--distortions", "blur, noise", "--photos", "camera,coffee"]) == 0
    assert capsys.readouterr().out.strip() == str(root)
    train, test = load_meta(root, "train.json"), load_meta(root, "test.json")
    assert len(train) == 6 and {r["distortion"] for r in train} == {"blur", "noise"}
    assert {r["source"] for r in train + test} == {"camera", "coffee"}
    assert json.loads((root / "dataset.json").read_text())["seed"] == 2
    assert cli_main(["synth", "--out", str(tmp_path / "bad"), "--distortions", "blur,warp"]) == 2
    assert "warp" in capsys.readouterr().err
