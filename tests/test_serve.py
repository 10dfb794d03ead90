"""`mmdit-flow serve`: the request handler (Studio) with the shipped model, the Gradio page, and the page in a
real browser (headless Chromium driven by playwright)."""

from __future__ import annotations

import importlib.util
import io
import shutil
from urllib.parse import urljoin

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit_flow.pipelines import TextToImagePipeline
from mmdit_flow.pipelines.cli import COMMANDS, main
from mmdit_flow.pipelines.serve import Studio, caption
from tests.train_helpers import free_port

PROMPT = "a red circle in the center"
HAS_GRADIO = importlib.util.find_spec("gradio") is not None
needs_gradio = pytest.mark.skipif(
    not HAS_GRADIO, reason="gradio is not installed (pip install 'mmdit-flow[serve]')"
)


@pytest.fixture(scope="module")
def studio() -> Studio:
    return Studio("shipped:tiny-shapes", device="cpu")


@pytest.fixture(scope="module")
def pipe() -> TextToImagePipeline:
    return TextToImagePipeline.from_pretrained("shipped:tiny-shapes", device="cpu", dtype=torch.float32)


def test_serve_is_a_command():
    assert COMMANDS["serve"] == "mmdit_flow.pipelines.serve"


def test_generate_returns_the_pipelines_image_and_records_its_parameters(studio, pipe):
    steps_seen = []
    result = studio.generate(
        PROMPT,
        "blue",
        steps=2,
        guidance=3.0,
        seed=7,
        sampler="heun",
        preview=lambda i, n, im: steps_seen.append((i, n)),
    )
    assert result.error is None
    expected = pipe(
        PROMPT, negative_prompt="blue", steps=2, guidance=3.0, seed=7, sampler="heun", progress=False
    )
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(expected))
    p = result.parameters
    assert {k: p[k] for k in ("prompt", "negative", "model", "steps", "guidance", "seed", "sampler")} == {
        "prompt": PROMPT,
        "negative": "blue",
        "model": "shipped:tiny-shapes",
        "steps": 2,
        "guidance": 3.0,
        "seed": 7,
        "sampler": "heun",
    }
    assert (p["height"], p["width"]) == (64, 64)  # the model's defaults, recorded as used
    assert steps_seen == [(1, 2), (2, 2)]
    assert studio.gallery[0] == (result.image, p)
    assert "seed 7" in caption(p) and "negative: blue" in caption(p)


def test_the_preview_of_the_last_euler_step_is_the_image(studio):
    """x0 = x_t - t v at the last step (t = 0) is the final latents: the preview equals the result."""
    previews = []
    result = studio.generate(PROMPT, steps=3, seed=1, preview=lambda i, n, im: previews.append(im))
    assert len(previews) == 3
    np.testing.assert_array_equal(np.asarray(previews[-1]), np.asarray(result.image))


def test_a_blank_seed_is_drawn_and_recorded_so_the_image_can_be_made_again(studio):
    first = studio.generate(PROMPT, steps=2, seed=None)
    again = studio.generate(PROMPT, steps=2, seed=first.parameters["seed"])
    np.testing.assert_array_equal(np.asarray(first.image), np.asarray(again.image))


def test_img2img_and_inpainting_through_the_handler(studio, pipe):
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = studio.generate(PROMPT, steps=2, seed=3, image=source, mask=mask, strength=0.8)
    assert result.error is None
    expected = pipe(PROMPT, steps=2, seed=3, image=source, mask_image=mask, strength=0.8, progress=False)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(expected))
    assert (result.parameters["edit"], result.parameters["strength"]) == ("inpaint", 0.8)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt"),
        ({"steps": 0}, "steps must be positive"),
        ({"steps": "many"}, "steps must be a number"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"height": 33}, "height must be a positive multiple of 8"),  # the pipeline's ValueError
        ({"sampler": "bogus"}, "unknown sampler 'bogus'"),
        ({"mask": Image.new("L", (64, 64))}, "upload the image to inpaint"),
        ({"image": Image.new("RGB", (64, 64)), "strength": 0}, "strength"),
        ({"model": "/no/such/model"}, "/no/such/model"),
    ],
)
def test_bad_input_returns_the_message_not_an_exception(studio, fields, message):
    before = len(studio.gallery)
    result = studio.generate(**{"prompt": PROMPT, "steps": 2, **fields})
    assert result.image is None and result.parameters is None
    assert message in result.error
    assert len(studio.gallery) == before
    assert studio.generate(PROMPT, steps=2, seed=0).error is None  # and the next request is served


def test_picking_another_model_replaces_the_one_in_memory():
    loads = []

    def loader(model, device):
        loads.append(model)
        return TextToImagePipeline.from_pretrained(model, device="cpu", dtype=torch.float32)

    studio = Studio("shipped:tiny-shapes", loader=loader)
    result = studio.generate(PROMPT, model="shipped:tiny-shapes-turbo", steps=2, seed=0)
    assert result.error is None and result.parameters["model"] == "shipped:tiny-shapes-turbo"
    studio.generate(PROMPT, model="shipped:tiny-shapes-turbo", steps=2, seed=0)
    assert loads == ["shipped:tiny-shapes", "shipped:tiny-shapes-turbo"]


