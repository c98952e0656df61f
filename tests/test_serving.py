"""The scoring service: parity with the original's numbers through HTTP, dynamic batching under load, bad input,
overload, the API key and the API description."""

import base64
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
from serving_helpers import get, png_bomb, post, post_files, service_checkpoint, serving_or_skip, write_images

from qscorer.client import Client, ServiceError
from qscorer.constants import SCORE_TOKENS_REPORT_ORDER
from qscorer.errors import QScorerError
from qscorer.scoring import Scorer

serving = serving_or_skip()
ServeSettings, background_server, create_app = serving.ServeSettings, serving.background_server, serving.create_app


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return service_checkpoint(tmp_path_factory.mktemp("tiny_service"), seed=23)


@pytest.fixture(scope="module")
def tiny_scorer(tiny_folder):
    return Scorer(tiny_folder, device="cpu", dtype="float32", clamp=False, batch_size=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("service_images"), 12)


@pytest.fixture(scope="module")
def expected(tiny_scorer, images):
    """In-process results (``qscorer score``'s path), by file name."""
    results = Scorer.from_model(tiny_scorer.model, tiny_scorer.tokenizer, clamp=False, batch_size=1).score(images)
    return {path.name: result for path, result in zip(images, results)}


def assert_same_result(record: dict, reference, tolerance: float = 1e-5) -> None:
    assert record["image"] == reference.image.rsplit("/", 1)[-1]
    assert record["score"] == pytest.approx(reference.score, abs=tolerance)
    assert list(record["logits"]) == list(SCORE_TOKENS_REPORT_ORDER) == list(record["probs"])
    for token in SCORE_TOKENS_REPORT_ORDER:
        assert record["logits"][token] == pytest.approx(reference.logits[token], abs=tolerance)
        assert record["probs"][token] == pytest.approx(reference.probs[token], abs=1e-9, rel=1e-4)
    assert record["token_id"] == reference.token_id


def test_goldens_of_the_original_through_the_service(parity_dir, golden_dir, parity_images_dir):
    golden = [json.loads(line) for line in (golden_dir / "iqa_eval_lora_bs1.jsonl").read_text().splitlines()]
    files = [(record["image"], (parity_images_dir / record["image"]).read_bytes()) for record in golden]
    scorer = Scorer(parity_dir / "qscorer_lora", parity_dir / "base", device="cpu", dtype="float32", batch_size=3)

    def check(records):
        assert [record["image"] for record in records] == [record["image"] for record in golden]
        for record, expected in zip(records, golden, strict=True):
            assert set(record) == {"image", "score", "logits", "probs", "token_id"}
            assert record["score"] == pytest.approx(expected["score"], abs=1e-5)
            for token in SCORE_TOKENS_REPORT_ORDER:
                assert record["logits"][token] == pytest.approx(expected["logits"][token], abs=1e-5)
                assert record["probs"][token] == pytest.approx(expected["probs"][token], abs=1e-9, rel=1e-4)

    app = create_app(scorer, ServeSettings(max_wait_ms=300))
    with background_server(app) as url:
        status, body, _ = post_files(url + "/score", files)
        assert status == 200
        check(body["results"])
        encoded = {"images": [base64.b64encode(data).decode() for _, data in files]}
        encoded["images"][1] = "data:image/jpeg;base64," + encoded["images"][1]  # data: URLs are taken too
        status, body, _ = post(url + "/score", json.dumps(encoded).encode(), "application/json")
        assert status == 200 and [record["image"] for record in body["results"]] == ["images[0]", "images[1]",
                                                                                     "images[2]"]
        for record, (name, _) in zip(body["results"], files):
            record["image"] = name
        check(body["results"])
        with ThreadPoolExecutor(3) as pool:  # three one-image requests at once share one batch
            singles = list(pool.map(lambda file: post_files(url + "/score", [file])[1]["results"][0], files))
        check(singles)
        assert get(url + "/health")[1]["batch_sizes"] == {"3": 3}

    one_at_a_time = Scorer.from_model(scorer.model, scorer.tokenizer, batch_size=1)
    with background_server(create_app(one_at_a_time, ServeSettings(max_wait_ms=300))) as url:
        status, body, _ = post_files(url + "/score", files)
        assert status == 200
        check(body["results"])
        assert get(url + "/health")[1]["batch_sizes"] == {"1": 3}


