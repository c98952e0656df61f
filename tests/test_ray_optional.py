"""Ray stays optional: nothing but ``--engine ray`` imports it, and without it that engine says how to install it."""

import json
import subprocess
import sys

from qscorer.cli import main


def test_the_cli_scoring_and_inference_do_not_import_ray():
    code = (
        "import sys, qscorer.cli, qscorer.scoring, qscorer.inference, qscorer.ray_data\n"
        "from qscorer.cli import build_parser\n"
        "build_parser('infer').parse_args(['infer', '--model-path', 'm', '--meta-paths', 'a', '--root-dir', '.'])\n"
        "print(sorted(name for name in sys.modules if name == 'ray' or name.startswith('ray.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.replace("'", '"')) == []


def test_the_ray_engine_without_ray_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps([{"id": "a", "image": "a.png"}]))
    arguments = ["infer", "--model-path", str(tmp_path), "--meta-paths", str(meta), "--root-dir", str(tmp_path)]
    assert main([*arguments, "--save-dir", str(tmp_path / "out"), "--engine", "ray"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("qscorer infer: error: the Ray engine needs Ray Data (")
    assert error.endswith("pip install 'qscorer[ray]'") and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_ray_options_need_the_ray_engine(tmp_path, capsys):
    arguments = ["infer", "--model-path", str(tmp_path), "--meta-paths", "m.json", "--root-dir", str(tmp_path)]
    assert main([*arguments, "--num-actors", "2", "--ray-address", "auto"]) == 2
    assert capsys.readouterr().err.strip() == (
        "qscorer infer: error: --ray-address, --num-actors only apply with --engine ray"
    )
