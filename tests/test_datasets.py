"""Meta records -> training batches (prompts, label masks, items, collators): parity with the original, validation."""

import json
import logging
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from qscorer.data import (
    PairCollator,
    PairDataset,
    SingleCollator,
    SingleDataset,
    load_meta,
    mask_targets,
    preprocess,
)
from qscorer.data.conversation import build_training_prompt, place_images_first
from qscorer.data.tokenization import tokenizer_image_token
from qscorer.errors import QScorerError

QUESTION = "How would you rate the quality of this image?\n<|image|>"


@pytest.fixture
def golden_training(golden_dir):
    return json.loads((golden_dir / "training.json").read_text())["preprocessing"]


def _record(image, answer="The quality of the image is <score3>.", **fields):
    return {"image": image, "conversations": [{"from": "human", "value": QUESTION},
                                              {"from": "gpt", "value": answer}], "gt_score": 3.0, **fields}


def _write(path, records, jsonl=False):
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """Six small images of different sizes and colours: img0.png .. img5.png."""
    folder = tmp_path / "images"
    folder.mkdir()
    for number in range(6):
        Image.new("RGB", (20 + 10 * number, 30), (40 * number, 10, 200 - 30 * number)).save(folder / f"img{number}.png")
    return folder


def test_golden_samples_and_batch(tokenizer, golden_dir, parity_images_dir, golden_training):
    dataset = SingleDataset([golden_dir / "train_meta.json"], tokenizer, data_weights=[1],
                            image_folder=parity_images_dir, image_aspect_ratio="pad")
    items = [dataset[index] for index in range(len(dataset))]
    for item, golden in zip(items, golden_training["samples"]):
        assert item["input_ids"].tolist() == golden["input_ids"]
        assert item["labels"].tolist() == golden["labels"]
        assert item["input_ids"].tolist().index(-200) == golden["image_index"]
        assert [i for i, label in enumerate(item["labels"].tolist()) if label != -100] == golden["supervised_positions"]
        assert (item["task_type"], item["gt_score"]) == (golden["task_type"], golden["gt_score"])
        assert list(item["image"].shape) == golden["image_shape"]
        assert item["image"].double().mean().item() == pytest.approx(golden["image_mean"], abs=1e-6)
    batch = SingleCollator.from_tokenizer(tokenizer)(items)
    expected = golden_training["batch"]
    assert batch["input_type"] == expected["input_type"]
    assert list(batch["input_ids"].shape) == expected["input_ids_shape"]
    assert batch["attention_mask"].int().tolist() == expected["attention_mask"]
    assert batch["gt_scores"].dtype == torch.float32 and batch["gt_scores"].tolist() == expected["gt_scores"]
    assert list(batch["images"].shape) == expected["images_shape"]
    assert batch["task_types"] == expected["task_types"]
    assert torch.equal(batch["labels"][0], items[0]["labels"])


def test_jsonl_and_weights(tmp_path, tokenizer, image_folder):
    first = _write(tmp_path / "a.json", [_record("img0.png"), _record("img1.png", gt_score=1.5)])
    second = _write(tmp_path / "b.jsonl", [_record("img2.png", gt_score=4.0)], jsonl=True)
    dataset = SingleDataset([first, second], tokenizer, data_weights=[2, 3], image_folder=image_folder)
    assert [record.images[0] for record in dataset.records] == ["img0.png", "img1.png"] * 2 + ["img2.png"] * 3
    assert [dataset[index]["gt_score"] for index in (1, 4)] == [1.5, 4.0]
    assert len(SingleDataset([first, second], tokenizer, image_folder=image_folder)) == 3  # weights default to 1
    with pytest.raises(QScorerError, match="2 meta files but 1 data_weights"):
        SingleDataset([first, second], tokenizer, data_weights=[1])
    with pytest.raises(QScorerError, match="data weight of .*a.json must be an integer"):
        SingleDataset([first, second], tokenizer, data_weights=[1.5, 1])
    with pytest.raises(QScorerError, match="training set is empty"):
        SingleDataset([first], tokenizer, data_weights=[0])