def test_concurrent_clients_get_exactly_their_own_images(tiny_scorer, images, expected):
    """8 clients x 6 requests of 1-4 images: 0 failed, 0 lost, 0 mismatched, and requests shared batches."""
    rng = random.Random(0)
    plans = [[rng.sample(images, rng.randint(1, 4)) for _ in range(6)] for _ in range(8)]
    scores = [result.score for result in expected.values()]
    assert min(abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1:]) > 1e-4  # a swap would show

    def client_run(requests, client):
        return [(request, client.results(request)) for request in requests]

    with background_server(create_app(tiny_scorer, ServeSettings(max_wait_ms=20))) as url:
        client = Client(url, timeout=60)
        with ThreadPoolExecutor(len(plans)) as pool:
            futures = [pool.submit(client_run, requests, client) for requests in plans]
            done, not_done = wait(futures, timeout=240)
        assert not not_done
        answered = [pair for future in futures for pair in future.result()]
        batch_sizes = {int(size): count for size, count in get(url + "/health")[1]["batch_sizes"].items()}
    assert len(answered) == 48
    for request, records in answered:
        assert len(records) == len(request)
        for path, record in zip(request, records, strict=True):
            assert record["image"] == path.name
            assert_same_result(record, expected[path.name])
    assert sum(size * count for size, count in batch_sizes.items()) == sum(len(request) for request, _ in answered)
    assert max(batch_sizes) == 4


@pytest.fixture(scope="module")
def guarded_url(tiny_scorer):
    settings = ServeSettings(max_image_bytes=60_000, max_images_per_request=5, max_queue=16)
    with background_server(create_app(tiny_scorer, settings)) as url:
        yield url


