"""A picture of the chat page of a running `astrai-ds serve`: open it in headless Chromium, ask the questions one
after the other (greedy: temperature 0), wait for each answer to finish streaming, and save a PNG of the page.

Needs the Debian packages chromium and chromium-driver (scripts/install_cluster_deps.sh installs them as root) and
the selenium package (the project's test extra: `source scripts/env.sh test`); Chinese text shows as boxes unless a
CJK font is installed (`apt-get install fonts-wqy-zenhei`, or fonts-noto-cjk).

  .venv/bin/astrai-ds serve --model runs/real/models/tuned --dtype fp32 --port 8000 &
  .venv/bin/python scripts/chat_screenshot.py --url http://127.0.0.1:8000 --out chat.png \
      "What is the capital of France?" "Context: [1] ... Question: ..."
"""

from __future__ import annotations

import argparse
import shutil
import sys

ANSWERS_DONE = ("const a = document.querySelectorAll('#log .assistant'); "
                "return a.length >= arguments[0] && a[arguments[0] - 1].dataset.done === 'true'")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("questions", nargs="+", metavar="QUESTION", help="asked in this order, in one conversation")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (its chat page is at /)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--size", default="1000,760", metavar="W,H", help="the window, in pixels")
    p.add_argument("--system", default="", help="a system prompt typed into the page's field")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for one answer")
    args = p.parse_args(argv)
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        print("error: chromium and chromedriver are needed (the Debian packages chromium and chromium-driver)",
              file=sys.stderr)
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.size}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(args.url.rstrip("/") + "/")
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        if args.system:
            browser.find_element(By.ID, "system").send_keys(args.system)
        for n, question in enumerate(args.questions, 1):
            browser.find_element(By.ID, "input").send_keys(question + Keys.ENTER)
            WebDriverWait(browser, args.timeout, poll_frequency=0.1).until(
                lambda d: d.execute_script(ANSWERS_DONE, n))
        if not browser.save_screenshot(args.out):
            print(f"error: no screenshot written to {args.out}", file=sys.stderr)
            return 1
        print(args.out)
        return 0
    finally:
        browser.quit()


if __name__ == "__main__":
    sys.exit(main())