def test_serve_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio":
            raise ModuleNotFoundError("No module named 'gradio'", name="gradio")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    assert main(["serve"]) == 2
    assert "pip install 'mmdit-flow[serve]'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(studio):
    """The page served on localhost from a thread of this process."""
    if not HAS_GRADIO:
        pytest.skip("gradio is not installed (pip install 'mmdit-flow[serve]')")
    from mmdit_flow.pipelines.serve import build_app, launch

    app = build_app(studio)
    port = free_port()
    launch(app, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    app.close()


@needs_gradio
def test_the_page_streams_each_steps_preview_then_the_image(server, studio):
    """Through the page's queued endpoint (the Gradio client): a preview per step, then the image, its
    parameters and the gallery."""
    from gradio_client import Client

    client = Client(server, verbose=False)
    fields = (PROMPT, "", "shipped:tiny-shapes", 3, 4.0, 11, 64, 64, "euler", None, None, 0.6)
    job = client.submit(*fields, api_name="/generate")
    image, status, parameters, gallery = job.result()
    statuses = [out[1] for out in job.outputs()]
    assert statuses[1:3] == ["step 1 / 3", "step 2 / 3"] and len(statuses) == 4  # the third: the image
    assert status.startswith("done in") and parameters["seed"] == 11 and parameters["steps"] == 3
    assert "seed 11" in gallery[0]["caption"]
    with Image.open(image) as img:  # lossless: the pixels the pipeline made
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), np.asarray(studio.gallery[0][0]))
    _, status, parameters, _ = client.predict(
        *(PROMPT, "", "shipped:tiny-shapes", 0, *fields[4:]), api_name="/generate"
    )
    assert status == "**Error:** steps must be positive, got 0" and parameters is None


@needs_gradio
def test_requests_at_once_are_queued_and_all_served(server, studio):
    from gradio_client import Client

    client = Client(server, verbose=False)
    before = len(studio.gallery)
    seeds = (21, 22, 23)
    jobs = [
        client.submit(
            PROMPT,
            "",
            "shipped:tiny-shapes",
            2,
            4.0,
            seed,
            64,
            64,
            "euler",
            None,
            None,
            0.6,
            api_name="/generate",
        )
        for seed in seeds
    ]
    assert sorted(job.result()[2]["seed"] for job in jobs) == list(seeds)
    assert (
        sorted(p["seed"] for _, p in studio.gallery[:3]) == list(seeds) and len(studio.gallery) == before + 3
    )


@needs_gradio
def test_the_page_inpaints_uploaded_files(server, pipe, tmp_path):
    """An image and a mask uploaded to the page (RGBA PNG files, as browsers send them) are inpainted as the
    pipeline inpaints them."""
    from gradio_client import Client, handle_file

    source = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((255, 255, 255, 255), (16, 16, 48, 48))
    source.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    client = Client(server, verbose=False)
    png, status, parameters, _ = client.predict(
        PROMPT,
        "",
        "shipped:tiny-shapes",
        2,
        4.0,
        9,
        64,
        64,
        "euler",
        handle_file(str(tmp_path / "in.png")),
        handle_file(str(tmp_path / "mask.png")),
        0.9,
        api_name="/generate",
    )
    assert status.startswith("done in") and (parameters["edit"], parameters["strength"]) == ("inpaint", 0.9)
    expected = pipe(PROMPT, steps=2, seed=9, image=source, mask_image=mask, strength=0.9, progress=False)
    with Image.open(png) as shown:
        np.testing.assert_array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HAS_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
@pytest.mark.skipif(not HAS_PLAYWRIGHT, reason="playwright is not installed (pip install playwright)")
def test_the_page_generates_in_a_real_browser(server, studio, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server, timeout=60_000)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#steps input").fill("4")
            page.locator("#seed input").fill("5")
            page.locator("#generate").click()
            page.locator("#status").get_by_text("done in").wait_for(timeout=60_000)
            img = page.locator("#result img")
            expect(img).to_be_visible(timeout=30_000)
            # decode() loads the (lazy) image and fails for a broken one
            assert img.evaluate("e => e.decode().then(() => [e.naturalWidth, e.naturalHeight])") == [64, 64]
            expect(page.locator("#gallery")).to_contain_text(
                "a red circle in the center | 4 steps, guidance 4.0, seed 5", timeout=30_000
            )
            src = img.get_attribute("src")
            with Image.open(io.BytesIO(page.request.get(urljoin(server + "/", src)).body())) as shown:
                np.testing.assert_array_equal(
                    np.asarray(shown.convert("RGB")), np.asarray(studio.gallery[0][0])
                )
            assert studio.gallery[0][1]["seed"] == 5
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            # bad input is answered on the page, and the server keeps serving
            page.locator("#steps input").fill("0")
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("steps must be positive, got 0", timeout=30_000)
        finally:
            browser.close()
