"""web_demo.py: the Gradio page streams answers from the serving engine, keeps a multi-turn history rendered with
the training chat format, and works in a real browser (headless Debian Chromium through Selenium; skipped with the
reason when Chromium or its driver is absent)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time

import pytest
import torch

from conftest import ROOT
from medtrain.generation import generate_responses
from medtrain.generation import GenerationModelArguments
from medtrain.serving import load_engine

import web_demo

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = ROOT / "outputs" / "screenshots" / "web_demo.png"  # outputs/ is git-ignored
U1, U2 = "I have a fever.", "For how long?"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tiny_chat_model_dir):
    engine, info = load_engine(GenerationModelArguments(model_name_or_path=str(tiny_chat_model_dir)))
    engine.info = info
    yield engine
    engine.shutdown()


def greedy(engine, messages, max_new_tokens: int) -> str:
    return generate_responses(engine.model, engine.tokenizer, engine.chat_format, [messages],
                              max_new_tokens=max_new_tokens, batch_size=1, temperature=0.0)[0]


def test_respond_streams_growing_prefixes_of_the_answer_and_uses_the_history(engine):
    parts = list(web_demo.respond(engine, U1, [], "", 0.0, 1.0, 24))
    answer = greedy(engine, [{"role": "user", "content": U1}], 24)
    assert parts[-1] == answer and len(set(parts)) > 3
    assert all(b.startswith(a) for a, b in zip(parts, parts[1:]))
    # Gradio's history (content as a string or as parts) and a system prompt become the chat's messages
    history = [{"role": "user", "content": U1}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    messages = web_demo.conversation(U2, history, "You are a doctor.")
    assert messages == [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": U1},
                        {"role": "assistant", "content": answer}, {"role": "user", "content": U2}]
    second = list(web_demo.respond(engine, U2, history, "You are a doctor.", 0.0, 1.0, 16))[-1]
    assert second == greedy(engine, messages, 16)


def test_long_history_drops_the_oldest_exchanges_to_fit(engine):
    long = "fever " * 150
    history = [{"role": "user", "content": long}, {"role": "assistant", "content": long}] * 2
    messages = web_demo.conversation(U2, history, "sys")
    ids = web_demo.fit_context(engine, messages, 100)
    assert len(ids) + 100 <= engine.context_length
    assert ids == web_demo.fit_context(engine, [messages[0], messages[-1]], 100)  # both old exchanges went


def _fingerprint(text: str) -> str:
    """Letters and digits only: the page renders the answer as Markdown and hides control characters."""
    return re.sub(r"[\W_]+", "", text)


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="headless browser test needs Debian's chromium and chromium-driver (apt-get install -y "
                           "chromium chromium-driver)")
def test_the_page_in_a_real_browser_streams_a_multi_turn_chat(engine):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = web_demo.build_demo(engine, engine.info, web_demo.DemoArguments(temperature=0.0, max_new_tokens=40), 256)
    demo.queue()
    port = web_demo.free_port("127.0.0.1")
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1200,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120)
        info = wait.until(lambda d: d.find_element(By.ID, "model-info")).text
        assert engine.info["root"] in info and "Adapter:\nnone" in info.replace("  ", "")
        assert "the tokenizer's chat template" in info

        def ask(question: str) -> list[str]:
            """Type the question, press Enter, record the last answer bubble's text as it changes until stable."""
            before = len(driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']"))
            box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea"))
            box.send_keys(question, Keys.ENTER)
            states: list[str] = []
            stable_since, deadline = None, time.monotonic() + 120
            while time.monotonic() < deadline:
                bots = driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")
                text = bots[-1].text if len(bots) > before else ""
                if text and (not states or states[-1] != text):
                    states.append(text)
                    stable_since = time.monotonic()
                elif states and time.monotonic() - stable_since > 3 and not box.get_attribute("disabled"):
                    return states
                time.sleep(0.02)
            raise AssertionError(f"no stable answer to {question!r}; saw {states[-1:]!r}")

        first = greedy(engine, [{"role": "user", "content": U1}], 40)
        states = ask(U1)
        assert _fingerprint(states[-1]) == _fingerprint(first)
        second = greedy(engine, [{"role": "user", "content": U1}, {"role": "assistant", "content": first},
                                 {"role": "user", "content": U2}], 40)
        states2 = ask(U2)  # the second turn is answered with the first exchange as history
        assert _fingerprint(states2[-1]) == _fingerprint(second)
        print(f"browser saw {len(states)} and {len(states2)} distinct states of the two streamed answers")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
    finally:
        driver.quit()
        demo.close()
        shutil.rmtree(profile, ignore_errors=True)
