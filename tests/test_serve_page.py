"""The web page at ``/`` in a real headless browser (Debian's chromium driven by Playwright): choose two images,
wait for the scores, compare them with the API's, drop a third, and keep a screenshot."""

import shutil

import pytest
import torch
from serving_helpers import post_files, service_checkpoint, serving_or_skip, write_images

from qscorer.scoring import Scorer

serving = serving_or_skip()
ServeSettings, background_server, create_app = serving.ServeSettings, serving.background_server, serving.create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the test extra) is not installed")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium with apt-get)"
)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    folder = service_checkpoint(tmp_path_factory.mktemp("tiny_page"), seed=9)
    scorer = Scorer(folder, device="cpu", dtype="float32", batch_size=4)
    with torch.no_grad():
        scorer.model.deepmlp.output_layer.bias += 3.0  # mid-scale scores, so the page shows unclamped values
    return scorer


def test_page_scores_chosen_and_dropped_images_like_the_api(scorer, tmp_path):
    paths = write_images(tmp_path, 3, seed=11)
    with background_server(create_app(scorer, ServeSettings(api_key="page-key"))) as url:
        api = {}
        for request in (paths[:2], paths[2:]):  # the page's two requests, so the batches are the same
            code, body, _ = post_files(url + "/score", [(path.name, path.read_bytes()) for path in request],
                                       {"Authorization": "Bearer page-key"})
            assert code == 200
            api.update({record["image"]: record for record in body["results"]})
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.goto(url + "/")
                page.wait_for_selector("#api-key", state="visible")
                page.fill("#api-key", "page-key")
                page.dispatch_event("#api-key", "change")
                page.wait_for_function("document.getElementById('model').textContent.includes('cpu')")
                page.set_input_files("#files", [str(path) for path in paths[:2]])
                page.wait_for_function("document.querySelectorAll('#results .card').length === 2")
                cards = page.eval_on_selector_all(
                    "#results .card",
                    "cards => cards.map(card => ({image: card.dataset.image, score: card.dataset.score,"
                    " text: card.querySelector('.score').textContent, bars: card.querySelectorAll('.fill').length,"
                    " loaded: card.querySelector('img').complete && card.querySelector('img').naturalWidth > 0}))",
                )
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
                assert [card["image"] for card in cards] == [paths[0].name, paths[1].name]
                for card in cards:
                    assert float(card["score"]) == api[card["image"]]["score"]
                    assert card["text"] == f"{api[card['image']]['score']:.3f}"
                    assert card["bars"] == 5 and card["loaded"]
                drawn = page.eval_on_selector_all(  # the bars as rendered: filled fraction of each track
                    "#results .card:first-child .fill",
                    "fills => fills.map(f => f.getBoundingClientRect().width"
                    " / f.parentElement.getBoundingClientRect().width)",
                )
                probs = list(api[paths[0].name]["probs"].values())
                assert drawn == pytest.approx([p / sum(probs) for p in probs], abs=0.01)

                page.evaluate(
                    """async ([name, bytes]) => {
                        const transfer = new DataTransfer();
                        transfer.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"}));
                        document.getElementById("drop").dispatchEvent(
                            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
                    }""",
                    [paths[2].name, list(paths[2].read_bytes())],
                )
                page.wait_for_function(f"document.querySelector('#results .card')?.dataset.image === '{paths[2].name}'")
                dropped = page.get_attribute("#results .card", "data-score")
                assert float(dropped) == api[paths[2].name]["score"]
            finally:
                browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000