BAD_REQUESTS = {
    "non-image part": (lambda good: [good, ("notes.txt", b"just some text")], 422, "images[1] (notes.txt)"),
    "empty part": (lambda good: [("empty.png", b""), good], 422, "images[0] (empty.png)"),
    "truncated jpeg": (lambda good: [good, ("cut.jpg", good[1][: len(good[1]) // 2])], 422, "images[1] (cut.jpg)"),
    "decompression bomb": (lambda good: [("bomb.png", png_bomb())], 422, "images[0] (bomb.png)"),
    "part over max-image-bytes": (lambda good: [good, ("big.bin", b"\xff" * 60_001)], 413, "images[1] (big.bin)"),
    "too many images": (lambda good: [good] * 6, 400, None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_parts_get_a_4xx_naming_the_part_and_the_service_goes_on(guarded_url, images, expected, case):
    make, status, part = BAD_REQUESTS[case]
    good = (images[3].name, images[3].read_bytes())
    assert good[1][:2] == b"\xff\xd8"  # a JPEG, so cutting it truncates it
    code, body, _ = post_files(guarded_url + "/score", make(good))
    assert code == status
    assert body["part"] == part and (part is None or part in body["error"])
    code, body, _ = post_files(guarded_url + "/score", [good])
    assert code == 200
    assert_same_result(body["results"][0], expected[good[0]])


@pytest.mark.parametrize(
    "body, content_type, status, words",
    [
        (b'{"images": ["abc', "application/json", 400, "malformed JSON"),
        (b'{"images": ["not base64!"]}', "application/json", 400, "images[0] is not valid base64"),
        (b'{"images": [7]}', "application/json", 400, "images[0] must be a base64 string"),
        (b'{"pictures": []}', "application/json", 400, 'object {"images"'),
        (b'{"images": []}', "application/json", 400, "no images"),
        (b"--b\r\nContent-Disposition: form-data; name=\"images\"\r\n\r\nhello\r\n--b--\r\n",
         "multipart/form-data; boundary=b", 400, "images[0] is a text field, not a file"),
        (b"images=1", "application/x-www-form-urlencoded", 415, "unsupported content type"),
        (b"--b\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"a.png\"\r\n\r\nxx\r\n--b--\r\n",
         "multipart/form-data; boundary=b", 400, "unexpected form field 'photo'"),
        (b"x" * 600_000, "application/json", 413, "request body"),
    ],
)
def test_malformed_bodies_get_a_4xx_and_the_service_goes_on(guarded_url, images, expected, body, content_type,
                                                          status, words):
    code, answer, _ = post(guarded_url + "/score", body, content_type)
    assert code == status and words in answer["error"]
    encoded = base64.b64encode(images[0].read_bytes()).decode()
    code, answer, _ = post(guarded_url + "/score", json.dumps({"images": [encoded]}).encode(), "application/json")
    assert code == 200
    assert answer["results"][0]["image"] == "images[0]"
    assert answer["results"][0]["score"] == pytest.approx(expected[images[0].name].score, abs=1e-5)


def test_streamed_body_over_the_limit_gets_413(guarded_url):
    chunks = (b"x" * 50_000 for _ in range(12))  # no Content-Length: sent chunked, counted as it arrives
    code, answer, _ = post(guarded_url + "/score", chunks, "application/json")
    assert code == 413 and "request body of" in answer["error"]
    assert get(guarded_url + "/health")[0] == 200


def test_api_key(tiny_scorer, images, expected):
    good = [(images[0].name, images[0].read_bytes())]
    with background_server(create_app(tiny_scorer, ServeSettings(api_key="s3cret"))) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            code, body, answer_headers = post_files(url + "/score", good, headers)
            assert code == 401 and "API key" in body["error"] and answer_headers["WWW-Authenticate"] == "Bearer"
            assert get(url + "/info", headers)[0] == 401
        status, health = get(url + "/health")
        assert status == 200 and health["api_key_required"] is True
        code, body, _ = post_files(url + "/score", good, {"Authorization": "Bearer s3cret"})
        assert code == 200 and body["results"][0]["score"] == pytest.approx(expected[images[0].name].score, abs=1e-5)
        assert Client(url, api_key="s3cret").info()["model"]["kind"] == "full"
        with pytest.raises(ServiceError, match="401 wrong API key") as error:
            Client(url, api_key="wrong").score(images[0])
        assert error.value.status == 401


def test_full_queue_answers_503_with_retry_after(tiny_scorer, images, expected):
    scorer = Scorer.from_model(tiny_scorer.model, tiny_scorer.tokenizer, clamp=False, batch_size=4)
    release = threading.Event()
    predict = scorer.predict

    def predict_when_released(pixels):
        assert release.wait(60)
        return predict(pixels)

    scorer.predict = predict_when_released
    files = [(path.name, path.read_bytes()) for path in images[:3]]
    settings = ServeSettings(max_queue=3, max_images_per_request=3, max_wait_ms=0)
    with background_server(create_app(scorer, settings)) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post_files, url + "/score", files)
        deadline = time.monotonic() + 30
        while get(url + "/health")[1]["queued_images"] < 3:
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.02)
        code, body, headers = post_files(url + "/score", files[:1])
        assert code == 503 and headers["Retry-After"] == "1" and "queue" in body["error"]
        retrying = pool.submit(Client(url, retries=30).score, images[0])
        time.sleep(0.3)
        release.set()
        code, body, _ = first.result(timeout=60)
        assert code == 200
        for record, path in zip(body["results"], images[:3]):
            assert_same_result(record, expected[path.name])
        assert retrying.result(timeout=60) == pytest.approx([expected[images[0].name].score], abs=1e-5)


def test_health_info_page_and_api_description(tiny_scorer):
    model_info = {"model_path": "checkpoints/x", "load_8bit": False}
    with background_server(create_app(tiny_scorer, model_info=model_info)) as url:
        status, info = get(url + "/info")
        assert status == 200
        assert info["model"] == {"kind": "full", "model_folder": str(tiny_scorer.model.load_report.model_folder),
                                 "base_folder": None, "quantization": None, **model_info}
        assert (info["dtype"], info["device"], info["prompt"], info["clamp"]) == ("float32", "cpu", "eval", False)
        assert info["max_batch_size"] == 4 and "api_key" not in info
        from qscorer import __version__

        assert info["qscorer_version"] == __version__
        assert get(url + "/health")[1]["status"] == "ok"
        api = get(url + "/openapi.json")[1]
        body = api["paths"]["/score"]["post"]["requestBody"]["content"]
        assert set(body) == {"multipart/form-data", "application/json"}
        responses = api["paths"]["/score"]["post"]["responses"]
        assert {"200", "400", "401", "413", "415", "422", "503"} <= set(responses)
        assert {"/health", "/info"} <= set(api["paths"])
        import urllib.request

        with urllib.request.urlopen(url + "/") as page:
            html = page.read().decode()
        assert '<script src="static/app.js">' in html
        with urllib.request.urlopen(url + "/static/app.js") as script:
            assert b'fetch("score"' in script.read()


def test_settings_are_checked():
    with pytest.raises(QScorerError, match="max-queue must be at least 1"):
        ServeSettings(max_queue=0)
    with pytest.raises(QScorerError, match="cannot exceed max-queue"):
        ServeSettings(max_queue=8, max_images_per_request=9)
    with pytest.raises(QScorerError, match="max-wait-ms"):
        ServeSettings(max_wait_ms=-1)


def test_client_takes_paths_bytes_and_pil_images(tiny_scorer, images, expected):
    from PIL import Image

    pil_images = [Image.open(path) for path in images[:4]]  # RGB, grey, palette PNGs and a JPEG, in their own modes
    rgba = Image.open(images[0]).convert("RGBA")
    in_process = Scorer.from_model(tiny_scorer.model, tiny_scorer.tokenizer, clamp=False).score([*pil_images, rgba])
    with background_server(create_app(tiny_scorer)) as url:
        client = Client(url + "/")
        assert client.health()["status"] == "ok"
        by_path = client.score(images[:4])
        assert by_path == pytest.approx([expected[path.name].score for path in images[:4]], abs=1e-5)
        assert client.score(images[1].read_bytes()) == pytest.approx([by_path[1]], abs=1e-5)
        records = client.results([*pil_images, rgba])
        assert [record["image"] for record in records] == [f"image_{index}.png" for index in range(5)]
        for record, reference in zip(records, in_process, strict=True):
            assert record["score"] == pytest.approx(reference.score, abs=1e-5)
        with pytest.raises(ServiceError, match=r"422 cannot read image images\[0\] \(image_0\)") as error:
            client.score(b"not an image")
        assert error.value.status == 422
        with pytest.raises(QScorerError, match="expected a path, bytes or a PIL image, got int"):
            client.score([7])
    with pytest.raises(ServiceError, match="cannot reach") as error:
        Client(url, timeout=5).score(images[0])
    assert error.value.status == 0


def test_uploads_are_decoded_in_worker_threads_not_on_the_event_loop(tiny_scorer, images, expected, monkeypatch):
    import threading

    from qscorer.serving import uploads

    threads = []

    def recording_load_image(source, **options):
        threads.append(threading.current_thread().name)
        return load_image(source, **options)

    load_image = uploads.load_image
    monkeypatch.setattr(uploads, "load_image", recording_load_image)
    with background_server(create_app(tiny_scorer, ServeSettings(decode_threads=2))) as url:
        scores = Client(url).score(images[:3])
    assert scores == pytest.approx([expected[path.name].score for path in images[:3]], abs=1e-5)
    assert len(threads) == 3 and all(name.startswith("qscorer-decode") for name in threads)


def test_results_are_those_of_qscorer_score_json(tiny_folder, tiny_scorer, images, capsys):
    from qscorer.cli import main

    common = ["score", "--model-path", str(tiny_folder), "--device", "cpu", "--dtype", "float32", "--no-clamp"]
    assert main([*common, "--format", "json", *map(str, images[:4])]) == 0
    cli_records = json.loads(capsys.readouterr().out)
    with background_server(create_app(tiny_scorer)) as url:
        records = Client(url).results(images[:4])
    for record, cli_record in zip(records, cli_records, strict=True):
        assert set(record) == set(cli_record) | {"probs"}
        assert record["image"] == cli_record["image"].rsplit("/", 1)[-1]
        assert record["score"] == pytest.approx(cli_record["score"], abs=1e-5)
        assert record["logits"] == pytest.approx(cli_record["logits"], abs=1e-5)
        assert record["token_id"] == cli_record["token_id"]