def test_modality_lengths_count_words(tmp_path, tokenizer):
    meta = _write(tmp_path / "m.json", [_record("x.png"), _record("y.png", answer="Bad.")])
    # "How would you rate the quality of this image? <|image|>" = 10 words; answers 7 and 1 words.
    assert SingleDataset([meta], tokenizer).modality_lengths == [17, 11]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"conversations": []}, "record 1: no 'image'"),
        (_record(5), "record 1: 'image' must be a path"),
        (_record(["a.png", 3]), "record 1: 'image' must be a path"),
        ({**_record("a.png"), "gt_score": None}, "record 1: a score record needs a numeric 'gt_score'"),
        ({k: v for k, v in _record("a.png").items() if k != "gt_score"}, "needs a numeric 'gt_score'"),
        (_record("a.png", gt_score="3.2"), "'gt_score' must be a finite number, got '3.2'"),
        (_record("a.png", gt_score=float("nan")), "'gt_score' must be a finite number"),
        (_record("a.png", task_type="rank"), "unknown task_type 'rank'"),
        ({**_record("a.png"), "conversations": "hi"}, "'conversations' must be a non-empty list"),
        ({**_record("a.png"), "conversations": [{"from": "bot", "value": "x"}]}, "message 0 must be"),
        ({**_record("a.png"), "conversations": [{"from": "human", "value": QUESTION}]}, "no answer from 'gpt'"),
        ({**_record("a.png"), "conversations": [{"from": "human", "value": QUESTION}] * 2}, "must alternate"),
        ({**_record("a.png"), "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
         r"no <\|image\|> placeholder"),
        ("just a string", "record 1: a record must be a JSON object"),
    ],
)
def test_invalid_records_are_named(tmp_path, record, message):
    meta = _write(tmp_path / "bad.json", [_record("ok.png"), record])
    with pytest.raises(QScorerError, match=f"bad.json {message}" if message.startswith("record") else message):
        load_meta(meta)


def test_unreadable_meta_files(tmp_path):
    with pytest.raises(QScorerError, match="cannot read .*none.json: no such file"):
        load_meta(tmp_path / "none.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(QScorerError, match="broken.json is not valid JSON"):
        load_meta(tmp_path / "broken.json")
    (tmp_path / "broken.jsonl").write_text('{"image": "a"}\n{oops\n')
    with pytest.raises(QScorerError, match="broken.jsonl line 2: not valid JSON"):
        load_meta(tmp_path / "broken.jsonl")


def test_description_records(tmp_path, tokenizer, image_folder):
    meta = _write(tmp_path / "d.json", [
        {"image": "img0.png", "task_type": "description",
         "conversations": [{"from": "human", "value": "Describe.\n<|image|>"}, {"from": "gpt", "value": "Sharp."}]},
        {"image": "img1.png", "task_type": "description",
         "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "It is <score2>."}]},
    ])
    dataset = SingleDataset([meta], tokenizer, image_folder=image_folder)
    item = dataset[0]
    assert item["task_type"] == "description" and math.isnan(item["gt_score"])
    assert math.isnan(SingleCollator()([item])["gt_scores"][0].item())
    with pytest.raises(QScorerError, match="d.json record 1: the answer has a score token but .*no 'gt_score'"):
        dataset[1]


def test_unreadable_images_stop_by_default(tmp_path, tokenizer, image_folder):
    meta = _write(tmp_path / "m.json", [_record("img0.png"), _record("gone.png"), _record("img2.png")])
    dataset = SingleDataset([meta], tokenizer, image_folder=image_folder)
    with pytest.raises(QScorerError, match=r"m.json record 1: image file not found: .*gone.png"):
        dataset[1]


def test_skip_policy_substitutes_the_next_readable_record(tmp_path, tokenizer, image_folder, caplog):
    meta = _write(tmp_path / "m.json", [_record("img0.png"), _record("gone.png"), _record("img2.png", gt_score=4.5)])
    dataset = SingleDataset([meta], tokenizer, image_folder=image_folder, on_unreadable="skip")
    with caplog.at_level(logging.WARNING, logger="qscorer.data.datasets"):
        item = dataset[1]
    assert item["gt_score"] == 4.5 and torch.equal(item["image"], dataset[2]["image"])
    assert "m.json record 1" in caplog.text and "gone.png" in caplog.text
    with pytest.raises(QScorerError, match="on_unreadable must be one of"):
        SingleDataset([meta], tokenizer, on_unreadable="random")


def test_image_list_gets_one_placeholder_per_image(tmp_path, tokenizer, image_folder, golden_training):
    meta = _write(tmp_path / "m.json", [_record(["img0.png", "img3.png"]), _record("img1.png")])
    dataset = SingleDataset([meta], tokenizer, image_folder=image_folder)
    pair, single = dataset[0], dataset[1]
    assert pair["image"].shape == (2, 3, 448, 448)
    assert torch.equal(pair["image"][1], dataset.load_pixels(load_meta(meta)[0])[1])
    golden = golden_training["samples"][0]
    expected_ids = golden["input_ids"][:36] + [-200] + golden["input_ids"][36:60] + [32002] + golden["input_ids"][61:]
    assert pair["input_ids"].tolist() == expected_ids  # "<score3>" answer instead of the golden's first record's
    assert pair["labels"].tolist()[54:] == expected_ids[54:] and set(pair["labels"].tolist()[:54]) == {-100}
    batch = SingleCollator.from_tokenizer(tokenizer)([pair, single])
    assert isinstance(batch["images"], list) and [image.shape[0] for image in batch["images"]] == [2, 1]


def test_label_masking_mismatch_masks_everything(tokenizer, caplog):
    conversations = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "Good <score4>."}]
    prompt = build_training_prompt(place_images_first(conversations, 1))
    input_ids = tokenizer_image_token(prompt, tokenizer)
    labels = mask_targets(prompt, input_ids, tokenizer, source="probe")
    assert [tokenizer.convert_ids_to_tokens(i) for i in labels if i != -100] == ["▁Good", "▁", "<score4>", ".", "</s>"]
    with caplog.at_level(logging.WARNING, logger="qscorer.data.datasets"):
        masked = mask_targets(prompt, input_ids + [2], tokenizer, source="meta.json record 7")
    assert masked == [-100] * (len(input_ids) + 1)
    assert "meta.json record 7: tokenization mismatch (58 vs 59 ids)" in caplog.text


