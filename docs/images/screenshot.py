"""A page's screenshot with headless Chromium, for docs/sweeps.md#dashboards.

    python docs/images/screenshot.py URL OUT.png [--cookie NAME=VALUE] [--wait S] [--size 1400x900] [--script JS]

Chromium's own --screenshot cannot send a cookie, which the Ray dashboard needs for its token
(ray-authentication-token, as its login dialog sets it), so this drives Chromium through the
DevTools protocol: the cookie is set, the page loaded, given --wait seconds to draw its charts,
and captured; --script's JavaScript, when given, runs in the page once it has drawn (to store the
page's own settings and reload it, say), and the page gets --wait seconds again before the capture.
Needs chromium (apt-get install chromium) and aiohttp (in the 'dashboard' extra).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from urllib.parse import urlsplit


async def capture(
    url: str, out: str, cookies: list[str], wait: float, width: int, height: int, script: str | None = None
) -> None:
    import aiohttp

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}"]
            + [f"--window-size={width},{height}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = _devtools_port(profile)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as answer:
                page = next(t for t in json.loads(answer.read()) if t["type"] == "page")
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    ids = itertools.count(1)

                    async def call(method: str, **params):
                        number = next(ids)
                        await ws.send_json({"id": number, "method": method, "params": params})
                        async for message in ws:
                            reply = json.loads(message.data)
                            if reply.get("id") == number:
                                if "error" in reply:
                                    raise RuntimeError(f"{method}: {reply['error']}")
                                return reply.get("result", {})

                    await call(
                        "Emulation.setDeviceMetricsOverride",
                        width=width,
                        height=height,
                        deviceScaleFactor=1,
                        mobile=False,
                    )
                    host = urlsplit(url).hostname
                    for cookie in cookies:
                        name, _, value = cookie.partition("=")
                        await call("Network.setCookie", name=name, value=value, domain=host, path="/")
                    await call("Page.enable")
                    await call("Page.navigate", url=url)
                    await asyncio.sleep(wait)  # the dashboards fetch their data and draw after the page loads
                    if script is not None:
                        await call("Runtime.evaluate", expression=script, awaitPromise=True)
                        await asyncio.sleep(wait)
                    shot = await call("Page.captureScreenshot", format="png")
            with open(out, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        finally:
            browser.terminate()
            browser.wait()


def _devtools_port(profile: str, timeout: float = 30) -> int:
    """The port Chromium chose (--remote-debugging-port=0), from the file it writes into its profile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"{profile}/DevToolsActivePort") as f:
                return int(f.readline())
        except (OSError, ValueError):
            time.sleep(0.2)
    raise SystemExit("chromium did not start its DevTools server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--cookie", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--wait", type=float, default=15, metavar="S", help="seconds to draw (default: %(default)s)")
    parser.add_argument("--size", default="1400x900", metavar="WxH", help="window size (default: %(default)s)")
    parser.add_argument("--script", metavar="JS", help="JavaScript to run once the page has drawn; then --wait again")
    args = parser.parse_args()
    width, height = (int(n) for n in args.size.split("x"))
    asyncio.run(capture(args.url, args.out, args.cookie, args.wait, width, height, args.script))


if __name__ == "__main__":
    main()
