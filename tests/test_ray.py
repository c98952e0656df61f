"""The Ray Data path (the ``ray`` extra): decoding in CPU tasks, scoring in actors, ``qscorer infer --engine ray``
with the default engine's files, resume and a scoring actor killed mid-run. Ray runs locally on 2 CPUs."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_inference import make_dataset
from tiny import save_tiny_checkpoint

from qscorer.cli import main
from qscorer.constants import SCORE_TOKENS_REPORT_ORDER
from qscorer.data import load_image, process_images
from qscorer.inference import load_test_records, read_json_lines
from qscorer.ray_data import BatchScorer, decode_batch
from qscorer.scoring import Scorer

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'qscorer[ray]'")
pytest.importorskip("ray.data", reason="the ray extra is not installed: pip install 'qscorer[ray]'")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SCORE_COLUMNS = ["score", *SCORE_TOKENS_REPORT_ORDER, "token_id"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs with a small object store, shut down after the module. Ray gives its node 30 s to
    start, which a loaded machine can exceed: one more try then."""
    for attempt in range(2):
        try:
            ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False)
            break
        except Exception as error:  # Ray raises a bare Exception for this
            ray.shutdown()
            if attempt or "timed out during startup" not in str(error):
                raise
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ray"), seed=43)


def image_names(meta: Path) -> list[str]:
    return [record.image for record in load_test_records(meta)]


def infer(model, metas, root, save_dir, *extra) -> int:
    """``qscorer infer`` of one meta or a list of metas, on CPU in float32."""
    metas = [str(meta) for meta in (metas if isinstance(metas, list) else [metas])]
    arguments = ["infer", "--model-path", str(model), "--meta-paths", *metas, "--root-dir", str(root)]
    return main([*arguments, "--save-dir", str(save_dir), "--device", "cpu", "--dtype", "float32", *extra])


def assert_same_records(actual: list[dict], expected: list[dict], tolerance: float = 1e-5) -> None:
    """Same ids in the same order, same keys, same failure records, scores / logits / probs within ``tolerance``."""
    assert [line["id"] for line in actual] == [line["id"] for line in expected]
    for got, want in zip(actual, expected, strict=True):
        assert set(got) == set(want)
        if "error" in want:
            assert got == want
            continue
        assert (got["image"], got["gt_score"]) == (want["image"], want["gt_score"])
        assert got["score"] == pytest.approx(want["score"], abs=tolerance)
        assert list(got["logits"]) == list(want["logits"])
        assert got["logits"] == pytest.approx(want["logits"], abs=tolerance)
        if "probs" in want:
            assert got["probs"] == pytest.approx(want["probs"], rel=1e-4, abs=1e-9)


def numpy_batch(table) -> dict:
    """The numpy batch Ray Data hands the next ``map_batches`` step for a table."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(table).to_batch_format("numpy")


def test_decode_batch_reads_bytes_paths_and_arrays(tmp_path):
    names = image_names(make_dataset(tmp_path, 3))
    paths = [str(tmp_path / name) for name in names]
    expected = process_images([load_image(path) for path in paths]).numpy()
    arrays = np.empty(3, dtype=object)
    arrays[:] = [np.asarray(load_image(path)) for path in paths]
    for column, root in [(np.array(names, dtype=object), tmp_path), (arrays, None)]:
        table = decode_batch({"image": column, "id": np.array(["a", "b", "c"])}, root_dir=root)
        assert table.column("error").to_pylist() == [None, None, None]
        assert table.schema.field("error").type == pa.string()
        assert np.array_equal(numpy_batch(table)["pixels"], expected)
        assert ("image" in table.column_names) == (root is not None) and table.column("id").to_pylist() == list("abc")

    data = np.array([Path(paths[1]).read_bytes(), b"junk", None], dtype=object)
    batch = {"bytes": data, "path": np.array(["p1", "p2", "p3"])}
    table = decode_batch(batch, image_column="bytes", name_column="path")
    pixels = numpy_batch(table)["pixels"]
    assert np.array_equal(pixels[0], expected[1]) and not pixels[1].any()
    errors = table.column("error").to_pylist()
    assert errors[0] is None and errors[1] == "cannot read image p2: not a recognised image format"
    assert errors[2] == "p3: expected image bytes, a path or an array, got NoneType"
    assert table.column_names == ["path", "pixels", "error"]

    odd = np.empty(2, dtype=object)
    odd[:] = [np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4), np.float32)]
    errors = decode_batch({"image": odd}).column("error").to_pylist()
    assert errors == [
        "image array: expected a uint8 array [H, W] or [H, W, 1|3|4], got uint8 [4, 4, 2]",
        "image array: expected a uint8 array [H, W] or [H, W, 1|3|4], got float32 [4, 4]",
    ]
    missing = decode_batch({"image": np.array(["nowhere.png"])}, root_dir=tmp_path).column("error").to_pylist()
    assert missing == [f"image file not found: {tmp_path / 'nowhere.png'}"]
    with pytest.raises(Exception, match="no column 'img' in the dataset"):
        decode_batch({"image": np.array(["a.png"])}, image_column="img")


def test_batch_scorer_adds_typed_score_columns(tiny_folder, tmp_path):
    names = image_names(make_dataset(tmp_path, 4, broken={2}))
    decoded = decode_batch({"image": np.array(names, dtype=object)}, root_dir=tmp_path)
    scored = BatchScorer(tiny_folder, device="cpu", dtype="float32", with_prob=True)(numpy_batch(decoded))
    probs = ["prob_" + token for token in SCORE_TOKENS_REPORT_ORDER]
    assert scored.column_names == ["image", *SCORE_COLUMNS, *probs, "error"]
    assert scored.schema.field("token_id").type == pa.int64() and scored.schema.field("score").type == pa.float64()
    rows = scored.to_pylist()
    assert rows[2]["error"].startswith("cannot read image") and names[2] in rows[2]["error"]
    assert all(rows[2][column] is None for column in SCORE_COLUMNS + probs)

    reference = Scorer(tiny_folder, device="cpu", dtype="float32").score([tmp_path / name for name in names])
    for row, result in zip(rows, reference, strict=True):
        if result.error is not None:
            continue
        assert row["error"] is None and row["token_id"] == result.token_id
        assert row["score"] == pytest.approx(result.score, abs=1e-5)
        logits = [row[token] for token in SCORE_TOKENS_REPORT_ORDER]
        assert logits == pytest.approx(list(result.logits.values()), abs=1e-5)
        assert [row[column] for column in probs] == pytest.approx(list(result.probs.values()), rel=1e-4)


@pytest.fixture(scope="module")
def example():
    """``examples/ray_score_parquet.py`` as a module."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import ray_score_parquet
    finally:
        sys.path.pop(0)
    return ray_score_parquet


