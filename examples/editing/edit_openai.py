"""Edits an image with the official OpenAI Python client against sd35-server, unchanged but for
`base_url`: once plainly, once streamed with live previews. Our sampling fields (`strength`,
`seed`, `steps`, `guidance_scale`, `negative_prompt`) go in `extra_body`.

    pip install openai
    python examples/editing/edit_openai.py IMAGE [MASK]

MASK is a PNG of the image's size, fully transparent where to repaint (OpenAI's masks); without
it the whole image is edited. SD35_URL is the server (default http://localhost:8080),
SD35_TOKEN its bearer token when it has one. Writes edited.png and edited-streamed.png, and a
preview-N.png for each preview the stream sends.
"""

import base64
import os
import sys

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("SD35_URL", "http://localhost:8080") + "/v1",
                api_key=os.environ.get("SD35_TOKEN", "unused"))
image_path = sys.argv[1]
mask_path = sys.argv[2] if len(sys.argv) > 2 else None
extra = {"strength": 0.8, "seed": 7}


def files():
    out = {"image": open(image_path, "rb")}
    if mask_path:
        out["mask"] = open(mask_path, "rb")
    return out


result = client.images.edit(prompt="a lighthouse in a snow storm, oil painting",
                            extra_body=extra, **files())
with open("edited.png", "wb") as f:
    f.write(base64.b64decode(result.data[0].b64_json))
print("edited.png")

stream = client.images.edit(prompt="a lighthouse in a snow storm, oil painting", stream=True,
                            partial_images=2, extra_body=extra, **files())
for event in stream:
    if event.type == "image_edit.partial_image":
        name = f"preview-{event.partial_image_index}.png"
    else:
        name = "edited-streamed.png"
    with open(name, "wb") as f:
        f.write(base64.b64decode(event.b64_json))
    print(name)
