"""The browser client (serving/static) in headless Chromium against a live server.

Chromium's fake devices stand in for the user: a WAV file of speech as the
microphone and its test pattern as the camera. The page streams both to
``python -m launch.serve`` (random parameters, 2 slots) and plays the model's
speech back; the test reads ``window.interactionStats`` and saves a screenshot
to ``$INTERACTION_TEST_ARTIFACTS/browser.png`` (default ``artifacts/browser.png``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from data_pipeline import wav
from tests.helpers import save_checkpoint

ROOT = pathlib.Path(__file__).parent.parent
INSTALL = "install them with: apt-get install -y chromium chromium-driver (.ci/run does, as root)"
WORDS = "hello there, can you hear me? what is two plus three? tell me about the weather today."


def browser_paths() -> tuple[str, str]:
  chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
  driver = shutil.which("chromedriver")
  if chromium is None or driver is None:
    missing = " and ".join(name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None)
    pytest.skip(f"{missing} not found; {INSTALL}")
  return chromium, driver


def speech_wav(path: pathlib.Path) -> pathlib.Path:
  """16-bit mono PCM speech: espeak-ng when installed, else a voiced buzz with a syllable rhythm."""
  if shutil.which("espeak-ng"):
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-s", "160", "-w", str(raw), WORDS], check=True, capture_output=True, timeout=30)
    x, rate = wav.read_wav(raw)
  else:
    rate = 16000
    t = np.arange(3 * rate) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)  # a gliding pitch
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))  # harmonics of a glottal buzz
    syllables = np.clip(np.sin(2 * np.pi * 3 * t), 0, None) ** 0.5  # 3 syllables a second
    x = 0.3 * voiced * syllables / np.abs(voiced).max()
  gap = np.zeros(rate // 4, np.float32)  # a pause before the file loops
  wav.write_wav(path, np.concatenate([x, gap]), rate)
  return path


class Server:
  """``python -m launch.serve`` on a free port; its output is collected by a thread."""

  def __init__(self, checkpoint: pathlib.Path, token: str):
    self.token, self.lines = token, []
    env = dict(os.environ, INTERACTION_SERVER_TOKEN=token, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "launch.serve", "--checkpoint", str(checkpoint), "--port", "0", "--slots", "2"]
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.ready = threading.Event()
    self.port = None
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line.rstrip())
      found = re.match(r"ready: ws://[^:]+:(\d+)/", line)
      if found:
        self.port = int(found.group(1))
        self.ready.set()
    self.ready.set()  # exited: wait_ready reports it

  def wait_ready(self, timeout: float) -> int:
    if not self.ready.wait(timeout) or self.port is None:
      raise AssertionError(f"the server did not get ready in {timeout:.0f} s:\n" + self.output())
    return self.port

  def stats(self) -> dict:
    request = urllib.request.Request(
      f"http://127.0.0.1:{self.port}/v1/stats", headers={"Authorization": f"Bearer {self.token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
      return json.load(response)

  def output(self) -> str:
    return "\n".join(self.lines[-40:])

  def stop(self) -> int | None:
    """SIGTERM (the server drains its sessions and exits 0), then SIGKILL if it hangs."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(15)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(5)
    return self.proc.returncode


def start_browser(chromium: str, driver: str, fake_audio: pathlib.Path, profile: pathlib.Path):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for arg in (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
    f"--user-data-dir={profile}",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    f"--use-file-for-fake-audio-capture={fake_audio}",
    "--autoplay-policy=no-user-gesture-required",
  ):
    options.add_argument(arg)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def artifact(name: str) -> pathlib.Path:
  folder = pathlib.Path(os.environ.get("INTERACTION_TEST_ARTIFACTS") or ROOT / "artifacts")
  folder.mkdir(parents=True, exist_ok=True)
  return folder / name


def console(browser) -> str:
  try:
    return "\n".join(f"{e['level']} {e['message']}" for e in browser.get_log("browser")[-30:])
  except Exception as e:  # noqa: BLE001  (diagnostics only)
    return f"(no console log: {e})"


def wait_for(browser, what: str, done, timeout: float) -> dict:
  """Polls ``window.interactionStats`` until ``done(stats)``; fails with the stats and the console."""
  deadline = time.monotonic() + timeout
  while True:
    stats = browser.execute_script("return window.interactionStats || null")
    if stats is not None and done(stats):
      return stats
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {stats}\nconsole:\n{console(browser)}")
    time.sleep(0.2)