def test_multi_round_and_text_only_masking(tokenizer):
    conversations = [{"from": "human", "value": "<|image|>\nQ1?"}, {"from": "gpt", "value": "A1 <score3>."},
                     {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "A2."}]
    ids, labels = preprocess(conversations, tokenizer)
    kept = [tokenizer.convert_ids_to_tokens(i) for i in labels if i != -100]
    assert kept == ["▁A", "1", "▁", "<score3>", ".", "</s>", "▁A", "2", ".", "</s>"]
    # Text only, the original's "- 2" leaves the instruction's trailing lone "▁" uncounted, so the answer's first
    # token is masked too (not reached by Q-Scorer, whose records all have an image; kept as the original does it).
    text_ids, text_labels = preprocess(conversations[2:], tokenizer, n_images=0)
    assert -200 not in text_ids
    assert [tokenizer.convert_ids_to_tokens(i) for i in text_labels if i != -100] == ["2", ".", "</s>"]


def test_literal_unk_is_not_padding(tmp_path, tokenizer, image_folder):
    meta = _write(tmp_path / "m.json", [_record("img0.png", answer="It is <unk> <score3>."),
                                        _record("img1.png", answer="Bad.")])
    dataset = SingleDataset([meta], tokenizer, image_folder=image_folder)
    item = dataset[0]
    assert 0 in item["input_ids"].tolist() and 0 in item["labels"].tolist()  # supervised, not a mismatch
    batch = SingleCollator.from_tokenizer(tokenizer)([item, dataset[1]])
    assert batch["attention_mask"][0].all() and batch["input_ids"].shape[1] == len(item["input_ids"])
    short = len(dataset[1]["input_ids"])
    assert batch["attention_mask"][1].tolist() == [True] * short + [False] * (len(item["input_ids"]) - short)
    assert set(batch["input_ids"][1, short:].tolist()) == {0} and set(batch["labels"][1, short:].tolist()) == {-100}


def test_collator_truncates_to_model_max_length():
    items = [{"input_ids": torch.arange(1, 8), "labels": torch.arange(1, 8), "image": torch.zeros(1, 3, 2, 2),
              "task_type": "score", "gt_score": 1}]
    batch = SingleCollator(pad_token_id=0, model_max_length=5)(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]] and batch["labels"].shape == (1, 5)
    assert batch["attention_mask"].shape == (1, 5) and batch["images"].shape == (1, 1, 3, 2, 2)


def test_items_fit_the_context_after_image_expansion(tmp_path, tokenizer, image_folder, caplog):
    meta = _write(tmp_path / "m.json", [_record("img0.png")])
    # 63 ids + 64 extra visual rows = 127 > 100: keep 100 - 64 = 36 ids (the image id is at 35).
    with caplog.at_level(logging.WARNING):
        item = SingleDataset([meta], tokenizer, image_folder=image_folder, model_max_length=100)[0]
    assert len(item["input_ids"]) == 36 and item["input_ids"][35] == -200 and "truncated" in caplog.text
    with pytest.raises(QScorerError, match="m.json record 0: 1 image.*cut off an image"):
        SingleDataset([meta], tokenizer, image_folder=image_folder, model_max_length=90)[0]