def test_the_example_scores_parquet_image_bytes_into_parquet(local_ray, example, tiny_folder, tmp_path):
    names = image_names(make_dataset(tmp_path, 5, broken={3}))
    keys = [f"k{index}" for index in range(5)]
    source = pa.table({"key": keys, "jpeg": [(tmp_path / name).read_bytes() for name in names]})
    pq.write_table(source, tmp_path / "images.parquet")
    arguments = [str(tmp_path / "images.parquet"), "--image-column", "jpeg", "--output", str(tmp_path / "scores")]
    model = ["--model-path", str(tiny_folder), "--dtype", "float32", "--batch-size", "2"]
    assert example.main([*arguments, *model]) == 0
    table = pq.read_table(tmp_path / "scores")
    assert sorted(table.column_names) == sorted(["key", *SCORE_COLUMNS, "error"])
    assert table.schema.field("error").type == pa.string()
    rows = {row["key"]: row for row in table.to_pylist()}
    assert sorted(rows) == keys
    assert rows["k3"]["error"] == "cannot read image bytes: not a recognised image format"
    assert rows["k3"]["score"] is None

    reference = Scorer(tiny_folder, device="cpu", dtype="float32").score([tmp_path / name for name in names])
    for key, result in zip(keys, reference, strict=True):
        if result.error is None:
            assert rows[key]["score"] == pytest.approx(result.score, abs=1e-5)
            assert rows[key]["token_id"] == result.token_id
    assert example.main([str(tmp_path / "images.parquet"), "--output", str(tmp_path / "x"), *model]) == 2


def test_the_example_reads_folders_parquet_and_metas(local_ray, example, tmp_path):
    meta = make_dataset(tmp_path, 3)
    names = image_names(meta)
    pq.write_table(pa.table({"image": [b"x"], "n": [1]}), tmp_path / "one.parquet")

    def read(*arguments):
        args = example.parse_arguments([*arguments, "--output", "o", "--model-path", "m"])
        dataset, columns = example.read_input(ray, args)
        return sorted(dataset.take_all(), key=str), columns

    rows, columns = read(str(tmp_path / "images"))
    assert columns == {"image_column": "bytes", "name_column": "path"}
    assert [Path(row["path"]).name for row in rows] == ["img_000.png", "img_001.png", "img_002.png"]
    assert rows[0]["bytes"] == (tmp_path / names[0]).read_bytes()
    rows, columns = read(str(meta), "--root-dir", str(tmp_path))
    assert columns == {"image_column": "image"} and rows[0]["image"] == str(tmp_path / names[0])
    assert (rows[0]["id"], rows[0]["gt_score"]) == ("img_000->0.0", 0.0)
    assert read(str(tmp_path / "one.parquet"))[0] == [{"image": b"x", "n": 1}]
    assert example.main([str(tmp_path / "nothing"), "--output", "o", "--model-path", "m"]) == 2