def talk(browser, server: Server, shot: pathlib.Path) -> None:
  """One session from the Start button to the Stop button, then one started by ?autostart=1 at the device's rate."""
  from selenium.webdriver.common.by import By

  page = f"http://127.0.0.1:{server.port}/?token={server.token}"
  browser.get(page + "&temperature=1&seed=7")  # sampled, not greedy: random parameters then emit text often
  wait_for(browser, "the page to load", lambda s: True, 10)
  browser.find_element(By.ID, "start").click()
  stats = wait_for(
    browser,
    "15 ticks with model audio and text, and our speech heard by the server",
    lambda s: (
      s["audioFrames"] >= 15
      and s["ticks"] >= 15
      and s["textChars"] > 0
      and s["userSpeakingTicks"] > 0
      and s["videoSent"] > 0
    ),
    30,
  )
  # user_speaking comes from the server: it received our PCM16 and found speech energy in it. A JPEG it
  # could not decode would have come back as a bad_video error event.
  assert stats["errors"] == 0, f"error events: {stats}\n{console(browser)}"
  assert stats["textTicks"] == stats["ticks"], f"every tick event carries a string text field: {stats}"
  assert stats["userAudioTicks"] > 0 and stats["audioSent"] > 0, stats
  assert stats["session"] is not None and not stats["closed"], stats
  assert stats["contextRate"] == 16000 and stats["capture"] == "AudioWorklet", stats
  assert browser.find_element(By.ID, "transcript").text.strip()
  assert "tick" in browser.find_element(By.ID, "timing").text
  assert browser.find_element(By.ID, "status").text.startswith("live")

  # Typed text goes in as a text event; the server accepts it.
  browser.find_element(By.ID, "text").send_keys("what is 2+3")
  browser.find_element(By.ID, "send").click()
  ticks = stats["ticks"]
  stats = wait_for(browser, "two more ticks", lambda s: s["ticks"] >= ticks + 2, 10)
  assert stats["errors"] == 0, f"error events: {stats}\n{console(browser)}"
  assert "you: what is 2+3" in browser.find_element(By.ID, "transcript").text

  # The tool list, fed two synthetic events (a model with random parameters rarely opens a call).
  browser.execute_script(
    """
    session.onMessage(JSON.stringify({type: "tool_call", call: 900, kind: "tool", request: "add 2 3", turn: 1}));
    session.onMessage(JSON.stringify({type: "tool_result", call: 900, kind: "tool", text: "5", done: true,
                                      error: null, turn: 2}));
    """
  )
  assert "#900 tool (turn 1): add 2 3 \u2192 5" in browser.find_element(By.ID, "tools").text

  seen = server.stats()
  assert seen["clients"] == 1 and seen["sessions"] == 1, seen
  assert not [k for k in seen if k.startswith("error_")], f"the server refused frames: {seen}"
  browser.save_screenshot(str(shot))

  # Stop: session.end, the server closes with 1000, the page says so.
  browser.find_element(By.ID, "stop").click()
  stats = wait_for(browser, "the socket to close", lambda s: s["closed"], 10)
  assert stats["closeCode"] == 1000 and stats["closeReason"] == "session ended by client", stats
  assert "closed: 1000" in browser.find_element(By.ID, "closed").text
  assert not browser.find_element(By.ID, "start").get_property("disabled")

  # Again in the freed slot, at the audio device's own rate: the page resamples to 16 kHz itself.
  browser.get(page + "&autostart=1&rate=native")
  stats = wait_for(browser, "5 ticks hearing our speech", lambda s: s["ticks"] >= 5 and s["userSpeakingTicks"] > 0, 20)
  assert stats["errors"] == 0, f"error events: {stats}\n{console(browser)}"
  assert stats["contextRate"] > 0 and stats["samplesSent"] > 0, stats
  assert server.stats()["sessions"] == 2


def test_browser_client_talks_to_the_live_server(tmp_path):
  pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
  chromium, driver = browser_paths()
  fake_audio = speech_wav(tmp_path / "speech.wav")
  server = Server(save_checkpoint(tmp_path), secrets.token_urlsafe(16))
  browser = None
  shot = artifact("browser.png")
  try:
    browser = start_browser(chromium, driver, fake_audio, tmp_path / "profile")  # starts while the server compiles
    server.wait_ready(60)
    talk(browser, server, shot)
  except BaseException:
    if browser is not None:
      try:
        browser.save_screenshot(str(shot))  # the page as it failed
      except Exception as e:  # noqa: BLE001  (keep the original failure)
        print(f"no screenshot: {e}")
    print(f"server output:\n{server.output()}")
    raise
  finally:
    try:
      if browser is not None:
        browser.quit()
    finally:
      code = server.stop()
  assert code == 0, f"the server exited with {code}:\n{server.output()}"
