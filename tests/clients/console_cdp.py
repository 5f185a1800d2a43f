"""Drives the console page in headless Chromium over the DevTools protocol.

usage: console_cdp.py DEVTOOLS_PORT PAGE_URL SCREENSHOT_PATH [--watch]

Opens the page, waits until the command's first line is shown, types a line
into the input as a user would (the text, then Enter), waits for the
command's answer, keeps a screenshot, clicks Disconnect and waits for the
page to show the close. Prints one JSON line: the output rows and the close
row's text.

With --watch (a shared command, which reads no input): waits until the
command's output ends and the page shows the close the server sent, keeps
a screenshot, and prints the same JSON line.
"""

import asyncio
import base64
import json
import sys
import urllib.parse
import urllib.request

import websockets

PATIENCE = 20.0


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method, **params):
        self.next_id += 1
        mine = self.next_id
        await self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == mine:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def value(self, expression):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def until(self, expression, what):
        """Polls `expression` until it is truthy (the DOM announces nothing)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        while loop.time() < deadline:
            value = await self.value(expression)
            if value:
                return value
            await asyncio.sleep(0.05)
        rows = await self.value("document.getElementById('log').innerText")
        raise TimeoutError(f"no {what} within {PATIENCE} s; the log shows:\n{rows}")


OUT = "[...document.querySelectorAll('.row.out .text')].map((e) => e.textContent)"


CLOSED = ("[...document.querySelectorAll('.row.event .text')].map((e) => e.textContent)"
          ".find((t) => t.startsWith('closed,'))")


async def main(port, url, screenshot, mode=None):
    new = f"http://127.0.0.1:{port}/json/new?{urllib.parse.quote(url, safe='')}"
    target = json.load(urllib.request.urlopen(urllib.request.Request(new, method="PUT")))
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
        page = Page(ws)
        if mode == "--watch":
            closed = await page.until(CLOSED, "close")
            shot = await page.call("Page.captureScreenshot", format="png")
            with open(screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            print(json.dumps({"out": await page.value(OUT), "closed": closed}))
            return
        await page.until(f"{OUT}.includes('ready') && document.getElementById('status').textContent === 'open'",
                         "first line")
        await page.value("document.getElementById('input').focus()")
        await page.call("Input.insertText", text="hello from the browser")
        for kind in ("keyDown", "keyUp"):
            await page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                            windowsVirtualKeyCode=13, text="\r" if kind == "keyDown" else "")
        await page.until(f"{OUT}.includes('you said: hello from the browser')", "answer")
        shot = await page.call("Page.captureScreenshot", format="png")
        with open(screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        await page.value("document.getElementById('toggle').click()")
        closed = await page.until(CLOSED, "close")
        print(json.dumps({"out": await page.value(OUT), "closed": closed}))


asyncio.run(main(*sys.argv[1:5]))
