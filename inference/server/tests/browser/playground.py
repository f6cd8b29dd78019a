"""Drives the playground in headless Chromium through the DevTools protocol (over
--remote-debugging-pipe: the standard library is enough) the way a person uses it: the page
loads, a text-to-image run with live previews, then an edit of an uploaded image with a mask
painted by mouse strokes. Prints a JSON report on stdout; screenshots go to the folder given.

    python3 playground.py CHROMIUM URL IMAGE SCREENSHOT_DIR
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

chromium, url, image, shots = sys.argv[1:5]
os.makedirs(shots, exist_ok=True)

# Chromium reads commands from fd 3 and writes answers and events to fd 4, each message a
# JSON text followed by a NUL byte.
to_browser_r, to_browser_w = os.pipe()
from_browser_r, from_browser_w = os.pipe()


def wire_pipes():
    a, b = os.dup(to_browser_r), os.dup(from_browser_w)
    os.dup2(a, 3)
    os.dup2(b, 4)


profile = tempfile.mkdtemp(prefix="sd35-playground-")
browser = subprocess.Popen(
    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
     "--disable-dev-shm-usage", "--remote-debugging-pipe", "--window-size=1280,1700",
     f"--user-data-dir={profile}", "about:blank"],
    preexec_fn=wire_pipes, close_fds=False,
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.close(to_browser_r)
os.close(from_browser_w)
out = os.fdopen(to_browser_w, "wb", buffering=0)
inp = os.fdopen(from_browser_r, "rb", buffering=0)

pending = b""
next_id = 0
events = []  # every event seen, in order
problems = []  # console errors, uncaught exceptions, error log entries


def read_message():
    global pending
    while b"\0" not in pending:
        chunk = inp.read(65536)
        if not chunk:
            raise RuntimeError("the browser closed its pipe")
        pending += chunk
    raw, pending = pending.split(b"\0", 1)
    return json.loads(raw)


def note(msg):
    method, p = msg.get("method"), msg.get("params", {})
    events.append(method)
    if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        problems.append("console." + p["type"] + ": " + " ".join(
            str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
    elif method == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        problems.append("exception: " + d.get("text", "") + " " +
                        d.get("exception", {}).get("description", ""))
    elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        problems.append("log: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))


def send(method, params=None, session=None):
    global next_id
    next_id += 1
    msg = {"id": next_id, "method": method, "params": params or {}}
    if session:
        msg["sessionId"] = session
    out.write(json.dumps(msg).encode() + b"\0")
    while True:
        reply = read_message()
        if reply.get("id") == next_id:
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})
        note(reply)


def wait_event(method, limit=60):
    deadline = time.time() + limit
    while time.time() < deadline:
        msg = read_message()
        note(msg)
        if msg.get("method") == method:
            return msg
    raise RuntimeError(f"no {method} within {limit} s")


target = send("Target.createTarget", {"url": "about:blank"})["targetId"]
session = send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]


def page(method, params=None):
    return send(method, params, session)


def js(expression):
    r = page("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                  "awaitPromise": True})
    if "exceptionDetails" in r:
        raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
    return r["result"].get("value")


def wait_for(expression, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        if js(expression):
            return
        time.sleep(0.05)
    raise RuntimeError(f"still false after {limit} s: {expression}")


def centre(selector):
    box = js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
             ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2, r.x, r.y,"
             " r.width, r.height]; })()")
    return box


def click(selector):
    x, y = centre(selector)[:2]
    for kind in ("mousePressed", "mouseReleased"):
        page("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                          "clickCount": 1})


def screenshot(name):
    data = page("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
    path = os.path.join(shots, name)
    with open(path, "wb") as f:
        f.write(base64.b64decode(data))
    return path


def type_into(selector, text):
    js(f"document.querySelector({json.dumps(selector)}).value = ''")
    js(f"document.querySelector({json.dumps(selector)}).focus()")
    page("Input.insertText", {"text": text})


report = {}
try:
    for domain in ("Runtime", "Log", "Page", "DOM"):
        page(domain + ".enable")
    page("Page.navigate", {"url": url})
    wait_event("Page.loadEventFired")
    # The served model's description arrives from /v1/models.
    wait_for("document.querySelector('#model b') !== null")
    report["model"] = js("document.getElementById('model').textContent")
    report["defaults"] = js("['width', 'height', 'steps', 'guidance']"
                           ".map((id) => +document.getElementById(id).value)")
    report["loaded_shot"] = screenshot("playground-loaded.png")

    # Text to image: watch the image element for previews before the final image.
    js("""window.__seen = []; new MutationObserver((records) => {
            for (const r of records) {
              if (r.target.tagName === 'IMG' && r.attributeName === 'data-kind')
                window.__seen.push(r.target.dataset.kind);
            }
          }).observe(document.getElementById('images'),
                     {subtree: true, attributes: true, attributeFilter: ['data-kind']})""")
    type_into("#prompt", "a lighthouse on a cliff at dusk")
    for sel, value in (("#width", "48"), ("#height", "32"), ("#steps", "6"), ("#seed", "5"),
                       ("#guidance", "4")):
        type_into(sel, value)
    click("#generate")
    wait_for("document.querySelectorAll('#history li').length === 1")
    report["txt2img_seen"] = js("window.__seen")
    report["txt2img_status"] = js("document.getElementById('status').textContent")
    report["txt2img_image"] = js("document.querySelector('#images img').src.slice(0, 40)")
    report["progress"] = js("document.getElementById('progress').value")
    report["txt2img_shot"] = screenshot("playground-txt2img.png")

    # Edit: upload the image, paint a stroke across it, lower the strength, run.
    click("#mode-edit")
    file_input = page("DOM.querySelector", {
        "nodeId": page("DOM.getDocument")["root"]["nodeId"], "selector": "#image-file"})["nodeId"]
    page("DOM.setFileInputFiles", {"nodeId": file_input, "files": [image]})
    wait_for("!document.getElementById('canvases').hidden && "
             "document.getElementById('mask-canvas').width > 0", 20)
    report["edit_size"] = js("['width', 'height'].map((id) => +document.getElementById(id).value)")
    _, _, x0, y0, w, h = centre("#mask-canvas")
    page("Input.dispatchMouseEvent", {"type": "mousePressed", "x": x0 + w * 0.2,
                                      "y": y0 + h * 0.5, "button": "left", "clickCount": 1})
    for i in range(1, 11):
        page("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x0 + w * (0.2 + 0.06 * i),
                                          "y": y0 + h * 0.5, "button": "left", "buttons": 1})
    page("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": x0 + w * 0.8,
                                      "y": y0 + h * 0.5, "button": "left", "clickCount": 1})
    # Share of the mask's pixels painted by the strokes.
    report["painted"] = js("""(() => {
        const m = document.getElementById('mask-canvas');
        const d = m.getContext('2d').getImageData(0, 0, m.width, m.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n / (m.width * m.height); })()""")
    js("(() => { const s = document.getElementById('strength'); s.value = '0.8';"
       " s.dispatchEvent(new Event('input')); })()")
    click("#generate")
    wait_for("document.querySelectorAll('#history li').length === 2")
    report["edit_status"] = js("document.getElementById('status').textContent")
    report["edit_entry"] = js("document.querySelector('#history li .params').textContent")
    report["edit_image"] = js("document.querySelector('#images img').src.slice(0, 40)")
    report["edit_shot"] = screenshot("playground-edit.png")
    click("#history li .copy-curl")
    click("#history li .copy-python")
    wait_for("document.querySelector('#history li pre').textContent.length > 0")
    report["python"] = js("document.querySelector('#history li pre').textContent")
    js("document.querySelector('#history li .copy-curl').click()")
    report["curl"] = js("document.querySelector('#history li pre').textContent")
    # What the snippets need beside them: the mask the page sent, and the image it showed.
    report["mask_b64"] = js("""(async () => {
        const a = [...document.querySelectorAll('#history li a')]
          .find((a) => a.download === 'mask.png');
        const bytes = new Uint8Array(await (await fetch(a.href)).arrayBuffer());
        let s = ''; for (const b of bytes) s += String.fromCharCode(b);
        return btoa(s); })()""")
    report["edit_image_b64"] = js("document.querySelector('#images img').src.split(',')[1]")
finally:
    report["problems"] = problems
    try:
        report["last_status"] = js("document.getElementById('status').textContent")
        report["files"] = js("document.getElementById('image-file').files.length")
    except Exception as e:  # the page itself is gone
        report["last_status"] = str(e)
    print(json.dumps(report))
    try:
        send("Browser.close")
    except Exception:
        pass
    browser.wait(timeout=30)
    shutil.rmtree(profile, ignore_errors=True)