def test_an_empty_actor_pool_is_refused_before_ray_starts(tmp_path, capsys):
    empty_pool = ["--engine", "ray", "--num-actors", "0"]
    assert infer(tmp_path, tmp_path / "meta.json", tmp_path, tmp_path / "out", *empty_pool) == 2
    assert capsys.readouterr().err.strip() == (
        "qscorer infer: error: actors and batch size must be at least 1, got 0 actors, batch 16"
    )


def test_a_model_the_actors_cannot_load_is_a_one_line_error(local_ray, tmp_path, capsys):
    meta = make_dataset(tmp_path, 1)
    assert infer(tmp_path / "no_model", meta, tmp_path, tmp_path / "out", "--engine", "ray") == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("qscorer infer: error: ") and str(tmp_path / "no_model") in last_line


def test_ray_engine_reproduces_the_original_iqa_eval(local_ray, parity_dir, golden_dir, parity_images_dir, tmp_path):
    golden = read_json_lines(golden_dir / "iqa_eval_lora_bs1.jsonl")
    model = ["--model-base", str(parity_dir / "base"), "--with-prob", "--batch-size", "2"]
    meta = golden_dir / "iqa_eval_test_meta.json"
    for engine in ("torch", "ray"):
        save_dir = tmp_path / engine
        assert infer(parity_dir / "qscorer_lora", meta, parity_images_dir, save_dir, *model, "--engine", engine) == 0
    on_ray = read_json_lines(tmp_path / "ray" / meta.name)
    assert_same_records(on_ray, golden)
    assert_same_records(on_ray, read_json_lines(tmp_path / "torch" / meta.name))


def test_ray_engine_writes_failures_and_resumes_like_the_default_engine(local_ray, tiny_folder, tmp_path):
    metas = [make_dataset(tmp_path, 8, broken={1, 6}), tmp_path / "b_meta.json"]
    metas[1].write_text(json.dumps(json.loads(metas[0].read_text())[::-1][:5]))
    assert infer(tiny_folder, metas, tmp_path, tmp_path / "torch", "--batch-size", "3") == 2
    expected = [read_json_lines(tmp_path / "torch" / meta.name) for meta in metas]

    resumed = tmp_path / "ray"
    resumed.mkdir()
    marked = dict(expected[0][2], score=-1.0)
    part = "".join(json.dumps(line) + "\n" for line in [expected[0][0], expected[0][1], marked])
    (resumed / ".test_meta.json.part0").write_text(part + '{"id": "img_004->0.4", "sc')
    assert infer(tiny_folder, metas, tmp_path, resumed, "--batch-size", "3", "--engine", "ray") == 2
    actual = [read_json_lines(resumed / meta.name) for meta in metas]
    assert actual[0][2] == marked, "a record written before the run was scored again"
    assert_same_records(actual[0][:2] + actual[0][3:], expected[0][:2] + expected[0][3:])
    assert_same_records(actual[1], expected[1])
    assert not list(resumed.glob(".*part*"))


def _descendants_running(marker: str) -> list[int]:
    """Pids of this process's descendants whose command line contains ``marker``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor and ancestor != os.getpid():
            ancestor = parents.get(ancestor)
        if ancestor == os.getpid():
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(pid)
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor's process through /proc")
def test_a_scoring_actor_killed_mid_run_is_replaced_and_no_record_is_lost_or_repeated(local_ray, tiny_folder, tmp_path):
    count = 24
    meta = make_dataset(tmp_path, count)
    assert infer(tiny_folder, meta, tmp_path, tmp_path / "torch", "--batch-size", "2") == 0
    part = tmp_path / "ray" / f".{meta.name}.part0"
    killed, finished = {}, threading.Event()

    def kill_one_actor_mid_run():
        deadline = time.time() + 240
        while time.time() < deadline and not finished.is_set():
            written = part.read_text().count("\n") if part.exists() else 0
            actors = _descendants_running("BatchScorer")
            if "pid" not in killed and written >= 4 and actors:
                os.kill(actors[0], signal.SIGKILL)
                killed.update(pid=actors[0], written=written)
            elif "pid" in killed and set(actors) - {killed["pid"]}:
                killed["replacement"] = (set(actors) - {killed["pid"]}).pop()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_one_actor_mid_run)
    watcher.start()
    try:
        assert infer(tiny_folder, meta, tmp_path, tmp_path / "ray", "--batch-size", "2", "--engine", "ray") == 0
    finally:
        finished.set()
        watcher.join()
    assert killed.get("written", count) < count, f"the actor was not killed mid-run: {killed}"
    assert "replacement" in killed, "no new scoring actor started after the kill"
    actual = read_json_lines(tmp_path / "ray" / meta.name)
    assert len({line["id"] for line in actual}) == count
    assert_same_records(actual, read_json_lines(tmp_path / "torch" / meta.name))