def test_dataset_pickles_for_worker_processes(tmp_path, tokenizer, image_folder):
    meta = _write(tmp_path / "m.json", [_record("img0.png"), _record("img1.png")])
    dataset = SingleDataset([meta], tokenizer, image_folder=image_folder)
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[1]["input_ids"], dataset[1]["input_ids"])
    assert torch.equal(clone[1]["image"], dataset[1]["image"])


def test_square_aspect_ratio_skips_padding(tmp_path, tokenizer, image_folder):
    meta = _write(tmp_path / "m.json", [_record("img0.png")])
    padded = SingleDataset([meta], tokenizer, image_folder=image_folder)[0]["image"]
    cropped = SingleDataset([meta], tokenizer, image_folder=image_folder, image_aspect_ratio="square")[0]["image"]
    assert not torch.equal(padded, cropped)
    assert np.allclose(cropped[0, :, 0, 0].numpy(), cropped[0, :, 224, 224].numpy())  # uniform image, no border


def _pair_meta(path, names, scores):
    return _write(path, [_record(name, gt_score=score, gt_score_norm=score + 1, std_norm=0.5 + score / 10)
                         for name, score in zip(names, scores)])


def test_pairs_come_from_the_same_meta(tmp_path, tokenizer, image_folder):
    first = _pair_meta(tmp_path / "a.json", ["img0.png", "img1.png", "img2.png"], [1.0, 2.0, 3.0])
    second = _pair_meta(tmp_path / "b.json", ["img3.png", "img4.png", "img5.png"], [3.5, 4.0, 4.5])
    dataset = PairDataset([first, second], tokenizer, image_folder=image_folder, seed=3)
    assert len(dataset) == 6 and dataset.modality_lengths == SingleDataset([first, second], tokenizer).modality_lengths
    draws = []
    for index in range(6):
        item = dataset[index]
        a_score, b_score = item["item_A"]["gt_score"], item["item_B"]["gt_score"]
        assert a_score == dataset.records[index].gt_score and a_score != b_score
        assert (a_score < 3.2) == (b_score < 3.2)  # same meta file
        assert item["item_B"]["gt_score_norm"] == b_score + 1 and item["item_B"]["std"] == 0.5 + b_score / 10
        draws.append(b_score)
    assert [dataset[index]["item_B"]["gt_score"] for index in range(6)] == draws  # deterministic
    epochs = []
    for epoch in range(1, 6):
        dataset.set_epoch(epoch)
        epochs.append([dataset[index]["item_B"]["gt_score"] for index in range(6)])
    assert any(draw != draws for draw in epochs)

    dataset.set_epoch(0)
    batch = PairCollator.from_tokenizer(tokenizer)([dataset[0], dataset[4]])
    assert batch["input_type"] == "pair"
    for half in ("A", "B"):
        assert batch[f"item_{half}"]["input_type"] == "single"
        assert batch[f"item_{half}"]["images"].shape == (2, 1, 3, 448, 448)
        assert batch[f"gt_scores_norm_{half}"].dtype == torch.float32 and batch[f"stds_{half}"].shape == (2,)
    assert batch["gt_scores_norm_A"].tolist() == [2.0, 5.0]
    assert batch["item_A"]["gt_scores"].tolist() == [1.0, 4.0]


def test_pair_validation(tmp_path, tokenizer):
    lonely = _pair_meta(tmp_path / "one.json", ["img0.png"], [1.0])
    with pytest.raises(QScorerError, match="one.json has 1 record.*at least 2"):
        PairDataset([lonely], tokenizer)
    missing = _write(tmp_path / "m.json", [_record("img0.png", gt_score_norm=2.0), _record("img1.png")])
    with pytest.raises(QScorerError, match="m.json record 0: pair training needs a numeric 'std_norm'"):
        PairDataset([missing], tokenizer)


def test_video_record(tmp_path, tokenizer):
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "clip.mp4"), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for value in (0, 120, 240):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), value, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    meta = _write(tmp_path / "m.json", [_record("clip.mp4")])
    item = SingleDataset([meta], tokenizer, image_folder=tmp_path)[0]
    assert item["image"].shape == (3, 3, 448, 448)
    assert item["input_ids"].tolist().count(-200) == 3
